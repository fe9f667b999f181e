"""``cerana-dataset-export``: write a dataset as a tar (optionally gzip/zstd) to a file or standard output.

The command-line twin of the ``cerana.platform.dataset_export`` module (same code): it
finds a live node holding the dataset through Consul (``CONSUL_HTTP_ADDR``,
``CERANA_KV_PREFIX``) and streams from that node's data server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ansible_collections.cerana.platform.plugins.module_utils import _store
from ansible_collections.cerana.platform.plugins.module_utils._dataexport import (
    ExportError,
    export_dataset,
    locate,
    stream_export,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cerana-dataset-export", description=__doc__.splitlines()[0])
    parser.add_argument("id", help="the dataset id")
    parser.add_argument("-o", "--output", default="-", help="the archive to write; - (default) is standard output")
    parser.add_argument("-z", "--compression", choices=["none", "gzip", "zstd"], default="none")
    parser.add_argument("--node", help="read from this node (id or hostname)")
    parser.add_argument("--data-port", type=int, default=7811)
    parser.add_argument("--timeout", type=float, default=300.0, help="idle timeout in seconds")
    args = parser.parse_args(argv)
    try:
        store = _store.Store(_store.ConnectionSettings.from_env())
        if args.output == "-":
            if sys.stdout.isatty():
                print("cerana-dataset-export: refusing to write a tar to a terminal; use -o FILE", file=sys.stderr)
                return 2
            _ds, _node, client, info = locate(store, args.id, node=args.node, port=args.data_port, timeout=args.timeout)
            man = stream_export(client, args.id, sys.stdout.buffer, compression=args.compression)
            sys.stdout.buffer.flush()
            if man.digest != info["digest"]:
                raise ExportError(
                    "the exported content has digest %s, the node's copy %s" % (man.digest, info["digest"])
                )
            print(man.digest, file=sys.stderr)
        else:
            result = export_dataset(
                store, args.id, args.output, compression=args.compression, node=args.node,
                port=args.data_port, timeout=args.timeout,
            )  # fmt: skip
            print(result["digest"], file=sys.stderr)
    except _store.StoreError as e:
        print(f"cerana-dataset-export: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

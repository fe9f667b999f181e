"""``cerana-node-tick``: parse flags, load Settings, configure logging, run the loop until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence

from ansible_collections.cerana.platform.plugins.module_utils import _store
from cerana_daemon.config import add_setting_flags
from cerana_daemon.logs import configure_logging
from cerana_daemon.signals import stop_on_signals
from cerana_nodetick import __version__, collect, loop
from cerana_nodetick.config import CONSUL_HELP, ENV_PREFIX, ConfigError, Settings

log = logging.getLogger("cerana_nodetick")

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cerana-node-tick",
        description="Heartbeat this node into the platform's Consul KV: nodes/<id>, heartbeats/datasets/*/<id>, "
        "heartbeats/bundles/*/<id> and history/nodes/<id>/. Settings come from flags, then CERANA_NODE_TICK_* "
        "environment variables (and CONSUL_HTTP_*), then the TOML file, then the defaults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-c", "--config", metavar="FILE",
        help="TOML settings file (env CERANA_NODE_TICK_CONFIG; default /etc/cerana/node-tick.toml if present)",
    )  # fmt: skip
    add_setting_flags(parser, Settings, ENV_PREFIX, skip=("consul",))
    parser.add_argument("--consul-address", dest="consul_address", metavar="URL", help=CONSUL_HELP["address"])
    parser.add_argument("--consul-timeout", dest="consul_timeout", metavar="SECONDS", help=CONSUL_HELP["timeout"])
    parser.add_argument("--kv-prefix", dest="kv_prefix", metavar="PREFIX", help=CONSUL_HELP["prefix"])
    return parser


def main(argv: Sequence[str] | None = None, *, stop: threading.Event | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    try:
        settings = Settings.load(args, path=config_path)
        try:
            node_id = collect.read_machine_id(settings.machine_id_file)
        except ValueError as e:
            raise ConfigError("machine_id_file", str(settings.machine_id_file), str(e)) from None
        store = _store.Store(settings.consul)
    except ConfigError as e:
        print(f"cerana-node-tick: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except _store.StoreError as e:
        print(f"cerana-node-tick: invalid setting consul: {e}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    log.debug("settings: %s", settings.redacted())

    stop = stop or threading.Event()
    stop_on_signals(stop)
    loop.run(settings, node_id, store=store, stop=stop)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

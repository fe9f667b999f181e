"""The Consul connection of the ``cerana`` commands that read the cluster (``plan``, ``status``).

Consul is reached as by the ``consul`` CLI and the daemons: ``CONSUL_HTTP_ADDR``,
``CONSUL_HTTP_TOKEN`` (no flag: it would show in ``ps``), ``CONSUL_HTTP_SSL``,
``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``
and ``CERANA_KV_PREFIX``; ``--consul-address``, ``--consul-timeout`` and ``--kv-prefix``
override them.
"""

from __future__ import annotations

import argparse


def seconds(value: str) -> float:
    n = float(value)
    if not n >= 0:
        raise argparse.ArgumentTypeError("must be a number of seconds >= 0, got %s" % value)
    return n


def add_consul_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--consul-address", metavar="URL", help="Consul HTTP address (default: $CONSUL_HTTP_ADDR)")
    parser.add_argument(
        "--consul-timeout", type=seconds, metavar="SECONDS", help="Consul request timeout (default: 10)"
    )
    parser.add_argument("--kv-prefix", metavar="PREFIX", help="KV prefix (default: $CERANA_KV_PREFIX or cerana)")


def store_from_args(args: argparse.Namespace):
    """A Store for the flags and environment; raises _store.Invalid on a malformed setting."""
    from ansible_collections.cerana.platform.plugins.module_utils._store import ConnectionSettings, Store

    settings = ConnectionSettings.from_env(
        address=args.consul_address, prefix=args.kv_prefix, timeout=args.consul_timeout
    )
    return Store(settings)

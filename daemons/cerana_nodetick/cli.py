"""``cerana-node-tick``: parse flags, load Settings, configure logging, run the loop until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from ansible_collections.cerana.platform.plugins.module_utils import _store
from cerana_nodetick import __version__, collect, loop
from cerana_nodetick.config import CONSUL_HELP, ConfigError, Settings

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
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        if field.name == "consul":
            continue
        default = getattr(defaults, field.name)
        shown = ",".join(f"{k}={v}" for k, v in default.items()) if isinstance(default, dict) else default
        if isinstance(default, tuple):
            shown = ",".join(default)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            metavar=field.name.split("_")[-1].upper(),
            help=f"{field.metadata['help']} (default: {shown!s} ; env CERANA_NODE_TICK_{field.name.upper()})",
        )
    parser.add_argument("--consul-address", dest="consul_address", metavar="URL", help=CONSUL_HELP["address"])
    parser.add_argument("--consul-timeout", dest="consul_timeout", metavar="SECONDS", help=CONSUL_HELP["timeout"])
    parser.add_argument("--kv-prefix", dest="kv_prefix", metavar="PREFIX", help=CONSUL_HELP["prefix"])
    return parser


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # requests/urllib3 would log every retry of every connection during an outage
    logging.getLogger("urllib3").setLevel(logging.ERROR)


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

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    loop.run(settings, node_id, store=store, stop=stop)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

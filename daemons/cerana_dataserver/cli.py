"""``cerana-dataserver``: parse flags, load Settings, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence

from cerana_daemon.config import add_setting_flags
from cerana_daemon.logs import configure_logging
from cerana_daemon.signals import stop_on_signals
from cerana_dataserver import __version__
from cerana_dataserver.config import ENV_PREFIX, ConfigError, Settings
from cerana_dataserver.server import make_server

log = logging.getLogger("cerana_dataserver")

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cerana-dataserver",
        description="Serve this node's datasets (<data_dir>/datasets/<id>/) over HTTP, and receive imports "
        "and replicas into it. Settings come from flags, then CERANA_DATASERVER_* environment variables, "
        "then the TOML file, then the defaults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-c", "--config", metavar="FILE",
        help="TOML settings file (env CERANA_DATASERVER_CONFIG; default /etc/cerana/dataserver.toml if present)",
    )  # fmt: skip
    add_setting_flags(parser, Settings, ENV_PREFIX)
    return parser


def main(argv: Sequence[str] | None = None, *, stop: threading.Event | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    try:
        settings = Settings.load(args, path=config_path)
    except ConfigError as e:
        print(f"cerana-dataserver: {e}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level)
    try:
        server = make_server(settings)
    except OSError as e:
        print(f"cerana-dataserver: cannot serve on {settings.address}:{settings.port}: {e}", file=sys.stderr)
        return 1
    stop = stop or threading.Event()
    stop_on_signals(stop)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    log.info("serving %s on %s:%d", settings.data_dir, settings.address, settings.port)
    stop.wait()
    server.shutdown()
    server.server_close()
    log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

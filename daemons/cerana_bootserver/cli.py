"""``cerana-bootserver``: the cluster's DHCP server (leases shared through Consul).

Every setting can come from a TOML file (``--config``), the environment
(``CERANA_BOOTSERVER_<SETTING>``, Consul through ``CONSUL_HTTP_*``) or a flag; flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys

from cerana_bootserver import __version__
from cerana_bootserver.boot import BootServices, BootSettings, consul_view
from cerana_bootserver.config import ConfigError, Settings
from cerana_bootserver.server import serve
from cerana_daemon import logs as daemon_logs

log = logging.getLogger("cerana_bootserver")


def configure_logging(level, fmt):
    # tftpy logs every refused request as an error
    daemon_logs.configure_logging(level, fmt, quiet=() if level.upper() == "DEBUG" else ("tftpy",))
    # Two lines per DHCP exchange: skip what no format of ours shows (the Python logging HOWTO,
    # "Optimization"): the caller's file and line, thread and process ids. Halves a line's cost.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None


def parser():
    p = argparse.ArgumentParser(prog="cerana-bootserver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument("--config", help="TOML settings file (also CERANA_BOOTSERVER_CONFIG)")
    for f in dataclasses.fields(Settings):
        if f.name == "consul":
            continue
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind if kind in (int, float) else str,
                       help=_field_doc(f.name))  # fmt: skip
    return p


def _field_doc(name):
    """The docstring under a Settings field (read from the source, for --help)."""
    import inspect

    try:
        lines = inspect.getsource(Settings).splitlines()
    except (OSError, TypeError):
        return None
    for i, line in enumerate(lines):
        if line.strip().startswith(name + ":") and i + 1 < len(lines):
            doc = lines[i + 1].strip()
            if doc.startswith('"""'):
                return doc.strip('"').replace("%", "%%")
    return None


def main(argv=None):
    args = vars(parser().parse_args(argv))
    try:
        settings = Settings.load(flags=args)
        configure_logging(settings.log_level, settings.log_format)
        settings = settings.with_server_address()
    except ConfigError as e:
        print("cerana-bootserver: %s" % e, file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(settings))
    except OSError as e:
        log.error("cannot serve on %s: %s", settings.interface, e)
        return 1
    except ValueError as e:  # a setting the boot media refuse (boot file name, kernel argument)
        print("cerana-bootserver: %s" % e, file=sys.stderr)
        return 2
    return 0


async def _run(settings):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    media = None
    if settings.media == "on":
        boot = BootSettings.from_settings(settings)
        media = BootServices(boot, consul_view(boot, settings.consul)).start()
    try:
        await serve(settings, stop)
    finally:
        if media is not None:
            media.stop()

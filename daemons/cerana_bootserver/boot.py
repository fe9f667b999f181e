"""The boot media services (TFTP + HTTP) of cerana-bootserver, and their settings.

:class:`BootSettings` lists the settings these services need. Until they are fields of
``config.Settings``, :meth:`BootSettings.from_settings` reads any it finds there and
takes the defaults below for the rest. :class:`BootServices` prepares the TFTP root,
starts both servers on daemon threads and stops them. :func:`boot_policy` builds the
:class:`pxe.BootPolicy` the DHCP handler passes to :func:`pxe.decide`.

``python -m cerana_bootserver.boot`` runs the two servers alone (tests, the lab, and
until ``cli.py`` starts them next to the DHCP server).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading

from cerana_bootserver import images as img
from cerana_bootserver import ipxe, pxe
from cerana_bootserver.config import Settings as _DEFAULTS
from cerana_bootserver.tftp import TftpService
from cerana_bootserver.web import WebContext, WebThread

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BootSettings:
    """The settings of the boot media services; their defaults are the daemon's (``config.Settings``)."""

    server_address: str
    """This server's address (URLs in scripts, siaddr). Settings.server_address."""
    next_server: str = _DEFAULTS.next_server
    """TFTP server handed to PXE ROMs; empty: this server. Settings.next_server."""
    bios_boot_file: str = _DEFAULTS.bios_boot_file
    efi_boot_file: str = _DEFAULTS.efi_boot_file
    pool: str = _DEFAULTS.pool
    ipxe_dir: str = _DEFAULTS.ipxe_dir
    """Where the iPXE binaries come from (Debian package ``ipxe``); copied into tftp_root at start."""
    tftp_root: str = _DEFAULTS.tftp_root
    """Directory served over TFTP (read-only)."""
    tftp_address: str = _DEFAULTS.tftp_address
    tftp_port: int = _DEFAULTS.tftp_port
    tftp_timeout: float = _DEFAULTS.tftp_timeout
    """Seconds before tftpy resends a block (also the longest stop delay)."""
    http_address: str = _DEFAULTS.http_address
    http_port: int = _DEFAULTS.http_port
    images_dir: str = _DEFAULTS.images_dir
    """Platform images: ``<images_dir>/<name>/{kernel,initrd}``."""
    default_image: str = _DEFAULTS.default_image
    cluster_ips: str = _DEFAULTS.cluster_ips
    """Comma-separated Consul servers for ``cerana.cluster_ips``; empty: Consul's Raft peers, else this server."""
    kernel_console: str = _DEFAULTS.kernel_console
    zfs_config: str = _DEFAULTS.zfs_config
    kernel_args: str = _DEFAULTS.kernel_args
    """Extra kernel arguments, space-separated."""
    boot_refresh: float = _DEFAULTS.boot_refresh
    """Seconds the cluster view (reservations, nodes) is cached between scripts."""

    @classmethod
    def from_settings(cls, settings, **overrides) -> BootSettings:
        values = {}
        for f in dataclasses.fields(cls):
            if hasattr(settings, f.name):
                values[f.name] = getattr(settings, f.name)
        values.update(overrides)
        return cls(**values)

    def script_policy(self) -> ipxe.ScriptPolicy:
        return ipxe.ScriptPolicy(
            http_base=pxe.http_base(self.server_address, self.http_port),
            server_address=self.server_address,
            default_image=self.default_image,
            console=self.kernel_console,
            zfs_config=self.zfs_config,
            extra_args=tuple(self.kernel_args.split()),
        )

    def cluster_ip_list(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.cluster_ips.split(",") if a.strip())


def boot_policy(settings) -> pxe.BootPolicy:
    """The PXE decision policy from ``config.Settings`` (or BootSettings); call once at start."""
    return pxe.BootPolicy.from_values(
        server_address=settings.server_address,
        http_port=getattr(settings, "http_port", 80),
        next_server=getattr(settings, "next_server", ""),
        bios_file=getattr(settings, "bios_boot_file", "undionly.kpxe"),
        efi_file=getattr(settings, "efi_boot_file", "ipxe.efi"),
        ipxe_url=getattr(settings, "ipxe_script_url", None),
    )


class BootServices:
    """TFTP + HTTP. ``view_for(mac)`` supplies the cluster view (default: no cluster state)."""

    def __init__(self, settings: BootSettings, view_for=None):
        self.settings = settings
        self.view_for = view_for or (lambda mac: ipxe.ClusterView())
        self.tftp = None
        self.web = None

    def start(self) -> BootServices:
        s = self.settings
        present = img.prepare_tftp_root(s.ipxe_dir, s.tftp_root)
        log.info("TFTP root %s holds %s", s.tftp_root, ", ".join(present) or "nothing")
        ctx = WebContext(images=img.Images(s.images_dir), tftp_root=s.tftp_root, policy=s.script_policy(),
                         view_for=self.view_for)  # fmt: skip
        self.tftp = TftpService(s.tftp_root, s.tftp_address, s.tftp_port, timeout=s.tftp_timeout).start()
        try:
            self.web = WebThread(ctx, s.http_address, s.http_port)
            if s.http_port == 0:  # tests: the URLs in scripts name the port actually bound
                base = pxe.http_base(s.server_address, self.web.port)
                ctx.policy = dataclasses.replace(ctx.policy, http_base=base)
            self.web.start()
        except BaseException:
            self.tftp.stop()
            raise
        return self

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        if self.tftp is not None:
            self.tftp.stop()


def consul_view(settings: BootSettings, consul_settings):
    """The production ``view_for``: a :class:`cluster.ClusterState` over Consul."""
    from ansible_collections.cerana.platform.plugins.module_utils._store import Store
    from cerana_bootserver.cluster import ClusterState

    state = ClusterState(lambda: Store(consul_settings), pool=settings.pool, cluster_ips=settings.cluster_ip_list(),
                         refresh=settings.boot_refresh)  # fmt: skip
    return state.view_for


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cerana_bootserver.boot", description="TFTP + HTTP boot media only.")
    for f in dataclasses.fields(BootSettings):
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                       required=f.default is dataclasses.MISSING)  # fmt: skip
    p.add_argument("--no-consul", action="store_true", help="serve every MAC as unknown (no cluster state)")
    p.add_argument("--log-level", default="INFO")
    args = vars(p.parse_args(argv))
    no_consul = args.pop("no_consul")
    logging.basicConfig(level=args.pop("log_level").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("tftpy").setLevel(logging.CRITICAL)
    settings = BootSettings(**{k: v for k, v in args.items() if v is not None})
    view_for = None
    if not no_consul:
        from ansible_collections.cerana.platform.plugins.module_utils._store import ConnectionSettings

        view_for = consul_view(settings, ConnectionSettings.from_env())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        services = BootServices(settings, view_for).start()
    except (OSError, ValueError) as e:
        log.error("cannot start the boot services: %s", e)
        return 1
    stop.wait()
    services.stop()
    log.info("boot services stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Settings of cerana-bootserver: defaults < TOML file < environment (CERANA_BOOTSERVER_*) < flags.

The only module that reads ``os.environ`` (Consul settings come from the usual
``CONSUL_HTTP_*`` variables through :meth:`ConnectionSettings.from_env`; a ``[consul]``
table in the file overrides them field by field).
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import os
import socket
import struct
import tomllib

from ansible_collections.cerana.platform.plugins.module_utils._store import ConnectionSettings

ENV_PREFIX = "CERANA_BOOTSERVER_"


class ConfigError(ValueError):
    """A bad setting; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Settings:
    interface: str = ""
    """Interface the DHCP socket is bound to (SO_BINDTODEVICE), e.g. ``mgmt0``. Required."""
    server_address: str = ""
    """This server's address (DHCP server identifier, option 54). Default: the interface's first IPv4 address."""
    bind_address: str = "0.0.0.0"
    """Address the UDP socket binds; 0.0.0.0 is needed to receive broadcasts."""
    port: int = 67
    """UDP port the server listens on (67; tests use a free one)."""
    client_port: int = 68
    """UDP port replies are sent to (68)."""
    broadcast_address: str = "255.255.255.255"
    """Destination of broadcast replies (tests on loopback set 127.0.0.1)."""
    pool: str = "dhcp"
    """KV sub-tree of the lease table (``<pool>/leases``, ``<pool>/macs``)."""
    offer_hold: int = 60
    """Seconds an OFFER holds its address before anyone may take it back."""
    decline_hold: int = 600
    """Seconds an address is quarantined after a client DECLINEd it."""
    clock_skew: int = 5
    """Seconds of clock difference tolerated between servers before another's expired lease is taken over."""
    max_probes: int = 16
    """Occupied candidate addresses probed one by one before one listing of the lease table is read."""
    config_refresh: float = 10.0
    """Seconds between reads of the DHCP configuration (``dhcp/config``)."""
    workers: int = 4
    """Threads that talk to Consul (one request in flight each)."""
    backlog: int = 64
    """Datagrams waiting for a worker beyond which new ones are dropped (overload; clients retransmit)."""
    batch_ops: int = 64
    """Most operations in one Consul transaction when exchanges' writes are batched (1: one exchange each)."""
    stats_interval: float = 10.0
    """Seconds between the log lines that count datagrams, shed load, batched writes (0: none)."""
    peer_interval: float = 1.0
    """Seconds between heartbeats in ``<pool>/servers/``; 0: no owner rule (every server answers every client)."""
    peer_ttl: float = 5.0
    """Seconds a heartbeat counts: a server that stops beating (killed) loses its MACs after this long."""
    peer_fallback: float = 1.0
    """Seconds a client must have been trying (``secs``, or its DISCOVER heard again) before a server that does
    not own its MAC answers it."""
    next_server: str = ""
    """TFTP server for PXE ROMs (siaddr, option 66). Default: this server."""
    bios_boot_file: str = "undionly.kpxe"
    """Boot file for BIOS PXE ROMs (option 93 = 0, or no option 93). Empty: none."""
    efi_boot_file: str = "ipxe.efi"
    """Boot file for x86-64 EFI PXE ROMs (option 93 = 7, 9; UEFI HTTP boot, 16, gets it over HTTP). Empty: none."""
    ipxe_script_url: str = "http://{server}/boot.ipxe"
    """URL handed to iPXE (user class ``iPXE``); ``{server}`` is replaced by the server address, ``{mac}`` by
    the client's MAC (``52-54-00-..``); e.g. ``http://{server}/boot/{mac}.ipxe``. Empty: none."""
    media: str = "on"
    """``on``: also serve boot media (TFTP + HTTP, boot.py); ``off``: DHCP only."""
    ipxe_dir: str = "/usr/lib/ipxe"
    """Where undionly.kpxe and ipxe.efi come from (Debian package ipxe); copied into tftp_root at start."""
    tftp_root: str = "/var/lib/cerana/bootserver/tftp"
    """Directory served read-only over TFTP."""
    tftp_address: str = "0.0.0.0"
    """Address the TFTP socket binds."""
    tftp_port: int = 69
    """UDP port of the TFTP server (69)."""
    tftp_timeout: float = 2.0
    """Seconds before a TFTP block is resent."""
    http_address: str = "0.0.0.0"
    """Address the boot HTTP server binds."""
    http_port: int = 80
    """TCP port of the boot HTTP server (scripts, kernels, initrds)."""
    images_dir: str = "/data/platform"
    """Platform images: ``<images_dir>/<name>/{kernel,initrd}``."""
    default_image: str = "current"
    """Image booted by unknown MACs and by nodes without a ``cerana.boot_image`` label."""
    cluster_ips: str = ""
    """Comma-separated Consul servers for ``cerana.cluster_ips``; empty: Consul's Raft peers, else this server."""
    kernel_console: str = "ttyS0"
    """``console=`` kernel argument; empty: none."""
    zfs_config: str = "auto"
    """``cerana.zfs_config=`` kernel argument; empty: none."""
    kernel_args: str = ""
    """Extra kernel arguments, space-separated."""
    boot_refresh: float = 5.0
    """Seconds the cluster view behind the iPXE scripts is cached."""
    log_level: str = "INFO"
    """Python logging level name."""
    log_format: str = "text"
    """``text`` or ``json``."""
    consul: ConnectionSettings = dataclasses.field(default_factory=ConnectionSettings)
    """How to reach Consul (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, ... and CERANA_KV_PREFIX)."""

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, *, path=None, environ=None, flags=None):
        """Merge the sources, validate once; raises ConfigError naming the key."""
        env = os.environ if environ is None else environ
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        path = flags.pop("config", None) or env.get(ENV_PREFIX + "CONFIG") or path
        values, consul_overrides = {}, {}
        if path:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError("config file %s: %s" % (path, e)) from None
            consul_overrides = data.pop("consul", {}) or {}
            if not isinstance(consul_overrides, dict):
                raise ConfigError("config file %s: [consul] must be a table" % path)
            values.update(data)
        names = {f.name for f in dataclasses.fields(cls) if f.name != "consul"}
        for name in names:
            if ENV_PREFIX + name.upper() in env:
                values[name] = env[ENV_PREFIX + name.upper()]
        values.update(flags)
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError("%s: unknown setting (known: %s)" % (unknown[0], ", ".join(sorted(names))))
        consul_fields = {f.name for f in dataclasses.fields(ConnectionSettings)}
        bad = sorted(set(consul_overrides) - consul_fields)
        if bad:
            raise ConfigError("consul.%s: unknown setting (known: %s)" % (bad[0], ", ".join(sorted(consul_fields))))
        try:
            consul = ConnectionSettings.from_env(env, **consul_overrides)
        except Exception as e:  # Invalid from parse_bool
            raise ConfigError("consul: %s" % e) from None
        return cls._validated(values, consul)

    @classmethod
    def _validated(cls, values, consul):
        out = {"consul": consul}
        for f in dataclasses.fields(cls):
            if f.name == "consul" or f.name not in values:
                continue
            raw = values[f.name]
            kind = type(f.default)
            try:
                if kind is int:
                    out[f.name] = int(raw)
                elif kind is float:
                    out[f.name] = float(raw)
                else:
                    out[f.name] = str(raw)
            except (TypeError, ValueError):
                raise ConfigError("%s: must be a %s, got %r" % (f.name, kind.__name__, raw)) from None
        s = cls(**out)
        if not s.interface:
            raise ConfigError("interface: required (flag --interface or %sINTERFACE)" % ENV_PREFIX)
        for name in ("port", "client_port", "tftp_port", "http_port"):
            if not 0 <= getattr(s, name) <= 65535:
                raise ConfigError("%s: must be 0-65535" % name)
        for name in ("server_address", "next_server", "bind_address", "broadcast_address", "tftp_address",
                     "http_address"):  # fmt: skip
            value = getattr(s, name)
            if value:
                try:
                    ipaddress.IPv4Address(value)
                except ValueError:
                    raise ConfigError("%s: must be an IPv4 address, got %r" % (name, value)) from None
        for name in ("offer_hold", "decline_hold", "max_probes", "workers", "backlog", "batch_ops"):
            if getattr(s, name) < 1:
                raise ConfigError("%s: must be at least 1" % name)
        if s.batch_ops > 64:
            raise ConfigError("batch_ops: Consul takes at most 64 operations in a transaction")
        for name in ("peer_interval", "peer_fallback"):
            if getattr(s, name) < 0:
                raise ConfigError("%s: must not be negative" % name)
        if s.peer_interval > 0 and s.peer_ttl <= s.peer_interval:
            raise ConfigError("peer_ttl: must be longer than peer_interval (%s s)" % s.peer_interval)
        if s.log_format not in ("text", "json"):
            raise ConfigError("log_format: must be text or json")
        if s.media not in ("on", "off"):
            raise ConfigError("media: must be on or off")
        return s

    def with_server_address(self):
        """The settings with ``server_address`` filled in from the interface when empty."""
        if self.server_address:
            return self
        addr = interface_address(self.interface)
        if addr is None:
            raise ConfigError("server_address: %s has no IPv4 address; set server_address" % self.interface)
        return dataclasses.replace(self, server_address=addr)


def interface_address(name):
    """The first IPv4 address of interface ``name`` (SIOCGIFADDR), or None."""
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])

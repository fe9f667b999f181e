"""PXE and iPXE boot decisions (pure): which boot file or URL a DHCP client is handed.

No I/O, clock or logging. The DHCP handler calls :func:`decide` with what it parsed from
the request (:meth:`ClientInfo.from_packet`) and a :class:`BootPolicy` built once from the
settings, and copies the returned :class:`BootOffer` into its reply (``siaddr``, ``file``,
options 66/67 and, for UEFI HTTP boot, option 60).

The chain (each step is one DHCP exchange)::

    PXE ROM (BIOS, option 93 = 0)      --TFTP undionly.kpxe-->  iPXE --HTTP /boot/<mac>.ipxe--> kernel + initrd
    PXE ROM (UEFI x86-64, 93 = 7 or 9) --TFTP ipxe.efi------->  iPXE --HTTP ...
    UEFI HTTP boot (93 = 16)           --HTTP ipxe.efi------->  iPXE --HTTP ...
    iPXE (option 77 user class "iPXE", e.g. QEMU's NIC ROMs)    ------HTTP /boot/<mac>.ipxe

Differences from the original bootserver (spec section 9): a plain PXE ROM (no option 77)
gets a boot file chosen by its architecture (the original gave it none), and iPXE gets a
per-MAC script URL instead of one shared script.

References: RFC 2132 9.4/9.5 (options 66, 67), RFC 3004 (option 77), RFC 4578 2.1 (option
93) and IANA's "Processor Architecture Types" registry (the HTTP boot values).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import urllib.parse

from cerana_bootserver import dhcp

# RFC 4578 2.1 / IANA Processor Architecture Types
ARCH_BIOS = 0  # Intel x86PC
ARCH_EFI_IA32 = 6
ARCH_EFI_BC = 7  # EFI BC: x86-64 in practice (OVMF, most firmware)
ARCH_EFI_X86_64 = 9
ARCH_EFI_ARM32 = 10
ARCH_EFI_ARM64 = 11
ARCH_EFI_X86_64_HTTP = 16

# arch -> (kind, which policy file). Debian's ``ipxe`` package ships undionly.kpxe (BIOS)
# and ipxe.efi (x86-64 EFI) only; 32-bit and ARM EFI clients get nothing rather than a
# binary they cannot run.
ARCH_TABLE = {
    ARCH_BIOS: ("bios", "bios"),
    ARCH_EFI_BC: ("efi", "efi"),
    ARCH_EFI_X86_64: ("efi", "efi"),
    ARCH_EFI_X86_64_HTTP: ("http", "efi"),
}

IPXE_USER_CLASS = b"iPXE"
PXE_VENDOR_PREFIX = "PXEClient"
HTTP_VENDOR_CLASS = b"HTTPClient"  # RFC-less UEFI convention: the reply must echo it in option 60
SCRIPT_PATH = "/boot/{mac}.ipxe"

_FILE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class ClientInfo:
    """What the boot decision needs from a DHCP request."""

    mac: str
    arches: tuple[int, ...] = ()
    """Option 93, in the client's order (empty when absent)."""
    user_classes: tuple[bytes, ...] = ()
    """Option 77 instances (iPXE sends ``iPXE``)."""
    vendor_class: str = ""
    """Option 60 (``PXEClient:Arch:00000:UNDI:002001``, ``HTTPClient:...``)."""

    @classmethod
    def from_packet(cls, packet: dhcp.Packet) -> ClientInfo:
        """From a parsed request; a malformed option counts as absent (it never raises)."""

        def safe(getter):
            try:
                return getter()
            except dhcp.CodecError:
                return None

        return cls(
            mac=packet.mac,
            arches=tuple(safe(lambda: packet.client_arch) or ()),
            user_classes=tuple(safe(lambda: packet.user_classes) or ()),
            vendor_class=safe(lambda: packet.vendor_class) or "",
        )

    @property
    def is_ipxe(self) -> bool:
        return any(c.rstrip(b"\0") == IPXE_USER_CLASS for c in self.user_classes)


@dataclasses.dataclass(frozen=True)
class BootPolicy:
    """Where boot files live; built once from the settings (:meth:`from_values`)."""

    next_server: ipaddress.IPv4Address
    """TFTP server for PXE ROMs (siaddr, option 66)."""
    http_base: str
    """``http://<address>[:<port>]`` of the boot HTTP server, no trailing slash."""
    bios_file: str | None = "undionly.kpxe"
    efi_file: str | None = "ipxe.efi"
    ipxe_url: str | None = None
    """URL for iPXE clients; ``{mac}`` becomes the MAC (``52-54-00-..``). None: :meth:`script_url`;
    empty: iPXE clients get no boot file."""

    @classmethod
    def from_values(cls, *, server_address, http_port=80, http_address="", next_server="",
                    bios_file="undionly.kpxe", efi_file="ipxe.efi", ipxe_url=None):  # fmt: skip
        """From settings values; empty strings mean "this server" / "none"."""
        nxt = ipaddress.IPv4Address(next_server or server_address)
        host = http_address or server_address
        for name in (bios_file, efi_file):
            if name and not _FILE_NAME.match(name):
                raise ValueError("boot file %r: only letters, digits, '.', '_' and '-' (it is a TFTP name)" % name)
        return cls(
            next_server=nxt,
            http_base=http_base(host, http_port),
            bios_file=bios_file or None,
            efi_file=efi_file or None,
            ipxe_url=None if ipxe_url is None else ipxe_url.replace("{server}", server_address),
        )

    def script_url(self, mac: str) -> str:
        """The per-node iPXE script URL (``http://<server>:<port>/boot/<mac-with-hyphens>.ipxe``)."""
        return self.http_base + SCRIPT_PATH.format(mac=url_mac(mac))


def url_mac(mac: str) -> str:
    """The MAC as it appears in URLs: ``52-54-00-12-34-56``. Not colons: iPXE's URI parser
    (1.0.0+git-2019, Debian 12) takes everything before the first ':' as the scheme, so a
    relative ``/boot/52:54:...`` fails with "Operation not supported"."""
    return urllib.parse.quote(mac.lower().replace(":", "-"), safe="-")


def http_base(host: str, port: int) -> str:
    return "http://%s" % host if port == 80 else "http://%s:%d" % (host, port)


@dataclasses.dataclass(frozen=True)
class BootOffer:
    """What to put in the reply. ``file`` is also the BOOTP ``file`` field (at most 128 octets)."""

    kind: str  # ipxe | bios | efi | http
    siaddr: ipaddress.IPv4Address
    file: str
    options: tuple[tuple[int, bytes], ...]

    @property
    def file_field(self) -> bytes:
        """The BOOTP ``file`` field: the name if it fits in 128 octets, else empty (option 67 carries it)."""
        raw = self.file.encode()
        return raw if len(raw) < 128 else b""


def decide(client: ClientInfo, policy: BootPolicy) -> BootOffer | None:
    """The boot hand-off for ``client``, or None when it is not a netboot client (or cannot be served).

    1. iPXE (user class ``iPXE``): the per-MAC script URL over HTTP;
    2. option 93: the first architecture of the client's list that :data:`ARCH_TABLE` knows;
    3. a ``PXEClient`` vendor class without option 93 (old ROMs): BIOS.
    """
    zero = ipaddress.IPv4Address(0)
    if client.is_ipxe:
        if policy.ipxe_url == "":
            return None
        url = (
            policy.script_url(client.mac)
            if policy.ipxe_url is None
            else policy.ipxe_url.replace("{mac}", url_mac(client.mac))
        )
        return BootOffer("ipxe", zero, url, ((dhcp.BOOTFILE_NAME, url.encode()),))
    kind = which = None
    for arch in client.arches:
        if arch in ARCH_TABLE:
            kind, which = ARCH_TABLE[arch]
            break
    else:
        if client.arches or not client.vendor_class.startswith(PXE_VENDOR_PREFIX):
            return None
        kind, which = "bios", "bios"
    name = policy.bios_file if which == "bios" else policy.efi_file
    if not name:
        return None
    if kind == "http":
        url = "%s/%s" % (policy.http_base, name)
        return BootOffer(
            "http", zero, url, ((dhcp.VENDOR_CLASS, HTTP_VENDOR_CLASS), (dhcp.BOOTFILE_NAME, url.encode()))
        )
    nxt = policy.next_server
    return BootOffer(kind, nxt, name, ((dhcp.TFTP_SERVER_NAME, str(nxt).encode()), (dhcp.BOOTFILE_NAME, name.encode())))

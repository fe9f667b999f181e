"""Per-node iPXE scripts (pure): cluster view + MAC -> boot plan -> script text.

No I/O, clock or logging. :func:`plan` decides what a MAC boots; :func:`render` writes
the script. The web server feeds :func:`plan` a :class:`ClusterView` read from Consul
(``dhcp/config`` reservations, ``nodes/``, the MAC's lease) and the images on disk.

A MAC is *known* when a DHCP reservation or a live Node record maps to it (a Node maps
to a MAC when one of its addresses is the MAC's reserved or leased address, or its
``cerana.mgmt_mac`` label names it). A known node boots its *boot target*, the Node label
``cerana.boot_image``: an image name, or ``local`` (leave iPXE, the firmware tries the
next boot device); without the label, or when that image is missing, the default image.
An unknown MAC boots the default image. Either way the kernel gets the cluster join
parameters of spec section 10.1 (``cerana.cluster_ips`` = the Consul servers).
"""

from __future__ import annotations

import dataclasses
import re

BOOT_IMAGE_LABEL = "cerana.boot_image"
MGMT_MAC_LABEL = "cerana.mgmt_mac"
LOCAL = "local"
# A kernel argument must survive iPXE's command parser: no whitespace, no ${...} expansion,
# no quotes or backslashes.
_ARG = re.compile(r"^[!#%&(-\[\]-~]+$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


class BadArgument(ValueError):
    """A kernel argument iPXE would split, expand or mangle."""


def check_arg(arg: str) -> str:
    if not _ARG.match(arg) or "$" in arg or "\\" in arg or '"' in arg or "'" in arg:
        raise BadArgument("kernel argument %r: no whitespace, quotes, '$' or '\\' allowed" % arg)
    return arg


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """The parts of a Node record (``_models.Node``) that matter for booting."""

    id: str
    hostname: str = ""
    addresses: tuple[str, ...] = ()
    labels: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_node(cls, node) -> NodeInfo:
        return cls(node.id, node.hostname, tuple(node.addresses), dict(node.labels))


@dataclasses.dataclass(frozen=True)
class ClusterView:
    """What the script for one MAC depends on."""

    cluster_ips: tuple[str, ...] = ()
    """Consul server addresses (no ports); empty: this boot server's address."""
    reservations: dict = dataclasses.field(default_factory=dict)
    """MAC -> reserved IPv4 address (``DHCPConfig.reservations``)."""
    leased: dict = dataclasses.field(default_factory=dict)
    """MAC -> address it holds or held (lease table), for the MACs asked about."""
    nodes: tuple[NodeInfo, ...] = ()


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image on disk: its name and the SHA-256 (hex) of its initrd."""

    name: str
    initrd_sha256: str


@dataclasses.dataclass(frozen=True)
class ScriptPolicy:
    """Settings that shape every script."""

    http_base: str
    """``http://<server>[:port]`` of this boot server."""
    server_address: str
    default_image: str = "current"
    console: str = "ttyS0"
    """``console=`` argument; empty: none."""
    zfs_config: str = "auto"
    extra_args: tuple[str, ...] = ()

    def __post_init__(self):
        for arg in self.extra_args:
            check_arg(arg)
        for value in (self.console, self.zfs_config, self.default_image):
            if value:
                check_arg(value)


@dataclasses.dataclass(frozen=True)
class BootPlan:
    mac: str
    action: str  # "boot" | "local" | "wait"
    reason: str
    node: str | None = None
    image: str | None = None
    kernel_url: str | None = None
    initrd_url: str | None = None
    args: tuple[str, ...] = ()


def find_node(mac: str, view: ClusterView) -> NodeInfo | None:
    mac = mac.lower()
    addresses = {a for a in (view.reservations.get(mac), view.leased.get(mac)) if a}
    for node in sorted(view.nodes, key=lambda n: n.id):
        if node.labels.get(MGMT_MAC_LABEL, "").lower() == mac or addresses & set(node.addresses):
            return node
    return None


def plan(mac: str, view: ClusterView, images: dict, policy: ScriptPolicy) -> BootPlan:
    """The boot plan of ``mac``. ``images`` maps image names (those that exist) to :class:`ImageRef`."""
    mac = mac.lower()
    node = find_node(mac, view)
    reserved = mac in view.reservations
    known = node is not None or reserved
    who = "node %s" % node.id if node else ("reserved %s" % view.reservations[mac] if reserved else "unknown MAC")
    wanted = node.labels.get(BOOT_IMAGE_LABEL) if node else None
    if wanted == LOCAL:
        return BootPlan(mac, "local", "%s: boot target local" % who, node=node.id if node else None)
    name, reason = policy.default_image, "%s: default image" % who
    if wanted:
        if wanted in images:
            name, reason = wanted, "%s: boot target %s" % (who, wanted)
        else:
            reason = "%s: boot target %s is missing, default image" % (who, wanted)
    image = images.get(name)
    if image is None:
        return BootPlan(mac, "wait", "%s: image %s is missing" % (who, name), node=node.id if node else None)
    base = "%s/images/%s" % (policy.http_base, name)
    cluster = ",".join(view.cluster_ips) or policy.server_address
    args = ["initrd=initrd"]  # the EFI stub finds the initrd by this name (iPXE --name); BIOS ignores it
    if policy.console:
        args.append("console=%s" % policy.console)
    args += [
        "cerana.boot_server=%s" % base,
        "cerana.cluster_ips=%s" % cluster,
        "cerana.mgmt_mac=%s" % mac,
    ]
    if policy.zfs_config:
        args.append("cerana.zfs_config=%s" % policy.zfs_config)
    if _HEX.match(image.initrd_sha256):
        args.append("cerana.initrd_hash=sha256-%s" % image.initrd_sha256)
    args += list(policy.extra_args)
    for arg in args:
        check_arg(arg)
    return BootPlan(
        mac, "boot", reason + (" (known)" if known else ""), node=node.id if node else None, image=name,
        kernel_url=base + "/kernel", initrd_url=base + "/initrd", args=tuple(args),
    )  # fmt: skip


def render(p: BootPlan, *, retry_seconds: int = 30) -> str:
    """The iPXE script for a plan."""
    lines = ["#!ipxe", "# cerana bootserver: %s %s" % (p.mac, _comment(p.reason))]
    if p.action == "local":
        lines += ["echo Booting from the next device (boot target local)", "exit"]
    elif p.action == "wait":
        lines += [
            "echo No platform image to boot (%s); retrying in %d s" % (_comment(p.reason), retry_seconds),
            "sleep %d" % retry_seconds,
            "reboot",
        ]
    else:
        lines += [
            "kernel %s %s" % (p.kernel_url, " ".join(p.args)),
            "initrd --name initrd %s" % p.initrd_url,
            "boot",
        ]
    return "\n".join(lines) + "\n"


def chain_script(script_path: str = "/boot/${netX/mac:hexhyp}.ipxe") -> str:
    """``/boot.ipxe``: for iPXE clients told a fixed URL, chain to the per-MAC script.

    iPXE expands ``${netX/mac:hexhyp}`` to the booting NIC's MAC with hyphens (a colon would
    make iPXE read ``/boot/52`` as a URI scheme)."""
    return "#!ipxe\nchain %s\n" % script_path


def _comment(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9 .,:;()/_+=@-]", "?", text)

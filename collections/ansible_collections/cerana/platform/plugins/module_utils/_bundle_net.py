# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Bundle networks on a node: the on-disk records and the pure parts (names, MACs, overlay peers).

Standard library only (plus :mod:`_models`), so the node tick can import it. The netlink
side lives in :mod:`_bundle_netio`; docs/services.md ("Bundle networks") describes both.

One record per bundle network on the node, replaced atomically by
``cerana.platform.bundle_network`` and removed by its ``state: absent``::

    <run_dir>/networks/<bundle id>.json
    {"address": "10.240.17.3", "bundle": "shop", "gateway": "10.240.0.9", "host_veth": "cbn1a2b3c4d5e6f",
     "mac": "02:5e:01:9a:33:c0", "netns": "cerana-shop", "prefix_len": 16}

``address``/``prefix_len`` is the bundle's ``eth0`` inside the network namespace
``/run/netns/<netns>``; ``gateway`` is the node's own address on the bridge ``cerana0``
(the bundle's default route); ``host_veth`` is the node side of the veth pair, a port of
``cerana0``; ``mac`` is the MAC of ``eth0`` and of the address lease (pool ``service``).
The directory is deliberately not ``<run_dir>/bundles/``, which holds service instance
records (:mod:`_instances`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._files import atomic_write

NETWORKS_DIR = "networks"
SUFFIX = ".json"
NETNS_DIR = "/run/netns"
NETNS_PREFIX = "cerana-"
VETH_PREFIX = "cbn"
CONTAINER_IFNAME = "eth0"
BRIDGE = "cerana0"
VXLAN = "cerana-vx"
VNI = 10240
VXLAN_PORT = 4789
MTU = 1450  # 1500 on the underlay minus the 50 bytes of VXLAN over IPv4
POOL = "service"
IFNAMSIZ = 15  # usable characters of a Linux interface name


# ---------------------------------------------------------------------------
# Names and MACs (pure)


def netns_name(bundle):
    """The bundle's network namespace name on every node: ``cerana-<bundle>``."""
    return NETNS_PREFIX + bundle


def netns_path(netns):
    """The namespace file (what ``ip netns`` and systemd's ``NetworkNamespacePath=`` use)."""
    return os.path.join(NETNS_DIR, netns)


def host_veth_name(bundle):
    """The node side of the bundle's veth pair: ``cbn`` + 12 hex digits of SHA-256(bundle), 15 characters.

    Bundle ids are up to 63 characters, interface names at most 15, so the name is a hash;
    48 bits make a collision between two bundles of one node practically impossible.
    """
    return VETH_PREFIX + hashlib.sha256(bundle.encode("utf-8")).hexdigest()[: IFNAMSIZ - len(VETH_PREFIX)]


def derived_mac(*parts):
    """A locally administered unicast MAC (``02:xx:xx:xx:xx:xx``) derived from ``parts``."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return ":".join("%02x" % b for b in (0x02, *digest[:5]))


def bridge_mac(node_id):
    """The MAC of the node's bridge, and of its address lease in pool ``service``."""
    return derived_mac("bridge", node_id)


def bundle_mac(bundle, node_id):
    """The MAC of a bundle's ``eth0`` on a node, and of its lease: the same pair always gets the same address back."""
    return derived_mac("bundle", bundle, node_id)


# ---------------------------------------------------------------------------
# Overlay peers (pure)


def underlay_address(node, service_network):
    """The node's underlay address for the overlay: its first IPv4 address outside the service network."""
    net = ipaddress.IPv4Network(service_network)
    for text in node.addresses:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            continue
        if addr.version == 4 and addr not in net and not addr.is_loopback and not addr.is_unspecified:
            return str(addr)
    return None


def overlay_peers(nodes, node_id, service_network, own_addresses=()):
    """Sorted underlay addresses of the live ``nodes`` (``_models.Node``) other than ``node_id``.

    Addresses the node holds itself (``own_addresses``) are never peers: a stale or duplicated
    node entry must not make the node flood frames to itself.
    """
    own = {str(a) for a in own_addresses}
    peers = set()
    for node in nodes:
        if node.id == node_id:
            own.update(node.addresses)
            continue
        addr = underlay_address(node, service_network)
        if addr is not None:
            peers.add(addr)
    return sorted(peers - own, key=ipaddress.IPv4Address)


def overlay_diff(current, desired):
    """(to add, to remove), both sorted: the FDB entries that turn ``current`` into ``desired``."""
    current, desired = set(current), set(desired)
    return (
        sorted(desired - current, key=ipaddress.IPv4Address),
        sorted(current - desired, key=ipaddress.IPv4Address),
    )


# ---------------------------------------------------------------------------
# The record


@dataclasses.dataclass(frozen=True)
class NetworkRecord(m._Model):
    """A bundle's network on this node (``<run_dir>/networks/<bundle>.json``)."""

    KIND = "network"
    bundle: str
    netns: str
    address: str
    prefix_len: int
    gateway: str
    mac: str
    host_veth: str

    @classmethod
    def from_dict(cls, data, path="network"):
        m._fields(
            data,
            path,
            {f.name for f in dataclasses.fields(cls)},
            required=[f.name for f in dataclasses.fields(cls)],
        )
        netns = m._str(data["netns"], path + ".netns")
        if "/" in netns or netns in (".", ".."):
            raise m.ValidationError(path + ".netns", "must be a namespace name, not a path, got %s" % m._show(netns))
        veth = m._str(data["host_veth"], path + ".host_veth")
        if len(veth) > IFNAMSIZ or "/" in veth or any(c.isspace() for c in veth):
            raise m.ValidationError(path + ".host_veth", "must be an interface name, got %s" % m._show(veth))
        return cls(
            bundle=m._label(data["bundle"], path + ".bundle"),
            netns=netns,
            address=str(m._ipv4(data["address"], path + ".address")),
            prefix_len=m._int(data["prefix_len"], path + ".prefix_len", 1, 32),
            gateway=str(m._ipv4(data["gateway"], path + ".gateway")),
            mac=m.normalize_mac(data["mac"], path + ".mac"),
            host_veth=veth,
        )

    def to_dict(self):
        return dataclasses.asdict(self)

    @property
    def netns_path(self):
        return netns_path(self.netns)

    @property
    def interface(self):
        """``address/prefix_len`` as an :class:`ipaddress.IPv4Interface`."""
        return ipaddress.IPv4Interface("%s/%d" % (self.address, self.prefix_len))


def network_record_path(run_dir, bundle):
    return os.path.join(run_dir, NETWORKS_DIR, bundle + SUFFIX)


def write_network(run_dir, record):
    """Write ``record`` atomically (creating the directory); returns the path."""
    path = network_record_path(run_dir, record.bundle)
    with atomic_write(path) as f:
        f.write(record.to_json())
    return path


def remove_network(run_dir, bundle):
    """Remove the record; False when there was none."""
    try:
        os.unlink(network_record_path(run_dir, bundle))
        return True
    except FileNotFoundError:
        return False


def parse_network(bundle, text):
    """A NetworkRecord from a record's text; its ``bundle`` must match the file name."""
    path = "network %s" % bundle
    try:
        data = json.loads(text)
    except ValueError as e:
        raise m.ValidationError(path, "not JSON: %s" % e) from None
    record = NetworkRecord.from_dict(data, path)
    if record.bundle != bundle:
        raise m.ValidationError(path + ".bundle", "must be %s (the file name), got %s" % (bundle, record.bundle))
    return record


def read_network(run_dir, bundle):
    """The bundle's NetworkRecord on this node, or None when it has none.

    Raises :class:`_models.ValidationError` when the record does not parse.
    """
    try:
        with open(network_record_path(run_dir, bundle)) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return parse_network(bundle, text)


def read_networks(run_dir):
    """(records sorted by bundle, [(path, error text)]) for every record under ``<run_dir>/networks``.

    A missing directory means no records; a record that does not parse is reported, not
    raised, so one bad file does not hide the others (as :func:`_instances.read_instances`).
    """
    root = os.path.join(run_dir, NETWORKS_DIR)
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return [], []
    records, errors = [], []
    for name in names:
        if not name.endswith(SUFFIX) or name.startswith("."):
            continue
        path = os.path.join(root, name)
        try:
            with open(path) as f:
                text = f.read()
            records.append(parse_network(name[: -len(SUFFIX)], text))
        except (OSError, m.ValidationError) as e:
            errors.append((path, str(e)))
    return records, errors

# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Bundle networks on a node: observe, plan, apply (iproute2), and the overlay sync.

Three layers, so that the decisions are pure and tested without a kernel:

* **observe** (:func:`observe_node`, :func:`observe_bundle`): ``ip -json`` reads into plain
  dataclasses (:class:`Link`, :class:`NodeState`, :class:`BundleState`);
* **plan** (:func:`plan_node`, :func:`plan_bundle`, :func:`plan_absent`): pure functions from
  what is there and what is wanted to a list of :class:`Step`; conflicts that need a human
  (a ``cerana0`` that is not a bridge) raise :class:`NetError` here, before any change;
* **apply** (:class:`Applier`): runs the steps with ``ip``, remembering how to undo each
  one that creates something, so a failed run removes what it created (:class:`Changes`).

:func:`present` and :func:`absent` are what the ``bundle_network`` module runs;
:func:`sync_overlay` is also meant for the node tick (docs/services.md, "Bundle networks").
Reads and changes go through iproute2's ``ip`` and ``bridge`` commands (``_iproute2.py``; a
netlink library cost a quarter of a second of every module call just to import); the one
sysctl (``net.ipv4.ip_forward``) is written through ``/proc/sys``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import os
import socket

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net as bn
from ansible_collections.cerana.platform.plugins.module_utils import _instances
from ansible_collections.cerana.platform.plugins.module_utils import _iproute2 as ipr2
from ansible_collections.cerana.platform.plugins.module_utils import _leases as L
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from ansible_collections.cerana.platform.plugins.module_utils._store import CasConflict

FORWARDING = "/proc/sys/net/ipv4/ip_forward"
DEFAULT_LEASE_DURATION = 86400
LOCK_NAME = ".bundle-network.lock"  # in run_dir: not in networks/, so a read-only records directory fails late


class NetError(Exception):
    """A failure with a message for the user (and optional extra result keys)."""

    def __init__(self, msg, **extra):
        super().__init__(msg)
        self.extra = extra


# ---------------------------------------------------------------------------
# What is there (plain data)


@dataclasses.dataclass(frozen=True)
class Link:
    """One network interface as observed: enough to decide what to change."""

    name: str
    index: int
    kind: str | None
    up: bool
    mtu: int
    mac: str
    master: str | None = None  # the master's name
    addresses: tuple = ()  # IPv4 "a.b.c.d/len", sorted
    vni: int | None = None  # vxlan only
    port: int | None = None  # vxlan only


@dataclasses.dataclass(frozen=True)
class NodeState:
    bridge: Link | None
    vxlan: Link | None
    forwarding: bool
    fdb: tuple = ()  # underlay addresses with an all-zeros entry on the vxlan device
    own_addresses: tuple = ()  # every IPv4 address of the node


@dataclasses.dataclass(frozen=True)
class BundleState:
    netns: bool  # the namespace file exists
    host_veth: Link | None
    eth0: Link | None = None  # inside the namespace
    lo_up: bool = False
    gateway: str | None = None  # the default route's gateway inside the namespace


# ---------------------------------------------------------------------------
# What is wanted


@dataclasses.dataclass(frozen=True)
class NodeWant:
    node_id: str
    address: str | None  # "ip/len" of the bridge; None: not allocated yet (check mode)
    peers: tuple = ()
    bridge: str = bn.BRIDGE
    vxlan: str = bn.VXLAN
    vni: int = bn.VNI
    port: int = bn.VXLAN_PORT
    mtu: int = bn.MTU

    @property
    def bridge_mac(self):
        return bn.bridge_mac(self.node_id)

    @property
    def vxlan_mac(self):
        return bn.derived_mac("vxlan", self.node_id)


@dataclasses.dataclass(frozen=True)
class BundleWant:
    bundle: str
    node_id: str
    address: str | None  # "ip/len" of eth0; None: not allocated yet (check mode)
    gateway: str | None
    bridge: str = bn.BRIDGE
    mtu: int = bn.MTU

    @property
    def netns(self):
        return bn.netns_name(self.bundle)

    @property
    def host_veth(self):
        return bn.host_veth_name(self.bundle)

    @property
    def mac(self):
        return bn.bundle_mac(self.bundle, self.node_id)


@dataclasses.dataclass(frozen=True)
class Step:
    """One change. ``where`` is None for the node, else the namespace name."""

    op: str
    name: str
    args: tuple = ()  # ((key, value), ...)
    where: str | None = None

    @property
    def kw(self):
        return dict(self.args)

    def describe(self):
        kw = self.kw
        text = {
            "create-bridge": "create bridge {name}",
            "create-vxlan": "create vxlan {name} (VNI {vni}, port {port})",
            "create-veth": "create veth {name} <-> {peer} in {netns}",
            "create-netns": "create network namespace {name}",
            "delete-link": "delete {name}",
            "delete-netns": "delete network namespace {name}",
            "set-link": "set {name} " + " ".join("%s=%s" % (k, v) for k, v in self.args),
            "add-address": "add {address} to {name}",
            "del-address": "remove {address} from {name}",
            "forwarding": "enable net.ipv4.ip_forward",
            "fdb-add": "flood {name} to peer {dst}",
            "fdb-del": "stop flooding {name} to {dst}",
            "default-route": "default route via {gateway}",
        }[self.op].format(name=self.name, **{k: ("a new address" if v is None else v) for k, v in kw.items()})
        return text if self.where is None else "%s (in %s)" % (text, self.where)


def _step(op, name, where=None, **kw):
    return Step(op, name, tuple(sorted(kw.items())), where)


# ---------------------------------------------------------------------------
# Planning (pure)


def _link_changes(link, *, mtu, master=None, mac=None, where=None):
    """set-link step (or none) so that ``link`` has the MTU, master, MAC and is up."""
    kw = {}
    if link.mtu != mtu:
        kw["mtu"] = mtu
    if master is not None and link.master != master:
        kw["master"] = master
    if mac is not None and link.mac != mac:
        kw["address"] = mac
    if not link.up:
        kw["state"] = "up"
    return [_step("set-link", link.name, where, **kw)] if kw else []


def _address_changes(name, have, want, where=None):
    """Steps that leave exactly ``want`` ("ip/len" or None = a new one) as the IPv4 address of ``name``."""
    steps = [_step("del-address", name, where, address=a) for a in have if a != want]
    if want is None or want not in have:
        steps.append(_step("add-address", name, where, address=want))
    return steps


def plan_node(have, want):
    """Steps that make the node's bridge, vxlan port, forwarding and flood list what ``want`` says."""
    steps = []
    br = have.bridge
    if br is not None and br.kind != "bridge":
        raise NetError(
            "%s exists on this node but is a %s, not a bridge; remove it or choose another bridge name"
            % (want.bridge, br.kind or "device of unknown kind")
        )
    if br is None:
        steps.append(_step("create-bridge", want.bridge, mac=want.bridge_mac, mtu=want.mtu))
        br = Link(want.bridge, 0, "bridge", False, want.mtu, want.bridge_mac)
    steps += _address_changes(want.bridge, br.addresses, want.address)
    steps += _link_changes(br, mtu=want.mtu)

    vx = have.vxlan
    fdb = set(have.fdb)
    if vx is not None and (vx.kind != "vxlan" or vx.vni != want.vni or vx.port != want.port):
        if vx.kind != "vxlan":
            raise NetError(
                "%s exists on this node but is a %s, not a vxlan device"
                % (want.vxlan, vx.kind or "device of unknown kind")
            )
        steps.append(_step("delete-link", want.vxlan))  # another VNI or port: recreate it
        vx = None
    if vx is None:
        steps.append(_step("create-vxlan", want.vxlan, vni=want.vni, port=want.port, mtu=want.mtu, mac=want.vxlan_mac))
        vx = Link(want.vxlan, 0, "vxlan", False, want.mtu, want.vxlan_mac)
        fdb = set()
    steps += _link_changes(vx, mtu=want.mtu, master=want.bridge)
    if not have.forwarding:
        steps.append(_step("forwarding", "net.ipv4.ip_forward"))
    add, remove = bn.overlay_diff(fdb, want.peers)
    steps += [_step("fdb-add", want.vxlan, dst=ip) for ip in add]
    steps += [_step("fdb-del", want.vxlan, dst=ip) for ip in remove]
    return steps


def plan_bundle(have, want):
    """Steps that give the bundle its namespace, veth pair, address and routes on the node."""
    steps = []
    ns = want.netns
    eth0, lo_up, gateway = have.eth0, have.lo_up, have.gateway
    if not have.netns:
        steps.append(_step("create-netns", ns))
        eth0, lo_up, gateway = None, False, None
    veth = have.host_veth
    if veth is not None and veth.kind != "veth":
        raise NetError(
            "%s exists on this node but is a %s, not the veth of bundle %s"
            % (want.host_veth, veth.kind or "device of unknown kind", want.bundle)
        )
    if veth is not None and eth0 is None:
        steps.append(_step("delete-link", want.host_veth))  # its peer is not in the namespace: start again
        veth = None
    elif veth is None and eth0 is not None:
        steps.append(_step("delete-link", bn.CONTAINER_IFNAME, ns))
        eth0 = None
    if veth is None:
        steps.append(
            _step("create-veth", want.host_veth, peer=bn.CONTAINER_IFNAME, netns=ns, mac=want.mac, mtu=want.mtu)
        )
        veth = Link(want.host_veth, 0, "veth", False, want.mtu, "")
        eth0 = Link(bn.CONTAINER_IFNAME, 0, "veth", False, want.mtu, want.mac)
    steps += _link_changes(veth, mtu=want.mtu, master=want.bridge)
    steps += _link_changes(eth0, mtu=want.mtu, mac=want.mac, where=ns)
    steps += _address_changes(bn.CONTAINER_IFNAME, eth0.addresses, want.address, ns)
    if not lo_up:
        steps.append(_step("set-link", "lo", ns, state="up"))
    if gateway != want.gateway or want.gateway is None:
        steps.append(_step("default-route", bn.CONTAINER_IFNAME, ns, gateway=want.gateway))
    return steps


def plan_absent(have, bundle):
    """Steps that remove the bundle's veth pair and namespace (the node's bridge and vxlan stay)."""
    steps = []
    if have.host_veth is not None:
        steps.append(_step("delete-link", bn.host_veth_name(bundle)))
    if have.netns:
        steps.append(_step("delete-netns", bn.netns_name(bundle)))
    return steps


# ---------------------------------------------------------------------------
# Observing (netlink reads)


@contextlib.contextmanager
def _doing(what):
    """Turn iproute2 and OS errors into a NetError that says what was being done."""
    try:
        yield
    except NetError:
        raise
    except ipr2.IpError as e:
        raise NetError("%s failed: %s" % (what, e)) from None
    except OSError as e:
        raise NetError("%s failed: %s" % (what, e.strerror or e)) from None


def _to_link(d):
    """A :class:`Link` from one object of ``ip -json -details addr show``."""
    info = d.get("linkinfo") or {}
    data = info.get("info_data") or {}
    kind = info.get("info_kind")
    addrs = sorted(
        {"%s/%d" % (a["local"], a["prefixlen"]) for a in d.get("addr_info", ()) if a.get("family") == "inet"},
        key=ipaddress.IPv4Interface,
    )
    return Link(
        name=d["ifname"],
        index=d.get("ifindex", 0),
        kind=kind,
        up="UP" in d.get("flags", ()),
        mtu=d.get("mtu"),
        mac=(d.get("address") or "").lower(),
        master=d.get("master"),
        addresses=tuple(addrs),
        vni=data.get("id") if kind == "vxlan" else None,
        port=data.get("port") if kind == "vxlan" else None,
    )


def _find(ipr, name):
    d = ipr.links().get(name)
    return None if d is None else _to_link(d)


def _fdb_peers(ipr, dev):
    out = {e["dst"] for e in ipr.fdb(dev) if (e.get("mac") or "").lower() == ipr2.ZERO_MAC and e.get("dst")}
    return tuple(sorted(out, key=ipaddress.IPv4Address))


def _own_addresses(ipr):
    return tuple(
        sorted({a["local"] for d in ipr.links().values() for a in d.get("addr_info", ()) if a.get("family") == "inet"})
    )


def _forwarding():
    try:
        with open(FORWARDING) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def observe_node(ipr, bridge=bn.BRIDGE, vxlan=bn.VXLAN):
    with _doing("reading the node's links"):
        br = _find(ipr, bridge)
        vx = _find(ipr, vxlan)
        return NodeState(
            bridge=br,
            vxlan=vx,
            forwarding=_forwarding(),
            fdb=_fdb_peers(ipr, vxlan) if vx is not None and vx.kind == "vxlan" else (),
            own_addresses=_own_addresses(ipr),
        )


def is_netns(path):
    """Whether ``path`` is a namespace file (a bind mount of nsfs, as ``ip netns add`` makes)."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def observe_bundle(ipr, bundle):
    ns = bn.netns_name(bundle)
    path = bn.netns_path(ns)
    with _doing("reading the links of bundle %s" % bundle):
        veth = _find(ipr, bn.host_veth_name(bundle))
        if not os.path.lexists(path):
            return BundleState(netns=False, host_veth=veth)
        if not is_netns(path):
            raise NetError("%s exists but is not a network namespace; remove it first" % path)
        nsr = ipr2.IpRoute2(netns=ns)
        eth0 = _find(nsr, bn.CONTAINER_IFNAME)
        lo = _find(nsr, "lo")
        gateway = None
        for route in nsr.default_routes():
            if route.get("gateway"):
                gateway = route["gateway"]
        return BundleState(netns=True, host_veth=veth, eth0=eth0, lo_up=bool(lo and lo.up), gateway=gateway)


# ---------------------------------------------------------------------------
# Applying


class Changes:
    """The actions of one run, and how to undo those that created something.

    In check mode :meth:`do` only records the action.
    """

    def __init__(self, check_mode=False):
        self.check_mode = check_mode
        self.actions = []
        self._undo = []

    def do(self, action, fn=None, undo=None):
        self.actions.append(action)
        if self.check_mode:
            return None
        with _doing(action):
            result = fn() if fn is not None else None
        if undo is not None:
            self._undo.append((action, undo))
        return result

    def rollback(self):
        """Undo in reverse order; returns the texts of undo steps that failed (best effort)."""
        errors = []
        while self._undo:
            action, fn = self._undo.pop()
            try:
                fn()
            except Exception as e:  # keep undoing the rest
                errors.append("undo of %r failed: %s" % (action, e))
        return errors


class Applier:
    """Runs :class:`Step` lists with iproute2 in the node's namespace (``ipr``) and bundle namespaces."""

    def __init__(self, ipr, changes):
        self.ipr = ipr
        self.changes = changes
        self._ns = {}

    def close(self):
        self._ns.clear()

    def _in(self, where):
        if where is None:
            return self.ipr
        if where not in self._ns:
            self._ns[where] = ipr2.IpRoute2(netns=where)
        return self._ns[where]

    def _remove_netns(self, name):
        self._ns.pop(name, None)
        ipr2.delete_netns(name)

    def apply(self, steps):
        for step in steps:
            if self.changes.check_mode:
                self.changes.do(step.describe())
            else:
                self.changes.do(step.describe(), *self._callables(step))

    def _callables(self, step):
        """(do, undo) for one step; undo is None for steps that create nothing."""
        ipr = self._in(step.where) if step.op not in ("create-netns", "delete-netns") else None
        kw = step.kw
        name = step.name
        if step.op == "create-bridge":
            return (
                lambda: ipr.add_link(name, "bridge", mtu=kw["mtu"], mac=kw["mac"]),
                lambda: ipr.delete_link(name),
            )
        if step.op == "create-vxlan":
            return (
                lambda: ipr.add_link(name, "vxlan", mtu=kw["mtu"], mac=kw["mac"], vni=kw["vni"], port=kw["port"]),
                lambda: ipr.delete_link(name),
            )
        if step.op == "create-netns":
            return lambda: ipr2.create_netns(name), lambda: self._remove_netns(name)
        if step.op == "create-veth":
            return (
                lambda: ipr.add_link(
                    name, "veth", mtu=kw["mtu"], peer=kw["peer"], peer_mac=kw["mac"], peer_netns=kw["netns"]
                ),
                lambda: ipr.delete_link(name),
            )
        if step.op == "delete-link":
            return lambda: ipr.delete_link(name), None
        if step.op == "delete-netns":
            return lambda: self._remove_netns(name), None
        if step.op == "set-link":
            return lambda: ipr.set_link(name, **kw), None
        if step.op in ("add-address", "del-address"):
            cidr = str(ipaddress.IPv4Interface(kw["address"]))
            if step.op == "add-address":
                return (lambda: ipr.address("add", name, cidr)), (lambda: ipr.address("del", name, cidr))
            return (lambda: ipr.address("del", name, cidr)), None
        if step.op == "forwarding":

            def forward():
                with open(FORWARDING, "w") as f:
                    f.write("1\n")

            return forward, None
        if step.op in ("fdb-add", "fdb-del"):
            if step.op == "fdb-add":
                return (lambda: ipr.flood("append", name, kw["dst"])), (lambda: ipr.flood("del", name, kw["dst"]))
            return (lambda: ipr.flood("del", name, kw["dst"])), None
        if step.op == "default-route":
            return lambda: ipr.default_route(kw["gateway"], name), None
        raise AssertionError("unknown step %s" % step.op)


# ---------------------------------------------------------------------------
# The overlay, for the module and the node tick


def sync_overlay(nodes, node_id, service_network, *, vxlan=bn.VXLAN, check_mode=False, ipr=None):
    """Make the vxlan device's flood list (all-zeros FDB entries) the underlay addresses of the live peers.

    ``nodes`` is ``Objects.nodes()`` (every live :class:`_models.Node`); the node ``node_id``
    and any address the node holds itself are left out; a peer's underlay address is its
    first IPv4 address outside ``service_network``. Does nothing when the device does not
    exist (no bundle network on this node yet). Returns
    ``{"device": bool, "peers": [...], "added": [...], "removed": [...]}``. Raises NetError.
    """
    with _doing("reading %s" % vxlan):
        ipr = ipr or ipr2.IpRoute2()
        vx = _find(ipr, vxlan)
        if vx is None or vx.kind != "vxlan":
            return {"device": False, "peers": [], "added": [], "removed": []}
        current = _fdb_peers(ipr, vxlan)
        peers = bn.overlay_peers(nodes, node_id, service_network, own_addresses=_own_addresses(ipr))
    add, remove = bn.overlay_diff(current, peers)
    if not check_mode:
        for dst in add:
            with _doing("adding peer %s to %s" % (dst, vxlan)):
                ipr.flood("append", vxlan, dst)
        for dst in remove:
            with _doing("removing peer %s from %s" % (dst, vxlan)):
                ipr.flood("del", vxlan, dst)
    return {"device": True, "peers": peers, "added": add, "removed": remove}


def renew_leases(store, node_id, run_dir, service_network, *, duration=None, now=None):
    """Renew the service-network leases of this node: its bridge's and every recorded bundle network's.

    A lease with at least half of ``duration`` (default: one day) left costs one read and no
    write; below that it is bound for ``duration`` again, at the same address. Meant for the
    node tick, at least every ``duration / 2`` (the module renews only when it runs). Returns
    ``{"renewed": [ip, ...], "errors": [text, ...]}``: a lease that cannot be renewed (taken by
    another MAC after it expired, outside a changed service network) or a bad record is an
    error in the list, not an exception; an unreachable Consul raises StoreError.
    """
    duration = duration or DEFAULT_LEASE_DURATION
    pool = L.Pool(net=ipaddress.IPv4Network(service_network))
    ls = L.LeaseStore(store, pool=bn.POOL, server=node_id)
    records, errors = bn.read_networks(run_dir)
    errors = ["%s: %s" % (path, text) for path, text in errors]
    wanted = [(bn.bridge_mac(node_id), None, "the bridge")]
    wanted += [(r.mac, r.address, "bundle %s" % r.bundle) for r in records]
    renewed = []
    for mac, ip, what in wanted:
        try:
            if ip is None:
                lease = ls.lease_of(mac)
                if lease is None:
                    continue  # no bundle network on this node yet
                ip = lease.ip
            lease, changed = ls.ack(pool, mac, ip, duration=duration, min_remaining=duration / 2, now=now,
                                    allow_unallocated=True)  # fmt: skip
            if changed:
                renewed.append(lease.ip)
        except (L.LeaseError, m.ValidationError) as e:
            errors.append("%s (%s): %s" % (what, ip, e))
    return {"renewed": renewed, "errors": errors}


# ---------------------------------------------------------------------------
# The module's flows


@dataclasses.dataclass(frozen=True)
class Options:
    bundle: str | None  # None: only the node's side (bridge, vxlan overlay, the node's address)
    node_id: str
    run_dir: str = "/run/cerana"
    bridge: str = bn.BRIDGE
    vxlan: str = bn.VXLAN
    vni: int = bn.VNI
    port: int = bn.VXLAN_PORT
    mtu: int = bn.MTU
    lease_duration: int = DEFAULT_LEASE_DURATION
    hostname: str = ""
    namespace: bool = True  # False: address, lease and record only (a VM is the bundle's endpoint)


def read_node_id(path="/etc/machine-id"):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise NetError("cannot read the node id from %s: %s" % (path, e.strerror or e)) from None
    try:
        return m._label(text, "node_id")
    except m.ValidationError:
        raise NetError("%s does not hold a node id (32 hexadecimal digits), got %r" % (path, text[:40])) from None


@contextlib.contextmanager
def node_lock(run_dir, check_mode):
    """One bundle_network run at a time on a node (they share the bridge and the vxlan device)."""
    if check_mode:
        yield
        return
    with _doing("creating %s" % run_dir):
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def service_network(objects):
    stored = objects.get_config(m.ClusterConfig, m.CLUSTER_CONFIG_KEY)
    return ipaddress.IPv4Network((stored.obj if stored is not None else m.ClusterConfig()).service_network)


def forget(ls, mac):
    """Release the MAC's lease and delete its MAC index entry, so nothing of it stays in Consul.

    :meth:`_leases.LeaseStore.release` keeps the index (a returning DHCP client gets its
    address back); a removed bundle network does not come back. Returns the freed Lease or None.
    """
    freed = ls.release(mac)
    _ip, index = ls.mac_hint(mac)
    if index:
        with contextlib.suppress(CasConflict):  # changed meanwhile: no longer ours to delete
            ls.store.txn([{"KV": {"Verb": "delete-cas", "Key": L.mac_key(mac, ls.pool_name), "Index": index}}])
    return freed


def _lease(ls, pool, mac, hostname, duration, changes, what):
    """(Lease or None in check mode when new, whether it is new) for ``mac``: kept, renewed or allocated."""
    now = ls.clock()
    current = ls.lease_of(mac)
    if current is not None and pool.usable(current.ip, mac):
        if (
            current.state == L.BOUND
            and current.remaining(now) >= duration / 2
            and (hostname or None) == current.hostname
        ):
            return current, False
        renewed = changes.do(
            "renew the lease of %s (%s)" % (current.ip, what),
            lambda: ls.ack(pool, mac, current.ip, duration=duration, hostname=hostname or None, allow_unallocated=True),
        )
        return (renewed[0] if renewed else dataclasses.replace(current, state=L.BOUND)), False

    def allocate():
        offer = ls.offer(pool, mac, hostname=hostname or None)
        return ls.ack(pool, mac, offer.ip, duration=duration, hostname=hostname or None)[0]

    _hint, hint_index = ls.mac_hint(mac)
    try:
        lease = changes.do(
            "allocate an address in %s (%s)" % (pool.net, what),
            allocate,
            # a MAC index entry this run created goes too; one that was there stays a hint
            undo=(lambda: ls.release(mac)) if hint_index else (lambda: forget(ls, mac)),
        )
    except L.NoFreeAddress:
        raise NetError(
            "the service network %s has no free address for the %s (pool %s)" % (pool.net, what, bn.POOL)
        ) from None
    return lease, True


def _require_iproute2():
    """Fail before anything is allocated or changed when iproute2 is missing."""
    for command in ("ip", "bridge"):
        try:
            ipr2.find_command(command)
        except ipr2.IpError as e:
            raise NetError(str(e)) from None


def _running_instances(run_dir, bundle):
    instances, _errors = _instances.read_instances(run_dir)
    return sorted(i.service for i in instances if i.bundle == bundle and _instances.pid_running(i.pid))


def present(store, opts, check_mode=False):
    """Make the bundle's network on this node; returns the module result (without ``diff``)."""
    _require_iproute2()
    objects = Objects(store)
    if opts.bundle is not None and objects.get("bundle", opts.bundle) is None:
        raise NetError("bundle %s is not declared" % opts.bundle)
    if opts.bundle is None:
        return node_present(store, objects, opts, check_mode)
    net = service_network(objects)
    nodes = objects.nodes()
    pool = L.Pool(net=net)
    ls = L.LeaseStore(store, pool=bn.POOL, server=opts.node_id)
    changes = Changes(check_mode)
    try:
        before = bn.read_network(opts.run_dir, opts.bundle)
    except m.ValidationError:
        before = None  # unreadable: rewritten below
    with node_lock(opts.run_dir, check_mode), ipr2.IpRoute2() as ipr:
        node_have = observe_node(ipr, opts.bridge, opts.vxlan)
        if not node_have.forwarding and not os.access(FORWARDING, os.W_OK):
            raise NetError(
                "net.ipv4.ip_forward is 0 on this node and cannot be set from inside it (%s is read-only, as in a "
                "container); enable it where the node's network namespace is made" % FORWARDING
            )
        bundle_have = observe_bundle(ipr, opts.bundle)
        peers = tuple(bn.overlay_peers(nodes, opts.node_id, net, own_addresses=node_have.own_addresses))

        def wants(bridge_lease, bundle_lease):
            gw = bridge_lease.ip if bridge_lease is not None else None
            node_want = NodeWant(
                node_id=opts.node_id, address="%s/%d" % (gw, net.prefixlen) if gw else None, peers=peers,
                bridge=opts.bridge, vxlan=opts.vxlan, vni=opts.vni, port=opts.port, mtu=opts.mtu,
            )  # fmt: skip
            bundle_want = BundleWant(
                bundle=opts.bundle, node_id=opts.node_id,
                address="%s/%d" % (bundle_lease.ip, net.prefixlen) if bundle_lease is not None else None,
                gateway=gw, bridge=opts.bridge, mtu=opts.mtu,
            )  # fmt: skip
            return node_want, bundle_want

        # Plan once before touching anything: conflicts fail here, with nothing changed.
        plan_node(node_have, wants(None, None)[0])
        if opts.namespace:
            plan_bundle(bundle_have, wants(None, None)[1])
        applier = Applier(ipr, changes)
        try:
            bridge_lease, _new = _lease(
                ls, pool, bn.bridge_mac(opts.node_id), opts.hostname or opts.bridge, opts.lease_duration, changes,
                "bridge %s of this node" % opts.bridge,
            )  # fmt: skip
            bundle_lease, _new = _lease(
                ls, pool, bn.bundle_mac(opts.bundle, opts.node_id), opts.bundle, opts.lease_duration, changes,
                "bundle %s" % opts.bundle,
            )  # fmt: skip
            node_want, bundle_want = wants(bridge_lease, bundle_lease)
            applier.apply(plan_node(node_have, node_want))
            if opts.namespace:
                applier.apply(plan_bundle(bundle_have, bundle_want))
            else:  # a namespace left from an earlier run would hold the address and MAC too
                applier.apply(plan_absent(bundle_have, opts.bundle))
            after = None
            if bundle_lease is not None and bridge_lease is not None:
                after = bn.NetworkRecord(
                    bundle=opts.bundle, netns=bundle_want.netns, address=bundle_lease.ip, prefix_len=net.prefixlen,
                    gateway=bridge_lease.ip, mac=bundle_want.mac, host_veth=bundle_want.host_veth,
                )  # fmt: skip
            if after is None or after != before:
                previous = before

                def restore():
                    if previous is None:
                        bn.remove_network(opts.run_dir, opts.bundle)
                    else:
                        bn.write_network(opts.run_dir, previous)

                changes.do(
                    "write %s" % bn.network_record_path(opts.run_dir, opts.bundle),
                    lambda: bn.write_network(opts.run_dir, after),
                    undo=restore,
                )
        except BaseException as e:
            problems = changes.rollback()  # before close(): undo steps use the open namespace handles
            applier.close()
            if problems and isinstance(e, NetError):
                raise NetError("%s; undoing this run's changes also failed: %s" % (e, "; ".join(problems))) from None
            raise
        applier.close()
    return {
        "changed": bool(changes.actions),
        "actions": changes.actions,
        "address": bundle_lease.ip if bundle_lease is not None else None,
        "prefix_len": net.prefixlen,
        "gateway": bridge_lease.ip if bridge_lease is not None else None,
        "netns": bundle_want.netns if opts.namespace else None,
        "netns_path": bn.netns_path(bundle_want.netns) if opts.namespace else None,
        "mac": bundle_want.mac,
        "host_veth": bundle_want.host_veth if opts.namespace else None,
        "peers": list(peers),
        "record": after.to_dict() if after is not None else None,
        "before": before.to_dict() if before is not None else None,
    }


def node_present(store, objects, opts, check_mode=False):
    """Only the node's side: the bridge with the node's service address, the vxlan overlay to the
    live nodes, forwarding. Every node needs it to publish ports, bundles or not."""
    net = service_network(objects)
    nodes = objects.nodes()
    pool = L.Pool(net=net)
    ls = L.LeaseStore(store, pool=bn.POOL, server=opts.node_id)
    changes = Changes(check_mode)
    with node_lock(opts.run_dir, check_mode), ipr2.IpRoute2() as ipr:
        have = observe_node(ipr, opts.bridge, opts.vxlan)
        if not have.forwarding and not os.access(FORWARDING, os.W_OK):
            raise NetError(
                "net.ipv4.ip_forward is 0 on this node and cannot be set from inside it (%s is read-only, as in a "
                "container); enable it where the node's network namespace is made" % FORWARDING
            )
        peers = tuple(bn.overlay_peers(nodes, opts.node_id, net, own_addresses=have.own_addresses))

        def want(lease):
            return NodeWant(
                node_id=opts.node_id, address="%s/%d" % (lease.ip, net.prefixlen) if lease else None, peers=peers,
                bridge=opts.bridge, vxlan=opts.vxlan, vni=opts.vni, port=opts.port, mtu=opts.mtu,
            )  # fmt: skip

        plan_node(have, want(None))  # conflicts fail here, before anything changes
        applier = Applier(ipr, changes)
        try:
            lease, _new = _lease(
                ls, pool, bn.bridge_mac(opts.node_id), opts.hostname or opts.bridge, opts.lease_duration, changes,
                "bridge %s of this node" % opts.bridge,
            )  # fmt: skip
            applier.apply(plan_node(have, want(lease)))
        except BaseException:
            changes.rollback()
            applier.close()
            raise
        applier.close()
    return {
        "changed": bool(changes.actions), "actions": changes.actions, "address": None,
        "prefix_len": net.prefixlen, "gateway": lease.ip if lease is not None else None, "netns": None,
        "netns_path": None, "mac": bn.bridge_mac(opts.node_id), "host_veth": None, "peers": list(peers),
        "record": None, "before": None,
    }  # fmt: skip


def absent(store, opts, check_mode=False):
    """Remove the bundle's network from this node: veth pair, namespace, record, lease."""
    _require_iproute2()
    running = _running_instances(opts.run_dir, opts.bundle)
    if running:
        raise NetError(
            "bundle %s still runs on this node (services %s); remove its service instances first"
            % (opts.bundle, ", ".join(running)),
            services=running,
        )
    ls = L.LeaseStore(store, pool=bn.POOL, server=opts.node_id)
    try:
        before = bn.read_network(opts.run_dir, opts.bundle)
    except m.ValidationError:
        before = None
    macs = {bn.bundle_mac(opts.bundle, opts.node_id)}
    if before is not None:
        macs.add(before.mac)
    held = []  # Consul first: unreachable fails before anything changes
    for mac in sorted(macs):
        lease = ls.lease_of(mac)
        if lease is not None or ls.mac_hint(mac)[1]:
            held.append((mac, lease))
    changes = Changes(check_mode)
    with node_lock(opts.run_dir, check_mode), ipr2.IpRoute2() as ipr:
        with _doing("reading the links of bundle %s" % opts.bundle):
            have = BundleState(
                netns=os.path.lexists(bn.netns_path(bn.netns_name(opts.bundle))),
                host_veth=_find(ipr, bn.host_veth_name(opts.bundle)),
            )
        applier = Applier(ipr, changes)
        try:
            applier.apply(plan_absent(have, opts.bundle))
        finally:
            applier.close()
        if os.path.lexists(bn.network_record_path(opts.run_dir, opts.bundle)):
            changes.do(
                "remove %s" % bn.network_record_path(opts.run_dir, opts.bundle),
                lambda: bn.remove_network(opts.run_dir, opts.bundle),
            )
        for mac, lease in held:
            changes.do(
                "release the lease of %s (%s)" % (lease.ip, mac) if lease is not None else "forget MAC %s" % mac,
                lambda mac=mac: forget(ls, mac),
            )
    return {
        "changed": bool(changes.actions),
        "actions": changes.actions,
        "address": None,
        "prefix_len": None,
        "gateway": None,
        "netns": bn.netns_name(opts.bundle),
        "netns_path": bn.netns_path(bn.netns_name(opts.bundle)),
        "mac": bn.bundle_mac(opts.bundle, opts.node_id),
        "host_veth": bn.host_veth_name(opts.bundle),
        "peers": [],
        "record": None,
        "before": before.to_dict() if before is not None else None,
    }


def _ifname(value, field):
    m._str(value, field)
    if len(value) > bn.IFNAMSIZ or "/" in value or ":" in value or any(c.isspace() for c in value):
        raise m.ValidationError(field, "must be an interface name of at most 15 characters, got %r" % value)
    return value


def options_from_params(p):
    """Validated :class:`Options` from the bundle_network module's parameters (before any I/O);
    raises ValidationError naming the parameter."""
    bundle = m._label(p["bundle"], "bundle") if p["bundle"] is not None else None
    if bundle is None and p["state"] == "absent":
        raise m.ValidationError("bundle", "is required with state=absent (the node's own side is never removed)")
    node_id = m._label(p["node_id"], "node_id") if p["node_id"] else read_node_id()
    bridge = _ifname(p["bridge"], "bridge")
    vxlan = _ifname(p["vxlan"], "vxlan")
    if bridge == vxlan:
        raise m.ValidationError("vxlan", "must differ from bridge (%s)" % bridge)
    return Options(
        bundle=bundle,
        node_id=node_id,
        run_dir=p["run_dir"],
        bridge=bridge,
        vxlan=vxlan,
        vni=m._int(p["vni"], "vni", 1, (1 << 24) - 1),
        port=m._int(p["vxlan_port"], "vxlan_port", 1, 65535),
        mtu=m._int(p["mtu"], "mtu", 576, 65535),
        lease_duration=m._int(m.parse_duration(p["lease_duration"], "lease_duration"), "lease_duration", 60),
        hostname=socket.gethostname(),
        namespace=p["namespace"],
    )


def run(store, opts, state, check_mode=False, diff=False):
    """:func:`present` or :func:`absent` (``state``), with the module's ``diff`` of the record."""
    flow = present if state == "present" else absent
    result = flow(store, opts, check_mode=check_mode)
    before = result.pop("before")
    if diff and opts.bundle is not None:
        path = bn.network_record_path(opts.run_dir, opts.bundle)
        result["diff"] = {"before": before or {}, "after": result["record"] or {}, "before_header": path,
                          "after_header": path}  # fmt: skip
    return result

"""Bundle networks: names, MACs, overlay peers, records (_bundle_net), planning, rollback and leases (_bundle_netio)."""

from __future__ import annotations

import ipaddress
import json

import pytest
from bootserver_fakes import MemoryStore

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net as bn
from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio as bnio
from ansible_collections.cerana.platform.plugins.module_utils import _leases as L
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _service_units as su

NODE_A = "0" * 31 + "a"
NODE_B = "0" * 31 + "b"
RECORD = {
    "bundle": "shop",
    "netns": "cerana-shop",
    "address": "10.240.17.3",
    "prefix_len": 16,
    "gateway": "10.240.0.9",
    "mac": "02:5e:01:9a:33:c0",
    "host_veth": "cbn1a2b3c4d5e6f",
}


def node(node_id, *addresses):
    return m.Node.from_dict({"id": node_id, "hostname": node_id[-4:], "heartbeat": "2026-01-01T00:00:00Z",
                             "addresses": list(addresses)})  # fmt: skip


# -- names and MACs -------------------------------------------------------------------------


def test_netns_name_and_path():
    assert bn.netns_name("shop") == "cerana-shop"
    assert bn.netns_path("cerana-shop") == "/run/netns/cerana-shop"


@pytest.mark.parametrize("bundle", ["a", "shop", "x" * 63, "a-b-c"])
def test_host_veth_fits_ifnamsiz_and_is_stable(bundle):
    name = bn.host_veth_name(bundle)
    assert len(name) == 15 and name.startswith("cbn")
    assert name == bn.host_veth_name(bundle)
    assert all(c.isalnum() for c in name)


def test_host_veth_differs_between_bundles():
    names = {bn.host_veth_name("b%d" % i) for i in range(2000)}
    assert len(names) == 2000


def test_macs_are_local_unicast_deterministic_and_distinct():
    macs = [bn.bridge_mac(NODE_A), bn.bridge_mac(NODE_B), bn.bundle_mac("shop", NODE_A), bn.bundle_mac("shop", NODE_B),
            bn.bundle_mac("web", NODE_A)]  # fmt: skip
    assert len(set(macs)) == len(macs)
    for mac in macs:
        assert m.normalize_mac(mac, "mac") == mac
        first = int(mac[:2], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert bn.bundle_mac("shop", NODE_A) == bn.bundle_mac("shop", NODE_A)
    # the separator keeps ("ab", "c") and ("a", "bc") apart
    assert bn.derived_mac("ab", "c") != bn.derived_mac("a", "bc")


# -- overlay peers ---------------------------------------------------------------------------


def test_underlay_address_skips_service_network_and_ipv6():
    n = node(NODE_B, "fd00::5", "10.240.0.7", "192.168.5.2", "192.168.6.2")
    assert bn.underlay_address(n, "10.240.0.0/16") == "192.168.5.2"
    assert bn.underlay_address(node(NODE_B, "10.240.0.7"), "10.240.0.0/16") is None
    assert bn.underlay_address(node(NODE_B), "10.240.0.0/16") is None


def test_overlay_peers_excludes_self_and_own_addresses():
    nodes = [
        node(NODE_A, "192.168.5.1"),
        node(NODE_B, "192.168.5.2"),
        node("c" * 32, "192.168.5.10"),
        node("d" * 32, "10.240.3.3"),  # only a service address: no underlay, not a peer
        node("e" * 32, "192.168.5.1"),  # a stale entry with our own address
        node("f" * 32, "192.168.5.9"),
    ]
    assert bn.overlay_peers(nodes, NODE_A, "10.240.0.0/16") == ["192.168.5.2", "192.168.5.9", "192.168.5.10"]
    assert bn.overlay_peers(nodes, NODE_A, "10.240.0.0/16", own_addresses=["192.168.5.9"]) == [
        "192.168.5.2", "192.168.5.10"]  # fmt: skip


def test_overlay_diff():
    assert bn.overlay_diff(["10.0.0.2", "10.0.0.10"], ["10.0.0.10", "10.0.0.3", "10.0.0.20"]) == (
        ["10.0.0.3", "10.0.0.20"], ["10.0.0.2"])  # fmt: skip
    assert bn.overlay_diff([], []) == ([], [])


# -- records ---------------------------------------------------------------------------------


def test_record_round_trip(tmp_path):
    rec = bn.NetworkRecord.from_dict(RECORD)
    assert rec.to_dict() == RECORD
    assert str(rec.interface) == "10.240.17.3/16"
    assert rec.netns_path == "/run/netns/cerana-shop"
    path = bn.write_network(str(tmp_path), rec)
    assert path == bn.network_record_path(str(tmp_path), "shop") == str(tmp_path / "networks" / "shop.json")
    assert json.loads((tmp_path / "networks" / "shop.json").read_text()) == RECORD
    assert bn.read_network(str(tmp_path), "shop") == rec
    assert [p.name for p in (tmp_path / "networks").iterdir()] == ["shop.json"]  # no temporary file left
    assert bn.remove_network(str(tmp_path), "shop") is True
    assert bn.remove_network(str(tmp_path), "shop") is False
    assert bn.read_network(str(tmp_path), "shop") is None


@pytest.mark.parametrize(
    ("edit", "field", "reason"),
    [
        ({"address": "10.240.300.1"}, "address", "IPv4"),
        ({"prefix_len": 33}, "prefix_len", "1-32"),
        ({"prefix_len": "16"}, "prefix_len", "integer"),
        ({"mac": "zz"}, "mac", "MAC"),
        ({"host_veth": "a-very-long-interface"}, "host_veth", "interface name"),
        ({"netns": "../etc"}, "netns", "not a path"),
        ({"bundle": "Shop"}, "bundle", "DNS label"),
        ({"extra": 1}, "extra", "unknown field"),
        ({"gateway": None}, "gateway", "required"),
    ],
)
def test_record_rejects(edit, field, reason):
    with pytest.raises(m.ValidationError) as e:
        bn.NetworkRecord.from_dict(dict(RECORD, **edit))
    assert e.value.path == "network." + field
    assert reason in e.value.reason


def test_read_networks_reports_bad_records(tmp_path):
    run = str(tmp_path)
    assert bn.read_networks(run) == ([], [])
    bn.write_network(run, bn.NetworkRecord.from_dict(RECORD))
    bn.write_network(run, bn.NetworkRecord.from_dict(dict(RECORD, bundle="api", netns="cerana-api")))
    (tmp_path / "networks" / "bad.json").write_text("{")
    (tmp_path / "networks" / "other.json").write_text(json.dumps(RECORD))  # bundle does not match the name
    (tmp_path / "networks" / ".shop.json.x.part").write_text("{")  # a writer's temporary file: ignored
    (tmp_path / "networks" / "notes.txt").write_text("x")
    records, errors = bn.read_networks(run)
    assert [r.bundle for r in records] == ["api", "shop"]
    assert [p.rsplit("/", 1)[1] for p, _e in errors] == ["bad.json", "other.json"]
    assert "not JSON" in errors[0][1] and "file name" in errors[1][1]
    with pytest.raises(m.ValidationError):
        bn.read_network(run, "bad")


# -- planning (pure) -------------------------------------------------------------------------

NET = "10.240.0.0/16"


def link(name, kind, *, up=True, mtu=1450, mac="02:00:00:00:00:01", master=None, addresses=(), vni=None, port=None):
    return bnio.Link(name, 7, kind, up, mtu, mac, master, tuple(addresses), vni, port)


def node_want(**kw):
    return bnio.NodeWant(**{"node_id": NODE_A, "address": "10.240.0.9/16", "peers": ("192.168.5.2",), **kw})


def bundle_want(**kw):
    return bnio.BundleWant(**{"bundle": "shop", "node_id": NODE_A, "address": "10.240.17.3/16",
                              "gateway": "10.240.0.9", **kw})  # fmt: skip


def settled_node(want):
    return bnio.NodeState(
        bridge=link("cerana0", "bridge", mac=want.bridge_mac, addresses=[want.address]),
        vxlan=link("cerana-vx", "vxlan", master="cerana0", vni=want.vni, port=want.port),
        forwarding=True,
        fdb=want.peers,
        own_addresses=("192.168.5.1", "10.240.0.9"),
    )


def settled_bundle(want):
    return bnio.BundleState(
        netns=True,
        host_veth=link(want.host_veth, "veth", master="cerana0", mac="7a:00:00:00:00:01"),
        eth0=link("eth0", "veth", mac=want.mac, addresses=[want.address]),
        lo_up=True,
        gateway=want.gateway,
    )


def ops(steps):
    return [(s.op, s.name, s.where, s.kw) for s in steps]


def test_plan_node_from_nothing_creates_everything_in_order():
    want = node_want()
    steps = bnio.plan_node(bnio.NodeState(None, None, False), want)
    assert ops(steps) == [
        ("create-bridge", "cerana0", None, {"mac": want.bridge_mac, "mtu": 1450}),
        ("add-address", "cerana0", None, {"address": "10.240.0.9/16"}),
        ("set-link", "cerana0", None, {"state": "up"}),
        ("create-vxlan", "cerana-vx", None, {"vni": 10240, "port": 4789, "mtu": 1450, "mac": want.vxlan_mac}),
        ("set-link", "cerana-vx", None, {"master": "cerana0", "state": "up"}),
        ("forwarding", "net.ipv4.ip_forward", None, {}),
        ("fdb-add", "cerana-vx", None, {"dst": "192.168.5.2"}),
    ]
    assert steps[3].describe() == "create vxlan cerana-vx (VNI 10240, port 4789)"


def test_plan_node_settled_is_empty_and_follows_peers_and_addresses():
    want = node_want()
    assert bnio.plan_node(settled_node(want), want) == []
    moved = node_want(address="10.241.0.4/16", peers=("192.168.5.3",))  # another service network, other peers
    assert ops(bnio.plan_node(settled_node(want), moved)) == [
        ("del-address", "cerana0", None, {"address": "10.240.0.9/16"}),
        ("add-address", "cerana0", None, {"address": "10.241.0.4/16"}),
        ("fdb-add", "cerana-vx", None, {"dst": "192.168.5.3"}),
        ("fdb-del", "cerana-vx", None, {"dst": "192.168.5.2"}),
    ]


def test_plan_node_recreates_a_vxlan_with_another_vni_and_refuses_foreign_devices():
    want = node_want()
    have = settled_node(want)
    other = bnio.NodeState(have.bridge, link("cerana-vx", "vxlan", master="cerana0", vni=5, port=4789), True,
                           fdb=("192.168.5.2",))  # fmt: skip
    assert [s.op for s in bnio.plan_node(other, want)] == ["delete-link", "create-vxlan", "set-link", "fdb-add"]
    with pytest.raises(bnio.NetError, match="cerana0 exists on this node but is a veth, not a bridge"):
        bnio.plan_node(bnio.NodeState(link("cerana0", "veth"), None, True), want)
    with pytest.raises(bnio.NetError, match="not a vxlan device"):
        bnio.plan_node(bnio.NodeState(have.bridge, link("cerana-vx", "bridge"), True), want)


def test_plan_node_check_mode_without_an_address_yet():
    steps = bnio.plan_node(bnio.NodeState(None, None, True), node_want(address=None, peers=()))
    assert [s.describe() for s in steps][:2] == ["create bridge cerana0", "add a new address to cerana0"]


def test_plan_bundle_from_nothing():
    want = bundle_want()
    steps = bnio.plan_bundle(bnio.BundleState(False, None), want)
    assert ops(steps) == [
        ("create-netns", "cerana-shop", None, {}),
        ("create-veth", want.host_veth, None, {"peer": "eth0", "netns": "cerana-shop", "mac": want.mac, "mtu": 1450}),
        ("set-link", want.host_veth, None, {"master": "cerana0", "state": "up"}),
        ("set-link", "eth0", "cerana-shop", {"state": "up"}),
        ("add-address", "eth0", "cerana-shop", {"address": "10.240.17.3/16"}),
        ("set-link", "lo", "cerana-shop", {"state": "up"}),
        ("default-route", "eth0", "cerana-shop", {"gateway": "10.240.0.9"}),
    ]
    assert steps[-1].describe() == "default route via 10.240.0.9 (in cerana-shop)"


def test_plan_bundle_settled_is_empty_and_repairs_drift():
    want = bundle_want()
    have = settled_bundle(want)
    assert bnio.plan_bundle(have, want) == []
    drifted = bnio.BundleState(
        netns=True,
        host_veth=link(want.host_veth, "veth", master=None, up=False, mtu=1500),
        eth0=link("eth0", "veth", mac="02:99:99:99:99:99", addresses=["10.240.1.1/16", want.address]),
        lo_up=False,
        gateway=None,
    )
    assert ops(bnio.plan_bundle(drifted, want)) == [
        ("set-link", want.host_veth, None, {"master": "cerana0", "mtu": 1450, "state": "up"}),
        ("set-link", "eth0", "cerana-shop", {"address": want.mac}),
        ("del-address", "eth0", "cerana-shop", {"address": "10.240.1.1/16"}),
        ("set-link", "lo", "cerana-shop", {"state": "up"}),
        ("default-route", "eth0", "cerana-shop", {"gateway": "10.240.0.9"}),
    ]


def test_plan_bundle_rebuilds_a_broken_pair():
    want = bundle_want()
    # the namespace was deleted behind our back while something kept the old one alive: the veth is orphaned
    orphan = bnio.BundleState(False, link(want.host_veth, "veth", master="cerana0"))
    assert [s.op for s in bnio.plan_bundle(orphan, want)][:3] == ["create-netns", "delete-link", "create-veth"]
    # eth0 without its node end
    lonely = bnio.BundleState(True, None, eth0=link("eth0", "veth", mac=want.mac), lo_up=True, gateway=want.gateway)
    assert ops(bnio.plan_bundle(lonely, want))[:2] == [
        ("delete-link", "eth0", "cerana-shop", {}),
        ("create-veth", want.host_veth, None, {"peer": "eth0", "netns": "cerana-shop", "mac": want.mac, "mtu": 1450}),
    ]
    with pytest.raises(bnio.NetError, match="not the veth of bundle shop"):
        bnio.plan_bundle(bnio.BundleState(True, link(want.host_veth, "bridge")), want)


def test_plan_absent():
    assert bnio.plan_absent(bnio.BundleState(False, None), "shop") == []
    steps = bnio.plan_absent(bnio.BundleState(True, link(bn.host_veth_name("shop"), "veth")), "shop")
    assert ops(steps) == [("delete-link", bn.host_veth_name("shop"), None, {}),
                          ("delete-netns", "cerana-shop", None, {})]  # fmt: skip


# -- changes and rollback --------------------------------------------------------------------


def test_changes_undo_in_reverse_and_keep_going():
    log = []
    changes = bnio.Changes()
    changes.do("a", lambda: log.append("do a"), undo=lambda: log.append("undo a"))
    changes.do("b", lambda: log.append("do b"))  # nothing to undo
    changes.do("c", lambda: log.append("do c"), undo=lambda: 1 / 0)
    changes.do("d", lambda: log.append("do d"), undo=lambda: log.append("undo d"))
    with pytest.raises(bnio.NetError, match="e failed: boom"):
        changes.do("e", lambda: (_ for _ in ()).throw(OSError("boom")), undo=lambda: log.append("undo e"))
    errors = changes.rollback()
    assert log == ["do a", "do b", "do c", "do d", "undo d", "undo a"]
    assert len(errors) == 1 and "'c'" in errors[0]
    assert changes.actions == ["a", "b", "c", "d", "e"]
    assert changes.rollback() == []


def test_changes_check_mode_only_records():
    changes = bnio.Changes(check_mode=True)
    assert changes.do("a", lambda: 1 / 0, undo=lambda: 1 / 0) is None
    assert changes.actions == ["a"] and changes.rollback() == []


# -- leases (over the in-memory store) -------------------------------------------------------


class Clock:
    def __init__(self, t=1_000_000):
        self.t = t

    def __call__(self):
        return self.t


def lease_env(net="10.240.0.0/29"):
    store, clock = MemoryStore(), Clock()
    ls = L.LeaseStore(store, pool=bn.POOL, server=NODE_A, clock=clock)
    return store, clock, ls, L.Pool(net=ipaddress.IPv4Network(net))


def test_lease_allocate_keep_renew_and_undo():
    store, clock, ls, pool = lease_env()
    mac = bn.bundle_mac("shop", NODE_A)
    changes = bnio.Changes()
    lease, new = bnio._lease(ls, pool, mac, "shop", 1000, changes, "bundle shop")
    assert new and lease.state == L.BOUND and lease.hostname == "shop"
    assert set(store.data) == {"service/leases/%s" % lease.ip, "service/macs/%s" % mac}
    # a second run keeps it while at least half is left ...
    again = bnio.Changes()
    assert bnio._lease(ls, pool, mac, "shop", 1000, again, "bundle shop") == (lease, False) and again.actions == []
    # ... and renews it below half, keeping the address
    clock.t += 600
    renewed, new = bnio._lease(ls, pool, mac, "shop", 1000, again, "bundle shop")
    assert not new and renewed.ip == lease.ip and renewed.expires == clock.t + 1000
    assert again.actions == ["renew the lease of %s (bundle shop)" % lease.ip]
    # undoing the first run's allocation leaves nothing of it in the store
    assert changes.rollback() == []
    assert store.data == {}


def test_lease_check_mode_predicts_without_writing():
    store, _clock, ls, pool = lease_env()
    changes = bnio.Changes(check_mode=True)
    assert bnio._lease(ls, pool, bn.bundle_mac("shop", NODE_A), "shop", 1000, changes, "bundle shop") == (None, True)
    assert store.data == {} and changes.actions == ["allocate an address in 10.240.0.0/29 (bundle shop)"]


def test_lease_exhausted_network_is_a_clear_error():
    store, _clock, ls, pool = lease_env()
    for i in range(6):  # a /29 has 6 addresses
        bnio._lease(ls, pool, bn.bundle_mac("b%d" % i, NODE_A), "b%d" % i, 1000, bnio.Changes(), "x")
    before = dict(store.data)
    with pytest.raises(bnio.NetError, match=r"service network 10.240.0.0/29 has no free address for the bundle b6"):
        bnio._lease(ls, pool, bn.bundle_mac("b6", NODE_A), "b6", 1000, bnio.Changes(), "bundle b6")
    assert store.data == before


def test_forget_removes_lease_and_mac_index():
    store, _clock, ls, pool = lease_env()
    mac = bn.bundle_mac("shop", NODE_A)
    lease, _new = bnio._lease(ls, pool, mac, "shop", 1000, bnio.Changes(), "bundle shop")
    other = bn.bundle_mac("web", NODE_A)
    bnio._lease(ls, pool, other, "web", 1000, bnio.Changes(), "bundle web")
    assert bnio.forget(ls, mac).ip == lease.ip
    assert not [k for k in store.data if lease.ip in k or mac in k]
    assert len(store.data) == 2  # the other bundle's lease and index
    assert bnio.forget(ls, mac) is None


# -- the unit joins the bundle's namespace ----------------------------------------------------


def test_unit_joins_the_network_namespace_only_with_a_record():
    overlay = {"id": "shop", "services": {"web": {"dataset": "root", "cmd": ["/bin/web"]}}, "datasets": {},
               "ports": {"8080": {}}}  # fmt: skip
    plain = su.build_spec(overlay, "web", "/var/lib/cerana", "/run/cerana")
    joined = su.build_spec(overlay, "web", "/var/lib/cerana", "/run/cerana", netns_path="/run/netns/cerana-shop")
    assert "NetworkNamespacePath" not in su.render_unit(plain, [])
    unit = su.render_unit(joined, []).splitlines()
    assert "NetworkNamespacePath=/run/netns/cerana-shop" in unit
    assert unit.index("NetworkNamespacePath=/run/netns/cerana-shop") > unit.index("[Service]")
    assert "--unshare-net" not in " ".join(unit)  # bwrap stays in the namespace systemd put it in


def test_renew_leases_for_the_node_tick(tmp_path):
    store, clock, ls, pool = lease_env("10.240.0.0/24")
    run = str(tmp_path)
    assert bnio.renew_leases(store, NODE_A, run, "10.240.0.0/24", now=clock.t) == {"renewed": [], "errors": []}
    bridge, _ = bnio._lease(ls, pool, bn.bridge_mac(NODE_A), "node-a", 1000, bnio.Changes(), "bridge")
    shop, _ = bnio._lease(ls, pool, bn.bundle_mac("shop", NODE_A), "shop", 1000, bnio.Changes(), "bundle shop")
    bn.write_network(run, bn.NetworkRecord.from_dict(dict(RECORD, address=shop.ip, prefix_len=24, gateway=bridge.ip,
                                                          mac=bn.bundle_mac("shop", NODE_A))))  # fmt: skip
    (tmp_path / "networks" / "bad.json").write_text("{")
    # more than half left: nothing written
    before = dict(store.data)
    out = bnio.renew_leases(store, NODE_A, run, "10.240.0.0/24", duration=1000, now=clock.t + 400)
    assert out["renewed"] == [] and store.data == before
    assert len(out["errors"]) == 1 and "bad.json" in out["errors"][0]
    # less than half left: both renewed at the same addresses, hostnames kept
    out = bnio.renew_leases(store, NODE_A, run, "10.240.0.0/24", duration=1000, now=clock.t + 600)
    assert sorted(out["renewed"]) == sorted([bridge.ip, shop.ip])
    assert ls.get(shop.ip).expires == clock.t + 1600 and ls.get(shop.ip).hostname == "shop"
    assert ls.get(bridge.ip).expires == clock.t + 1600 and ls.get(bridge.ip).hostname == "node-a"
    # expired and taken by another MAC meanwhile: an error for that lease, the others still renewed
    other = L.LeaseStore(store, pool=bn.POOL, server="other", clock=lambda: clock.t + 5000)
    other.ack(pool, "02:00:00:00:00:99", shop.ip, duration=1000, allow_unallocated=True, now=clock.t + 5000)
    out = bnio.renew_leases(store, NODE_A, run, "10.240.0.0/24", duration=1000, now=clock.t + 5000)
    assert out["renewed"] == [bridge.ip]
    assert any("bundle shop (%s)" % shop.ip in e and "leased to 02:00:00:00:00:99" in e for e in out["errors"])


def test_links_from_ip_json():
    """``ip -json -details addr show`` objects to Links: kind, master by name, IPv4 addresses only
    (sorted), vxlan id and port, flags."""
    from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio as bnio

    vx = bnio._to_link({
        "ifindex": 4, "ifname": "cerana-vx", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1450,
        "address": "02:AB:00:00:00:01", "master": "cerana0",
        "linkinfo": {"info_kind": "vxlan", "info_data": {"id": 10240, "port": 4789, "learning": True}},
        "addr_info": [{"family": "inet6", "local": "fe80::1", "prefixlen": 64}],
    })  # fmt: skip
    assert (vx.kind, vx.up, vx.mac, vx.master, vx.vni, vx.port, vx.addresses) == (
        "vxlan",
        True,
        "02:ab:00:00:00:01",
        "cerana0",
        10240,
        4789,
        (),
    )
    br = bnio._to_link({
        "ifindex": 3, "ifname": "cerana0", "flags": ["BROADCAST", "MULTICAST"], "mtu": 1450,
        "address": "02:00:00:00:00:02",
        "linkinfo": {"info_kind": "bridge", "info_data": {"id": "8000.2:0:0:0:0:2"}},
        "addr_info": [{"family": "inet", "local": "10.240.9.1", "prefixlen": 16},
                      {"family": "inet", "local": "10.240.10.1", "prefixlen": 16}],
    })  # fmt: skip
    assert (br.kind, br.up, br.master, br.vni, br.addresses) == ("bridge", False, None, None,
                                                                 ("10.240.9.1/16", "10.240.10.1/16"))  # fmt: skip
    plain = bnio._to_link({"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK"], "mtu": 65536})
    assert (plain.kind, plain.up, plain.mac, plain.addresses) == (None, False, "", ())


class _FakeIp:
    def __init__(self, links, fdb):
        self._links, self._fdb = links, fdb

    def links(self):
        return self._links

    def fdb(self, dev):
        return self._fdb


def test_flood_peers_and_own_addresses_from_ip_json():
    from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio as bnio

    ipr = _FakeIp(
        {"eth0": {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "192.0.2.10", "prefixlen": 24},
                                                   {"family": "inet6", "local": "2001:db8::1", "prefixlen": 64}]},
         "lo": {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]}},
        [{"mac": "00:00:00:00:00:00", "dst": "192.0.2.12", "flags": ["self"]},
         {"mac": "00:00:00:00:00:00", "dst": "192.0.2.9", "flags": ["self"]},
         {"mac": "02:11:22:33:44:55", "dst": "192.0.2.40", "flags": ["self"]},  # learnt, not a flood entry
         {"mac": "02:11:22:33:44:55", "master": "cerana0", "flags": []}],
    )  # fmt: skip
    assert bnio._fdb_peers(ipr, "cerana-vx") == ("192.0.2.9", "192.0.2.12")
    assert bnio._own_addresses(ipr) == ("127.0.0.1", "192.0.2.10")

"""The pure parts of bundle networks (module_utils/_bundle_net.py): names, MACs, overlay peers, records."""

from __future__ import annotations

import json

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net as bn
from ansible_collections.cerana.platform.plugins.module_utils import _models as m

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

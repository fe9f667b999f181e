"""The published-port renderer (_portmap): rotation over healthy instances, port filters, deterministic text."""

from __future__ import annotations

import random
import re

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _portmap as pm

BRIDGE = "cerana0"


def bundle(bid, ports=None):
    return m.Bundle.from_dict({"id": bid, "ports": ports or {}})


def hb(bid, node, address, *checks, state="running"):
    """A heartbeat of ``bid`` on ``node``; ``checks`` are the error texts of its checks (None passes)."""
    health = {f"c{i}": err for i, err in enumerate(checks)}
    return m.BundleHeartbeat(
        bundle=bid,
        node=node,
        time="2026-11-30T03:04:05Z",
        address=address,
        services={"web": {"state": state, "health": health}},
    )


SHOP = bundle("shop", {80: {"port": 80, "public": True, "external_port": 8080}})


def dnat_targets(text, external_port):
    """{address} the DNAT rule for ``external_port`` rotates over (prerouting chain), or None without a rule."""
    pre = text.split("chain prerouting", 1)[1].split("}\n", 1)[0] if "chain prerouting" in text else ""
    for line in pre.splitlines():
        if f"tcp dport {external_port} " in line:
            mapped = re.search(r"map \{ (.*?) \}", line)
            if mapped:
                return {pair.split(" : ")[1] for pair in mapped.group(1).split(", ")}
            return {re.search(r"dnat to ([0-9.]+):", line).group(1)}
    return None


def test_rotation_is_over_the_healthy_instances_only():
    hbs = [
        hb("shop", "n1", "10.240.0.2", None),
        hb("shop", "n2", "10.240.0.3", "GET http://10.240.0.3:80/: connection refused"),
        hb("shop", "n3", "10.240.0.10", None, None),
        hb("shop", "n4", "10.240.0.4", "not checked yet"),
        hb("shop", "n5", "10.240.0.5", "service is not running", state="stopped"),
        hb("shop", "n6", None, None),  # no bundle network on that node: nowhere to send traffic
    ]
    rs = pm.render([SHOP], hbs, BRIDGE)
    assert rs.published == (pm.Published(8080, "shop", 80, ("10.240.0.2", "10.240.0.10")),)
    assert dnat_targets(rs.text, 8080) == {"10.240.0.2", "10.240.0.10"}
    # numeric order of the addresses, numbered from 0, port of the bundle
    assert "numgen inc mod 2 map { 0 : 10.240.0.2, 1 : 10.240.0.10 } : 80" in rs.text
    # both the prerouting (from outside) and the output (from the node) chains, not for loopback
    assert rs.text.count("tcp dport 8080 dnat to numgen") == 2
    assert "ip daddr != 127.0.0.0/8 fib daddr type local tcp dport 8080" in rs.text
    assert 'oifname "cerana0" ct status dnat meta l4proto tcp ct original proto-dst { 8080 } masquerade' in rs.text
    assert "reject" not in rs.text


def test_an_unhealthy_instance_leaves_the_rotation_and_comes_back():
    good = [hb("shop", "n1", "10.240.0.2", None), hb("shop", "n2", "10.240.0.3", None)]
    before = pm.render([SHOP], good, BRIDGE).text
    sick = [good[0], hb("shop", "n2", "10.240.0.3", "status 500, expected 200")]
    during = pm.render([SHOP], sick, BRIDGE).text
    after = pm.render([SHOP], list(reversed(good)), BRIDGE).text
    assert dnat_targets(before, 8080) == {"10.240.0.2", "10.240.0.3"}
    assert dnat_targets(during, 8080) == {"10.240.0.2"}
    assert "dnat to 10.240.0.2:80" in during and "numgen" not in during  # one target: a plain DNAT
    assert after == before


def test_no_healthy_instance_resets_connections_instead_of_publishing():
    hbs = [hb("shop", "n1", "10.240.0.2", "connection refused")]
    rs = pm.render([SHOP], hbs, BRIDGE)
    assert rs.published == (pm.Published(8080, "shop", 80, ()),)
    assert dnat_targets(rs.text, 8080) is None
    assert "dnat" not in rs.text and "masquerade" not in rs.text
    assert "chain input {" in rs.text
    assert 'tcp dport 8080 reject with tcp reset comment "shop 80 no healthy instance"' in rs.text
    # no instance anywhere is the same: the declared port is reserved on every node
    assert pm.render([SHOP], [], BRIDGE).text == rs.text


def test_several_bundles_and_ports():
    shop = bundle(
        "shop",
        {
            80: {"port": 80, "public": True, "external_port": 8080},
            443: {"port": 443, "public": True},  # no external_port: published on 443
            9000: {"port": 9000},  # not public: never published
        },
    )
    blog = bundle("blog", {8000: {"port": 8000, "public": True, "external_port": 8081}})
    hbs = [
        hb("shop", "n1", "10.240.0.2", None),
        hb("shop", "n2", "10.240.0.3", None),
        hb("blog", "n1", "10.240.0.7", None),
        hb("blog", "n2", "10.240.0.8", "down"),
    ]
    rs = pm.render([shop, blog], hbs, BRIDGE)
    assert [(p.external_port, p.bundle, p.port) for p in rs.published] == [
        (443, "shop", 443),
        (8080, "shop", 80),
        (8081, "blog", 8000),
    ]
    assert dnat_targets(rs.text, 443) == {"10.240.0.2", "10.240.0.3"}
    assert dnat_targets(rs.text, 8080) == {"10.240.0.2", "10.240.0.3"}
    assert dnat_targets(rs.text, 8081) == {"10.240.0.7"}
    assert dnat_targets(rs.text, 9000) is None
    assert "map { 0 : 10.240.0.2, 1 : 10.240.0.3 } : 443" in rs.text
    assert "ct original proto-dst { 443, 8080, 8081 } masquerade" in rs.text
    assert rs.problems == ()


def test_an_external_port_published_twice_goes_to_the_first_bundle_by_id():
    a = bundle("alpha", {80: {"port": 80, "public": True, "external_port": 8080}})
    b = bundle("beta", {81: {"port": 81, "public": True, "external_port": 8080}})
    rs = pm.render([b, a], [hb("alpha", "n1", "10.240.0.2", None), hb("beta", "n1", "10.240.0.3", None)], BRIDGE)
    assert rs.published == (pm.Published(8080, "alpha", 80, ("10.240.0.2",)),)
    assert rs.problems == (
        "bundle beta port 81: external port 8080 is already published for bundle alpha port 80; not published",
    )


def test_connected_bundles_decide_who_reaches_a_non_public_port():
    db = bundle("db", {5432: {"port": 5432, "connected_bundles": ["web"]}, 80: {"port": 80, "public": True}})
    web = bundle("web")
    other = bundle("other")
    hbs = [
        hb("db", "n1", "10.240.0.20", None),
        hb("db", "n2", "10.240.0.21", "failing"),  # unhealthy still counts: it is a db instance
        hb("web", "n1", "10.240.0.30", None),
        hb("web", "n2", "10.240.0.31", None),
        hb("other", "n1", "10.240.0.40", None),
        hb("gone", "n1", "10.240.0.50", None),  # not declared, not connected
    ]
    rs = pm.render([db, web, other], hbs, BRIDGE, trusted=["10.240.0.1", "10.240.0.9"])
    assert rs.guarded == (
        pm.Guarded(
            "db",
            5432,
            ("10.240.0.20", "10.240.0.21"),
            ("10.240.0.1", "10.240.0.9", "10.240.0.20", "10.240.0.21", "10.240.0.30", "10.240.0.31"),
        ),
    )
    rule = next(line.strip() for line in rs.text.splitlines() if "tcp dport 5432" in line)
    assert rule == (
        "ip daddr { 10.240.0.20, 10.240.0.21 } tcp dport 5432 tcp flags & (syn | ack) == syn "
        "ip saddr != { 10.240.0.1, 10.240.0.9, 10.240.0.20, 10.240.0.21, 10.240.0.30, 10.240.0.31 } drop "
        'comment "db 5432"'
    )
    assert "10.240.0.40" not in rs.text and "10.240.0.50" not in rs.text
    assert "table bridge cerana {" in rs.text and "type filter hook forward priority filter" in rs.text
    # the public port of the same bundle is not filtered
    assert "tcp dport 80 " not in rs.text.split("table bridge", 1)[1]


def test_a_non_public_port_without_connected_bundles_is_reached_by_its_own_bundle_only():
    db = bundle("db", {5432: {"port": 5432}})
    rs = pm.render([db], [hb("db", "n1", "10.240.0.20", None), hb("web", "n1", "10.240.0.30")], BRIDGE)
    assert rs.guarded == (pm.Guarded("db", 5432, ("10.240.0.20",), ("10.240.0.20",)),)
    assert "table ip cerana" not in rs.text  # nothing published: no NAT table at all


def test_nothing_to_publish_or_guard_renders_nothing():
    assert pm.render([], [], BRIDGE) == pm.Ruleset()
    assert pm.render([], [], BRIDGE).empty
    # a non-public port without instances needs no rule; undeclared bundles are ignored
    rs = pm.render([bundle("db", {5432: {"port": 5432}}), bundle("plain")], [hb("x", "n1", "10.240.0.2")], BRIDGE)
    assert rs.text == "" and rs.published == () and rs.guarded == ()


def test_the_text_is_deterministic():
    db = bundle("db", {5432: {"port": 5432, "connected_bundles": ["web", "api"]}})
    web = bundle("web", {80: {"port": 80, "public": True, "external_port": 8080}})
    api = bundle("api", {81: {"port": 81, "public": True}})
    hbs = [hb(b, f"n{i}", f"10.240.{i}.{j}", None) for i in range(3) for j, b in enumerate(("db", "web", "api"), 2)]
    first = pm.render([db, web, api], hbs, BRIDGE, trusted=["10.240.9.1", "10.240.8.1"])
    rng = random.Random(7)
    for _ in range(20):
        shuffled, bundles, trusted = list(hbs), [api, db, web], ["10.240.8.1", "10.240.9.1"]
        rng.shuffle(shuffled)
        rng.shuffle(bundles)
        rng.shuffle(trusted)
        assert pm.render(bundles, shuffled, BRIDGE, trusted=trusted) == first
    assert first.text.endswith("}\n")
    assert "map { 0 : 10.240.0.3, 1 : 10.240.1.3, 2 : 10.240.2.3 } : 80" in first.text


def test_an_address_claimed_twice_is_left_out():
    hbs = [hb("shop", "n1", "10.240.0.2", None), hb("shop", "n2", "10.240.0.2", None), hb("shop", "n3", "10.240.0.3")]
    rs = pm.render([SHOP], hbs, BRIDGE)
    assert dnat_targets(rs.text, 8080) == {"10.240.0.3"}
    assert rs.problems == ("address 10.240.0.2 is claimed by shop on n1, shop on n2; left out",)


def test_the_bridge_must_be_an_interface_name():
    with pytest.raises(ValueError, match="interface name"):
        pm.render([SHOP], [], 'cerana0"; flush ruleset')
    with pytest.raises(ValueError):
        pm.render([SHOP], [], "")


def test_apply_loads_only_a_changed_text_in_one_transaction():
    calls = []

    def run(nft, script, timeout):
        calls.append(script)

    text = pm.render([SHOP], [hb("shop", "n1", "10.240.0.2", None)], BRIDGE).text
    assert pm.apply_ruleset(text, None, run=run) is True
    assert pm.apply_ruleset(text, text, run=run) is False  # unchanged: nft is not run
    assert pm.apply_ruleset("", text, run=run) is True  # nothing left: the tables go
    assert pm.apply_ruleset("", "", run=run) is False
    assert len(calls) == 2
    drop = "table ip cerana\ndelete table ip cerana\ntable bridge cerana\ndelete table bridge cerana\n"
    assert calls[0] == drop + text
    assert calls[1] == drop


def test_apply_reports_a_missing_nft_and_its_errors(tmp_path):
    with pytest.raises(pm.NftMissing):
        pm.apply_ruleset("table ip cerana {\n}\n", nft=str(tmp_path / "no-nft"))
    fake = tmp_path / "nft"
    fake.write_text(
        "#!/bin/sh\ncat >/dev/null\necho 'Error: Could not process rule: Operation not permitted' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    with pytest.raises(pm.NftError, match="Operation not permitted"):
        pm.apply_ruleset("", nft=str(fake))


def test_the_heartbeat_address_is_an_optional_ipv4_address():
    base = {"bundle": "shop", "node": "n1", "time": "2026-11-30T03:04:05Z"}
    assert m.BundleHeartbeat.from_dict(base).address is None
    assert m.BundleHeartbeat.from_dict({**base, "address": "10.240.0.2"}).address == "10.240.0.2"
    with pytest.raises(m.ValidationError) as e:
        m.BundleHeartbeat.from_dict({**base, "address": "10.240.0.300"})
    assert e.value.path == "bundle_heartbeat.address" and "IPv4 address" in e.value.reason


def test_an_instance_missing_one_of_its_bundles_services_stays_out_of_the_rotation():
    two = m.Bundle.from_dict({"id": "shop", "services": {"web": {}, "api": {}},
                              "ports": {80: {"port": 80, "public": True, "external_port": 8080}}})  # fmt: skip
    partial = hb("shop", "n1", "10.240.0.5")  # reports only "web": "api" is not started yet
    full = m.BundleHeartbeat(bundle="shop", node="n2", time="2026-11-30T03:04:05Z", address="10.240.0.6",
                             services={"web": {"state": "running", "health": {}},
                                       "api": {"state": "running", "health": {}}})  # fmt: skip
    text = pm.render([two], [partial, full], BRIDGE).text
    assert dnat_targets(text, 8080) == {"10.240.0.6"}

"""Pure core of cerana-node-tick: node and heartbeat values, check scheduling, history pruning, backoff, link state."""

from __future__ import annotations

import datetime

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _instances
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from cerana_nodetick import core
from cerana_nodetick.collect import MemInfo, Running, Sample

NODE = "0123456789abcdef0123456789abcdef"
T0 = datetime.datetime(2026, 11, 30, 3, 4, 5, 123456, tzinfo=datetime.UTC)
SAMPLE = Sample(
    hostname="n1",
    addresses=("192.0.2.10", "2001:db8::10"),
    cpu_count=4,
    load=(0.123, 0.5, 1.0),
    memory=MemInfo(total=8 << 30, available=3 << 30),
    disk_total=100 << 30,
    disk_free=40 << 30,
)


def running(bundle, service, datasets=(), alive=True, started=T0):
    inst = _instances.Instance(bundle, service, 42, m.format_time(started), tuple(datasets))
    return Running(inst, alive)


def test_build_node_round_trips_and_uses_the_collected_values():
    node = core.build_node(NODE, SAMPLE, {"zone": "a", "consul_role": "server"}, T0)
    assert node == m.Node.from_dict(node.to_dict())
    assert node.id == NODE
    assert node.heartbeat == "2026-11-30T03:04:05.123456Z"
    assert node.addresses == ("192.0.2.10", "2001:db8::10")
    assert (node.memory_total, node.memory_free) == (8 << 30, 3 << 30)
    assert (node.disk_total, node.disk_free) == (100 << 30, 40 << 30)
    assert node.load == (0.12, 0.5, 1.0)
    assert list(node.labels) == ["consul_role", "zone"]


def test_dataset_heartbeats_in_use_only_when_a_live_instance_mounts_it():
    inst = [running("shop", "web", ["web-data"]), running("shop", "db", ["db-data"], alive=False)]
    hbs = core.dataset_heartbeats(NODE, ["web-data", "db-data", "spare"], inst, T0)
    assert sorted(hbs) == [
        f"heartbeats/datasets/db-data/{NODE}",
        f"heartbeats/datasets/spare/{NODE}",
        f"heartbeats/datasets/web-data/{NODE}",
    ]
    assert hbs[f"heartbeats/datasets/web-data/{NODE}"].in_use is True
    assert hbs[f"heartbeats/datasets/db-data/{NODE}"].in_use is False  # its instance is dead
    assert hbs[f"heartbeats/datasets/spare/{NODE}"].in_use is False
    assert all(hb.node == NODE for hb in hbs.values())  # one node id everywhere, never an IP


def check(kind="command", interval=10, **args):
    args = args or {"cmd": ["true"]}
    return m.HealthCheck.from_dict({"id": "c", "kind": kind, "args": args, "interval": interval, "timeout": 1})


def test_bundle_heartbeats_report_results_pending_and_stopped():
    inst = [running("shop", "web"), running("shop", "db", alive=False), running("other", "x")]
    checks = {"shop": {"web": {"up": check(), "port": check()}, "db": {"up": check()}}}
    results = {("shop", "web", "up"): None, ("shop", "web", "port"): "tcp 127.0.0.1:80: connection refused"}
    hbs = core.bundle_heartbeats(NODE, inst, checks, results, T0)
    shop = hbs[m.bundle_heartbeat_key("shop", NODE)]
    assert shop == m.BundleHeartbeat.from_dict(shop.to_dict())
    assert shop.services == {
        "db": {"state": "stopped", "health": {"up": core.NOT_RUNNING}},
        "web": {"state": "running", "health": {"port": "tcp 127.0.0.1:80: connection refused", "up": None}},
    }
    assert not shop.healthy()
    other = hbs[m.bundle_heartbeat_key("other", NODE)]  # an undeclared bundle: no checks, still reported
    assert other.services == {"x": {"state": "running", "health": {}}}
    assert other.healthy()


def test_bundle_heartbeats_pending_check_is_not_reported_as_passing():
    hbs = core.bundle_heartbeats(NODE, [running("shop", "web")], {"shop": {"web": {"up": check()}}}, {}, T0)
    assert hbs[m.bundle_heartbeat_key("shop", NODE)].services["web"]["health"] == {"up": core.NOT_CHECKED}


def test_service_checks_from_an_overlaid_bundle():
    svc = m.Service.from_dict(
        {"id": "web", "dataset": "d", "cmd": ["x"], "health_checks": {"up": {"kind": "tcp", "args": {"port": 80}}}}
    )
    bundle = m.Bundle.from_dict({"id": "shop", "services": {"web": {"id": "web"}}})
    overlaid = m.overlay_bundle(bundle, {"web": svc}, {"d": m.Dataset(id="d")})
    checks = core.service_checks(overlaid)
    assert list(checks) == ["web"]
    assert checks["web"]["up"].kind == "tcp"
    assert checks["web"]["up"].args["port"] == 80
    assert core.service_checks(None) == {}


@pytest.mark.parametrize(
    ("last", "in_flight", "now", "due"),
    [
        ({}, (), 0.0, ["a", "b"]),  # never run
        ({"a": 0.0, "b": 0.0}, (), 9.9, []),  # interval 10 not reached
        ({"a": 0.0, "b": 5.0}, (), 10.0, ["a"]),
        ({"a": 0.0, "b": 0.0}, ("a",), 20.0, ["b"]),  # still running: not started twice
    ],
)
def test_due_checks(last, in_flight, now, due):
    wanted = {("s", "v", "a"): check(), ("s", "v", "b"): check()}
    got = core.due_checks(wanted, {("s", "v", k): t for k, t in last.items()}, [("s", "v", k) for k in in_flight], now)
    assert got == [("s", "v", k) for k in due]


@pytest.mark.parametrize(
    ("last", "now", "interval", "due"),
    [(None, 0.0, 60.0, True), (0.0, 59.9, 60.0, False), (0.0, 60.0, 60.0, True)],
)
def test_history_due(last, now, interval, due):
    assert core.history_due(last, now, interval) is due


def hkey(node, when):
    return m.history_key(node, m.format_time(when))


def test_history_to_prune_keeps_the_retention_window_and_other_nodes():
    keys = [hkey(NODE, T0 - datetime.timedelta(seconds=s)) for s in (0, 30, 60, 61, 3600)]
    keys += [hkey("f" * 32, T0 - datetime.timedelta(days=9)), f"history/nodes/{NODE}/not-a-time"]
    pruned = core.history_to_prune(keys, NODE, T0, 60)
    assert pruned == sorted([keys[3], keys[4]])
    assert core.history_to_prune(keys, NODE, T0, 0) == sorted(keys[:5])  # 0 keeps none


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (1000, 30.0)],
)
def test_backoff_doubles_up_to_the_cap(attempt, expected):
    assert core.backoff(attempt, 1.0, 30.0) == expected


def test_link_logs_once_per_state_change():
    """A long outage: many failed ticks, exactly one line going down and one coming back."""
    link, lines = core.Link(), []
    outcomes = ["ok", "ok"] + ["unreachable"] * 20 + ["ok", "ok", "failing", "failing", "ok"]
    clock = 100.0
    waits = []
    for outcome in outcomes:
        link, msg = core.link_after(link, outcome, "connection refused" if outcome != "ok" else "", clock)
        waits.append(core.next_wait(link, 5.0, 0.5, 1.0, 30.0))
        if msg:
            lines.append(msg)
        clock += 1.0
    assert len(lines) == 5, lines
    assert lines[0].startswith("connected to Consul")
    assert lines[1].startswith("Consul unreachable: connection refused")
    assert lines[2].startswith("Consul is back after 20.0 s (20 failed ticks)")
    assert lines[3].startswith("tick failed")
    assert lines[4].startswith("Consul is back")
    assert waits[0] == 4.5  # the rest of the interval
    assert waits[2:8] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]  # backoff while unreachable, capped
    assert waits[22] == 4.5  # back to the interval at once


def test_link_failing_logs_again_when_the_error_changes():
    link, _ = core.link_after(core.Link(), "ok", "", 0.0)
    link, first = core.link_after(link, "failing", "permission denied", 1.0)
    link, same = core.link_after(link, "failing", "permission denied", 2.0)
    link, other = core.link_after(link, "failing", "rejected", 3.0)
    assert first and other and same is None


def test_bundle_heartbeats_carry_the_bundle_network_address():
    inst = [running("shop", "web"), running("blog", "web")]
    hbs = core.bundle_heartbeats(NODE, inst, {}, {}, T0, {"shop": "10.240.0.7", "gone": "10.240.0.8"})
    assert hbs[m.bundle_heartbeat_key("shop", NODE)].address == "10.240.0.7"
    assert hbs[m.bundle_heartbeat_key("blog", NODE)].address is None  # no network for it here
    assert m.bundle_heartbeat_key("gone", NODE) not in hbs  # a network without instances sends nothing
    again = m.BundleHeartbeat.from_json(hbs[m.bundle_heartbeat_key("shop", NODE)].to_json())
    assert again.address == "10.240.0.7"


def test_placed_args_send_default_host_checks_to_the_instance():
    place = core.Placement("10.240.0.7", "/run/netns/cerana-shop")
    http = check("http", port=80, path="/health")
    assert core.placed_args(http, None)["host"] == "127.0.0.1"
    assert core.placed_args(http, place) == {**http.args, "host": "10.240.0.7"}
    assert http.args["host"] == "127.0.0.1"  # the check itself is left alone
    assert core.placed_args(check("tcp", port=5432), place)["host"] == "10.240.0.7"
    # a host given explicitly is kept
    assert core.placed_args(check("tcp", port=53, host="192.0.2.1"), place)["host"] == "192.0.2.1"
    # command and file checks have no host
    assert core.placed_args(check("command", cmd=["true"]), place) == {"cmd": ["true"]}
    assert "host" not in core.placed_args(check("file", path="/etc/hostname"), place)

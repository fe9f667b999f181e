"""The cluster tick on the 3-node lab deployed by ``site.yml`` (a tick on each Consul server).

Nothing but declarations goes in: the ticks place the sample bundle (redundancy 2), copy its
dataset where needed and start it, through the converge playbook over ssh. In file order:

1. a bundle with redundancy 2 runs healthy on 2 distinct nodes and answers on its published
   port from every node;
2. a changed env var rolls out one instance at a time: at every sample one instance is healthy;
3. a node whose heartbeats stop (its node tick stopped) loses its placement: the bundle is
   healthy on another node; when the node comes back with its old instance, the excess goes;
4. bad declarations show in the plan and in the events, and the loop keeps running;
5. Consul restarted on the leader's node in the middle of a reconcile: it converges after;
6. over the whole module, the events never show two ticks applying at once;
7. the bundle deleted: gone from every node.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from platform_lab import NODES, Platform, usable, wait_for
from sample_app import controller_play, declare, get, undeclare

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

if not usable():
    pytest.skip("needs root, iproute2, systemd-container and debootstrap", allow_module_level=True)

BUNDLE = "tshop"
EXTERNAL = 30090
NODE_TTL = 3


def kv(plat: Platform, key: str, recurse: bool = False) -> Any:
    status, entries = plat.http("node1", f"/v1/kv/cerana/{key}{'?recurse' if recurse else ''}")
    if status != 200:
        return {} if recurse else None
    decoded = {e["Key"].removeprefix("cerana/"): json.loads(base64.b64decode(e["Value"])) for e in entries}
    return decoded if recurse else next(iter(decoded.values()))


def node_ids(plat: Platform) -> dict[str, str]:
    return {n: plat.machine_id(n) for n in NODES}


def instances(plat: Platform) -> dict[str, dict[str, Any]]:
    """{node id: heartbeat} of the bundle."""
    return {k.rsplit("/", 1)[1]: v for k, v in kv(plat, f"heartbeats/bundles/{BUNDLE}/", recurse=True).items()}


def healthy_nodes(plat: Platform) -> set[str]:
    out = set()
    for node, hb in instances(plat).items():
        services = hb.get("services") or {}
        if services and all(s["state"] == "running" and not any(s["health"].values()) for s in services.values()):
            out.add(node)
    return out


def events(plat: Platform) -> list[dict[str, Any]]:
    return [v for _k, v in sorted(kv(plat, "cluster/events/", recurse=True).items())]


def tick_pids(plat: Platform) -> dict[str, str]:
    return {n: plat.run_in(n, "systemctl", "show", "-P", "MainPID", "cerana-cluster-tick.service") for n in NODES}


@pytest.fixture(scope="module")
def lab(site_platform) -> Iterator[dict[str, Any]]:
    plat = site_platform
    controller_play(plat, [{"cerana.platform.cluster_config": {"node_ttl": NODE_TTL}}], "config")
    for node in NODES:
        plat.run_in(node, "systemctl", "start", "cerana-cluster-tick.service")
    started = time.monotonic()
    declare(plat, "hello", bundle=BUNDLE, external=EXTERNAL)
    yield {"platform": plat, "ids": node_ids(plat), "declared": started}


def test_bundle_runs_on_two_nodes_and_answers_on_every_node(lab):
    plat = lab["platform"]
    nodes = wait_for(lambda: (lambda h: h if len(h) == 2 else None)(healthy_nodes(plat)), 240, interval=0.5,
                     what="2 healthy instances")  # fmt: skip
    lab["timings"] = {"declared_to_healthy": time.monotonic() - lab["declared"]}
    assert len(nodes) == 2
    for target in NODES:
        answer = wait_for(lambda t=target: (lambda a: a if "front" in a else None)(
            get(plat, "node3", t, port=EXTERNAL)), 30, what=f"an answer on {target}:{EXTERNAL}")  # fmt: skip
        assert answer["greeting"] == "hello"
    runs = [e for e in events(plat) if e.get("kind") == "run"]
    assert runs and all(e["status"] in ("ok", "partial", "failed") for e in runs)


def test_env_change_rolls_one_instance_at_a_time(lab):
    plat = lab["platform"]
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(len(healthy_nodes(plat)))
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        declare(plat, "bonjour", bundle=BUNDLE, external=EXTERNAL)

        def rolled() -> bool:
            answers = [get(plat, "node3", "node1", port=EXTERNAL).get("greeting") for _ in range(10)]
            return set(answers) == {"bonjour"} and len(healthy_nodes(plat)) == 2

        wait_for(rolled, 240, interval=1, what="the new greeting on both instances")
    finally:
        stop.set()
        watcher.join()
    assert samples and min(samples) >= 1, samples


def test_lost_node_is_replaced_and_the_excess_goes_when_it_returns(lab):
    plat, ids = lab["platform"], lab["ids"]
    by_id = {v: k for k, v in ids.items()}
    placed = sorted(by_id[n] for n in healthy_nodes(plat))
    victim = placed[-1]
    plat.run_in(victim, "systemctl", "stop", "cerana-node-tick.service")  # its heartbeats stop
    lost = time.monotonic()
    try:

        def replaced() -> set[str] | None:
            found = healthy_nodes(plat)
            return found if len(found) == 2 and ids[victim] not in found else None

        others = wait_for(replaced, 2 * NODE_TTL + 120, interval=0.5, what="2 healthy instances without the lost node")
        lab["timings"]["node_loss_to_healthy"] = time.monotonic() - lost
        assert ids[victim] not in others
    finally:
        before = {e["run"] for e in events(plat) if e.get("kind") == "run"}
        plat.run_in(victim, "systemctl", "start", "cerana-node-tick.service")
    # The node is back with its old instance (still running: only its node tick stopped):
    # three instances until the tick stops the excess one, then exactly two.

    def excess_stopped() -> list[dict[str, Any]]:
        return [e for e in events(plat) if e.get("kind") == "run" and e["run"] not in before
                and any(BUNDLE in n.get("stop_bundles", []) for n in e["plan"]["nodes"].values())]  # fmt: skip

    stopped = wait_for(excess_stopped, 180, interval=0.5, what="a run stopping the excess instance")
    assert stopped[0]["status"] == "ok", stopped
    wait_for(lambda: len(instances(plat)) == 2 and len(healthy_nodes(plat)) == 2, 60, interval=0.5,
             what="exactly two healthy instances")  # fmt: skip
    time.sleep(3)
    assert len(instances(plat)) == 2


def test_bad_declarations_are_reported_and_the_loop_keeps_running(lab):
    plat = lab["platform"]
    pids = tick_pids(plat)
    controller_play(plat, [
        {"cerana.platform.bundle": {"id": "broken", "services": [{"id": "no-such-service"}]}},
        {"cerana.platform.bundle": {"id": "too-big", "redundancy": 5, "services": [{"id": "backend"}],
                                    "ports": [{"port": 8081}]}},
        {"cerana.platform.plan": {}, "register": "plan"},
        {"ansible.builtin.copy": {"content": "{{ plan.plan | to_json }}", "dest": str(plat.workdir / "plan.json")}},
    ], "bad")  # fmt: skip
    problems = {p["object"] for p in json.loads((plat.workdir / "plan.json").read_text())["problems"]}
    assert {"bundle/broken", "bundle/too-big"} <= problems
    wait_for(lambda: any("bundle/broken" in json.dumps(e.get("problems", [])) for e in events(plat)), 60,
             what="an event naming the bad bundle")  # fmt: skip
    controller_play(plat, [{"cerana.platform.bundle": {"id": b, "state": "absent"}} for b in ("broken", "too-big")],
                    "unbad")  # fmt: skip
    assert tick_pids(plat) == pids


def leader_node(plat: Platform) -> str | None:
    lock = None
    status, entries = plat.http("node1", "/v1/kv/cerana/cluster/tick/lock")
    if status == 200 and entries and entries[0].get("Session"):
        status, info = plat.http("node1", f"/v1/session/info/{entries[0]['Session']}")
        lock = info[0]["Node"] if status == 200 and info else None
    return lock


def test_consul_restart_mid_reconcile_converges_after(lab):
    plat = lab["platform"]
    leader = wait_for(lambda: leader_node(plat), 30, what="a tick holding the lock")
    declare(plat, "hallo", bundle=BUNDLE, external=EXTERNAL)
    time.sleep(1)  # the tick wakes and starts converging
    plat.run_in(leader, "systemctl", "restart", "consul.service")

    def converged() -> bool:
        answers = [get(plat, "node3", "node2", port=EXTERNAL).get("greeting") for _ in range(10)]
        return set(answers) == {"hallo"} and len(healthy_nodes(plat)) == 2

    wait_for(converged, 300, interval=1, what="convergence after the Consul restart")


def _interval(event: dict[str, Any]) -> tuple[float, float]:
    end = datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
    return end - float(event.get("duration", 0)), end


def test_no_two_ticks_ever_applied_at_once(lab):
    runs = sorted((_interval(e), e["applier"]) for e in events(lab["platform"]) if e.get("kind") == "run")
    assert runs
    for ((_s1, e1), a1), ((s2, _e2), a2) in itertools.pairwise(runs):
        assert a1 == a2 or s2 >= e1 - 0.05, (a1, a2, e1, s2)


def test_deleted_bundle_is_gone_everywhere(lab):
    plat = lab["platform"]
    undeclare(plat, BUNDLE)

    def gone() -> bool:
        units = [
            plat.run_in(n, "sh", "-c", f"ls /etc/systemd/system/ | grep -c '^cerana-{BUNDLE}_' || true") for n in NODES
        ]
        return not instances(plat) and all(u.strip() == "0" for u in units)

    wait_for(gone, 180, interval=1, what="the bundle gone from every node")
    print("timings:", lab.get("timings"))

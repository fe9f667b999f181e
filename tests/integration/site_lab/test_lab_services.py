"""A bundle of two plain-Python services on the 3-node nspawn lab deployed by ``site.yml``.

The services issue's acceptance test, with every part real: the dataset is this machine's
Python and two small services (``cerana_lab/sample.py``) imported with ``dataset_import`` and copied with
``dataset_replica`` through the nodes' data servers; ``bundle_network`` and
``service_instance`` run on node1 and node2 through ansible-playbook (nspawn connection,
the node venv's Python); the node ticks run the health checks and keep the published-port
rules (nftables) of every node. In file order:

1. the bundle answers on the published port of every node, from another node, through its
   front, which forwards to the backend in the same bundle namespace; limits are in the units;
2. a killed backend is restarted by systemd (new main pid, same unit);
3. a changed env var of the front restarts only the front instances;
4. an instance marked unhealthy leaves the rotation: all requests go to the other one; it
   comes back when healthy;
5. ``bundle_instance`` (network and every service in one call): check mode, a run that
   restarts only the changed front and removes an instance of an undeclared service, a
   second run that changes nothing;
6. removal (``bundle_instance`` absent) leaves no unit, namespace, address or lease;
   undeclared, no published-port rule.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from platform_lab import Platform, usable, wait_for
from sample_app import BUNDLE, EXTERNAL, declare, fronts_are, get, undeclare

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

if not usable():
    pytest.skip("needs root, iproute2, systemd-container and debootstrap", allow_module_level=True)

RUNNERS = ("node1", "node2")
NODE_PY = "/opt/cerana/venv/bin/python"


def on_runners(platform: Platform, tasks: list[dict[str, Any]], nodes=RUNNERS) -> dict[str, Any]:
    """Run ``tasks`` on ``nodes`` with the node venv's Python; return each host's registered results."""
    play = {
        "hosts": ",".join(nodes), "gather_facts": False,
        "vars": {"ansible_python_interpreter": NODE_PY},
        "module_defaults": {"group/cerana.platform.platform": {
            "consul_url": "http://127.0.0.1:8500", "consul_token": platform.token}},
        "tasks": [*tasks, {"ansible.builtin.copy": {
            "content": "{{ results | default({}) | to_json }}", "dest": "/run/cerana-test-results.json"}}],
    }  # fmt: skip
    path = platform.workdir / "runners.json"
    path.write_text(json.dumps([play]))
    platform.playbook(path)
    return {n: json.loads(platform.run_in(n, "cat", "/run/cerana-test-results.json")) for n in nodes}


def start_tasks() -> list[dict[str, Any]]:
    return [
        {"cerana.platform.bundle_network": {"bundle": BUNDLE, "state": "present"}, "register": "net"},
        {"cerana.platform.service_instance": {"bundle": BUNDLE, "service": "{{ item }}", "state": "started"},
         "loop": ["backend", "front"], "register": "svc"},
        {"ansible.builtin.set_fact": {"results": {
            "net": "{{ net }}", "svc": "{{ svc.results | items2dict(key_name='item', value_name='restarted') }}",
            "changed": "{{ svc.results | items2dict(key_name='item', value_name='changed') }}"}}},
    ]  # fmt: skip


def main_pid(platform: Platform, node: str, service: str) -> str:
    return platform.run_in(node, "systemctl", "show", "-P", "MainPID", f"cerana-{BUNDLE}_{service}.service")


@pytest.fixture(scope="module")
def lab(site_platform) -> Iterator[dict[str, Any]]:
    plat = site_platform
    for node in ("node1", "node2", "node3"):  # this module drives the node-level modules itself
        plat.run_in(node, "systemctl", "stop", "cerana-cluster-tick.service")
    declare(plat, "hello")
    results = on_runners(plat, start_tasks())
    yield {"platform": plat, "addresses": {n: results[n]["net"]["address"] for n in RUNNERS}}


def test_published_port_answers_from_another_node_with_limits_in_the_units(lab):
    plat, addresses = lab["platform"], lab["addresses"]
    assert len(set(addresses.values())) == 2
    # every node publishes the port; requests from node3 reach both instances
    seen = wait_for(
        fronts_are(plat, "node3", "node1", set(addresses.values())),
        60,
        interval=1,
        what="both instances behind node1's published port",
    )
    assert sum(seen.values()) == 20
    for target in ("node2", "node3"):
        answer = get(plat, "node3", target)
        assert answer["front"] in addresses.values(), answer
        assert answer["backend"]["backend"] == "127.0.0.1" and answer["greeting"] == "hello"
    props = plat.run_in("node1", "systemctl", "show", "-p", "CPUQuotaPerSecUSec", "-p", "MemoryMax", "-p", "TasksMax",
                        "-p", "NetworkNamespacePath", f"cerana-{BUNDLE}_front.service")  # fmt: skip
    assert sorted(props.splitlines()) == sorted(
        ["CPUQuotaPerSecUSec=500ms", "MemoryMax=134217728", "TasksMax=64",
         f"NetworkNamespacePath=/run/netns/cerana-{BUNDLE}"])  # fmt: skip


def test_killed_backend_is_restarted_by_systemd(lab):
    plat = lab["platform"]
    before = main_pid(plat, "node1", "backend")
    plat.run_in("node1", "systemctl", "kill", "--kill-who=main", "-s", "KILL", f"cerana-{BUNDLE}_backend.service")
    after = wait_for(lambda: (lambda p: p if p not in ("0", before) else None)(main_pid(plat, "node1", "backend")), 30,
                     what="a new backend main pid")  # fmt: skip
    assert after != before
    wait_for(lambda: "front" in get(plat, "node3", "node1"), 30, what="the bundle answering again")


def test_changed_env_restarts_only_the_front(lab):
    plat = lab["platform"]
    pids = {(n, s): main_pid(plat, n, s) for n in RUNNERS for s in ("backend", "front")}
    declare(plat, "bonjour")
    results = on_runners(plat, start_tasks())
    for n in RUNNERS:
        assert results[n]["changed"] == {"backend": False, "front": True}, results[n]
        assert main_pid(plat, n, "backend") == pids[(n, "backend")]
        assert main_pid(plat, n, "front") != pids[(n, "front")]
    wait_for(lambda: get(plat, "node3", "node2").get("greeting") == "bonjour", 30, what="the new greeting")


def test_bundle_instance_does_network_and_services_in_one_call(lab):
    """bundle_instance: check mode predicts, a run restarts only what changed, a second changes
    nothing, and an instance of a service the bundle no longer declares is removed."""
    plat = lab["platform"]
    pids = {(n, s): main_pid(plat, n, s) for n in RUNNERS for s in ("backend", "front")}
    unit = f"cerana-{BUNDLE}_stray.service"
    stray = f"/etc/systemd/system/{unit}"
    script = f"printf '[Service]\\nExecStart=/bin/sleep infinity\\n' > {stray} && systemctl daemon-reload"
    plat.run_in("node1", "sh", "-c", f"{script} && systemctl start {unit}")
    declare(plat, "hola")
    task = {"cerana.platform.bundle_instance": {"bundle": BUNDLE, "settle": 0}}
    results = on_runners(plat, [
        {**task, "check_mode": True, "diff": True, "register": "check"},
        {**task, "register": "run"},
        {**task, "register": "again"},
        {"ansible.builtin.set_fact": {"results": {"check": "{{ check }}", "run": "{{ run }}", "again": "{{ again }}"}}},
    ])  # fmt: skip
    for n in RUNNERS:
        check, run, again = results[n]["check"], results[n]["run"], results[n]["again"]
        assert check["changed"] and not check["network"]["changed"], check
        assert any("hola" in d.get("after", "") for d in check["diff"]), check["diff"]
        assert run["changed"] and run["services"]["front"]["restarted"], run
        assert not run["services"]["backend"]["changed"] and not run["network"]["changed"], run
        assert run["removed"] == (["stray"] if n == "node1" else []), run
        assert not again["changed"] and again["removed"] == [], again
        assert main_pid(plat, n, "backend") == pids[(n, "backend")]
        assert main_pid(plat, n, "front") != pids[(n, "front")]
    assert plat.run_in("node1", "ls", stray, check=False) == ""
    assert plat.run_in("node1", "systemctl", "show", "-P", "LoadState", unit) == "not-found"
    wait_for(lambda: get(plat, "node3", "node2").get("greeting") == "hola", 30, what="the new greeting")


def test_unhealthy_instance_leaves_the_rotation_and_comes_back(lab):
    plat, addresses = lab["platform"], lab["addresses"]
    flag = f"/var/lib/cerana/instances/{BUNDLE}/data/unhealthy"
    plat.run_in("node1", "touch", flag)
    try:
        only_node2 = wait_for(
            fronts_are(plat, "node3", "node1", {addresses["node2"]}),
            60,
            interval=1,
            what="node1's instance out of the rotation",
        )
        assert sum(only_node2.values()) == 20
    finally:
        plat.run_in("node1", "rm", "-f", flag)
    wait_for(
        fronts_are(plat, "node3", "node2", set(addresses.values())),
        60,
        interval=1,
        what="node1's instance back in the rotation",
    )


def service_leases(plat: Platform) -> dict[str, Any]:
    status, entries = plat.http("node1", "/v1/kv/cerana/service/leases/?recurse")
    if status == 404:
        return {}
    return {e["Key"]: json.loads(base64.b64decode(e["Value"])) for e in entries or []}


def test_removal_leaves_nothing(lab):
    plat, addresses = lab["platform"], lab["addresses"]
    before = service_leases(plat)
    assert {lease["ip"] for lease in before.values()} >= set(addresses.values())
    results = on_runners(plat, [
        {"cerana.platform.bundle_instance": {"bundle": BUNDLE, "state": "absent"}, "register": "gone"},
        {"cerana.platform.bundle_instance": {"bundle": BUNDLE, "state": "absent"}, "register": "again"},
        {"ansible.builtin.set_fact": {"results": {"gone": "{{ gone }}", "again": "{{ again }}"}}},
    ])  # fmt: skip
    for n in RUNNERS:
        assert results[n]["gone"]["changed"] and results[n]["gone"]["removed"] == ["backend", "front"], results[n]
        assert results[n]["gone"]["network"]["changed"], results[n]
        assert not results[n]["again"]["changed"], results[n]
    for n in RUNNERS:
        assert plat.run_in(n, "sh", "-c", f"ls /etc/systemd/system/cerana-{BUNDLE}_* 2>/dev/null; ls /run/netns",
                           check=False).split() == []  # fmt: skip
        assert plat.run_in(n, "ls", f"/run/cerana/networks/{BUNDLE}.json", check=False) == ""
    after = service_leases(plat)
    assert not {lease["ip"] for lease in after.values()} & set(addresses.values())

    # the declared bundle keeps its port reserved (a reset while no instance is healthy);
    # undeclared, the rules go from every node
    undeclare(plat)

    def no_rules():
        rules = {n: plat.run_in(n, "nft", "list", "ruleset", check=False) for n in ("node1", "node2", "node3")}
        return all(str(EXTERNAL) not in r for r in rules.values())

    wait_for(no_rules, 30, interval=1, what="the published-port rules to go")

"""The platform on a 3-node nspawn lab: ``site.yml``, the live node list, failures.

The package's lab (``site_platform`` in conftest.py: three systemd-nspawn machines on their own
bridge and a free subnet, deployed once with ``playbooks/site.yml``: Consul servers with ACLs
in default-deny mode, the node tick with a 1 s interval), after the services and cluster tick
modules are done with it (they leave nothing declared), in file order:

1. the cluster has a leader; every node was in the live list within 15 s of the first
   site.yml run (measured by the fixture) and shows up in ``node_info`` and in the inventory
   plugin;
2. a second ``site.yml`` run changes nothing (the cluster ticks running, as site.yml left them);
3. testinfra: services running and enabled, Consul's ports listening, on every node;
4. a crashed (SIGKILLed) non-leader machine leaves the live list within 2 x node_ttl
   (docs/node-tick.md); the machine is booted again and redeployed with ``--limit``;
5. the Consul leader's machine crashes: a new leader is elected, the other nodes' ticks keep
   running (same process, no restart) and heartbeat under it.

Needs root, systemd-container and debootstrap (the node image is built once, about a minute).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import testinfra.host
from testinfra.backend import base as testinfra_base

from platform_lab import (
    BIN,
    INTERVAL,
    NODES,
    SITE,
    Platform,
    ansible_env,
    lab_cli,
    recap,
    usable,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

NODE_TTL = 3  # seconds, set through cluster_config for the failure tests

if not usable():
    pytest.skip("needs root, iproute2, systemd-container and debootstrap", allow_module_level=True)


@pytest.fixture(scope="module")
def platform(site_platform) -> Platform:
    return site_platform


# --- 1. cluster, node_info, inventory -----------------------------------------------------------


def test_site_forms_a_consul_cluster_with_a_leader(platform):
    leaders = {node: platform.leader(node) for node in NODES}
    assert None not in leaders.values() and len(set(leaders.values())) == 1, leaders
    status, raft = platform.http("node1", "/v1/operator/raft/configuration")
    assert status == 200
    assert sorted((s["Node"], s["Voter"]) for s in raft["Servers"]) == [(n, True) for n in NODES]
    # default deny: nothing without a token
    request = urllib.request.Request(f"http://{platform.ip('node2')}:8500/v1/kv/acl-probe", data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(request, timeout=3)
    assert denied.value.code == 403


def test_every_node_is_live_in_node_info_and_the_inventory_within_15s(platform):
    ids = {platform.machine_id(n): n for n in NODES}
    assert platform.live_after is not None and platform.live_after <= 15, platform.live_after
    assert platform.live_ids("node2") == set(ids)

    out = platform.workdir / "node_info.json"
    play = platform.workdir / "node_info.yml"
    play.write_text(
        textwrap.dedent(f"""\
        - name: Read the live nodes from a node's Consul
          hosts: localhost
          gather_facts: false
          tasks:
            - name: Live nodes
              cerana.platform.node_info:
                consul_url: http://{platform.ip("node1")}:8500
                consul_token: "{{{{ token }}}}"
              register: live
            - name: Keep them
              ansible.builtin.copy:
                content: "{{{{ live.nodes | to_json }}}}"
                dest: {out}
                mode: "0600"
        """)
    )
    platform.playbook(play, "-e", f"token={platform.token}")
    nodes = json.loads(out.read_text())
    assert {n["id"]: n["hostname"] for n in nodes} == ids
    assert all(n["labels"] == {"consul_role": "server"} for n in nodes)

    source = platform.workdir / "live.cerana_nodes.yml"
    source.write_text(f"plugin: cerana.platform.nodes\nconsul_url: http://{platform.ip('node3')}:8500\n")
    env = {**ansible_env(), "CONSUL_HTTP_TOKEN": platform.token}
    proc = subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(source), "--list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    inv = json.loads(proc.stdout)
    assert sorted(inv["cerana_nodes"]["hosts"]) == list(NODES)
    assert sorted(inv["consul_servers"]["hosts"]) == list(NODES)
    # ansible-inventory marks strings from plugins as unsafe: {"__ansible_unsafe": "..."}
    node_ids = [inv["_meta"]["hostvars"][n]["cerana_node_id"] for n in NODES]
    assert {v["__ansible_unsafe"] if isinstance(v, dict) else v for v in node_ids} == set(ids)


# --- 2. idempotence -----------------------------------------------------------------------------


def test_second_site_run_changes_nothing(platform):
    proc, platform.timings["site_second"] = platform.playbook(SITE)
    counts = recap(proc.stdout)
    assert set(counts) == set(NODES)
    changed = {n: (c["changed"], c["failed"]) for n, c in counts.items()}
    assert changed == {n: (0, 0) for n in NODES}, proc.stdout[-4000:]


# --- 3. testinfra on the nodes ------------------------------------------------------------------


class NspawnBackend(testinfra_base.BaseBackend):
    """testinfra commands inside a lab machine, through ``nsenter`` (like the nspawn connection)."""

    NAME = "cerana_nspawn"

    def __init__(self, platform: Platform, node: str) -> None:
        self.platform = platform
        self.node = node
        super().__init__(node)

    def run(self, command: str, *args: str, **kwargs: Any) -> testinfra_base.CommandResult:
        cmd = self.get_command(command, *args)
        argv = ["nsenter", "-t", str(self.platform.leader_pid(self.node)), "-a", "/bin/sh", "-c", cmd]
        proc = subprocess.run(argv, capture_output=True, check=False)
        return self.result(proc.returncode, self.encode(cmd), proc.stdout, proc.stderr)


@pytest.mark.parametrize("node", NODES)
def test_testinfra_services_and_ports(platform, node):
    host = testinfra.host.Host(NspawnBackend(platform, node))
    assert host.check_output("hostname") == node
    for service in ("consul", "cerana-node-tick"):
        assert host.service(service).is_running, service
        assert host.service(service).is_enabled, service
    ip = platform.ip(node)
    for spec in (
        f"tcp://{ip}:8300",
        f"tcp://{ip}:8301",
        f"udp://{ip}:8301",
        f"tcp://{ip}:8500",
        "tcp://127.0.0.1:8500",
    ):
        assert host.socket(spec).is_listening, spec
    assert host.file("/etc/cerana/consul-management-token").mode == 0o600
    assert host.file("/etc/cerana/node-tick.toml").contains('consul_role" = "server"')
    assert host.process.get(comm="consul").user == "consul"


# --- 4. a crashed node leaves the live list within 2 x node_ttl ----------------------------------


def set_node_ttl(platform: Platform, ttl: int) -> None:
    play = platform.workdir / "ttl.yml"
    play.write_text(
        textwrap.dedent(f"""\
        - name: Short TTLs for the failure tests
          hosts: localhost
          gather_facts: false
          tasks:
            - name: Cluster configuration
              cerana.platform.cluster_config:
                consul_url: http://{platform.ip("node1")}:8500
                consul_token: "{{{{ token }}}}"
                node_ttl: {ttl}
        """)
    )
    platform.playbook(play, "-e", f"token={platform.token}")

    def rebound():
        status, sessions = platform.http("node1", "/v1/session/list")
        if status != 200:
            return False
        ticks = [s for s in sessions if s["Name"].startswith("cerana-node-tick/") and s["Name"].endswith("/nodes")]
        ticks = ticks or [s for s in sessions if s["Name"].startswith("cerana-node-tick/")]
        return len({s["Name"] for s in ticks}) >= 3 and any(s["TTL"] == f"{ttl}s" for s in ticks)

    wait_for(rebound, 15, what=f"node sessions with TTL {ttl}s")
    time.sleep(2 * INTERVAL)  # every node has re-bound by now


def test_crashed_node_leaves_within_two_ttls(platform):
    set_node_ttl(platform, NODE_TTL)
    leader = platform.leader("node1")
    victim = next(n for n in reversed(NODES) if n != leader)
    survivor = next(n for n in NODES if n != victim)
    victim_id = platform.machine_id(victim)
    assert victim_id in platform.live_ids(survivor)

    killed = time.monotonic()
    lab_cli("stop", "--name", platform.name, victim, "--kill")
    wait_for(lambda: victim_id not in (platform.live_ids(survivor) or {victim_id}), 4 * NODE_TTL, interval=0.05,
             what=f"{victim} to leave")  # fmt: skip
    gone_after = time.monotonic() - killed
    platform.timings["crashed_node_gone_after"] = gone_after
    # docs/node-tick.md: within 2 x node_ttl of its last tick (+ polling slack)
    assert gone_after <= 2 * NODE_TTL + 0.5, gone_after
    assert len(platform.live_ids(survivor)) == 2

    # Boot it again (a fresh machine: new machine id, nothing installed) and redeploy only it,
    # so the cluster has three servers again for the leader test.
    lab_cli("start", "--name", platform.name, victim)
    _, platform.timings["site_limit_redeploy"] = platform.playbook(
        SITE, "--limit", victim, extra={"consul_acl_management_token": platform.token}
    )
    new_id = platform.machine_id(victim)
    wait_for(lambda: new_id in (platform.live_ids(survivor) or ()), 15, what=f"{victim} to be back")

    def three_voters() -> bool:
        status, raft = platform.http(survivor, "/v1/operator/raft/configuration")
        return status == 200 and sum(s["Voter"] for s in raft["Servers"]) == 3 and all(map(platform.leader, NODES))

    wait_for(three_voters, 30, what="three voting servers")


# --- 5. the Consul leader's machine crashes -----------------------------------------------------


def tick_pid(platform: Platform, node: str) -> str:
    return platform.run_in(node, "systemctl", "show", "-p", "MainPID", "--value", "cerana-node-tick")


def test_leader_crash_ticks_resume_under_the_new_leader(platform):
    leader = platform.leader("node1")
    survivors = [n for n in NODES if n != leader]
    ids = {n: platform.machine_id(n) for n in survivors}
    leader_id = platform.machine_id(leader)
    pids = {n: tick_pid(platform, n) for n in survivors}

    killed = time.monotonic()
    lab_cli("stop", "--name", platform.name, leader, "--kill")
    new_leader = wait_for(
        lambda: (lambda found: found if found and found != leader else None)(platform.leader(survivors[0])),
        60,
        what="a new leader",
    )
    elected = time.monotonic()
    platform.timings["leader_elected_after"] = elected - killed
    assert new_leader in survivors

    # Each survivor writes a newer heartbeat under the new leader (a tick after the election).
    def heartbeats_after_election():
        docs = {n: platform.node_doc(survivors[0], ids[n]) for n in survivors}
        if not all(docs.values()):
            return None
        return docs

    first = wait_for(heartbeats_after_election, 15, what="survivors' heartbeats")
    time.sleep(3 * INTERVAL)
    later = wait_for(heartbeats_after_election, 15, what="survivors' heartbeats")
    for node in survivors:
        assert later[node]["heartbeat"] > first[node]["heartbeat"], node

    # ... from the same process: the ticks kept running through the election.
    for node in survivors:
        assert tick_pid(platform, node) == pids[node]
        assert platform.run_in(node, "systemctl", "show", "-p", "NRestarts", "--value", "cerana-node-tick") == "0"

    # The crashed leader's node leaves too: the new leader restarts session timers at full
    # length, so the bound is the election time plus 2 x node_ttl.
    wait_for(lambda: leader_id not in (platform.live_ids(survivors[0]) or {leader_id}), 4 * NODE_TTL + 30,
             what="the old leader's node to leave")  # fmt: skip
    gone_after = time.monotonic() - killed
    platform.timings["crashed_leader_gone_after"] = gone_after
    assert gone_after <= (elected - killed) + 2 * NODE_TTL + 1.0, (gone_after, elected - killed)
    assert platform.live_ids(survivors[0]) == set(ids.values())
    print("timings:", json.dumps({k: round(v, 2) for k, v in platform.timings.items()}))

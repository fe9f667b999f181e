"""The platform on a 3-node nspawn lab: ``site.yml``, the live node list, failures.

One lab for the whole module (three systemd-nspawn machines on their own bridge and a free
subnet), deployed once with ``playbooks/site.yml`` (Consul servers with ACLs in default-deny
mode, the node tick with a 1 s interval) and reused by every test, in file order:

1. the cluster has a leader; every node shows up in ``node_info`` and in the inventory plugin;
2. a second ``site.yml`` run changes nothing;
3. testinfra: services running and enabled, Consul's ports listening, on every node;
4. a crashed (SIGKILLed) non-leader machine leaves the live list within 2 x node_ttl
   (docs/node-tick.md); the machine is booted again and redeployed with ``--limit``;
5. the Consul leader's machine crashes: a new leader is elected, the other nodes' ticks keep
   running (same process, no restart) and heartbeat under it.

Needs root, systemd-container and debootstrap (the node image is built once, about a minute).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import testinfra.host
from testinfra.backend import base as testinfra_base

from cerana_lab import rootfs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SITE = REPO / "playbooks" / "site.yml"
NODES = ("node1", "node2", "node3")
NODE_TTL = 3  # seconds, set through cluster_config for the failure tests
INTERVAL = 1  # seconds between ticks

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "systemd-nspawn", "debootstrap", "nsenter")):
    pytest.skip("needs root, iproute2, systemd-container and debootstrap", allow_module_level=True)


# --- helpers ----------------------------------------------------------------------------------


def lab_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "cerana_lab", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"cerana lab {' '.join(args)} failed:\n{proc.stderr}"
    return proc


def free_subnet() -> str:
    used = []
    for args in (["-4", "addr", "show"], ["-4", "route", "show", "table", "all"]):
        data = json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout)
        for item in data:
            used += [IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False) for a in item.get("addr_info", [])]
            dst = item.get("dst")
            if dst and dst != "default":
                try:
                    used.append(IPv4Network(dst, strict=False))
                except ValueError:
                    pass
    used = [n for n in used if n.prefixlen > 0]
    for third in range(0, 250, 5):
        net = IPv4Network(f"10.243.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free 10.243.x.0/24 subnet")


def consul_bin() -> str:
    given = os.environ.get("CERANA_CONSUL_BIN")
    if given:
        return given
    proc = subprocess.run([str(REPO / "scripts/ensure-consul.sh")], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def ansible_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "CONSUL_"))}
    env.update(
        PATH=os.pathsep.join([str(BIN), env.get("PATH", os.defpath)]),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="false",
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_FORKS="5",
    )
    return env


RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


def recap(output: str) -> dict[str, dict[str, int]]:
    return {
        m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "unreachable": int(m.group(4)),
                     "failed": int(m.group(5))}
        for m in RECAP.finditer(output)
    }  # fmt: skip


@dataclass
class Platform:
    name: str
    subnet: str
    workdir: Path
    inventory: Path
    extra_vars: dict[str, Any]
    token: str = ""
    site_done: float = 0.0  # time.monotonic() when the first site.yml run ended
    timings: dict[str, float] = field(default_factory=dict)

    def ip(self, node: str) -> str:
        return str(IPv4Network(self.subnet).network_address + 10 + int(node.removeprefix("node")))

    def leader_pid(self, node: str) -> int:
        state = json.loads(Path(f"/run/cerana-lab/{self.name}/state.json").read_text())
        return next(n["leader_pid"] for n in state["nodes"] if n["name"] == node)

    def run_in(self, node: str, *argv: str, check: bool = True) -> str:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader_pid(node)), "-a", *argv], capture_output=True, text=True, check=False
        )
        if check:
            assert proc.returncode == 0, f"{node}: {argv}: {proc.stderr}"
        return proc.stdout.strip()

    def http(self, node: str, path: str, *, method: str = "GET", body: bytes | None = None, timeout: float = 3):
        """(status, parsed JSON or None) from ``node``'s Consul HTTP API, from the controller."""
        req = urllib.request.Request(f"http://{self.ip(node)}:8500{path}", data=body, method=method)
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = resp.read()
                return resp.status, (json.loads(data) if data else None)
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except OSError:
            return 0, None

    def live_ids(self, via: str) -> set[str] | None:
        status, keys = self.http(via, "/v1/kv/cerana/nodes/?keys&stale")
        if status == 404:
            return set()
        if status != 200:
            return None
        return {k.rsplit("/", 1)[1] for k in keys}

    def node_doc(self, via: str, node_id: str) -> dict[str, Any] | None:
        status, entries = self.http(via, f"/v1/kv/cerana/nodes/{node_id}?stale")
        if status != 200:
            return None
        return json.loads(base64.b64decode(entries[0]["Value"]))

    def leader(self, via: str) -> str | None:
        status, leader = self.http(via, "/v1/status/leader")
        if status != 200 or not leader:
            return None
        address = leader.rsplit(":", 1)[0]
        return next(n for n in NODES if self.ip(n) == address)

    def playbook(self, playbook: Path | str, *args: str, extra: dict[str, Any] | None = None):
        vars_file = self.workdir / f"vars-{uuid.uuid4().hex[:6]}.json"
        vars_file.write_text(json.dumps({**self.extra_vars, **(extra or {})}))
        started = time.monotonic()
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(playbook), "-e", f"@{vars_file}", *args],
            capture_output=True,
            text=True,
            env=ansible_env(),
            timeout=600,
            check=False,
        )
        elapsed = time.monotonic() - started
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        return proc, elapsed

    def machine_id(self, node: str) -> str:
        return self.run_in(node, "cat", "/etc/machine-id")


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Iterator[Platform]:
    rootfs.ensure_rootfs()
    workdir = tmp_path_factory.mktemp("platform")
    name, subnet = f"tp{uuid.uuid4().hex[:6]}", free_subnet()
    try:
        lab_cli("up", "--name", name, "--nodes", "3", "--kind", "nspawn", "--subnet", subnet)
        inventory = workdir / "lab.yml"
        inventory.write_text(lab_cli("inventory", "--name", name).stdout)
        plat = Platform(
            name,
            subnet,
            workdir,
            inventory,
            extra_vars={
                "consul_src": consul_bin(),
                "consul_acl_enabled": True,
                "consul_session_ttl_min": "1s",
                "node_tick_interval": f"{INTERVAL}s",
                # a fresh wheelhouse per session: the nodes run the code under test
                "node_tick_wheelhouse_dir": str(workdir / "wheelhouse"),
            },
        )
        proc, plat.timings["site_first"] = plat.playbook(SITE)
        plat.site_done = time.monotonic()
        counts = recap(proc.stdout)
        assert set(counts) == set(NODES) and all(c["failed"] == 0 and c["changed"] > 0 for c in counts.values())
        plat.token = plat.run_in("node1", "cat", "/etc/cerana/consul-management-token")
        yield plat
    finally:
        subprocess.run([sys.executable, "-m", "cerana_lab", "down", "--name", name], capture_output=True, check=False)


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
    wait_for(lambda: platform.live_ids("node2") == set(ids), 15, what="three live nodes")
    seen_after = time.monotonic() - platform.site_done
    assert seen_after <= 15, seen_after

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

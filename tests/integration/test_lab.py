"""``cerana lab`` against the real host: namespaces, a bridge, nspawn machines, Ansible through them.

Needs root, iproute2 and (for the nspawn tests) systemd-container + debootstrap. Every lab
gets its own name and a free 10.2xx.y.0/24 subnet; everything is removed afterwards.
Host-wide snapshots are compared only for entries that belong to the lab, because other
processes may create links or namespaces of their own at the same time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from cerana_lab import rootfs

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

if os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip("cerana lab tests need root and iproute2", allow_module_level=True)

need_nspawn = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("systemd-nspawn", "debootstrap", "nsenter")),
    reason="needs systemd-container and debootstrap (apt-get install systemd-container debootstrap)",
)


# --- helpers ----------------------------------------------------------------------------------


def lab_cli(*args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cerana_lab ARGS`` in a fresh process (state must work across processes)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cerana_lab", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, f"cerana lab {' '.join(args)} failed:\n{proc.stderr}"
    return proc


def host_networks() -> list[IPv4Network]:
    out = []
    for args in (["-4", "addr", "show"], ["-4", "route", "show", "table", "all"]):
        data = json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout)
        for item in data:
            for info in item.get("addr_info", []):
                out.append(IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
            dst = item.get("dst")
            if dst and dst != "default":
                try:
                    out.append(IPv4Network(dst, strict=False))
                except ValueError:
                    pass
    return [n for n in out if n.prefixlen > 0]


def free_subnet() -> str:
    used = host_networks()
    for second in range(231, 250):
        for third in range(0, 250, 7):
            net = IPv4Network(f"10.{second}.{third}.0/24")
            if not any(net.overlaps(u) for u in used):
                return str(net)
    raise RuntimeError("no free 10.2xx.y.0/24 subnet")


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[: 8 - len(prefix)]}"


def start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except OSError:
        return None


def in_child_pid_namespace(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
    return len(nspid) > 1


@dataclass(frozen=True)
class Snapshot:
    links: frozenset[str]
    netns: frozenset[str]
    mounts: frozenset[str]
    procs: frozenset[tuple[int, str]]
    files: frozenset[str]


def snapshot() -> Snapshot:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    procs = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":
            procs.add((int(entry.name), cmdline))
    files = set()
    for base in (Path("/run/cerana-lab"), Path("/etc/netns"), Path("/tmp")):
        if base.is_dir():
            files |= {str(p) for p in base.iterdir()}
    return Snapshot(
        links=frozenset(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()),
        netns=frozenset(line.split()[0] for line in netns.splitlines() if line.strip()),
        mounts=frozenset(Path("/proc/mounts").read_text().splitlines()),
        procs=frozenset(procs),
        files=frozenset(files),
    )


def leftovers(before: Snapshot, after: Snapshot, tokens: list[str]) -> dict[str, list[str]]:
    """New entries since ``before`` that mention one of ``tokens``."""

    def new(field: str) -> list[str]:
        added = getattr(after, field) - getattr(before, field)
        return sorted(str(item) for item in added if any(t in str(item) for t in tokens))

    found = {field: new(field) for field in ("links", "netns", "mounts", "procs", "files")}
    return {k: v for k, v in found.items() if v}


def lab_tokens(name: str, subnet: str) -> list[str]:
    prefix = subnet.rsplit(".", 1)[0] + "."
    return [f"{name}-node", f"cl-{name}-", f"/run/cerana-lab/{name}", prefix, "nspawn-volatile"]


def ansible_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        PATH=os.pathsep.join([str(BIN), env.get("PATH", os.defpath)]),
        ANSIBLE_COLLECTIONS_PATH=str(REPO / "collections"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_HOST_KEY_CHECKING="false",
        ANSIBLE_RETRY_FILES_ENABLED="false",
        ANSIBLE_FORKS="5",
    )
    return env


def run_playbook(tmp_path: Path, lab: str, play: str) -> subprocess.CompletedProcess[str]:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(lab_cli("inventory", "--name", lab).stdout)
    playbook = tmp_path / "play.yml"
    playbook.write_text(textwrap.dedent(play))
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook)],
        capture_output=True,
        text=True,
        env=ansible_env(),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def netns_lab() -> Iterator[tuple[str, str]]:
    """A name and a free subnet for a netns lab; the lab is taken down afterwards in any case."""
    name, subnet = unique_name("tn"), free_subnet()
    try:
        yield name, subnet
    finally:
        lab_cli("down", "--name", name)


# --- netns labs -------------------------------------------------------------------------------


def test_netns_up_down_twice_leaves_nothing(netns_lab):
    name, subnet = netns_lab
    tokens = lab_tokens(name, subnet)
    before = snapshot()
    for _round in range(2):
        started = time.monotonic()
        lab_cli("up", "--name", name, "--nodes", "3", "--subnet", subnet)
        up_time = time.monotonic() - started
        during = snapshot()
        assert {f"{name}-node{i}" for i in (1, 2, 3)} <= during.netns
        assert {f"cl-{name}-br", f"cl-{name}-1", f"cl-{name}-2", f"cl-{name}-3"} <= during.links
        assert Path(f"/etc/netns/{name}-node1/resolv.conf").is_file()
        # a daemon left running in a node must not survive `down`
        sleeper = subprocess.Popen(["ip", "netns", "exec", f"{name}-node2", "sleep", "300"])
        ping = subprocess.run(
            ["ip", "netns", "exec", f"{name}-node1", "ping", "-c1", "-W2", subnet.replace(".0/24", ".13")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        started = time.monotonic()
        lab_cli("down", "--name", name)
        down_time = time.monotonic() - started
        assert sleeper.wait(timeout=10) != 0
        assert leftovers(before, snapshot(), tokens) == {}
        assert up_time < 10 and down_time < 10, (up_time, down_time)


def test_netns_up_is_idempotent(netns_lab):
    name, subnet = netns_lab
    lab_cli("up", "--name", name, "--nodes", "2", "--subnet", subnet)
    state_file = Path(f"/run/cerana-lab/{name}/state.json")
    stamp = state_file.stat().st_mtime_ns
    first = snapshot()
    started = time.monotonic()
    again = lab_cli("up", "--name", name, "--nodes", "2", "--subnet", subnet)
    assert time.monotonic() - started < 5
    assert "already up" in again.stderr
    assert state_file.stat().st_mtime_ns == stamp
    second = snapshot()
    assert (first.links, first.netns) == (second.links, second.netns)


def test_netns_up_scales_and_repairs(netns_lab):
    name, subnet = netns_lab
    lab_cli("up", "--name", name, "--nodes", "3", "--subnet", subnet)
    lab_cli("up", "--name", name, "--nodes", "2", "--subnet", subnet)
    view = snapshot()
    assert f"{name}-node3" not in view.netns and f"cl-{name}-3" not in view.links
    assert f"{name}-node3" not in Path(f"/etc/netns/{name}-node1/hosts").read_text()
    subprocess.run(["ip", "link", "delete", f"cl-{name}-2"], check=True)
    broken = lab_cli("status", "--name", name, check=False)
    assert broken.returncode == 1 and "veth missing" in broken.stdout
    lab_cli("up", "--name", name, "--nodes", "2", "--subnet", subnet)
    assert lab_cli("status", "--name", name).returncode == 0


def test_status(netns_lab):
    name, subnet = netns_lab
    down = lab_cli("status", "--name", name, check=False)
    assert down.returncode == 3 and "down" in down.stdout
    lab_cli("up", "--name", name, "--nodes", "2", "--subnet", subnet)
    text = lab_cli("status", "--name", name).stdout
    assert f"lab {name}: 2 netns node(s) on {subnet}, healthy" in text
    assert f"node2    {name}-node2" in text
    doc = json.loads(lab_cli("status", "--name", name, "--json").stdout)
    assert doc["healthy"] is True and [n["name"] for n in doc["nodes"]] == ["node1", "node2"]


def test_refuses_a_subnet_in_use(netns_lab):
    name, subnet = netns_lab
    squatter = f"ct{uuid.uuid4().hex[:8]}"
    busy = subnet.replace(".0/24", ".200/25")
    subprocess.run(["ip", "link", "add", squatter, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", busy, "dev", squatter], check=True)
        proc = lab_cli("up", "--name", name, "--subnet", subnet, check=False)
        assert proc.returncode == 1
        assert f"subnet {subnet} is already in use on this host" in proc.stderr
        assert squatter in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        view = snapshot()
        assert f"cl-{name}-br" not in view.links and not any(n.startswith(f"{name}-") for n in view.netns)
        assert not Path(f"/run/cerana-lab/{name}").exists()
    finally:
        subprocess.run(["ip", "link", "delete", squatter], check=True)


def test_refusals_are_one_line(netns_lab):
    name, _ = netns_lab
    for args, message in [
        (["up", "--name", "Bad!"], "invalid lab name"),
        (["up", "--name", name, "--subnet", "10.1.2.3/24"], "invalid subnet"),
        (["up", "--name", name, "--nodes", "0"], "invalid number of nodes"),
    ]:
        proc = lab_cli(*args, check=False)
        assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ansible_through_the_netns_plugin(netns_lab, tmp_path):
    name, subnet = netns_lab
    lab_cli("up", "--name", name, "--nodes", "2", "--subnet", subnet)
    outdir = tmp_path / "files"
    outdir.mkdir()
    run_playbook(
        tmp_path,
        name,
        f"""
        - name: Work inside the lab's namespaces
          hosts: {name}
          gather_facts: false
          tasks:
            - name: Raw runs in the namespace
              ansible.builtin.raw: ip -o addr
              register: raw_addr
            - name: Only the node's own address is there
              ansible.builtin.assert:
                that:
                  - ansible_host ~ '/24' in raw_addr.stdout
                  - "'cl-{name}-br' not in raw_addr.stdout"
                  - groups['{name}'] | map('extract', hostvars, 'ansible_host') | reject('eq', ansible_host)
                    | select('in', raw_addr.stdout) | list == []
            - name: A module runs in the namespace
              ansible.builtin.command: ip -o -4 addr show dev eth0
              register: cmd_addr
              changed_when: false
            - name: The module saw the node's address
              ansible.builtin.assert:
                that: ansible_host ~ '/24' in cmd_addr.stdout
            - name: Copy a file
              ansible.builtin.copy:
                content: "{{{{ inventory_hostname }}}}\\n"
                dest: "{outdir}/{{{{ inventory_hostname }}}}.txt"
                mode: "0644"
            - name: Read it back
              ansible.builtin.slurp:
                src: "{outdir}/{{{{ inventory_hostname }}}}.txt"
              register: slurped
            - name: Same content
              ansible.builtin.assert:
                that: slurped.content | b64decode == inventory_hostname ~ '\\n'
        """,
    )
    # netns nodes share the controller's filesystem
    assert (outdir / "node1.txt").read_text() == "node1\n"


# --- nspawn labs ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_image() -> Path:
    """The cached Debian image, built at most once per session (about a minute when cold)."""
    if not all(shutil.which(t) for t in ("systemd-nspawn", "debootstrap", "nsenter")):
        pytest.skip("needs systemd-container and debootstrap")
    return rootfs.ensure_rootfs()


@dataclass(frozen=True)
class NspawnLab:
    name: str
    subnet: str
    state: dict

    def leader(self, node: str) -> int:
        return next(n["leader_pid"] for n in self.state["nodes"] if n["name"] == node)

    def run(self, node: str, *argv: str) -> str:
        return subprocess.run(
            ["nsenter", "-t", str(self.leader(node)), "-a", *argv], capture_output=True, text=True, check=True
        ).stdout.strip()


@pytest.fixture(scope="module")
def nspawn_lab(node_image) -> Iterator[NspawnLab]:
    name, subnet = unique_name("ts"), free_subnet()
    try:
        lab_cli("up", "--name", name, "--nodes", "2", "--kind", "nspawn", "--subnet", subnet)
        state = json.loads(Path(f"/run/cerana-lab/{name}/state.json").read_text())
        yield NspawnLab(name, subnet, state)
    finally:
        lab_cli("down", "--name", name)


@need_nspawn
@pytest.mark.slow
def test_nspawn_machines_boot(nspawn_lab):
    doc = json.loads(lab_cli("status", "--name", nspawn_lab.name, "--json").stdout)
    assert doc["healthy"] is True
    assert {n["machine"] for n in doc["status"]} <= {"running", "degraded"}
    assert [nspawn_lab.run(n, "hostname") for n in ("node1", "node2")] == ["node1", "node2"]
    ids = [nspawn_lab.run(n, "cat", "/etc/machine-id") for n in ("node1", "node2")]
    assert len(set(ids)) == 2 and Path("/etc/machine-id").read_text().strip() not in ids
    assert [n["machine_id"] for n in nspawn_lab.state["nodes"]] == ids
    # own process tree: PID 1 is systemd
    assert nspawn_lab.run("node1", "cat", "/proc/1/comm") == "systemd"


@need_nspawn
@pytest.mark.slow
def test_nspawn_up_is_idempotent(nspawn_lab):
    started = time.monotonic()
    again = lab_cli("up", "--name", nspawn_lab.name, "--nodes", "2", "--kind", "nspawn", "--subnet", nspawn_lab.subnet)
    assert "already up" in again.stderr and time.monotonic() - started < 5
    state = json.loads(Path(f"/run/cerana-lab/{nspawn_lab.name}/state.json").read_text())
    assert state == nspawn_lab.state


@need_nspawn
@pytest.mark.slow
def test_ansible_through_the_nspawn_plugin(nspawn_lab, tmp_path):
    marker = f"/root/cerana-lab-{uuid.uuid4().hex[:8]}.txt"
    run_playbook(
        tmp_path,
        nspawn_lab.name,
        f"""
        - name: Work inside the machines
          hosts: {nspawn_lab.name}
          gather_facts: true
          tasks:
            - name: Facts come from the machine
              ansible.builtin.assert:
                that:
                  - ansible_facts['service_mgr'] == 'systemd'
                  - ansible_facts['hostname'] == inventory_hostname
                  - ansible_facts['default_ipv4']['address'] == ansible_host
            - name: Copy a file into the machine
              ansible.builtin.copy:
                content: "{{{{ inventory_hostname }}}}\\n"
                dest: {marker}
                mode: "0600"
            - name: Read it back
              ansible.builtin.slurp:
                src: {marker}
              register: slurped
            - name: Same content
              ansible.builtin.assert:
                that: slurped.content | b64decode == inventory_hostname ~ '\\n'
            - name: Ping every other node over the bridge
              ansible.builtin.command: ping -c 1 -W 2 {{{{ hostvars[item]['ansible_host'] }}}}
              loop: "{{{{ groups['{nspawn_lab.name}'] | difference([inventory_hostname]) }}}}"
              changed_when: false
            - name: Names of the other nodes resolve without DNS
              ansible.builtin.command: getent ahostsv4 {{{{ item }}}}
              loop: "{{{{ groups['{nspawn_lab.name}'] }}}}"
              changed_when: false
        """,
    )
    # the file is in each machine's own filesystem, not on the host's path
    assert not Path(marker).exists()
    assert nspawn_lab.run("node1", "cat", marker) == "node1"
    assert nspawn_lab.run("node2", "cat", marker) == "node2"


@need_nspawn
@pytest.mark.slow
def test_nspawn_down_leaves_nothing(node_image):
    name, subnet = unique_name("td"), free_subnet()
    tokens = [*lab_tokens(name, subnet), str(node_image)]
    before = snapshot()
    try:
        lab_cli("up", "--name", name, "--nodes", "2", "--kind", "nspawn", "--subnet", subnet)
        state = json.loads(Path(f"/run/cerana-lab/{name}/state.json").read_text())
        leaders = {n["leader_pid"]: start_time(n["leader_pid"]) for n in state["nodes"]}
        assert all(leaders.values()) and all(in_child_pid_namespace(pid) for pid in leaders)
        for leader in leaders:
            subprocess.run(["nsenter", "-t", str(leader), "-a", "sh", "-c", "echo x > /var/tmp/persist"], check=True)
    finally:
        lab_cli("down", "--name", name)
    after = snapshot()
    assert leftovers(before, after, tokens) == {}
    # pids wrap quickly here: a pid may be reused (even by another test's container), but not by the same process
    for node in state["nodes"]:
        assert start_time(node["pid"]) != node["start_time"]
    for leader, started in leaders.items():
        assert start_time(leader) != started
    assert not any(str(node_image) in line or name in line for line in after.mounts)
    assert not Path(f"/run/cerana-lab/{name}").exists()
    assert not (node_image / "var/tmp/persist").exists()  # the image itself was never written

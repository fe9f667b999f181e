"""A 3-node nspawn lab with the platform deployed by ``playbooks/site.yml``, for test modules.

``platform_lab(tmp_path_factory, extra_vars)`` is a context manager: it brings up three
systemd-nspawn machines on their own bridge and a free subnet, runs ``site.yml`` once
(Consul servers with ACLs in default-deny mode, the node tick with a 1 s interval, plus
``extra_vars``) and yields a :class:`Platform`; the lab is removed afterwards, even on failure.
Needs root, systemd-container and debootstrap (the node image is built once, about a minute).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from cerana_lab import rootfs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITE = REPO / "playbooks" / "site.yml"
NODES = ("node1", "node2", "node3")
INTERVAL = 1  # seconds between node ticks


def usable() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "systemd-nspawn", "debootstrap", "nsenter"))


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
    live_after: float | None = None  # seconds from site_done to every node live, when measured
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
            timeout=1500,  # site.yml on a loaded 2-core machine has taken 320 s
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


def session_wheelhouse(tmp_path_factory) -> Path:
    """The wheelhouse directory every lab and molecule scenario of one pytest session shares:
    the first role run that needs it builds it, the node_tick role's locks make any other wait
    and take it. Fresh per session (pytest's base temp), so the nodes run the code under test.
    Outside pytest (the benchmarks' stand-in factory), a fresh one per call."""
    getbasetemp = getattr(tmp_path_factory, "getbasetemp", None)
    base = getbasetemp() if getbasetemp is not None else tmp_path_factory.mktemp("wheels")
    return base / "wheelhouse"


@contextlib.contextmanager
def platform_lab(tmp_path_factory, extra_vars: dict[str, Any] | None = None, prefix: str = "tp") -> Iterator[Platform]:
    """Bring up and deploy a 3-node lab; yield it; remove it."""
    rootfs.ensure_rootfs()
    workdir = tmp_path_factory.mktemp("platform")
    name, subnet = f"{prefix}{uuid.uuid4().hex[:6]}", free_subnet()
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
                "node_tick_wheelhouse_dir": str(session_wheelhouse(tmp_path_factory)),
                **(extra_vars or {}),
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

"""Thin executors for nspawn nodes: start, find the leader, wait for systemd, stop.

Machines run ``systemd-nspawn --boot`` from the cached image with ``--volatile=overlay``
(a tmpfs upper layer in nspawn's own mount namespace: files written in a machine persist
while it runs, and vanish with it), inside the node's network namespace. There is no
machined on the host, hence ``--register=no --keep-unit``; commands go in with
``nsenter -t <leader> -a``.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from cerana_lab.host import NETNS_RUN, nspawn_processes, pid_start_time, run
from cerana_lab.plan import LabError, MachineState, Node

log = logging.getLogger(__name__)

READY = ("running", "degraded")
DEFAULT_BOOT_TIMEOUT = 120.0


def nspawn_command(node: Node, rootfs: Path, machine_id: str) -> list[str]:
    return [
        "systemd-nspawn",
        "--quiet",
        "--boot",
        f"--directory={rootfs}",
        "--volatile=overlay",
        "--register=no",
        "--keep-unit",
        "--console=passive",
        "--link-journal=no",
        "--resolv-conf=off",
        "--timezone=off",
        f"--machine={node.netns}",
        f"--hostname={node.name}",
        f"--uuid={machine_id}",
        f"--network-namespace-path={NETNS_RUN / node.netns}",
        # nspawn keeps CAP_NET_ADMIN from a machine in a given namespace; nodes need it for
        # their bundle networks (veths, bridges, vxlan) and published ports (nftables).
        "--capability=CAP_NET_ADMIN",
    ]


def start_machine(node: Node, rootfs: Path, machine_id: str, log_path: Path, *, timeout: float = 15.0) -> MachineState:
    """Start the machine detached from us (``setsid -f``) and find its nspawn and leader pids."""
    cmd = nspawn_command(node, rootfs, machine_id)
    log.info("starting %s: %s", node.name, " ".join(cmd))
    with open(log_path, "ab") as out:
        subprocess.run(
            ["setsid", "-f", *cmd], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = nspawn_processes().get(node.netns, ())
        for pid in pids:
            leader = find_leader(pid)
            start = pid_start_time(pid)
            if leader is not None and start is not None:
                return MachineState(pid=pid, start_time=start, leader=leader, machine_id=machine_id)
        time.sleep(0.05)
    raise LabError(f"{node.name}: systemd-nspawn did not start a machine within {timeout:.0f} s:\n{tail(log_path)}")


def find_leader(nspawn_pid: int) -> int | None:
    """The machine's PID 1 (as a host pid): a child of nspawn that is PID 1 in its own pid namespace."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() != str(nspawn_pid):
            continue
        nspid = fields.get("NSpid", "").split()
        if len(nspid) > 1 and nspid[-1] == "1":
            return int(entry.name)
    return None


def alive(machine: MachineState) -> bool:
    return pid_start_time(machine.pid) == machine.start_time and pid_start_time(machine.leader) is not None


def in_machine(
    leader: int, argv: Sequence[str], *, input: str | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return run(["nsenter", "-t", str(leader), "-a", *argv], input=input, check=check)


def system_state(leader: int) -> str:
    """What ``systemctl is-system-running`` says inside the machine ('unknown' if it cannot say)."""
    proc = in_machine(leader, ["systemctl", "is-system-running"])
    return proc.stdout.strip() or "unknown"


def wait_ready(
    nodes: Sequence[tuple[Node, MachineState]], log_dir: Path, *, timeout: float = DEFAULT_BOOT_TIMEOUT
) -> None:
    """Wait until every machine's systemd reports running or degraded."""
    pending = dict((node.name, (node, machine)) for node, machine in nodes)
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while pending:
        for name, (node, machine) in list(pending.items()):
            if not alive(machine):
                raise LabError(f"{name}: the machine stopped while booting:\n{tail(log_dir / f'{node.name}.log')}")
            states[name] = system_state(machine.leader)
            if states[name] in READY:
                log.info("%s: %s", name, states[name])
                del pending[name]
        if pending and time.monotonic() > deadline:
            summary = ", ".join(f"{n}={states.get(n, '?')}" for n in pending)
            raise LabError(f"machines not up after {timeout:.0f} s ({summary}); see {log_dir}/<node>.log")
        if pending:
            time.sleep(0.2)


def write_file(leader: int, path: str, text: str) -> None:
    in_machine(leader, ["/bin/sh", "-c", f"cat > {path}"], input=text, check=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

"""Thin executors for the host side: observe the root namespace, run ``ip``, kill processes.

Every function here does I/O; the decisions live in :mod:`cerana_lab.plan`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

from cerana_lab.plan import HostView, LabError, Node, lab_links

log = logging.getLogger(__name__)

NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")

#: tool -> Debian package that provides it
TOOLS = {
    "ip": "iproute2",
    "nsenter": "util-linux",
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
}


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("cerana lab must run as root (it creates namespaces, links and machines)")


def require_tools(names: Iterable[str]) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        packages = sorted({TOOLS.get(name, name) for name in missing})
        raise LabError(f"missing {', '.join(missing)}: apt-get install {' '.join(packages)}")


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    log.debug("run: %s", " ".join(cmd))
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise LabError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def ip_json(*args: str) -> list[dict]:
    out = run(["ip", "-j", *args]).stdout.strip()
    return json.loads(out) if out else []


# --- observing --------------------------------------------------------------------------------


def list_netns() -> frozenset[str]:
    try:
        return frozenset(p.name for p in NETNS_RUN.iterdir())
    except FileNotFoundError:
        return frozenset()


def observe(bridge: str | None = None) -> HostView:
    links = frozenset(link["ifname"] for link in ip_json("link", "show"))
    networks: list[tuple[str, IPv4Network]] = []
    addresses: list[tuple[str, IPv4Interface]] = []
    for link in ip_json("-4", "addr", "show"):
        for info in link.get("addr_info", []):
            iface = IPv4Interface(f"{info['local']}/{info['prefixlen']}")
            networks.append((link["ifname"], iface.network))
            if link["ifname"] == bridge:
                addresses.append((link["ifname"], iface))
    for route in ip_json("-4", "route", "show", "table", "main"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            try:
                networks.append((route.get("dev", "?"), IPv4Network(dst, strict=False)))
            except ValueError:
                pass
    return HostView(
        links=links,
        netns=list_netns(),
        networks=tuple(networks),
        addresses=tuple(addresses),
        nspawn_by_netns=nspawn_processes(),
    )


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def nspawn_processes() -> dict[str, tuple[int, ...]]:
    """Running systemd-nspawn processes, by the namespace name of their --network-namespace-path."""
    found: dict[str, list[int]] = {}
    prefix = f"--network-namespace-path={NETNS_RUN}/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = _cmdline(int(entry.name))
        if not args or not args[0].endswith("systemd-nspawn"):
            continue
        for arg in args:
            if arg.startswith(prefix):
                found.setdefault(arg[len(prefix) :], []).append(int(entry.name))
    return {ns: tuple(sorted(pids)) for ns, pids in found.items()}


def processes_in_netns(netns: str) -> list[int]:
    """Pids of processes whose network namespace is the named one."""
    try:
        st = os.stat(NETNS_RUN / netns)
    except OSError:
        return []
    pids = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            ns = os.stat(entry / "ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry.name))
    return pids


def pid_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def terminate(pids: Iterable[int], *, timeout: float = 20.0, reap_wait: float = 3.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left.

    Then waits up to ``reap_wait`` (best effort) until the processes are reaped, so that they
    are gone from the process table when ``down`` returns; orphans (our detached nspawns) are
    reaped by the host's PID 1, which here takes a second or two.
    """
    pids = [p for p in pids if _signal(p, signal.SIGTERM)]
    targets = [(p, pid_start_time(p)) for p in pids]
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        if pids:
            time.sleep(0.05)
    for pid in pids:
        log.warning("pid %d did not stop within %.0f s: killing it", pid, timeout)
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + reap_wait
    while targets and time.monotonic() < deadline:
        targets = [(p, start) for p, start in targets if start is not None and _exists(p, start)]
        if targets:
            time.sleep(0.02)


def kill(pid: int) -> None:
    """SIGKILL one process (gone already is fine)."""
    _signal(pid, signal.SIGKILL)


def _exists(pid: int, start: int) -> bool:
    _alive(pid)  # reaps it if it is our child
    return pid_start_time(pid) == start


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (reaps our own children)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# --- changing ---------------------------------------------------------------------------------


def create_bridge(name: str, address: IPv4Interface) -> None:
    run(["ip", "link", "add", name, "type", "bridge"])
    run(["ip", "addr", "add", str(address), "dev", name])
    run(["ip", "link", "set", name, "up"])


def create_node(node: Node, gateway: str, bridge: str) -> None:
    ns = node.netns
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "link", "set", node.veth, "master", bridge, "up"])
    run(["ip", "-n", ns, "addr", "add", str(node.address), "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", gateway])
    # A node routes for the bundle networks it hosts; nspawn mounts /proc/sys read-only in the
    # machine, so the (per-namespace) switch is set here, from outside.
    run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])


def write_node_files(netns: str, hosts: str, resolv: str) -> None:
    etc = NETNS_ETC / netns
    etc.mkdir(parents=True, exist_ok=True)
    _write(etc / "hosts", hosts)
    _write(etc / "resolv.conf", resolv)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def remove_node_files(netns: str) -> None:
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
    try:
        NETNS_ETC.rmdir()  # only when empty, and only ever created by ip-netns users
    except OSError:
        pass


def delete_netns(netns: str) -> None:
    run(["ip", "netns", "delete", netns])


def delete_link(name: str) -> None:
    """Delete a link; one that is already gone is fine.

    A veth whose peer lives in a node's namespace vanishes by itself when that namespace goes, so
    the link can disappear between ip's name lookup ("Cannot find device") and the delete itself
    ("No such device"): both mean the work is done. Any other failure, or a link still there, is not.
    """
    proc = run(["ip", "link", "delete", name], check=False)
    if proc.returncode == 0 or not link_exists(name):
        return
    raise LabError(f"`ip link delete {name}` failed: {proc.stderr.strip()}")


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def leftover_links(lab_name: str) -> list[str]:
    return lab_links(lab_name, (link["ifname"] for link in ip_json("link", "show")))

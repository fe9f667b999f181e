"""``cerana lab``: a local cluster of nodes on one Linux bridge.

``up`` creates (or completes) the lab, ``down`` removes everything it created, ``status``
reports, ``inventory`` prints an Ansible inventory. Wire into a bigger CLI with
:func:`register`; run alone with :func:`main` (``python -m cerana_lab``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import yaml

from cerana_lab import host, machines, rootfs, sample
from cerana_lab.plan import (
    DEFAULT_LAB,
    DEFAULT_SUBNET,
    KINDS,
    RESOLV_CONF,
    Action,
    CreateBridge,
    CreateNode,
    DeleteLink,
    DeleteNetns,
    KillMachine,
    KillNamespaceProcesses,
    Lab,
    LabError,
    LabState,
    MachineState,
    NodeStatus,
    RemoveNodeFiles,
    RemoveState,
    StartMachine,
    StopMachine,
    WaitMachine,
    WriteNodeFiles,
    WriteState,
    hosts_file,
    inventory,
    inventory_ini,
    make_address,
    make_lab,
    netns_name,
    node_healthy,
    node_status_line,
    plan_down,
    plan_start,
    plan_stop,
    plan_up,
    validate_name,
    veth_name,
)

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/cerana-lab")


# --- state ------------------------------------------------------------------------------------


class LabDir:
    """``<base>/<lab>/``: state.json, one console log per nspawn node; ``<base>/<lab>.lock``."""

    def __init__(self, base: Path, name: str) -> None:
        self.base = base
        self.name = validate_name(name)
        self.path = base / name
        self.state_file = self.path / "state.json"

    def load(self) -> LabState | None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(
                f"cannot read {self.state_file}: {exc}; `cerana lab down --name {self.name}` cleans up"
            ) from None
        state = LabState.from_json(data)
        return replace(state, machines={n: replace(m, alive=machines.alive(m)) for n, m in state.machines.items()})

    def save(self, state: LabState) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
        tmp.replace(self.state_file)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.base / f"{self.name}.lock").unlink()
        with contextlib.suppress(OSError):
            self.base.rmdir()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One up/down at a time per lab, across processes."""
        self.base.mkdir(parents=True, exist_ok=True)
        lock_path = self.base / f"{self.name}.lock"
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if not self.state_file.exists():  # no lab (left): leave no lock file behind
                    self.remove()


# --- executing plans --------------------------------------------------------------------------


class Executor:
    """Carries out plan actions in order; remembers the machines it started."""

    def __init__(
        self,
        labdir: LabDir,
        lab: Lab | None = None,
        rootfs_path: Path | None = None,
        boot_timeout: float = machines.DEFAULT_BOOT_TIMEOUT,
    ) -> None:
        self.labdir = labdir
        self.lab = lab
        self.rootfs = rootfs_path
        self.boot_timeout = boot_timeout
        self.started: dict[str, MachineState] = {}
        self.to_wait: list[str] = []
        self.hosts_changed: list[str] = []

    def run(self, actions: Sequence[Action]) -> None:
        # Machines shut down in parallel: every stop comes before anything else of its node.
        stops = [a for a in actions if isinstance(a, StopMachine) and a.pids]
        if stops:
            log.info("stopping machine(s) %s", ", ".join(a.netns for a in stops))
            host.terminate([pid for a in stops for pid in a.pids], timeout=30)
        for action in actions:
            log.debug("action: %s", action)
            if not isinstance(action, StopMachine):
                self.apply(action)

    def apply(self, action: Action) -> None:
        if isinstance(action, CreateBridge):
            log.info("bridge %s %s", action.name, action.address)
            host.create_bridge(action.name, action.address)
        elif isinstance(action, CreateNode):
            log.info("node %s: netns %s, %s", action.node.name, action.node.netns, action.node.address)
            host.create_node(action.node, str(action.gateway), action.bridge)
        elif isinstance(action, WriteNodeFiles):
            host.write_node_files(action.node.netns, action.hosts, RESOLV_CONF)
            self.hosts_changed.append(action.node.name)
        elif isinstance(action, StartMachine):
            if self.rootfs is None:
                raise LabError("internal: no node image")
            self.labdir.path.mkdir(parents=True, exist_ok=True)
            self.started[action.node.name] = machines.start_machine(
                action.node, self.rootfs, uuid.uuid4().hex, self.labdir.path / f"{action.node.name}.log"
            )
        elif isinstance(action, WaitMachine):
            self.to_wait.append(action.node.name)
        elif isinstance(action, StopMachine):
            host.terminate(action.pids, timeout=30)
        elif isinstance(action, KillMachine):
            log.info("killing machine %s (SIGKILL to its PID 1, %d)", action.netns, action.leader)
            host.kill(action.leader)
            host.terminate(action.pids, timeout=10)
        elif isinstance(action, KillNamespaceProcesses):
            pids = host.processes_in_netns(action.netns)
            if pids:
                log.info("netns %s: stopping %d leftover process(es)", action.netns, len(pids))
                host.terminate(pids, timeout=5, reap_wait=0)
        elif isinstance(action, DeleteNetns):
            host.delete_netns(action.netns)
        elif isinstance(action, DeleteLink):
            host.delete_link(action.name)
        elif isinstance(action, RemoveNodeFiles):
            host.remove_node_files(action.netns)
        elif isinstance(action, WriteState):
            state = action.state
            merged = {**{n: m for n, m in state.machines.items()}, **self.started}
            self.labdir.save(replace(state, machines=merged))
            self._wait(replace(state, machines=merged))
        elif isinstance(action, RemoveState):
            self.labdir.remove()
        else:  # pragma: no cover - exhaustive
            raise LabError(f"internal: unknown action {action!r}")

    def _wait(self, state: LabState) -> None:
        """After the state is saved (so `down` finds everything), wait for booting machines.

        Then give every machine whose node list changed the lab's /etc/hosts (machines have
        their own /etc; /etc/netns/<ns>/hosts only applies to ``ip netns exec``).
        """
        if self.lab is None or self.lab.kind != "nspawn":
            return
        pairs = [(self.lab.node(name), state.machines[name]) for name in self.to_wait]
        machines.wait_ready(pairs, self.labdir.path, timeout=self.boot_timeout)
        self.to_wait = []
        for name in self.hosts_changed:
            if name in state.machines:
                machines.write_file(state.machines[name].leader, "/etc/hosts", hosts_file(self.lab))
        self.hosts_changed = []


# --- commands ---------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    host.require_root()
    lab = make_lab(args.name, args.kind, args.nodes, args.subnet)
    host.require_tools(
        ["ip"] + (["systemd-nspawn", "nsenter", "setsid", "debootstrap"] if lab.kind == "nspawn" else [])
    )
    labdir = LabDir(args.state_dir, lab.name)
    started = time.monotonic()
    with labdir.locked():
        state = labdir.load()
        actions = plan_up(lab, host.observe(lab.bridge), state)
        image = None
        if any(isinstance(a, StartMachine) for a in actions):
            image = rootfs.ensure_rootfs(args.rootfs_cache, args.suite)
        executor = Executor(labdir, lab, image, boot_timeout=args.boot_timeout)
        try:
            executor.run(actions)
        except LabError as exc:
            raise LabError(
                f"{exc}\nlab {lab.name!r} is half up: `cerana lab down --name {lab.name}` removes it"
            ) from None
    changed = [a for a in actions if not isinstance(a, (WriteState, WaitMachine))]
    what = "created/updated" if changed else "already up"
    log.info(
        "lab %s %s: %d %s node(s) on %s via %s (%.1f s)",
        lab.name,
        what,
        len(lab.nodes),
        lab.kind,
        lab.subnet,
        lab.bridge,
        time.monotonic() - started,
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    host.require_root()
    labdir = LabDir(args.state_dir, args.name)
    started = time.monotonic()
    with labdir.locked():
        try:
            state = labdir.load()
        except LabError as exc:
            log.warning("%s; removing the lab by its names", exc)
            state = None
        actions = plan_down(args.name, host.observe(), state)
        Executor(labdir).run(actions)
    left = host.leftover_links(args.name)
    if left:
        raise LabError(f"links left behind: {', '.join(left)}")
    log.info("lab %s is down (%.1f s)", args.name, time.monotonic() - started)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    host.require_root()
    labdir = LabDir(args.state_dir, args.name)
    started = time.monotonic()
    with labdir.locked():
        actions = plan_stop(labdir.load(), args.node, host.observe(), kill=args.kill)
        Executor(labdir).run(actions)
    if not actions:
        log.info("%s of lab %s is not running", args.node, args.name)
    else:
        how = "killed" if args.kill else "stopped"
        log.info("%s of lab %s %s (%.1f s)", args.node, args.name, how, time.monotonic() - started)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    host.require_root()
    host.require_tools(["systemd-nspawn", "nsenter", "setsid"])
    labdir = LabDir(args.state_dir, args.name)
    started = time.monotonic()
    with labdir.locked():
        state = labdir.load()
        actions = plan_start(state, args.node, host.observe())
        if actions:
            assert state is not None
            lab = make_lab(state.name, state.kind, len(state.nodes), state.subnet)
            image = rootfs.ensure_rootfs(args.rootfs_cache, args.suite)
            Executor(labdir, lab, image, boot_timeout=args.boot_timeout).run(actions)
    if not actions:
        log.info("%s of lab %s is already running", args.node, args.name)
    else:
        log.info("%s of lab %s started (%.1f s)", args.node, args.name, time.monotonic() - started)
    return 0


def lab_status(state: LabState) -> list[NodeStatus]:
    view = host.observe()
    out = []
    for name in state.nodes:
        netns = netns_name(state.name, name)
        index = int(name.removeprefix("node"))
        machine = None
        if state.kind == "nspawn":
            recorded = state.machines.get(name)
            machine = machines.system_state(recorded.leader) if recorded and recorded.alive else "stopped"
        out.append(
            NodeStatus(
                name=name,
                netns=netns,
                address=str(make_address(state.subnet, name)),
                netns_present=netns in view.netns,
                link_present=veth_name(state.name, index) in view.links,
                machine=machine,
            )
        )
    return out


def cmd_status(args: argparse.Namespace) -> int:
    host.require_root()
    state = LabDir(args.state_dir, args.name).load()
    if state is None:
        if args.json:
            print(json.dumps({"name": args.name, "up": False}))
        else:
            print(f"lab {args.name}: down")
        return 3
    nodes = lab_status(state)
    healthy = all(node_healthy(n) for n in nodes)
    if args.json:
        doc = {
            **state.to_json(),
            "up": True,
            "healthy": healthy,
            "status": [n.__dict__ for n in nodes],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"lab {state.name}: {len(nodes)} {state.kind} node(s) on {state.subnet}, "
            + ("healthy" if healthy else "NOT healthy")
        )
        for status in nodes:
            print("  " + node_status_line(status))
    return 0 if healthy else 1


def cmd_inventory(args: argparse.Namespace) -> int:
    labdir = LabDir(args.state_dir, args.name)
    state = labdir.load()
    if state is None:
        raise LabError(f"lab {args.name!r} is not up: `cerana lab up --name {args.name}` first")
    inv = inventory(state, python=args.python or sys.executable, state_dir=str(labdir.path))
    if args.format == "ini":
        sys.stdout.write(inventory_ini(inv))
    elif args.format == "json":
        print(json.dumps(inv, indent=2))
    else:
        sys.stdout.write(yaml.safe_dump(inv, sort_keys=False, default_flow_style=False))
    return 0


# --- wiring -----------------------------------------------------------------------------------


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected errors become one line on stderr and exit status 1, whoever calls us."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except LabError as exc:
            log.error("%s", exc)
            return 1

    return wrapper


def cmd_sample_dataset(args: argparse.Namespace) -> int:
    if args.dir.exists():
        raise LabError(f"{args.dir} exists; give a new directory")
    try:
        sample.build_sample(args.dir, args.python)
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(args.dir, ignore_errors=True)
        raise LabError(f"cannot build the sample dataset in {args.dir}: {exc}") from None
    print(args.dir)
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``lab`` command group to an argparse subparsers object."""
    lab = subparsers.add_parser(
        "lab",
        help="a local lab cluster of netns or systemd-nspawn nodes",
        description="A local lab: nodes in their own network namespaces on one Linux bridge (needs root).",
    )
    commands = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", default=DEFAULT_LAB, help=f"lab name, 1-8 of a-z0-9 (default: {DEFAULT_LAB})")
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help=f"where labs keep their state (default: {DEFAULT_STATE_DIR})",
        )

    up = commands.add_parser(
        "up",
        help="create the lab, or complete it (idempotent)",
        description="Create the lab, or complete it; a second up with the same arguments changes nothing.",
    )
    common(up)
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default: 3)")
    up.add_argument(
        "--kind",
        choices=KINDS,
        default="netns",
        help="netns: namespaces only (fast); nspawn: systemd machines (default: netns)",
    )
    up.add_argument(
        "--subnet",
        default=DEFAULT_SUBNET,
        help=f"IPv4 subnet; bridge at .1, nodes from .11 (default: {DEFAULT_SUBNET})",
    )
    up.add_argument(
        "--rootfs-cache",
        type=Path,
        default=rootfs.DEFAULT_CACHE,
        help=f"node image cache (default: {rootfs.DEFAULT_CACHE})",
    )
    up.add_argument(
        "--suite",
        default=rootfs.DEFAULT_SUITE,
        help=f"Debian suite of the node image (default: {rootfs.DEFAULT_SUITE})",
    )
    up.add_argument(
        "--boot-timeout",
        type=float,
        default=machines.DEFAULT_BOOT_TIMEOUT,
        help="seconds to wait for nspawn machines to boot",
    )
    up.set_defaults(func=_guarded(cmd_up))

    down = commands.add_parser(
        "down",
        help="remove everything the lab created",
        description="Stop machines and remove namespaces, links and state of the lab.",
    )
    common(down)
    down.set_defaults(func=_guarded(cmd_down))

    stop = commands.add_parser(
        "stop",
        help="stop one node's machine (nspawn labs)",
        description="Stop one node's machine: a clean shutdown, or with --kill a crash (SIGKILL to its PID 1). "
        "The node's namespace stays; `start` boots the machine again from a fresh overlay.",
    )
    common(stop)
    stop.add_argument("node", help="node name, e.g. node2")
    stop.add_argument("--kill", action="store_true", help="kill the machine at once instead of shutting it down")
    stop.set_defaults(func=_guarded(cmd_stop))

    start = commands.add_parser(
        "start",
        help="boot one node's stopped machine again (nspawn labs)",
        description="Boot a stopped node's machine again (a fresh overlay: what was installed on it is gone).",
    )
    common(start)
    start.add_argument("node", help="node name, e.g. node2")
    start.add_argument("--rootfs-cache", type=Path, default=rootfs.DEFAULT_CACHE, help=argparse.SUPPRESS)
    start.add_argument("--suite", default=rootfs.DEFAULT_SUITE, help=argparse.SUPPRESS)
    start.add_argument(
        "--boot-timeout", type=float, default=machines.DEFAULT_BOOT_TIMEOUT, help="seconds to wait for the boot"
    )
    start.set_defaults(func=_guarded(cmd_start))

    status = commands.add_parser(
        "status",
        help="show the lab's nodes (exit 0 healthy, 1 not, 3 down)",
        description="Show the lab's nodes; exit 0 when healthy, 1 when not, 3 when the lab is down.",
    )
    common(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_guarded(cmd_status))

    inv = commands.add_parser(
        "inventory",
        help="print an Ansible inventory of the lab",
        description="Print an Ansible inventory (group <lab name> and cerana_lab).",
    )
    common(inv)
    inv.add_argument(
        "--format", choices=("yaml", "ini", "json"), default="yaml", help="inventory format (default: yaml)"
    )
    inv.add_argument(
        "--python", help="interpreter for netns nodes (default: this Python; nspawn nodes use /usr/bin/python3)"
    )
    inv.set_defaults(func=_guarded(cmd_inventory))

    sample_cmd = commands.add_parser(
        "sample-dataset",
        help="write the sample app dataset (Python and two small services) into a directory",
        description="Write the sample app dataset into DIR: this machine's Python, its standard library and "
        "libraries, /app/backend.py and /app/front.py (cerana_lab/sample.py). Import it with "
        "cerana.platform.dataset_import.",
    )
    sample_cmd.add_argument("dir", type=Path, help="target directory (must not exist)")
    sample_cmd.add_argument("--python", default="/usr/bin/python3", help="interpreter to copy (default: %(default)s)")
    sample_cmd.set_defaults(func=_guarded(cmd_sample_dataset))
    return lab


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cerana", description="Cerana platform tools.")
    register(parser.add_subparsers(dest="group", required=True, metavar="COMMAND"))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)] if _bare(argv) else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="cerana: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


def _bare(argv: Sequence[str] | None) -> bool:
    """``main(["up", ...])`` and ``main(["lab", "up", ...])`` both work."""
    first = (sys.argv[1:] if argv is None else list(argv))[:1]
    return first != ["lab"]

"""Pure planning core of ``cerana lab``: names, addresses and what to create or delete.

Nothing here touches the host. The executors observe the host into :class:`HostView`
and :class:`LabState`, call :func:`plan_up` / :func:`plan_down`, and carry out the
returned actions in order.

Naming (lab ``cerana``, 2 nodes)::

    bridge        cl-cerana-br       10.77.0.1/24
    node1         netns cerana-node1 eth0 10.77.0.11/24, host side of the veth cl-cerana-1
    node2         netns cerana-node2 eth0 10.77.0.12/24, host side of the veth cl-cerana-2

Interface names are limited to 15 characters, hence the lab name limit of 8.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

DEFAULT_LAB = "cerana"
DEFAULT_SUBNET = "10.77.0.0/24"
KINDS = ("netns", "nspawn")
#: Node N gets host number NODE_OFFSET + N in the subnet (.11, .12, ...); the bridge gets .1.
NODE_OFFSET = 10
MAX_NODES = 200
LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
NODE_NAME_RE = re.compile(r"^node([1-9][0-9]{0,2})$")
STATE_FORMAT = 1


class LabError(Exception):
    """An expected error: printed as one line, no traceback."""


# --- the desired lab --------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    index: int
    name: str  # inventory name and hostname: node1
    netns: str  # network namespace, also the nspawn machine name: cerana-node1
    veth: str  # host side of the node's veth pair: cl-cerana-1
    address: IPv4Interface  # eth0 inside the namespace

    @property
    def ip(self) -> str:
        return str(self.address.ip)


@dataclass(frozen=True)
class Lab:
    name: str
    kind: str
    subnet: IPv4Network
    nodes: tuple[Node, ...]

    @property
    def bridge(self) -> str:
        return bridge_name(self.name)

    @property
    def gateway(self) -> IPv4Interface:
        return IPv4Interface(f"{self.subnet.network_address + 1}/{self.subnet.prefixlen}")

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


def bridge_name(lab: str) -> str:
    return f"cl-{lab}-br"


def veth_name(lab: str, index: int) -> str:
    return f"cl-{lab}-{index}"


def netns_name(lab: str, node: str) -> str:
    return f"{lab}-{node}"


def validate_name(name: str) -> str:
    if not LAB_NAME_RE.match(name):
        raise LabError(f"invalid lab name {name!r}: 1-8 characters a-z0-9, starting with a letter")
    return name


def parse_subnet(text: str) -> IPv4Network:
    try:
        subnet = IPv4Network(text, strict=True)
    except ValueError as exc:
        raise LabError(f"invalid subnet {text!r}: {exc}") from None
    if subnet.prefixlen > 29:
        raise LabError(f"subnet {subnet} is too small: use a /29 or larger")
    return subnet


def make_lab(
    name: str = DEFAULT_LAB, kind: str = "netns", nodes: int = 3, subnet: str | IPv4Network = DEFAULT_SUBNET
) -> Lab:
    """Validate the arguments of ``lab up`` and compute every name and address."""
    validate_name(name)
    if kind not in KINDS:
        raise LabError(f"invalid kind {kind!r}: one of {', '.join(KINDS)}")
    net = subnet if isinstance(subnet, IPv4Network) else parse_subnet(subnet)
    if not 1 <= nodes <= MAX_NODES:
        raise LabError(f"invalid number of nodes {nodes}: 1 to {MAX_NODES}")
    usable = net.num_addresses - 2  # network and broadcast
    if NODE_OFFSET + nodes > usable:
        raise LabError(f"subnet {net} has room for {max(usable - NODE_OFFSET, 0)} nodes, not {nodes}")
    members = []
    for index in range(1, nodes + 1):
        node = f"node{index}"
        address = IPv4Interface(f"{net.network_address + NODE_OFFSET + index}/{net.prefixlen}")
        members.append(Node(index, node, netns_name(name, node), veth_name(name, index), address))
    return Lab(name, kind, net, tuple(members))


def hosts_file(lab: Lab) -> str:
    """/etc/hosts for every node: localhost plus every lab node (a node's own name is its eth0 address)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{n.ip}\t{n.name}\t{n.netns}" for n in lab.nodes]
    return "\n".join(lines) + "\n"


#: resolv.conf without a nameserver: glibc then asks 127.0.0.1:53 inside the namespace,
#: which refuses at once, so nothing waits for a resolver it cannot reach.
RESOLV_CONF = "# cerana lab node: no DNS inside the lab\noptions timeout:1 attempts:1\n"


# --- what the executors observed --------------------------------------------------------------


@dataclass(frozen=True)
class HostView:
    """The root network namespace as far as the lab cares."""

    links: frozenset[str] = frozenset()
    netns: frozenset[str] = frozenset()
    #: (device, network) of every IPv4 address and main-table route in the root namespace.
    networks: tuple[tuple[str, IPv4Network], ...] = ()
    #: (device, interface) of addresses on the lab's bridge, to tell if it is configured.
    addresses: tuple[tuple[str, IPv4Interface], ...] = ()
    #: pids of running systemd-nspawn processes by the netns path they were given.
    nspawn_by_netns: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class MachineState:
    """A running nspawn node as recorded in the state file."""

    pid: int  # the systemd-nspawn process
    start_time: int  # field 22 of /proc/<pid>/stat, guards against pid reuse
    leader: int  # PID 1 of the machine (systemd), seen from the host
    machine_id: str
    alive: bool = True


@dataclass(frozen=True)
class LabState:
    """The state file of a lab (``<state dir>/state.json``), plus liveness of its machines."""

    name: str
    kind: str
    subnet: IPv4Network
    nodes: tuple[str, ...]
    machines: Mapping[str, MachineState] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "kind": self.kind,
            "subnet": str(self.subnet),
            "bridge": bridge_name(self.name),
            "nodes": [
                {
                    "name": node,
                    "netns": netns_name(self.name, node),
                    "address": str(make_address(self.subnet, node)),
                    **(
                        {
                            "machine": netns_name(self.name, node),
                            "pid": self.machines[node].pid,
                            "start_time": self.machines[node].start_time,
                            "leader_pid": self.machines[node].leader,
                            "machine_id": self.machines[node].machine_id,
                        }
                        if node in self.machines
                        else {}
                    ),
                }
                for node in self.nodes
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabState:
        try:
            if data.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            machines = {
                n["name"]: MachineState(int(n["pid"]), int(n["start_time"]), int(n["leader_pid"]), str(n["machine_id"]))
                for n in data["nodes"]
                if "pid" in n
            }
            return cls(
                name=validate_name(str(data["name"])),
                kind=str(data["kind"]),
                subnet=IPv4Network(data["subnet"]),
                nodes=tuple(str(n["name"]) for n in data["nodes"]),
                machines=machines,
            )
        except (KeyError, TypeError, ValueError, LabError) as exc:
            raise LabError(f"unreadable lab state: {exc}") from None


def make_address(subnet: IPv4Network, node: str) -> IPv4Interface:
    match = NODE_NAME_RE.match(node)
    if not match:
        raise ValueError(f"bad node name {node!r}")
    return IPv4Interface(f"{subnet.network_address + NODE_OFFSET + int(match.group(1))}/{subnet.prefixlen}")


# --- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateBridge:
    name: str
    address: IPv4Interface


@dataclass(frozen=True)
class CreateNode:
    """Namespace (lo up), veth into the bridge, eth0 address, default route, /etc/netns files."""

    node: Node
    gateway: IPv4Address
    bridge: str


@dataclass(frozen=True)
class WriteNodeFiles:
    """(Re)write /etc/netns/<ns>/{hosts,resolv.conf}: cheap, keeps the node list current."""

    node: Node
    hosts: str


@dataclass(frozen=True)
class StartMachine:
    node: Node


@dataclass(frozen=True)
class WaitMachine:
    node: Node


@dataclass(frozen=True)
class StopMachine:
    """Stop systemd-nspawn (SIGTERM = clean shutdown), by recorded or discovered pids."""

    netns: str
    pids: tuple[int, ...]


@dataclass(frozen=True)
class KillMachine:
    """SIGKILL the machine's PID 1: its whole pid namespace dies at once, like a power cut."""

    netns: str
    leader: int
    pids: tuple[int, ...]  # systemd-nspawn, which exits when its machine died


@dataclass(frozen=True)
class KillNamespaceProcesses:
    """Kill whatever still runs inside a lab namespace (daemons started by tests, ...)."""

    netns: str


@dataclass(frozen=True)
class DeleteNetns:
    netns: str


@dataclass(frozen=True)
class DeleteLink:
    name: str


@dataclass(frozen=True)
class RemoveNodeFiles:
    netns: str


@dataclass(frozen=True)
class WriteState:
    state: LabState


@dataclass(frozen=True)
class RemoveState:
    pass


Action = (
    CreateBridge
    | CreateNode
    | WriteNodeFiles
    | StartMachine
    | WaitMachine
    | StopMachine
    | KillMachine
    | KillNamespaceProcesses
    | DeleteNetns
    | DeleteLink
    | RemoveNodeFiles
    | WriteState
    | RemoveState
)


# --- planning ---------------------------------------------------------------------------------


def subnet_conflicts(lab: Lab, host: HostView) -> list[str]:
    """Addresses/routes of the root namespace that overlap the lab subnet, except the lab's own."""
    conflicts = []
    for dev, net in host.networks:
        if dev == lab.bridge or net.prefixlen == 0:
            continue
        if net.overlaps(lab.subnet):
            conflicts.append(f"{net} on {dev}")
    return sorted(set(conflicts))


def lab_netns(lab_name: str, names: Iterable[str]) -> list[str]:
    """Namespaces that follow the lab's naming scheme."""
    pattern = re.compile(rf"^{re.escape(lab_name)}-node[1-9][0-9]{{0,2}}$")
    return sorted(n for n in names if pattern.match(n))


def lab_links(lab_name: str, names: Iterable[str]) -> list[str]:
    """Root-namespace links that follow the lab's naming scheme (bridge and veths)."""
    pattern = re.compile(rf"^cl-{re.escape(lab_name)}-(br|[1-9][0-9]{{0,2}})$")
    return sorted(n for n in names if pattern.match(n))


def plan_up(lab: Lab, host: HostView, state: LabState | None) -> tuple[Action, ...]:
    """What ``lab up`` must do to make ``lab`` exist, given the host and the lab's state.

    An existing lab of another kind or subnet is refused (down it first); a different node
    count adds or removes nodes. Everything already in place is left alone, so a second
    ``up`` with the same arguments plans no creation at all.
    """
    if state is not None and (state.kind != lab.kind or state.subnet != lab.subnet):
        raise LabError(
            f"lab {lab.name!r} is already up as {len(state.nodes)} {state.kind} node(s) on {state.subnet}; "
            f"run `cerana lab down --name {lab.name}` first"
        )
    conflicts = subnet_conflicts(lab, host)
    if conflicts:
        raise LabError(
            f"subnet {lab.subnet} is already in use on this host ({', '.join(conflicts)}); choose another with --subnet"
        )

    actions: list[Action] = []
    wanted = {n.netns for n in lab.nodes}
    # Nodes beyond the requested count: remove them first.
    extra = sorted(
        set(lab_netns(lab.name, host.netns)) | {netns_name(lab.name, n) for n in (state.nodes if state else ())}
    )
    for netns in extra:
        if netns not in wanted:
            actions += _node_teardown(lab.name, netns, host, state)

    bridge_ok = lab.bridge in host.links and (lab.bridge, lab.gateway) in host.addresses
    if not bridge_ok:
        if lab.bridge in host.links:
            actions.append(DeleteLink(lab.bridge))
        actions.append(CreateBridge(lab.bridge, lab.gateway))

    hosts_changed = state is None or state.nodes != tuple(n.name for n in lab.nodes)
    machines: dict[str, MachineState] = {}
    for node in lab.nodes:
        complete = bridge_ok and node.netns in host.netns and node.veth in host.links
        if not complete:
            if node.netns in host.netns:
                actions.append(StopMachine(node.netns, _nspawn_pids(node, host, state)))
                actions.append(DeleteNetns(node.netns))
            if node.veth in host.links:
                actions.append(DeleteLink(node.veth))
            actions.append(CreateNode(node, lab.gateway.ip, lab.bridge))
        if not complete or hosts_changed:
            actions.append(WriteNodeFiles(node, hosts_file(lab)))
        if lab.kind == "nspawn":
            recorded = state.machines.get(node.name) if state else None
            if complete and recorded is not None and recorded.alive:
                machines[node.name] = recorded
            else:
                if complete and _nspawn_pids(node, host, state):
                    actions.append(StopMachine(node.netns, _nspawn_pids(node, host, state)))
                actions.append(StartMachine(node))
    actions += [WaitMachine(a.node) for a in actions if isinstance(a, StartMachine)]

    new_state = LabState(lab.name, lab.kind, lab.subnet, tuple(n.name for n in lab.nodes), machines)
    if actions or state != new_state:
        actions.append(WriteState(new_state))
    return tuple(actions)


def _machine_node(state: LabState | None, node: str, command: str) -> Lab:
    if state is None:
        raise LabError(f"no such lab: `cerana lab up` first, then `cerana lab {command} NODE`")
    if state.kind != "nspawn":
        raise LabError(f"lab {state.name!r} has {state.kind} nodes: only nspawn machines can be stopped and started")
    if node not in state.nodes:
        raise LabError(f"lab {state.name!r} has no node {node!r} (nodes: {', '.join(state.nodes)})")
    return make_lab(state.name, state.kind, len(state.nodes), state.subnet)


def plan_stop(state: LabState | None, node: str, host: HostView, *, kill: bool = False) -> tuple[Action, ...]:
    """Stop one node's machine: a clean shutdown (SIGTERM to nspawn), or with ``kill`` a crash.

    The node's namespace and link stay; the machine stays recorded (not alive), so ``status``
    shows it stopped and ``start`` (or ``up``) boots it again, from a fresh overlay.
    """
    _machine_node(state, node, "stop")
    assert state is not None
    netns = netns_name(state.name, node)
    recorded = state.machines.get(node)
    pids = _nspawn_pids(netns, host, state)
    if not pids:
        return ()
    if kill and recorded is not None and recorded.alive:
        return (KillMachine(netns, recorded.leader, pids),)
    return (StopMachine(netns, pids),)


def plan_start(state: LabState | None, node: str, host: HostView) -> tuple[Action, ...]:
    """Boot one node's stopped machine again (nothing to do if it runs)."""
    lab = _machine_node(state, node, "start")
    assert state is not None
    recorded = state.machines.get(node)
    if recorded is not None and recorded.alive:
        return ()
    member = lab.node(node)
    if member.netns not in host.netns or member.veth not in host.links:
        raise LabError(f"node {node} of lab {lab.name!r} lost its namespace or link: run `cerana lab up` to repair it")
    actions: list[Action] = []
    leftover = _nspawn_pids(member, host, state)
    if leftover:
        actions.append(StopMachine(member.netns, leftover))
    machines = {n: m for n, m in state.machines.items() if n != node}
    actions += [
        WriteNodeFiles(member, hosts_file(lab)),
        StartMachine(member),
        WaitMachine(member),
        WriteState(replace(state, machines=machines)),
    ]
    return tuple(actions)


def _nspawn_pids(node: Node | str, host: HostView, state: LabState | None) -> tuple[int, ...]:
    netns = node if isinstance(node, str) else node.netns
    pids = set(host.nspawn_by_netns.get(netns, ()))
    if state is not None:
        for name, machine in state.machines.items():
            if netns_name(state.name, name) == netns and machine.alive:
                pids.add(machine.pid)
    return tuple(sorted(pids))


def _node_teardown(lab_name: str, netns: str, host: HostView, state: LabState | None) -> list[Action]:
    actions: list[Action] = [StopMachine(netns, _nspawn_pids(netns, host, state)), KillNamespaceProcesses(netns)]
    if netns in host.netns:
        actions.append(DeleteNetns(netns))
    index = netns.rsplit("-node", 1)[1]
    veth = veth_name(lab_name, int(index))
    if veth in host.links:
        actions.append(DeleteLink(veth))
    actions.append(RemoveNodeFiles(netns))
    return actions


def plan_down(lab_name: str, host: HostView, state: LabState | None) -> tuple[Action, ...]:
    """Everything that belongs to the lab, from its state file and from the naming scheme.

    Works without a state file too (an ``up`` that died half way), so ``down`` always
    leaves nothing behind.
    """
    validate_name(lab_name)
    netns = set(lab_netns(lab_name, host.netns))
    netns |= set(lab_netns(lab_name, host.nspawn_by_netns))
    if state is not None:
        netns |= {netns_name(lab_name, n) for n in state.nodes}
    actions: list[Action] = []
    for ns in sorted(netns, key=_node_sort_key):
        actions += _node_teardown(lab_name, ns, host, state)
    for link in lab_links(lab_name, host.links):
        if not any(isinstance(a, DeleteLink) and a.name == link for a in actions):
            actions.append(DeleteLink(link))
    actions.append(RemoveState())
    return tuple(actions)


def _node_sort_key(netns: str) -> tuple[str, int]:
    base, _, index = netns.rpartition("-node")
    return (base, int(index) if index.isdigit() else 0)


# --- status and inventory ---------------------------------------------------------------------


@dataclass(frozen=True)
class NodeStatus:
    name: str
    netns: str
    address: str
    netns_present: bool
    link_present: bool
    machine: str | None = None  # nspawn only: systemctl is-system-running, or "stopped"


def node_status_line(status: NodeStatus) -> str:
    problems = []
    if not status.netns_present:
        problems.append("netns missing")
    if not status.link_present:
        problems.append("veth missing")
    text = f"{status.name:<8} {status.netns:<20} {status.address:<18}"
    if status.machine is not None:
        text += f" {status.machine}"
    if problems:
        text += f" ({', '.join(problems)})"
    return text.rstrip()


def node_healthy(status: NodeStatus) -> bool:
    return (
        status.netns_present
        and status.link_present
        and (status.machine is None or status.machine in ("running", "degraded"))
    )


def inventory(state: LabState, *, python: str, state_dir: str) -> dict[str, Any]:
    """An Ansible YAML inventory for the lab: group ``<lab>`` (and ``cerana_lab``) of all nodes."""
    hosts: dict[str, dict[str, Any]] = {}
    for node in state.nodes:
        netns = netns_name(state.name, node)
        hostvars: dict[str, Any] = {"ansible_host": str(make_address(state.subnet, node).ip)}
        if state.kind == "netns":
            hostvars.update(
                ansible_connection="cerana.platform.netns",
                ansible_netns=netns,
                ansible_python_interpreter=python,
            )
        else:
            hostvars.update(
                ansible_connection="cerana.platform.nspawn",
                ansible_nspawn_machine=netns,
                ansible_nspawn_state_dir=state_dir,
                ansible_python_interpreter="/usr/bin/python3",
                # modules go in on the command's stdin: one nsenter per task instead of three
                ansible_pipelining=True,
            )
        hosts[node] = hostvars
    return {
        "all": {
            "children": {
                "cerana_lab": {"children": {state.name: {}}},
                state.name: {
                    "hosts": hosts,
                    "vars": {
                        "cerana_lab_name": state.name,
                        "cerana_lab_kind": state.kind,
                        "cerana_lab_subnet": str(state.subnet),
                        "cerana_lab_gateway": str(IPv4Interface(f"{state.subnet.network_address + 1}").ip),
                    },
                },
            }
        }
    }


def inventory_ini(inv: Mapping[str, Any]) -> str:
    """The same inventory in INI form."""
    lines: list[str] = []
    children = inv["all"]["children"]
    for group, body in children.items():
        if "hosts" not in body:
            continue
        lines.append(f"[{group}]")
        for host, hostvars in body["hosts"].items():
            lines.append(" ".join([host, *(f"{k}={_ini_value(v)}" for k, v in hostvars.items())]))
        lines.append("")
        lines.append(f"[{group}:vars]")
        lines += [f"{k}={_ini_value(v)}" for k, v in body.get("vars", {}).items()]
        lines.append("")
    for group, body in children.items():
        if "children" in body:
            lines.append(f"[{group}:children]")
            lines += list(body["children"])
            lines.append("")
    return "\n".join(lines)


def _ini_value(value: object) -> str:
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_./:@+-]+", text) else repr(text)

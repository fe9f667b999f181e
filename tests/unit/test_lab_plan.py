"""The pure planning core of ``cerana lab`` (no root, no host changes)."""

from __future__ import annotations

import logging
from ipaddress import IPv4Interface, IPv4Network

import pytest
import yaml

from cerana_lab import cli, rootfs
from cerana_lab.plan import (
    CreateBridge,
    CreateNode,
    DeleteLink,
    DeleteNetns,
    HostView,
    KillNamespaceProcesses,
    LabError,
    LabState,
    MachineState,
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
    lab_links,
    lab_netns,
    make_lab,
    plan_down,
    plan_up,
    subnet_conflicts,
)


def kinds(actions):
    return [type(a).__name__ for a in actions]


def host_with(lab, *, extra_networks=(), nspawn=None, netns=None, links=None) -> HostView:
    """The host as it looks when ``lab`` is fully up."""
    return HostView(
        links=frozenset(links if links is not None else {"lo", "eth0", lab.bridge, *(n.veth for n in lab.nodes)}),
        netns=frozenset(netns if netns is not None else {n.netns for n in lab.nodes}),
        networks=(("eth0", IPv4Network("192.0.2.0/24")), (lab.bridge, lab.subnet), *extra_networks),
        addresses=((lab.bridge, lab.gateway),),
        nspawn_by_netns=nspawn or {},
    )


def machine(pid: int, alive: bool = True) -> MachineState:
    return MachineState(pid=pid, start_time=1000 + pid, leader=pid + 1, machine_id=f"{pid:032x}", alive=alive)


def state_of(lab, machines=None) -> LabState:
    return LabState(lab.name, lab.kind, lab.subnet, tuple(n.name for n in lab.nodes), machines or {})


# --- names and addresses ----------------------------------------------------------------------


def test_names_and_addresses():
    lab = make_lab("cerana", "netns", 3, "10.77.0.0/24")
    assert lab.bridge == "cl-cerana-br"
    assert lab.gateway == IPv4Interface("10.77.0.1/24")
    assert [(n.name, n.netns, n.veth, str(n.address)) for n in lab.nodes] == [
        ("node1", "cerana-node1", "cl-cerana-1", "10.77.0.11/24"),
        ("node2", "cerana-node2", "cl-cerana-2", "10.77.0.12/24"),
        ("node3", "cerana-node3", "cl-cerana-3", "10.77.0.13/24"),
    ]


def test_interface_names_fit_the_kernel_limit():
    lab = make_lab("abcdefgh", "netns", 200, "10.0.0.0/16")
    assert max(len(n) for n in [lab.bridge, *(n.veth for n in lab.nodes)]) <= 15


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Cerana"}, "invalid lab name"),
        ({"name": "toolongname"}, "invalid lab name"),
        ({"name": "1lab"}, "invalid lab name"),
        ({"kind": "vm"}, "invalid kind"),
        ({"nodes": 0}, "invalid number of nodes"),
        ({"nodes": 201}, "invalid number of nodes"),
        ({"subnet": "10.77.0.1/24"}, "invalid subnet"),
        ({"subnet": "fd00::/64"}, "invalid subnet"),
        ({"subnet": "10.77.0.0/30"}, "too small"),
        ({"subnet": "10.77.0.0/28", "nodes": 5}, "has room for 4 nodes"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(LabError, match=message):
        make_lab(**{"name": "lab", "kind": "netns", "nodes": 3, "subnet": "10.77.0.0/24", **kwargs})


def test_hosts_file_lists_every_node():
    lab = make_lab("lab", "netns", 2, "10.9.0.0/24")
    assert hosts_file(lab).splitlines() == [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "10.9.0.11\tnode1\tlab-node1",
        "10.9.0.12\tnode2\tlab-node2",
    ]


# --- subnet conflicts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "dev", "conflict"),
    [
        ("10.77.0.0/24", "br-other", True),
        ("10.77.0.128/25", "eth1", True),
        ("10.0.0.0/8", "eth1", True),
        ("10.77.1.0/24", "eth1", False),
        ("0.0.0.0/0", "eth0", False),  # the default route overlaps everything: not a conflict
        ("10.77.0.0/24", "cl-lab-br", False),  # the lab's own bridge
    ],
)
def test_subnet_conflicts(network, dev, conflict):
    lab = make_lab("lab", "netns", 2, "10.77.0.0/24")
    host = HostView(networks=((dev, IPv4Network(network)),))
    assert bool(subnet_conflicts(lab, host)) is conflict


def test_up_refuses_a_subnet_in_use():
    lab = make_lab("lab", "netns", 2)
    host = HostView(links=frozenset({"br0"}), networks=(("br0", IPv4Network("10.77.0.0/16")),))
    with pytest.raises(LabError, match=r"10\.77\.0\.0/24 is already in use on this host \(10\.77\.0\.0/16 on br0\)"):
        plan_up(lab, host, None)


# --- up ---------------------------------------------------------------------------------------


def test_up_netns_from_nothing():
    lab = make_lab("lab", "netns", 2)
    actions = plan_up(lab, HostView(links=frozenset({"lo"})), None)
    assert kinds(actions) == [
        "CreateBridge",
        "CreateNode",
        "WriteNodeFiles",
        "CreateNode",
        "WriteNodeFiles",
        "WriteState",
    ]
    assert actions[0] == CreateBridge("cl-lab-br", IPv4Interface("10.77.0.1/24"))
    assert actions[1] == CreateNode(lab.nodes[0], lab.gateway.ip, "cl-lab-br")
    assert actions[-1] == WriteState(state_of(lab))


def test_up_nspawn_from_nothing_starts_then_waits():
    lab = make_lab("lab", "nspawn", 2)
    actions = plan_up(lab, HostView(), None)
    assert kinds(actions) == [
        "CreateBridge",
        "CreateNode",
        "WriteNodeFiles",
        "StartMachine",
        "CreateNode",
        "WriteNodeFiles",
        "StartMachine",
        "WaitMachine",
        "WaitMachine",
        "WriteState",
    ]


@pytest.mark.parametrize("kind", ["netns", "nspawn"])
def test_up_again_changes_nothing(kind):
    lab = make_lab("lab", kind, 3)
    machines = {n.name: machine(100 + n.index) for n in lab.nodes} if kind == "nspawn" else {}
    nspawn = {n.netns: (100 + n.index,) for n in lab.nodes} if kind == "nspawn" else {}
    actions = plan_up(lab, host_with(lab, nspawn=nspawn), state_of(lab, machines))
    assert actions == ()


def test_up_restarts_only_the_dead_machine():
    lab = make_lab("lab", "nspawn", 2)
    state = state_of(lab, {"node1": machine(101), "node2": machine(102, alive=False)})
    actions = plan_up(lab, host_with(lab, nspawn={"lab-node1": (101,)}), state)
    assert [a for a in actions if isinstance(a, (StartMachine, WaitMachine))] == [
        StartMachine(lab.nodes[1]),
        WaitMachine(lab.nodes[1]),
    ]
    assert not any(isinstance(a, (StopMachine, CreateNode, CreateBridge)) for a in actions)
    assert actions[-1] == WriteState(state_of(lab, {"node1": machine(101)}))


def test_up_stops_a_stray_nspawn_before_restarting():
    lab = make_lab("lab", "nspawn", 1)
    actions = plan_up(lab, host_with(lab, nspawn={"lab-node1": (555,)}), state_of(lab))
    assert kinds(actions)[:2] == ["StopMachine", "StartMachine"]
    assert actions[0] == StopMachine("lab-node1", (555,))


def test_up_completes_a_half_built_node():
    lab = make_lab("lab", "netns", 2)
    host = host_with(lab, links={"lo", lab.bridge, "cl-lab-1"})  # node2's veth is gone
    actions = plan_up(lab, host, state_of(lab))
    assert kinds(actions) == ["StopMachine", "DeleteNetns", "CreateNode", "WriteNodeFiles", "WriteState"]
    assert actions[1] == DeleteNetns("lab-node2")
    assert actions[2] == CreateNode(lab.nodes[1], lab.gateway.ip, lab.bridge)


def test_up_rebuilds_a_bridge_without_its_address():
    lab = make_lab("lab", "netns", 1)
    host = HostView(links=frozenset({lab.bridge}), networks=(), addresses=())
    actions = plan_up(lab, host, None)
    assert kinds(actions)[:2] == ["DeleteLink", "CreateBridge"]


def test_up_with_fewer_nodes_removes_the_extra_ones():
    old = make_lab("lab", "netns", 3)
    new = make_lab("lab", "netns", 2)
    actions = plan_up(new, host_with(old), state_of(old))
    assert actions[:5] == (
        StopMachine("lab-node3", ()),
        KillNamespaceProcesses("lab-node3"),
        DeleteNetns("lab-node3"),
        DeleteLink("cl-lab-3"),
        RemoveNodeFiles("lab-node3"),
    )
    # the remaining nodes get a hosts file without node3
    assert [a.node.name for a in actions if isinstance(a, WriteNodeFiles)] == ["node1", "node2"]
    assert actions[-1] == WriteState(state_of(new))


def test_up_with_more_nodes_adds_them():
    old = make_lab("lab", "netns", 1)
    new = make_lab("lab", "netns", 2)
    actions = plan_up(new, host_with(old), state_of(old))
    assert [a.node.name for a in actions if isinstance(a, CreateNode)] == ["node2"]
    assert not any(isinstance(a, (CreateBridge, DeleteNetns, DeleteLink)) for a in actions)


@pytest.mark.parametrize(("kind", "subnet"), [("nspawn", "10.77.0.0/24"), ("netns", "10.88.0.0/24")])
def test_up_refuses_to_change_kind_or_subnet(kind, subnet):
    old = make_lab("lab", "netns", 2)
    with pytest.raises(LabError, match="lab down --name lab"):
        plan_up(make_lab("lab", kind, 2, subnet), host_with(old), state_of(old))


# --- down -------------------------------------------------------------------------------------


def test_down_from_state():
    lab = make_lab("lab", "nspawn", 2)
    state = state_of(lab, {"node1": machine(101), "node2": machine(102)})
    host = host_with(lab, nspawn={"lab-node1": (101,), "lab-node2": (102, 777)})
    actions = plan_down("lab", host, state)
    assert actions == (
        StopMachine("lab-node1", (101,)),
        KillNamespaceProcesses("lab-node1"),
        DeleteNetns("lab-node1"),
        DeleteLink("cl-lab-1"),
        RemoveNodeFiles("lab-node1"),
        StopMachine("lab-node2", (102, 777)),
        KillNamespaceProcesses("lab-node2"),
        DeleteNetns("lab-node2"),
        DeleteLink("cl-lab-2"),
        RemoveNodeFiles("lab-node2"),
        DeleteLink("cl-lab-br"),
        RemoveState(),
    )


def test_down_without_state_finds_everything_by_name():
    lab = make_lab("lab", "netns", 10)
    host = host_with(lab)
    actions = plan_down("lab", host, None)
    assert [a.netns for a in actions if isinstance(a, DeleteNetns)] == [f"lab-node{i}" for i in range(1, 11)]
    assert {a.name for a in actions if isinstance(a, DeleteLink)} == {lab.bridge, *(n.veth for n in lab.nodes)}


def test_down_leaves_other_labs_alone():
    mine, other = make_lab("lab", "netns", 1), make_lab("lab1", "netns", 1)
    host = HostView(
        links=frozenset({mine.bridge, other.bridge, "cl-lab-1", "cl-lab1-1", "eth0"}),
        netns=frozenset({"lab-node1", "lab1-node1", "lab-nodeX"}),
    )
    actions = plan_down("lab", host, None)
    touched = {getattr(a, "netns", None) or getattr(a, "name", None) for a in actions}
    assert touched == {"lab-node1", "cl-lab-1", "cl-lab-br", None}


def test_down_of_nothing_only_removes_state():
    assert plan_down("lab", HostView(), None) == (RemoveState(),)


def test_naming_scheme_filters():
    assert lab_netns("a", ["a-node1", "a-node12", "ab-node1", "a-node0", "a-nodes"]) == ["a-node1", "a-node12"]
    assert lab_links("a", ["cl-a-br", "cl-a-3", "cl-ab-br", "cl-a-x"]) == ["cl-a-3", "cl-a-br"]


# --- state and inventory ----------------------------------------------------------------------


def test_state_round_trip():
    lab = make_lab("lab", "nspawn", 2)
    state = state_of(lab, {"node1": machine(101), "node2": machine(102)})
    doc = state.to_json()
    assert doc["nodes"][0] == {
        "name": "node1",
        "netns": "lab-node1",
        "address": "10.77.0.11/24",
        "machine": "lab-node1",
        "pid": 101,
        "start_time": 1101,
        "leader_pid": 102,
        "machine_id": f"{101:032x}",
    }
    assert LabState.from_json(doc) == state


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"format": 1, "name": "lab"},
        {"format": 99},
        {"format": 1, "name": "BAD", "kind": "netns", "subnet": "10.0.0.0/24", "nodes": []},
    ],
)
def test_state_rejects_garbage(doc):
    with pytest.raises(LabError, match="unreadable lab state"):
        LabState.from_json(doc)


def test_inventory_netns():
    lab = make_lab("lab", "netns", 2)
    inv = inventory(state_of(lab), python="/venv/bin/python", state_dir="/run/cerana-lab/lab")
    node1 = inv["all"]["children"]["lab"]["hosts"]["node1"]
    assert node1 == {
        "ansible_host": "10.77.0.11",
        "ansible_connection": "cerana.platform.netns",
        "ansible_netns": "lab-node1",
        "ansible_python_interpreter": "/venv/bin/python",
    }
    assert inv["all"]["children"]["cerana_lab"] == {"children": {"lab": {}}}
    assert yaml.safe_load(yaml.safe_dump(inv)) == inv


def test_inventory_nspawn_and_ini():
    lab = make_lab("lab", "nspawn", 1)
    inv = inventory(state_of(lab, {"node1": machine(101)}), python="/venv/bin/python", state_dir="/run/cerana-lab/lab")
    assert inv["all"]["children"]["lab"]["hosts"]["node1"] == {
        "ansible_host": "10.77.0.11",
        "ansible_connection": "cerana.platform.nspawn",
        "ansible_nspawn_machine": "lab-node1",
        "ansible_nspawn_state_dir": "/run/cerana-lab/lab",
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_pipelining": True,
    }
    ini = inventory_ini(inv)
    assert "[lab]\nnode1 ansible_host=10.77.0.11 ansible_connection=cerana.platform.nspawn " in ini
    assert "[cerana_lab:children]\nlab\n" in ini


# --- the image's mirror comes from the host's apt configuration --------------------------------

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822():
    sources = rootfs.parse_deb822_sources(DEB822)
    assert [s.uri for s in sources] == ["http://mirror.example/debian", "http://mirror.example/debian-security"]
    assert rootfs.pick_mirror(sources, "bookworm") == "http://mirror.example/debian"


def test_mirror_from_sources_list():
    text = (
        "# comment\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://security.example/debian-security bookworm-security main\n"
        "deb [ signed-by=/k.gpg ] http://one.example/debian bookworm main contrib\n"
    )
    sources = rootfs.parse_sources_list(text)
    assert [(s.uri, s.suites) for s in sources] == [
        ("http://security.example/debian-security", ("bookworm-security",)),
        ("http://one.example/debian", ("bookworm",)),
    ]
    assert rootfs.pick_mirror(sources, "bookworm") == "http://one.example/debian"
    assert rootfs.pick_mirror(sources, "trixie") == "http://one.example/debian"  # any main archive will do
    assert rootfs.pick_mirror([], "bookworm") is None


def test_disabled_stanza_is_ignored():
    disabled = DEB822.replace("Types: deb\n#", "Types: deb\nEnabled: no\n#", 1)
    assert [s.uri for s in rootfs.parse_deb822_sources(disabled)] == ["http://mirror.example/debian-security"]


# --- the CLI reports expected errors in one line ----------------------------------------------


def test_inventory_of_a_missing_lab_is_one_line(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert cli.main(["inventory", "--name", "nolab", "--state-dir", str(tmp_path)]) == 1
    assert caplog.messages == ["lab 'nolab' is not up: `cerana lab up --name nolab` first"]


def test_register_adds_the_lab_group():
    import argparse

    parser = argparse.ArgumentParser(prog="cerana")
    cli.register(parser.add_subparsers(dest="group"))
    args = parser.parse_args(["lab", "up", "--nodes", "2", "--kind", "nspawn"])
    assert (args.nodes, args.kind, args.name, str(args.subnet)) == (2, "nspawn", "cerana", "10.77.0.0/24")
    assert callable(args.func)


def test_missing_tools_name_the_apt_package(monkeypatch):
    from cerana_lab import host

    monkeypatch.setattr(host.shutil, "which", lambda name: None if name != "ip" else "/usr/sbin/ip")
    with pytest.raises(
        LabError, match=r"missing systemd-nspawn, debootstrap: apt-get install debootstrap systemd-container"
    ):
        host.require_tools(["ip", "systemd-nspawn", "debootstrap"])

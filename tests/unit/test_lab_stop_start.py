"""``cerana lab stop NODE`` / ``start NODE``: the pure planning and the CLI's refusals."""

from __future__ import annotations

import logging

import pytest

from cerana_lab import cli
from cerana_lab.plan import (
    HostView,
    KillMachine,
    LabError,
    LabState,
    MachineState,
    StartMachine,
    StopMachine,
    WaitMachine,
    WriteNodeFiles,
    WriteState,
    hosts_file,
    make_lab,
    plan_start,
    plan_stop,
)


def machine(pid: int, alive: bool = True) -> MachineState:
    return MachineState(pid=pid, start_time=1000 + pid, leader=pid + 1, machine_id=f"{pid:032x}", alive=alive)


LAB = make_lab("lab", "nspawn", 3)


def state(machines: dict[str, MachineState], kind: str = "nspawn") -> LabState:
    return LabState("lab", kind, LAB.subnet, tuple(n.name for n in LAB.nodes), machines)


def host(nspawn: dict[str, tuple[int, ...]] | None = None) -> HostView:
    return HostView(
        links=frozenset({LAB.bridge, *(n.veth for n in LAB.nodes)}),
        netns=frozenset(n.netns for n in LAB.nodes),
        nspawn_by_netns=nspawn or {},
    )


RUNNING = {"node1": machine(100), "node2": machine(200), "node3": machine(300)}


def test_stop_shuts_the_machine_down():
    assert plan_stop(state(RUNNING), "node2", host()) == (StopMachine("lab-node2", (200,)),)


def test_stop_kill_kills_pid_1_of_the_machine():
    assert plan_stop(state(RUNNING), "node2", host(), kill=True) == (KillMachine("lab-node2", 201, (200,)),)


def test_stop_also_stops_an_unrecorded_nspawn_of_the_node():
    actions = plan_stop(state(RUNNING), "node2", host({"lab-node2": (200, 250)}))
    assert actions == (StopMachine("lab-node2", (200, 250)),)


def test_stop_of_a_stopped_machine_does_nothing():
    stopped = {**RUNNING, "node2": machine(200, alive=False)}
    assert plan_stop(state(stopped), "node2", host()) == ()
    assert plan_stop(state(stopped), "node2", host(), kill=True) == ()


def test_start_boots_only_that_machine_with_the_hosts_file():
    stopped = {**RUNNING, "node2": machine(200, alive=False)}
    actions = plan_start(state(stopped), "node2", host())
    node2 = LAB.node("node2")
    assert actions == (
        WriteNodeFiles(node2, hosts_file(LAB)),
        StartMachine(node2),
        WaitMachine(node2),
        WriteState(state({"node1": machine(100), "node3": machine(300)})),
    )


def test_start_of_a_running_machine_does_nothing():
    assert plan_start(state(RUNNING), "node1", host()) == ()


def test_start_stops_a_stray_nspawn_first():
    stopped = {**RUNNING, "node2": machine(200, alive=False)}
    actions = plan_start(state(stopped), "node2", host({"lab-node2": (222,)}))
    assert actions[0] == StopMachine("lab-node2", (222,))
    assert isinstance(actions[2], StartMachine)


def test_start_refuses_a_node_without_its_namespace():
    stopped = {**RUNNING, "node2": machine(200, alive=False)}
    broken = HostView(links=host().links, netns=frozenset({"lab-node1", "lab-node3"}))
    with pytest.raises(LabError, match="lost its namespace or link: run `cerana lab up`"):
        plan_start(state(stopped), "node2", broken)


@pytest.mark.parametrize("plan", [plan_start, plan_stop])
def test_refusals(plan):
    with pytest.raises(LabError, match="no such lab"):
        plan(None, "node1", host())
    with pytest.raises(LabError, match="has no node 'node9'"):
        plan(state(RUNNING), "node9", host())
    with pytest.raises(LabError, match="only nspawn machines"):
        plan(state({}, kind="netns"), "node1", host())


def test_cli_stop_of_a_missing_lab_is_one_line(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cli.host, "require_root", lambda: None)
    monkeypatch.setattr(cli.host, "observe", lambda bridge=None: HostView())
    with caplog.at_level(logging.ERROR):
        assert cli.main(["stop", "node1", "--name", "nolab", "--state-dir", str(tmp_path)]) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "no such lab: `cerana lab up` first, then `cerana lab stop NODE`"
    ]

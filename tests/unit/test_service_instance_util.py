"""Pure parts of module_utils/_service_instance.py: finding a bundle's instances on a node, Task."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ansible_collections.cerana.platform.plugins.module_utils import _service_instance as si


def test_services_on_node_from_units_records_and_vm_dirs(tmp_path: Path) -> None:
    units, run, data = tmp_path / "units", tmp_path / "run", tmp_path / "data"
    (run / "bundles" / "shop").mkdir(parents=True)
    (data / "vms").mkdir(parents=True)
    units.mkdir()
    for name in ("cerana-shop_web.service", "cerana-shop_db.service", "cerana-shopping_web.service",
                 "cerana-shop_Bad.service", "cerana-shop_web.service.d", "ssh.service"):  # fmt: skip
        (units / name).touch()
    (run / "bundles" / "shop" / "worker.json").write_text("{}")
    (run / "bundles" / "shop" / "notes.txt").write_text("")
    (data / "vms" / "shop_vm").mkdir()
    (data / "vms" / "shopping_vm").mkdir()
    assert si.services_on_node("shop", str(units), str(run), str(data)) == ["db", "vm", "web", "worker"]
    # nothing there: no error
    assert si.services_on_node("shop", str(tmp_path / "none"), str(tmp_path / "none"), str(tmp_path / "none")) == []


def test_task_replaces_parameters_and_keeps_the_rest() -> None:
    module = SimpleNamespace(params={"bundle": "shop", "service": None, "state": "started"}, check_mode=True)
    task = si.Task(module, service="web", state="absent")
    assert task.params == {"bundle": "shop", "service": "web", "state": "absent"}
    assert task.check_mode is True
    task.params["state"] = "started"
    assert module.params["state"] == "started" and module.params["service"] is None  # the module's own are untouched


def test_failure_names_the_field_the_service_and_the_extra_values() -> None:
    from ansible_collections.cerana.platform.plugins.module_utils import _models as m
    from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError
    from ansible_collections.cerana.platform.plugins.module_utils._systemd import InstanceError

    assert si.failure(m.ValidationError("bundle", "must be a label")) == {
        "msg": "bundle: must be a label", "field": "bundle"}  # fmt: skip
    assert si.failure(InstanceError("port 80 in use", ports=[80])) == {"msg": "port 80 in use", "ports": [80]}
    assert si.failure(StoreError("Consul unreachable")) == {"msg": "Consul unreachable"}
    wrapped = si.ServiceFailed("web", InstanceError("did not stay up", journal=["x"]))
    assert si.failure(wrapped) == {"msg": "service web: did not stay up", "service": "web", "journal": ["x"]}
    assert all(isinstance(e, si.EXPECTED) for e in (wrapped, StoreError("x"), m.ValidationError("a", "b")))


def test_show_many_reads_one_block_per_unit_in_order() -> None:
    from ansible_collections.cerana.platform.plugins.module_utils._systemd import Systemd

    calls = []
    out = (
        "MainPID=41\nNRestarts=2\nActiveState=active\nSubState=running\nUnitFileState=enabled\nLoadState=loaded\n\n"
        "MainPID=0\nNRestarts=0\nActiveState=failed\nSubState=failed\nUnitFileState=disabled\nLoadState=loaded\n\n"
        "MainPID=0\nNRestarts=0\nActiveState=inactive\nSubState=dead\nUnitFileState=\nLoadState=not-found\n"
    )

    def run_command(argv):
        calls.append(argv)
        return 0, out, ""

    module = SimpleNamespace(get_bin_path=lambda name, required=False: "/bin/" + name, run_command=run_command)
    states = Systemd(module).show_many(["a.service", "b.service", "c.service"])
    assert len(calls) == 1 and calls[0][-3:] == ["a.service", "b.service", "c.service"]
    assert states["a.service"] == {"active": True, "active_state": "active", "main_pid": 41, "restarts": 2,
                                   "enabled": True, "load_state": "loaded"}  # fmt: skip
    assert states["b.service"]["active_state"] == "failed" and not states["b.service"]["active"]
    assert states["c.service"] == {"active": False, "active_state": "inactive", "main_pid": None, "restarts": 0,
                                   "enabled": False, "load_state": "not-found"}  # fmt: skip


def test_a_bundles_instances_are_removed_with_one_stop_for_all(tmp_path: Path) -> None:
    """dispatch_many, all absent: one ``systemctl stop`` for every running unit (systemd stops
    them in parallel, so stop timeouts do not add up), one ``disable``, one reload."""
    units, run, data = tmp_path / "units", tmp_path / "run", tmp_path / "data"
    units.mkdir()
    for service in ("backend", "front"):
        (units / f"cerana-shop_{service}.service").write_text("[Service]\n")
    calls = []
    active = "MainPID=7\nNRestarts=0\nActiveState=active\nSubState=running\nUnitFileState=enabled\nLoadState=loaded\n"

    def run_command(argv):
        calls.append(argv[1:])
        return 0, ("\n\n".join([active, active]) if argv[1] == "show" else ""), ""

    module = SimpleNamespace(
        params={"bundle": "shop", "service": None, "state": "started", "unit_dir": str(units), "run_dir": str(run),
                "data_dir": str(data)},
        check_mode=False, _diff=False, run_command=run_command, get_bin_path=lambda name, required=False: name,
    )  # fmt: skip
    tasks = [si.Task(module, service=s, state="absent") for s in ("backend", "front")]
    results = si.dispatch_many(tasks)
    assert [(r["unit"], r["changed"], r["kind"]) for r in results] == [
        ("cerana-shop_backend.service", True, None), ("cerana-shop_front.service", True, None)]  # fmt: skip
    assert list(units.iterdir()) == []
    both = ["cerana-shop_backend.service", "cerana-shop_front.service"]
    assert [c for c in calls if c[0] != "show"] == [
        ["stop", *both], ["disable", "--no-reload", *both], ["daemon-reload"], ["reset-failed", *both]]  # fmt: skip


def test_units_systemd_did_not_find_without_a_reload_are_started_after_one() -> None:
    from ansible_collections.cerana.platform.plugins.module_utils._systemd import Systemd

    def fake(start_rc, load_states):
        calls = []

        def run_command(argv):
            calls.append(argv[1:])
            if argv[1] == "show":
                blocks = [f"ActiveState=inactive\nLoadState={state}\n" for state in load_states]
                return 0, "\n\n".join(blocks), ""
            return (start_rc if argv[1] == "start" and len(calls) == 1 else 0), "", ""

        return calls, Systemd(SimpleNamespace(get_bin_path=lambda name, required=False: name, run_command=run_command))

    calls, sd = fake(1, ["loaded", "not-found"])  # an old systemd: b.service not found without a reload
    si.start_units(sd, ["a.service", "b.service"], unreloaded=True)
    assert [c[0] for c in calls] == ["start", "show", "daemon-reload", "start"] and calls[-1] == ["start", "b.service"]
    calls, sd = fake(1, ["loaded", "loaded"])  # a start that failed for another reason: no second try
    si.start_units(sd, ["a.service", "b.service"], unreloaded=True)
    assert [c[0] for c in calls] == ["start", "show"]
    calls, sd = fake(1, ["not-found"])  # systemd was reloaded before: nothing more to try
    si.start_units(sd, ["a.service"], unreloaded=False)
    assert [c[0] for c in calls] == ["start"]
    calls, sd = fake(0, [])  # the usual case: one call
    si.start_units(sd, ["a.service"], unreloaded=True)
    assert calls == [["start", "a.service"]]

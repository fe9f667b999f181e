"""The pure parts of benchmarks/cluster_tick.py (the benchmark itself runs a lab and is not run here)."""

from __future__ import annotations

import datetime
import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "cluster_tick.py"
spec = importlib.util.spec_from_file_location("bench_cluster_tick", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

T0 = datetime.datetime(2026, 11, 30, 3, 4, 5, 123456, tzinfo=datetime.UTC).timestamp()


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(20, 0, -1)]  # 20..1, unsorted on purpose
    assert bench.percentile(values, 95) == 19
    assert bench.percentile(values, 50) == 10
    assert bench.percentile(values, 100) == 20
    assert bench.percentile(values, 0) == 1
    assert bench.percentile([3.0, 1.0, 2.0], 95) == 3
    with pytest.raises(ValueError):
        bench.percentile([], 50)
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


def test_epoch_reads_event_times_run_ids_and_runner_times():
    assert bench.epoch("2026-11-30T03:04:05.123456Z") == pytest.approx(T0)
    assert bench.epoch("20261130T030405.123456Z") == pytest.approx(T0)
    assert bench.epoch("2026-11-30T03:04:05.123456") == pytest.approx(T0)  # ansible-runner: UTC, no offset
    assert bench.epoch("2026-11-30T03:04:05.123456+00:00") == pytest.approx(T0)


def event(run: str, duration: float, time: str, plan_nodes: dict, ok=(), failed=(), kind="run") -> dict:
    return {"kind": kind, "run": run, "duration": duration, "time": time,
            "plan": {"nodes": plan_nodes}, "nodes": {"ok": list(ok), "failed": list(failed)}}  # fmt: skip


def test_bundle_runs_picks_the_runs_that_started_the_bundle_since_a_time():
    events = [
        event("20261130T030406.000000Z", 2.0, "2026-11-30T03:04:08.1Z", {"a": {"start_bundles": ["b2"]}}, ok=["a"]),
        event("20261130T030400.000000Z", 2.0, "2026-11-30T03:04:02.1Z", {"a": {"start_bundles": ["b1"]}}, ok=["a"]),
        event(
            "20261130T030410.000000Z",
            3.0,
            "2026-11-30T03:04:13.1Z",
            {"a": {"start_bundles": ["b1"]}, "c": {"stop_bundles": ["b1"]}},
            ok=["a"],
            failed=["c"],
        ),
        event("20261130T030411.000000Z", 1.0, "2026-11-30T03:04:12.1Z", {"c": {"update_bundles": ["b1"]}}, ok=["c"]),
        {"kind": "problems", "time": "2026-11-30T03:04:12.5Z", "status": "problems", "problems": []},
    ]
    found = bench.bundle_runs(events, "b1", T0)
    assert [e["run"] for e in found] == ["20261130T030410.000000Z"]
    assert bench.run_nodes(found[0]) == {"a", "c"}
    assert bench.useful_runs(found, {"c"}) == []  # failed there
    assert bench.useful_runs(found, {"a", "x"}) == found
    later = [*found, event("20261130T030420.000000Z", 0.0, "2026-11-30T03:04:20.1Z", {"x": {}}, failed=["x"])]
    assert bench.useful_runs(later, {"a"}) == found
    updates = bench.bundle_runs(events, "b1", T0, ("update_bundles",))
    assert [e["run"] for e in updates] == ["20261130T030411.000000Z"]
    assert [e["run"] for e in bench.runs_since(events, T0)] == [
        "20261130T030406.000000Z", "20261130T030410.000000Z", "20261130T030411.000000Z"]  # fmt: skip


def test_task_spans_and_breakdown_add_up_to_the_total():
    job_events = [
        {"event": "runner_on_ok", "created": "2026-11-30T03:04:08.000000",
         "event_data": {"task": "Give the bundles their network on the node", "host": "a",
                        "start": "2026-11-30T03:04:07.000000", "end": "2026-11-30T03:04:07.500000"}},
        {"event": "runner_item_on_ok", "created": "2026-11-30T03:04:10.000000",
         "event_data": {"task": "Run the bundles' services", "host": "a", "duration": 1.2}},
        {"event": "runner_on_ok", "created": "2026-11-30T03:04:10.500000",
         "event_data": {"task": "Run the bundles' services", "host": "b",
                        "start": "2026-11-30T03:04:07.600000", "end": "2026-11-30T03:04:10.500000"}},
        {"event": "playbook_on_stats", "created": "2026-11-30T03:04:11.000000", "event_data": {}},
    ]  # fmt: skip
    spans = bench.task_spans(job_events)
    net = spans["Give the bundles their network on the node"]
    svc = spans["Run the bundles' services"]
    assert net == (pytest.approx(T0 + 1.876544), pytest.approx(T0 + 2.376544))
    assert svc == (pytest.approx(T0 + 2.476544), pytest.approx(T0 + 5.376544))  # min start, max end over hosts

    declared = bench.epoch("2026-11-30T03:04:05.500000Z")
    run = event("20261130T030406.000000Z", 5.5, "2026-11-30T03:04:11.800000Z", {"a": {"start_bundles": ["x"]}})
    healthy_hb = bench.epoch("2026-11-30T03:04:13.000000Z")
    seen = healthy_hb + 0.02
    parts = bench.breakdown(declared, [run], spans, healthy_hb, seen)
    assert parts["detect"] == pytest.approx(0.5)
    assert parts["startup"] == pytest.approx(1.0)
    assert parts["bundle_network"] == pytest.approx(0.5)
    assert parts["service_instance"] == pytest.approx(2.9)
    assert parts["between tasks"] == pytest.approx(0.1)
    assert parts["healthy"] == pytest.approx(2.5)  # last task end -> healthy heartbeat
    assert parts["seen"] == pytest.approx(0.02)
    assert parts["tail"] == pytest.approx(1.0)  # off the path: last task end -> run end
    assert parts["record"] == pytest.approx(0.3)  # run end -> event
    on_path = [v for k, v in parts.items() if k not in ("total", *bench.OFF_PATH)]
    assert sum(on_path) == pytest.approx(parts["total"]) == pytest.approx(7.52)

    # a heartbeat healthy before the run ended (the module's settle, the run's tail): negative healthy
    early = bench.breakdown(declared, [run], spans, bench.epoch("2026-11-30T03:04:10.000000Z"), seen)
    assert early["healthy"] == pytest.approx(-0.5)

    retried = event("20261130T030405.800000Z", 0.0, "2026-11-30T03:04:05.900000Z", {"a": {"start_bundles": ["x"]}})
    again = bench.breakdown(declared, [retried, run], spans, healthy_hb, seen)
    assert again["detect"] == pytest.approx(0.3) and again["more runs"] == pytest.approx(0.2)
    assert sum(v for k, v in again.items() if k not in ("total", *bench.OFF_PATH)) == pytest.approx(7.52)

    without_tasks = bench.breakdown(declared, [run], {}, healthy_hb, seen)
    assert without_tasks["ansible"] == pytest.approx(5.5)
    assert without_tasks["healthy"] == pytest.approx(1.5)
    on_path = [v for k, v in without_tasks.items() if k not in ("total", *bench.OFF_PATH)]
    assert sum(on_path) == pytest.approx(without_tasks["total"])


def test_fmt_parts_gives_medians_in_path_order():
    runs = [{"total": 9, "record": 0.1, "detect": 1.0, "healthy": 2.0},
            {"total": 9, "detect": 3.0, "dataset copy": 5.0, "healthy": 4.0, "record": 0.3},
            {"total": 9, "detect": 2.0, "healthy": 3.0, "record": 0.2}]  # fmt: skip
    assert bench.fmt_parts(runs) == "detect 2.00, dataset copy 5.00 (1/3), healthy 3.00, off path: record 0.20"
    assert bench.fmt_parts([{"total": 1, "tail": 0.5}]) == "off path: tail 0.50"


def test_bursts_split_on_idle_gaps():
    # a pass of 3 ms spread over two samples, 150 ms of sleep, a pass of 2 ms, then a pass
    # whose HTTP wait of 30 ms (no CPU) is shorter than the gap: still one burst
    samples = [(0.00, 100), (0.01, 1100), (0.02, 3100), (0.03, 3100), (0.18, 3100), (0.19, 5100),
               (0.20, 5100), (0.40, 5100), (0.41, 6100), (0.44, 6100), (0.45, 7100), (0.60, 7100)]  # fmt: skip
    assert bench.bursts(samples, 0.06) == [3000, 2000, 2000]
    assert bench.bursts(samples, 0.02) == [3000, 2000, 1000, 1000]
    assert bench.bursts([(0.0, 5), (1.0, 5)], 0.06) == []


def test_heartbeat_healthy_needs_every_service_running_and_passing():
    ok = {"services": {"backend": {"state": "running", "health": {"tcp": None}},
                       "front": {"state": "running", "health": {"http": None}}}}  # fmt: skip
    assert bench.heartbeat_healthy(ok)
    assert not bench.heartbeat_healthy({"services": {}})  # nothing reported yet
    no_checks = {"services": {s: {"state": "running", "health": {}} for s in ("backend", "front")}}
    assert not bench.heartbeat_healthy(no_checks)  # checks not run (the bundle is not declared)
    assert not bench.heartbeat_healthy({"services": {"backend": ok["services"]["backend"]}})
    failing = {"services": dict(ok["services"], front={"state": "running", "health": {"http": "not checked yet"}})}
    assert not bench.heartbeat_healthy(failing)
    stopped = {"services": dict(ok["services"], backend={"state": "stopped", "health": {}})}
    assert not bench.heartbeat_healthy(stopped)


def test_bundle_declaration_is_valid():
    from ansible_collections.cerana.platform.plugins.module_utils import _models as m

    bundle = m.Bundle.from_dict(bench.bundle_decl("bench-d01", "hi", 30101))
    assert bundle.redundancy == 2 and set(bundle.services) == {"backend", "front"}
    for decl in bench.SERVICE_DECLS.values():
        m.Service.from_dict(decl)


def test_record_row_creates_the_section_once_and_appends(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Other\n\n| a |\n|---|\n| 1 |\n")
    monkeypatch.setattr(bench, "DOC", doc)
    bench.record_row("| row 1 |")
    bench.record_row("| row 2 |")
    text = doc.read_text()
    assert text.count(bench.SECTION) == 1
    lines = text.splitlines()
    assert lines.index("| row 1 |") + 1 == lines.index("| row 2 |")
    assert lines.index("| 1 |") < lines.index(bench.SECTION) < lines.index("| row 1 |")
    # rows go to the end of this section's table, before any text that follows it
    doc.write_text(text + "\nNotes about the figures.\n\n## Later\n")
    bench.record_row("| row 3 |")
    lines = doc.read_text().splitlines()
    assert lines.index("| row 2 |") + 1 == lines.index("| row 3 |") < lines.index("Notes about the figures.")


def test_report_prints_every_figure_and_builds_one_table_row(capsys):
    import argparse

    parts = {"total": 4.0, "detect": 0.2, "startup": 1.0, "service_instance": 2.5, "healthy": 0.28, "seen": 0.02,
             "tail": 0.5, "record": 0.01}  # fmt: skip
    runs = [{"parts": dict(parts, total=t), "dataset_copies": c, "removed": 5.0} for t, c in ((4.0, 0), (6.0, 1))]
    result = {
        "first": {"parts": dict(parts, total=30.0)},
        "d2h": runs,
        "loss": {"parts": dict(parts, total=11.0, expiry=5.9), "excess_removed": 20.0},
        "change": {"runs": 2, "hosts": [["node1"], ["node3"]], "holders": ["node1", "node3"], "outside": [],
                   "rolled": 30.0},
        "idle": {"window": 30.0, "passes": 60, "wakes": 62, "process_ms_per_pass": 4.5, "runs_in_window": 0,
                 "main_ms_per_pass": {"median": 3.0}, "inprocess_ms": {"median": 3.5, "p95": 4.0}},
        "host": {"reference_s": 0.55, "reference_after_s": 0.71, "steal_pct": 1.25},
    }  # fmt: skip
    args = argparse.Namespace(node_ttl=3)
    row = bench.report(args, result, [1.0, 2.0], 1.0, 0.0)
    out = capsys.readouterr().out
    assert "median 5.00 s, p95 6.00 s over 2 runs" in out and "NOT met" in out
    assert "4.00 (1) / 6.00 (1)" in out
    header_columns = bench.HEADER.splitlines()[0].count("|")
    assert row.startswith("| ") and row.count("|") == header_columns
    assert "| 2 (node1; node3); 0 | 0.55-0.71; 1.2 |" in row
    assert "0.550 s before the lab, 0.710 s after it" in out and "steal during the run 1.2 %" in out


def test_steal_is_a_share_of_all_cpu_time_between_two_readings():
    assert bench.steal_percent((100, 10_000), (150, 12_000)) == 2.5
    assert bench.steal_percent((0, 5), (0, 5)) == 0.0  # no time passed
    steal, total = bench.cpu_times()  # this machine's /proc/stat
    assert 0 <= steal <= total and total > 0

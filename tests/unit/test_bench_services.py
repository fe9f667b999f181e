"""The pure parts of benchmarks/service_instances.py (the benchmark itself runs a lab and is not run here)."""

from __future__ import annotations

import http.server
import importlib.util
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "service_instances.py"
spec = importlib.util.spec_from_file_location("bench_service_instances", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert bench.percentile(values, 95) == 19
    assert bench.percentile(values, 50) == 10
    assert bench.percentile(values, 100) == 20
    assert bench.percentile(values, 0) == 1
    assert bench.percentile([3.0, 1.0, 2.0], 95) == 3  # fewer than 20 values: the largest
    with pytest.raises(ValueError):
        bench.percentile([], 50)
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


def test_summary():
    s = bench.summary([4.0, 1.0, 3.0, 2.0])
    assert s == {"median": 2.5, "p95": 4.0, "min": 1.0, "max": 4.0, "n": 4}
    assert bench.fmt(s) == "2.50 / 4.00"
    assert bench.fmt(None) == "-"


def test_parse_args_defaults_and_errors():
    args = bench.parse_args([])
    assert (args.repeat, args.playbook_repeat, args.duration, args.concurrency, args.settle, args.record) == (
        5, 2, 10.0, 8, None, False)  # fmt: skip
    assert bench.parse_args(["--repeat", "3", "--settle", "0.5", "--record"]).settle == 0.5
    for bad in (["--repeat", "0"], ["--concurrency", "0"], ["--duration", "0"], ["--playbook-repeat", "-1"],
                ["--settle", "-1"], ["--skip-latency", "--skip-throughput"]):  # fmt: skip
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


HB = {"bundle": "shop", "node": "n1", "time": "2026-11-30T03:04:05.500000Z", "address": "10.240.0.5",
      "services": {"backend": {"state": "running", "health": {"tcp": None}},
                   "front": {"state": "running", "health": {"http": "not checked yet"}}}}  # fmt: skip


def test_service_healthy_and_first_healthy():
    assert bench.service_healthy(HB, "backend")
    assert not bench.service_healthy(HB, "front")
    assert not bench.service_healthy(HB, "other")
    assert not bench.service_healthy(None, "backend")
    stopped = json.loads(json.dumps(HB))
    stopped["services"]["backend"]["state"] = "stopped"
    assert not bench.service_healthy(stopped, "backend")
    t = bench.heartbeat_time(HB)
    assert t == pytest.approx(1796007845.5)
    later = json.loads(json.dumps(HB))
    later["time"] = "2026-11-30T03:04:06.500000Z"
    later["services"]["front"]["health"]["http"] = None
    seen = [(0.0, None), (1.0, HB), (2.0, later)]
    assert bench.first_healthy(seen, "backend", t) == t
    assert bench.first_healthy(seen, "backend", t + 0.1) == t + 1  # written before ``since``: not counted
    assert bench.first_healthy(seen, "front", 0) == t + 1
    assert bench.first_healthy(seen[:2], "front", 0) is None


def test_cpu_stat_delta():
    before = bench.parse_cpu_stat("usage_usec 1000000\nuser_usec 5\nnr_throttled 2\nthrottled_usec 100000\n")
    after = bench.parse_cpu_stat("usage_usec 3500000\nnr_throttled 7\nthrottled_usec 600000\nbogus line here\n")
    assert bench.cpu_delta(before, after) == {"cpu_s": 2.5, "throttled_s": 0.5, "throttled_periods": 5}
    # a cgroup without the cpu controller (this machine's nspawn nodes): usage only
    no_quota = bench.cpu_delta({"usage_usec": 0}, {"usage_usec": 250000})
    assert no_quota == {"cpu_s": 0.25, "throttled_s": None, "throttled_periods": None}
    assert bench.cpu_delta({}, {}) == {"cpu_s": None, "throttled_s": None, "throttled_periods": None}


def test_cpu_figure():
    rounds = [{"direct": {"front_cpu": c, "front_throttled": t, "backend_cpu": None, "backend_throttled": None}}
              for c, t in ((0.4, 0.1), (0.5, 0.2), (0.45, 0.0))]  # fmt: skip
    assert bench.cpu_figure(rounds, "front") == "0.45 (0.10)"
    assert bench.cpu_figure(rounds, "backend") == "-"
    for r in rounds:
        r["direct"]["front_throttled"] = None
    assert bench.cpu_figure(rounds, "front") == "0.45 (no quota)"


def test_insert_rows_creates_and_appends():
    doc = "# Benchmarks\n\n## Other\n\n| a |\n|---|\n| 1 |\n"
    header = "| x | y |\n|---|---|"
    text = bench.insert_rows(doc, "## Services", "Intro.", "### Latency", header, ["| 1 | 2 |"])
    assert text.endswith("## Services\n\nIntro.\n\n### Latency\n\n| x | y |\n|---|---|\n| 1 | 2 |\n")
    assert text.startswith(doc.rstrip("\n"))
    text = bench.insert_rows(text, "## Services", "Intro.", "### Throughput", header, ["| 3 | 4 |"])
    text = bench.insert_rows(text, "## Services", "Intro.", "### Latency", header, ["| 5 | 6 |"])
    assert text.count("## Services") == 1 and text.count("Intro.") == 1
    lat = text.index("### Latency")
    thr = text.index("### Throughput")
    assert lat < text.index("| 1 | 2 |") < text.index("| 5 | 6 |") < thr < text.index("| 3 | 4 |")
    # notes after a table stay after it; a later section stays last
    text = text.replace("| 5 | 6 |\n", "| 5 | 6 |\n\nNotes.\n") + "\n## Later\n\ntext\n"
    text = bench.insert_rows(text, "## Services", "Intro.", "### Latency", header, ["| 7 | 8 |"])
    assert text.index("| 5 | 6 |\n| 7 | 8 |\n\nNotes.") < text.index("### Throughput") < text.index("## Later")
    text = bench.insert_rows(text, "## Services", "Intro.", "### Throughput", header, ["| 9 | 0 |"])
    assert text.index("| 3 | 4 |\n| 9 | 0 |") < text.index("## Later")


def _fig(rps, errors=0):
    return {"ok": int(rps * 10), "errors": errors, "error_kinds": {"503": errors} if errors else {}, "rps": rps,
            "lat_median": 0.01, "lat_p95": 0.02}  # fmt: skip


def _run(kinds, rps, unhealthy=0):
    out = {"kinds": {k: _fig(r) for k, r in zip(kinds, rps, strict=True)}, "threads": 8 if len(kinds) == 1 else 4,
           "client_cpu_s": 1.0, "unhealthy_heartbeats": unhealthy, "unhealthy_reasons": []}  # fmt: skip
    return out | {"front_cpu": 0.3, "front_throttled": None, "backend_cpu": 0.2, "backend_throttled": None}


def test_throughput_rows():
    args = bench.parse_args(["--repeat", "2"])
    info = {"date": "D", "nproc": "2", "free": "23Gi", "cpu": "AMD EPYC", "load": "9"}
    tp = {}
    for service in bench.SERVICES:
        tp[service] = []
        for scale in (1.0, 2.0):
            rnd = {k: _run((k,), [100 * scale * (i + 1)], unhealthy=1) for i, k in enumerate(bench.TARGETS)}
            for pair in bench.PAIRS:
                rnd[bench.run_name(pair)] = _run(pair, [50 * scale] * len(pair))
            tp[service].append(rnd)
    solo, paired = bench.throughput_rows(info, "5", args, tp)
    assert len(solo) == len(paired) == 2
    cells = [c.strip() for c in solo[0].strip("|").split("|")]
    assert len(cells) == bench.THROUGHPUT_HEADER.split("\n")[0].count("|") - 1
    # medians of 100/200, 200/400, ...; ratios per round then median: 2, 3, 5/4
    assert cells[5] == "backend, 8 threads x 10 s, median of 2"
    assert cells[6:11] == ["150", "300", "450", "600", "750"]
    assert cells[11:14] == ["2.00", "3.00", "1.25"]
    assert cells[14] == "backend 0.20 (no quota), front 0.30 (no quota)"
    assert cells[15] == "0 / 10"
    pcells = [c.strip() for c in paired[1].strip("|").split("|")]
    assert len(pcells) == bench.PAIRED_HEADER.split("\n")[0].count("|") - 1
    assert pcells[5] == "front, 4/4 threads per target x 10 s, median of 2"
    assert pcells[6:11] == ["75"] * 5 and pcells[11:14] == ["1.00"] * 3 and pcells[14] == "0 / 0"
    assert "direct 100.0 req/s" in bench.describe_run(1, "front", ("direct",), tp["front"][0]["direct"])


def test_loadgen_counts_answers_on_loopback():
    """The client shipped to the node, run by a separate interpreter against a loopback server."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            code = 200 if self.path == "/" else 503
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    def run(targets, path, duration=0.5, workers=2, warmup=0.1):
        code = bench.node_script(bench.loadgen, f"loadgen({targets!r}, {path!r}, {duration}, {workers}, {warmup})")
        return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True, timeout=30).stdout)  # fmt: skip

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        with socket.socket() as s:  # a port nobody listens on: refused connections are errors
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        out = run([["127.0.0.1", port], ["127.0.0.1", closed]], "/")
        good, refused = out["targets"]
        assert good["ok"] > 0 and good["errors"] == 0 and good["rps"] == good["ok"] / 0.5
        assert 0 < good["lat_median"] <= good["lat_p95"]
        assert refused["ok"] == 0 and refused["error_kinds"]["ConnectionRefusedError"] == refused["errors"] > 0
        bad = run([["127.0.0.1", port]], "/bad")["targets"][0]
        assert bad["ok"] == 0 and bad["errors"] == bad["error_kinds"]["503"] > 0 and bad["lat_median"] is None
        assert len(hits) > 2 and out["client_cpu_s"] >= 0
    finally:
        server.shutdown()
        server.server_close()

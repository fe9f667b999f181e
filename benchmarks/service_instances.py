"""Benchmark: service instance start latency, and requests/s through a published port against direct requests.

Run on demand as root (not a test):  .venv/bin/python benchmarks/service_instances.py [--repeat 5] [--record]

Sets up its own 3-node nspawn lab with ``playbooks/site.yml`` (``tests/platform_lab.py``:
Consul, node tick with a 1 s interval, data server; the cluster tick is not deployed, so
nothing but this script starts or stops instances), imports the sample dataset
(``cerana_lab/sample.py``: Python, ``/app/backend.py``, ``/app/front.py``) on node1 and
declares the sample bundle ``shop`` (the services of ``tests/sample_app.py``: backend with
a tcp check on 8081, front with an http check on 8080 ``/health`` that forwards ``/`` to the
backend; cpu 0.5, 128 MiB, 64 tasks each) with one change: the backend's port 8081 is
published too (external 30081, beside the front's 30080), so that the network path can be
measured without the front's second hop. ``bundle_network`` runs on all three nodes (node3
needs it to reach instance addresses directly); the instances run on node1 only.

**Start latency** (``--repeat`` rounds; each round: ``absent`` for front and backend, wait for
the bundle heartbeat to go, then ``started`` for backend, then front). The module runs on
node1 with the node venv's Python as Ansible would run it there, but without Ansible:
``python -m ansible_collections.cerana.platform.plugins.modules.service_instance '<args JSON>'``
(interpreter start, imports, Consul reads, unit, ``systemctl start``, and the module's
``settle`` wait: it returns only after the unit kept its main pid for ``settle`` s, 1 s by
default). A small runner on node1 takes the wall-clock time t0 right before it starts that
process; nspawn machines share the host kernel's clock, so every time below is on one clock:

* ``module startup``: a process of the same interpreter that only imports the module, timed
  just before (interpreter start and imports: the part of ``module`` that is not its work);
* ``module``: t0 to the module's exit;
* ``answers``: t0 to the first answer of the instance itself (probed every 20 ms from node1:
  a TCP connect to the backend, ``GET /health`` on the front, at the instance's address);
* ``healthy``: t0 to the ``time`` of the first bundle heartbeat (written by node1's node tick)
  that shows the service ``running`` with every check passing, watched with Consul blocking
  queries; this is "module call to first successful health check";
* ``published``: t0 to the first answer through node2's published port (from node1 to node2's
  address; node2 DNATs over the overlay to node1's instance): the instance in the rotation on
  another node, whose tick must first read node1's heartbeat. Only the backend's figure
  means that: the rotation is per bundle instance, and an instance counts as healthy when the
  services it has records for are (``BundleHeartbeat.healthy``): once the backend is healthy
  the front's port is in the rotation too, before the front runs; the instance leaves the
  rotation when the front's record appears ("not checked yet") and comes back with the
  front's first passing check, so the front's figure mixes both.

``--playbook-repeat`` more rounds start the front through ``ansible-playbook`` (one play, one
task, nspawn connection) and give its wall time and the time from its start to the healthy
heartbeat, for comparison with the direct module call.

**Throughput** (``--repeat`` rounds, targets interleaved and rotated each round): one client
(``loadgen`` below, run by the node's ``/usr/bin/python3``): ``--concurrency`` threads, each
opening a new TCP connection per request (HTTP/1.0 ``GET /``, no keep-alive), for
``--duration`` s after ``--warmup`` s; requests/s = ``200`` answers completed in the window.
Per service (front: a request is two HTTP exchanges, front then backend; backend: one), five
targets, same client code, same duration:

* from node3 (which has the bundle network, without instances, so it is on the service network):
  ``direct``: the instance's address (node3's bridge, vxlan to node1, the instance's veth);
  ``published``: node1's address and the external port (DNAT and masquerade on node1 to its
  own instance, no overlay); ``published-remote``: node2's address and the external port
  (DNAT and masquerade on node2, then the overlay to node1: "an instance on another node");
* from node1 itself: ``local-direct``: the instance's address (the bridge only);
  ``local-published``: node1's own address and the external port (output-hook DNAT and
  masquerade, then the bridge). This pair differs by the published-port rules alone.

Each target is measured alone (all threads on it: the rate it sustains), and then in **paired
runs**: the targets of one client node at the same time, ceil(concurrency / targets) threads
each (node3: direct, published, published-remote; node1: local-direct, local-published). On
a machine whose load moves by 2x within a minute, only the paired runs compare the paths
under the same conditions; their ratios are the ones to read.

The CPU time the instance's units used during each run, and how long the kernel throttled
them (their ``CPUQuota=``), come from their cgroups' ``cpu.stat``: they show whether the
instance (its quota or the shared CPUs) or the path limits the rate. In this machine's nspawn
nodes (cgroups v1 + v2 hybrid host) the units' groups have no cpu controller: usage only,
shown with "no quota", and the quota is not enforced. A watch on node1's bundle heartbeat
during each run counts the heartbeats with a failing check (the instance out of the rotation). ``--record`` appends
the figures to docs/benchmarks.md ("Services"). The lab is removed at the end, on failure too.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import inspect
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
BUNDLE = "shop"
NODE_PY = "/opt/cerana/venv/bin/python"
SERVICES = ("backend", "front")
PORTS = {"front": (8080, 30080), "backend": (8081, 30081)}  # service: (port, external port)
SECTION = "## Services"
LATENCY_HEADING = "### Start latency"
THROUGHPUT_HEADING = "### Requests through a published port"
PAIRED_HEADING = "### Published port against direct, paired runs"
# target: (client node, what the client asks) -- see the docstring
TARGETS = {
    "direct": ("node3", "the instance's address (overlay)"),
    "published": ("node3", "node1's address, external port"),
    "published-remote": ("node3", "node2's address, external port (overlay)"),
    "local-direct": ("node1", "the instance's address (bridge)"),
    "local-published": ("node1", "node1's address, external port (output DNAT)"),
}
RATIOS = (("published", "direct"), ("published-remote", "direct"), ("local-published", "local-direct"))
PAIRS = (("direct", "published", "published-remote"), ("local-direct", "local-published"))  # paired runs


# -- pure parts (tests/unit/test_bench_services.py) ----------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="start-latency rounds and throughput rounds (default 5)")
    parser.add_argument("--playbook-repeat", type=int, default=2,
                        help="rounds starting the front through ansible-playbook (default 2; 0: none)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=10.0, help="seconds each throughput run counts (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before counting starts (default 1)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--settle", type=float, default=None,
                        help="the module's settle option (default: the module's own, 1 s)")  # fmt: skip
    parser.add_argument("--skip-latency", action="store_true", help="measure throughput only")
    parser.add_argument("--skip-throughput", action="store_true", help="measure start latency only")
    parser.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md (Services)")
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args(argv)
    for name in ("repeat", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.playbook_repeat < 0:
        parser.error("--playbook-repeat must not be negative")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    if args.settle is not None and args.settle < 0:
        parser.error("--settle must not be negative")
    if args.skip_latency and args.skip_throughput:
        parser.error("nothing to measure: --skip-latency and --skip-throughput")
    return args


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): the smallest value with at least q % of the values at or below it."""
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    """median, p95 (nearest rank: with fewer than 20 values, the largest), min, max, n."""
    return {"median": statistics.median(values), "p95": percentile(values, 95), "min": min(values),
            "max": max(values), "n": len(values)}  # fmt: skip


def service_healthy(heartbeat: dict[str, Any] | None, service: str) -> bool:
    """Whether a bundle heartbeat (decoded JSON) shows ``service`` running with every check passing (null)."""
    status = ((heartbeat or {}).get("services") or {}).get(service)
    return bool(status) and status.get("state") == "running" and not any((status.get("health") or {}).values())


def heartbeat_time(heartbeat: dict[str, Any]) -> float:
    """The heartbeat's ``time`` (RFC 3339, UTC) as seconds since the epoch."""
    return datetime.datetime.fromisoformat(heartbeat["time"].replace("Z", "+00:00")).timestamp()


def first_healthy(seen: list[tuple[float, dict[str, Any] | None]], service: str, since: float) -> float | None:
    """The ``time`` of the first heartbeat in ``seen`` ([(observed, heartbeat)]) written at or after
    ``since`` that shows ``service`` healthy; None if there is none."""
    for _observed, hb in seen:
        if hb is not None and service_healthy(hb, service) and heartbeat_time(hb) >= since:
            return heartbeat_time(hb)
    return None


def cpu_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, float | None]:
    """CPU seconds used and throttled between two ``cpu.stat`` readings (microsecond counters);
    None for what a reading lacks (no ``throttled_usec`` without the cpu controller)."""

    def diff(key: str, scale: float) -> float | None:
        if key not in before or key not in after:
            return None
        return (after[key] - before[key]) / scale

    return {"cpu_s": diff("usage_usec", 1e6), "throttled_s": diff("throttled_usec", 1e6),
            "throttled_periods": diff("nr_throttled", 1)}  # fmt: skip


def parse_cpu_stat(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def insert_rows(text: str, section: str, intro: str, heading: str, header: str, rows: list[str]) -> str:
    """``text`` (a Markdown document) with ``rows`` appended to the table under ``heading`` of
    ``section``; the section (with ``intro``), the heading and the table ``header`` are added
    when missing. The table is the first one after the heading."""
    if section not in text.splitlines():
        text = text.rstrip("\n") + f"\n\n{section}\n\n{intro}\n"
    lines = text.rstrip("\n").split("\n")
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    at = next((i for i in range(start + 1, end) if lines[i] == heading), None)
    if at is None:
        block = ["", heading, "", *header.split("\n")]
        lines[end:end] = block
        at = end + 1
        end += len(block)
    stop = next((j for j in range(at + 1, end) if lines[j].startswith("#")), end)  # the next heading
    i = at + 1
    while i < stop and not lines[i].startswith("|"):
        i += 1
    if i == stop:  # heading without a table: put one right after it
        lines[at + 1 : at + 1] = ["", *header.split("\n")]
        i = at + 2
    while i < len(lines) and lines[i].startswith("|"):
        i += 1
    lines[i:i] = rows
    return "\n".join(lines) + "\n"


def fmt(stats: dict[str, float] | None) -> str:
    return "-" if stats is None else f"{stats['median']:.2f} / {stats['p95']:.2f}"


# -- code run on the nodes (stdlib only; shipped with inspect.getsource) -------------------


def loadgen(targets: list[list[Any]], path: str, duration: float, workers: int, warmup: float) -> dict[str, Any]:
    """Closed-loop HTTP/1.0 GETs (a new connection each) from ``workers`` threads per target
    ([host, port]), all at once; counts the answers completed between ``warmup`` and
    ``warmup + duration`` seconds after the start, per target."""
    import os
    import socket
    import threading
    import time

    start = time.monotonic() + 0.05
    begin, end = start + warmup, start + warmup + duration
    results: list[list[Any]] = [[] for _ in targets]
    lock = threading.Lock()

    def one(host: str, port: int, request: bytes) -> str:
        """ "200", another status, or the error's class name."""
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(request)
                chunks = []
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError as exc:
            return type(exc).__name__
        head = b"".join(chunks).split(b"\r\n", 1)[0].split()
        return head[1].decode(errors="replace") if len(head) >= 2 else "no status line"

    def work(index: int, host: str, port: int) -> None:
        request = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: cerana-bench\r\n\r\n".encode()
        ok, bad, latencies = 0, {}, []
        while time.monotonic() < start:
            time.sleep(0.005)
        while True:
            t = time.monotonic()
            if t >= end:
                break
            outcome = one(host, port, request)
            done = time.monotonic()
            if begin <= done < end:
                if outcome == "200":
                    ok += 1
                    latencies.append(done - t)
                else:
                    bad[outcome] = bad.get(outcome, 0) + 1
            if outcome != "200":
                time.sleep(0.01)
        with lock:
            results[index].append((ok, bad, latencies))

    cpu0 = os.times()
    threads = [threading.Thread(target=work, args=(i, host, port)) for i, (host, port) in enumerate(targets)
               for _ in range(workers)]  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    cpu1 = os.times()

    def summary(parts: list[Any]) -> dict[str, Any]:
        latencies = sorted(x for r in parts for x in r[2])
        ok, bad = sum(r[0] for r in parts), {}
        for r in parts:
            for k, n in r[1].items():
                bad[k] = bad.get(k, 0) + n

        def pct(q: float) -> float | None:
            return latencies[max(0, int(-(-len(latencies) * q // 100)) - 1)] if latencies else None

        return {"ok": ok, "errors": sum(bad.values()), "error_kinds": bad, "rps": ok / duration,
                "lat_median": pct(50), "lat_p95": pct(95)}  # fmt: skip

    return {"targets": [summary(parts) for parts in results],
            "client_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)}  # fmt: skip


def run_module(module_args: dict[str, Any], probes: list[list[Any]], timeout: float) -> dict[str, Any]:
    """On the node: start the service_instance module as a process (t0 just before), probe the
    targets every 20 ms from t0 until each answers once or ``timeout`` s after the module ended.
    A probe is [name, host, port, path or None (TCP connect only)]. Times are time.time().
    With probes, first times a process that only imports the module (``startup``, before t0)."""
    import json
    import socket
    import subprocess
    import sys
    import threading
    import time
    import urllib.request

    found: dict[str, float] = {}
    stop = threading.Event()

    def probe(name: str, host: str, port: int, path: str | None) -> None:
        while not stop.is_set():
            try:
                if path is None:
                    socket.create_connection((host, port), timeout=1).close()
                else:
                    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=1) as resp:
                        resp.read()
                found[name] = time.time()
                return
            except Exception:
                time.sleep(0.02)

    module = "ansible_collections.cerana.platform.plugins.modules.service_instance"
    threads = [threading.Thread(target=probe, args=tuple(p), daemon=True) for p in probes]
    startup = None
    if probes:
        tb = time.time()
        subprocess.run([sys.executable, "-c", "import " + module], capture_output=True, check=True)
        startup = time.time() - tb
    t0 = time.time()
    for th in threads:
        th.start()
    proc = subprocess.run([sys.executable, "-m", module, json.dumps({"ANSIBLE_MODULE_ARGS": module_args})],
                          capture_output=True, text=True, check=False)  # fmt: skip
    t1 = time.time()
    for th in threads:
        th.join(max(0.0, t1 + timeout - time.time()))
    stop.set()
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = {"failed": True, "msg": (proc.stdout + proc.stderr)[-2000:]}
    return {"t0": t0, "t1": t1, "found": found, "result": result, "startup": startup}


# read once at import: the file may be edited while a long run goes on
_NODE_SOURCES = {f.__name__: inspect.getsource(f) for f in (loadgen, run_module)}


def node_script(func, call: str) -> str:
    """Python source that defines ``func`` (loadgen or run_module) and prints ``call``'s result as JSON."""
    head = "from __future__ import annotations\nimport json\n"
    return head + _NODE_SOURCES[func.__name__] + f"\nprint(json.dumps({call}))\n"


# -- the lab ------------------------------------------------------------------------------


class _Factory:
    """What platform_lab() needs of pytest's tmp_path_factory."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=name + "-", dir=self.base))


class Bench:
    def __init__(self, plat, args: argparse.Namespace) -> None:
        self.plat, self.args = plat, args
        self.node_id = plat.machine_id("node1")
        self.addresses: dict[str, str] = {}
        self.warned = False

    # Consul ----------------------------------------------------------------------------

    def kv_get(self, key: str, index: int = 0, wait: str = "10s") -> tuple[int, dict[str, Any] | None]:
        """(index, decoded JSON value or None when absent), from node1's agent; blocks while ``index`` is current."""
        query = f"?index={index}&wait={wait}" if index else ""
        req = urllib.request.Request(f"http://{self.plat.ip('node1')}:8500/v1/kv/cerana/{key}{query}")
        req.add_header("X-Consul-Token", self.plat.token)
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                new = int(resp.headers.get("X-Consul-Index", "0"))
                entries = json.loads(resp.read())
                value = json.loads(base64.b64decode(entries[0]["Value"])) if entries[0].get("Value") else None
                return new, value
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return int(exc.headers.get("X-Consul-Index", "0")), None
            raise

    def heartbeat_key(self) -> str:
        return f"heartbeats/bundles/{BUNDLE}/{self.node_id}"

    def watch(self, until, timeout: float, wait: str = "10s") -> list[tuple[float, dict[str, Any] | None]]:
        """Every version of node1's bundle heartbeat ([(observed time, value)]) until ``until(value)``
        (checked at least every ``wait``)."""
        seen = []
        index, value = self.kv_get(self.heartbeat_key())
        seen.append((time.time(), value))
        deadline = time.monotonic() + timeout
        while not until(value):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s watching {self.heartbeat_key()}: {value}")
            new, value = self.kv_get(self.heartbeat_key(), index or 1, wait)
            if new == index:  # the wait ran out without a change
                continue
            index = new if new > index else 0  # Consul: a lower index resets the watch
            seen.append((time.time(), value))
        return seen

    def watch_in_thread(self, until, timeout: float, wait: str = "10s"):
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["seen"] = self.watch(until, timeout, wait)
            except Exception as exc:  # reported by the caller
                box["error"] = exc

        th = threading.Thread(target=run, daemon=True)
        th.start()
        return th, box

    # playbooks and node processes ------------------------------------------------------

    def play(self, hosts: str, tasks: list[dict[str, Any]], name: str, node_level: bool = True) -> float:
        play: dict[str, Any] = {"hosts": hosts, "gather_facts": False, "tasks": tasks}
        if node_level:
            play["vars"] = {"ansible_python_interpreter": NODE_PY}
            play["module_defaults"] = {"group/cerana.platform.platform": {
                "consul_url": "http://127.0.0.1:8500", "consul_token": self.plat.token}}  # fmt: skip
        else:
            play.update(connection="local", module_defaults={"group/cerana.platform.platform": {
                "consul_url": f"http://{self.plat.ip('node1')}:8500", "consul_token": self.plat.token}})  # fmt: skip
        path = self.plat.workdir / f"{name}.json"
        path.write_text(json.dumps([play]))
        _proc, elapsed = self.plat.playbook(path)
        return elapsed

    def module(self, service: str, state: str, probes: list[list[Any]] | None = None,
               timeout: float = 60) -> dict[str, Any]:  # fmt: skip
        args: dict[str, Any] = {"bundle": BUNDLE, "service": service, "state": state,
                                "consul_url": "http://127.0.0.1:8500", "consul_token": self.plat.token}  # fmt: skip
        if self.args.settle is not None and state == "started":
            args["settle"] = self.args.settle
        out = json.loads(self.plat.run_in("node1", NODE_PY, "-c", node_script(
            run_module, f"run_module({args!r}, {probes or []!r}, {timeout!r})")))  # fmt: skip
        if out["result"].get("failed"):
            raise RuntimeError(f"service_instance {service} {state}: {out['result'].get('msg')}")
        return out

    def cpu_stat(self) -> dict[str, dict[str, int]]:
        """``cpu.stat`` of the instance units on node1 (their cgroup v2 group, as systemd names it:
        ``/sys/fs/cgroup`` on a unified host, ``/sys/fs/cgroup/unified`` on a hybrid one such as this
        machine, where the group has CPU usage but no cpu controller, hence no throttling figures)."""
        out = {}
        for service in SERVICES:
            unit = f"cerana-{BUNDLE}_{service}.service"
            group = self.plat.run_in("node1", "systemctl", "show", "-P", "ControlGroup", unit, check=False)
            text = ""
            if group:
                text = self.plat.run_in("node1", "sh", "-c", f"cat /sys/fs/cgroup{group}/cpu.stat 2>/dev/null || "
                                        f"cat /sys/fs/cgroup/unified{group}/cpu.stat", check=False)  # fmt: skip
            out[service] = parse_cpu_stat(text)
            if "usage_usec" not in out[service] and not self.warned:
                self.warned = True
                print(f"warning: no cpu.stat for {unit} (ControlGroup {group!r}); unit CPU left at 0", flush=True)
        return out

    # setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        from cerana_lab import sample

        src = sample.build_sample(self.plat.workdir / "pyapp")
        svc_limits = {"cpu": 0.5, "memory": 134217728, "processes": 64}
        self.play("localhost", [
            {"cerana.platform.dataset_import": {"src": str(src), "id": "pyapp", "redundancy": 1, "node": "node1"}},
            {"cerana.platform.service": {
                "id": "backend", "dataset": "pyapp", "cmd": ["/usr/bin/python3", "/app/backend.py"],
                "env": {"PORT": "8081"}, "limits": svc_limits,
                "health_checks": [{"id": "tcp", "kind": "tcp", "args": {"port": 8081}, "interval": "1s",
                                   "timeout": "1s"}]}},
            {"cerana.platform.service": {
                "id": "front", "dataset": "pyapp", "cmd": ["/usr/bin/python3", "/app/front.py"],
                "env": {"PORT": "8080", "BACKEND_URL": "http://127.0.0.1:8081/"}, "limits": svc_limits,
                "health_checks": [{"id": "http", "kind": "http", "args": {"port": 8080, "path": "/health"},
                                   "interval": "1s", "timeout": "1s"}]}},
            {"cerana.platform.bundle": {
                "id": BUNDLE, "redundancy": 1,
                "datasets": [{"name": "data", "type": "rw"}],
                "services": [{"id": "backend"},
                             {"id": "front", "env": {"GREETING": "bench"},
                              "datasets": [{"name": "data", "mount_point": "/data"}]}],
                "ports": [{"port": port, "public": True, "external_port": external}
                          for port, external in PORTS.values()]}},
        ], "declare", node_level=False)  # fmt: skip
        self.play("node1,node2,node3", [{"cerana.platform.bundle_network": {"bundle": BUNDLE, "state": "present"}}],
                  "network")  # fmt: skip
        for node in ("node1", "node3"):
            record = json.loads(self.plat.run_in(node, "cat", f"/run/cerana/networks/{BUNDLE}.json"))
            self.addresses[node] = record["address"]

    # start latency ---------------------------------------------------------------------

    def probes(self, service: str) -> list[list[Any]]:
        port, external = PORTS[service]
        path = "/health" if service == "front" else None
        return [["answers", self.addresses["node1"], port, path], ["published", self.plat.ip("node2"), external, path]]

    def remove_all(self) -> None:
        t = time.time()
        for service in reversed(SERVICES):
            self.module(service, "absent")
        # wait for a heartbeat written after the removal without the services (or none at all)
        self.watch(lambda hb: hb is None or (heartbeat_time(hb) >= t and not hb.get("services")), 60)

    def start_latency(self, service: str) -> dict[str, float]:
        t_call = time.time()
        th, box = self.watch_in_thread(
            lambda hb: hb is not None and service_healthy(hb, service) and heartbeat_time(hb) >= t_call, 120
        )
        out = self.module(service, "started", self.probes(service))
        th.join(130)
        if "error" in box or "seen" not in box:
            raise RuntimeError(f"no healthy heartbeat for {service}: {box.get('error')}")
        healthy = first_healthy(box["seen"], service, out["t0"])
        t0, found = out["t0"], out["found"]
        row = {"startup": out["startup"], "module": out["t1"] - t0, "healthy": (healthy - t0) if healthy else math.nan}
        for name in ("answers", "published"):
            row[name] = found[name] - t0 if name in found else math.nan
        return row

    def playbook_latency(self) -> dict[str, float]:
        t = time.time()
        self.module("front", "absent")
        self.watch(lambda hb: hb is not None and heartbeat_time(hb) >= t and "front" not in hb.get("services", {}), 60)
        t_call = time.time()
        th, box = self.watch_in_thread(
            lambda hb: hb is not None and service_healthy(hb, "front") and heartbeat_time(hb) >= t_call, 180
        )
        task = {"cerana.platform.service_instance": {"bundle": BUNDLE, "service": "front", "state": "started"}}
        if self.args.settle is not None:
            task["cerana.platform.service_instance"]["settle"] = self.args.settle
        wall = self.play("node1", [task], "start-front")
        th.join(190)
        if "error" in box or "seen" not in box:
            raise RuntimeError(f"no healthy heartbeat for the front: {box.get('error')}")
        healthy = first_healthy(box["seen"], "front", t_call)
        return {"wall": wall, "healthy": (healthy - t_call) if healthy else math.nan}

    # throughput ------------------------------------------------------------------------

    def target(self, service: str, kind: str) -> tuple[str, str, int]:
        """(client node, host, port) of a target (TARGETS)."""
        port, external = PORTS[service]
        client = TARGETS[kind][0]
        if kind.endswith("direct"):
            return client, self.addresses["node1"], port
        return client, self.plat.ip("node2" if kind == "published-remote" else "node1"), external

    def wait_serving(self) -> None:
        """Every target answers from node3 (the rotation on node1 and node2 has the instance)."""
        code = "import sys, urllib.request\nfor u in sys.argv[1:]:\n    urllib.request.urlopen(u, timeout=3).read()\n"
        for client in ("node1", "node3"):
            urls = [f"http://{h}:{p}/" for s in SERVICES for k in TARGETS for c, h, p in [self.target(s, k)]
                    if c == client]  # fmt: skip
            argv = ["nsenter", "-t", str(self.plat.leader_pid(client)), "-a", "python3", "-c", code, *urls]
            deadline = time.monotonic() + 90
            while subprocess.run(argv, capture_output=True, check=False).returncode:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the targets do not all answer from {client}")
                time.sleep(1)

    def throughput(self, service: str, kinds: tuple[str, ...]) -> dict[str, Any]:
        """One client run against the ``kinds`` targets of ``service`` at once (same client node):
        {"kinds": {kind: figures}, unit CPU, unhealthy heartbeats}. With several kinds, each gets
        ceil(concurrency / len(kinds)) threads (a paired run)."""
        a = self.args
        targets = [self.target(service, kind) for kind in kinds]
        client = targets[0][0]
        assert all(t[0] == client for t in targets), targets
        workers = math.ceil(a.concurrency / len(kinds))
        call = f"loadgen({[[h, p] for _c, h, p in targets]!r}, '/', {a.duration}, {workers}, {a.warmup})"
        before = self.cpu_stat()
        done = threading.Event()
        th, box = self.watch_in_thread(lambda _hb: done.is_set(), a.duration + a.warmup + 120, "1s")
        try:
            res = json.loads(self.plat.run_in(client, "python3", "-c", node_script(loadgen, call)))
        finally:
            done.set()
            th.join(30)
        after = self.cpu_stat()
        out: dict[str, Any] = {"kinds": dict(zip(kinds, res["targets"], strict=True)), "threads": workers,
                               "client_cpu_s": res["client_cpu_s"]}  # fmt: skip
        # heartbeats of node1's instance written during the run that were not healthy (any service)
        bad = [hb for _t, hb in box.get("seen", [])[1:] if not all(service_healthy(hb, s) for s in SERVICES)]
        out["unhealthy_heartbeats"] = len(bad)
        out["unhealthy_reasons"] = sorted({f"{s}.{c}: {e}" for hb in bad if hb for s, st in hb["services"].items()
                                           for c, e in (st.get("health") or {}).items() if e})  # fmt: skip
        # CPU of the units over the whole client run (warm-up included): per second of the run
        span = a.duration + a.warmup
        for svc in SERVICES:
            d = cpu_delta(before[svc], after[svc])
            for key, name in (("cpu_s", "cpu"), ("throttled_s", "throttled")):
                out[f"{svc}_{name}"] = None if d[key] is None else d[key] / span
        return out


# -- output -------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    free = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "free": free[1].split()[1] if len(free) > 1 else "?",
        "cpu": " ".join(cpu.split()[:2]),
        "load": Path("/proc/loadavg").read_text().split()[0],
    }


INTRO = (
    "`benchmarks/service_instances.py`: the sample bundle (`cerana_lab/sample.py`; services as in "
    "`tests/sample_app.py`, the backend's port published too) on a 3-node nspawn lab deployed with `site.yml` "
    "(node tick interval 1 s, checks every 1 s, no cluster tick), instances on node1. The script's docstring "
    "says what each figure measures. Times: median / p95 (nearest rank) in seconds."
)
LATENCY_HEADER = (
    "| date | nproc | memory | CPU | load start-end | service, rounds | module startup s | module s | answers s "
    "| healthy s | published (node2) s | ansible-playbook s |\n|" + "---|" * 12
)
THROUGHPUT_HEADER = (
    "| date | nproc | memory | CPU | load start-end | service, client, rounds | direct req/s | published req/s "
    "| published-remote req/s | local-direct req/s | local-published req/s | published/direct | remote/direct "
    "| local published/direct | unit CPU s/s, direct (throttled) | errors / unhealthy heartbeats |\n|" + "---|" * 16
)


PAIRED_HEADER = (
    "| date | nproc | memory | CPU | load start-end | service, client, rounds | direct req/s | published req/s "
    "| published-remote req/s | local-direct req/s | local-published req/s | published/direct | remote/direct "
    "| local published/direct | errors / unhealthy heartbeats |\n|" + "---|" * 15
)


def latency_rows(info, load0, args, lat, pb) -> list[str]:
    rows = []
    for service in SERVICES:
        cols = [fmt(summary([r[k] for r in lat[service] if not math.isnan(r[k])] or [math.nan]))
                for k in ("startup", "module", "answers", "healthy", "published")]  # fmt: skip
        playbook = "-"
        if service == "front" and pb:
            walls, healthy = summary([r["wall"] for r in pb]), summary([r["healthy"] for r in pb])
            playbook = f"wall {fmt(walls)}, healthy {fmt(healthy)}"
        rows.append(f"| {info['date']} | {info['nproc']} | {info['free']} | {info['cpu']} | {load0}-{info['load']} "
                    f"| {service}, {len(lat[service])} | {' | '.join(cols)} | {playbook} |")  # fmt: skip
    return rows


def run_name(kinds: tuple[str, ...]) -> str:
    """A run's key in a round: the target, or "paired:" and the targets of a paired run."""
    return kinds[0] if len(kinds) == 1 else "paired:" + "+".join(kinds)


def describe_run(round_no: int, service: str, kinds: tuple[str, ...], res: dict[str, Any]) -> str:
    figures = "; ".join(
        f"{kind} {r['rps']:.1f} req/s, errors {r['error_kinds'] or 0}, latency "
        f"{r['lat_median'] or 0:.3f}/{r['lat_p95'] or 0:.3f} s"
        for kind, r in res["kinds"].items()
    )
    units = ", ".join(f"{s} {cpu_figure([{'x': res}], s, 'x')}" for s in SERVICES)
    return (f"round {round_no} {service:7s} {run_name(kinds):45s} {figures}; {res['threads']} threads/target; "
            f"client CPU {res['client_cpu_s']:.1f} s; unit CPU s/s {units}; unhealthy heartbeats "
            f"{res['unhealthy_heartbeats']} {res['unhealthy_reasons'] or ''}")  # fmt: skip


def cpu_figure(rounds: list[dict[str, Any]], service: str, target: str = "direct") -> str:
    """Median CPU s/s of ``service``'s unit during the ``target`` runs, with the throttled s/s in
    parentheses ("no quota" where the cgroup has no cpu controller); "-" when not measured."""

    def med(key: str) -> float | None:
        values = [r[target].get(key) for r in rounds]
        return None if any(v is None for v in values) else statistics.median(values)

    cpu, thr = med(f"{service}_cpu"), med(f"{service}_throttled")
    if cpu is None:
        return "-"
    return f"{cpu:.2f} ({'no quota' if thr is None else f'{thr:.2f}'})"


def throughput_rows(info, load0, args, tp) -> tuple[list[str], list[str]]:
    """(rows of the solo table, rows of the paired table)."""
    solo, paired = [], []
    for service in SERVICES:
        rounds = tp[service]
        head = (f"| {info['date']} | {info['nproc']} | {info['free']} | {info['cpu']} | {load0}-{info['load']} "
                f"| {service}, %s x {args.duration:g} s, median of {len(rounds)} | ")  # fmt: skip
        rps = {k: [r[k]["kinds"][k]["rps"] for r in rounds] for k in TARGETS}
        ratio = [statistics.median(x / y if y else math.nan for x, y in zip(rps[a], rps[b], strict=True))
                 for a, b in RATIOS]  # fmt: skip
        used = ", ".join(f"{s} {cpu_figure(rounds, s)}" for s in SERVICES)
        errors = sum(r[k]["kinds"][k]["errors"] for r in rounds for k in TARGETS)
        unhealthy = sum(r[k]["unhealthy_heartbeats"] for r in rounds for k in TARGETS)
        solo.append(head % f"{args.concurrency} threads"
                    + " | ".join(f"{statistics.median(rps[k]):.0f}" for k in TARGETS) + " | "
                    + " | ".join(f"{x:.2f}" for x in ratio) + f" | {used} | {errors} / {unhealthy} |")  # fmt: skip
        runs = {p: [r[run_name(p)] for r in rounds] for p in PAIRS}
        prs = {k: [run["kinds"][k]["rps"] for run in runs[p]] for p in PAIRS for k in p}
        pratio = [statistics.median(x / y if y else math.nan for x, y in zip(prs[a], prs[b], strict=True))
                  for a, b in RATIOS]  # fmt: skip
        errors = sum(run["kinds"][k]["errors"] for p in PAIRS for run in runs[p] for k in p)
        unhealthy = sum(run["unhealthy_heartbeats"] for p in PAIRS for run in runs[p])
        threads = "/".join(str(runs[p][0]["threads"]) for p in PAIRS)
        paired.append(head % f"{threads} threads per target"
                      + " | ".join(f"{statistics.median(prs[k]):.0f}" for k in TARGETS) + " | "
                      + " | ".join(f"{x:.2f}" for x in pratio) + f" | {errors} / {unhealthy} |")  # fmt: skip
    return solo, paired


def record(latency: list[str], solo: list[str], paired: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    for heading, header, rows in ((LATENCY_HEADING, LATENCY_HEADER, latency),
                                  (THROUGHPUT_HEADING, THROUGHPUT_HEADER, solo),
                                  (PAIRED_HEADING, PAIRED_HEADER, paired)):  # fmt: skip
        if rows:
            text = insert_rows(text, SECTION, INTRO, heading, header, rows)
    DOC.write_text(text)


# -- main ---------------------------------------------------------------------------------


def _sigterm(_signum, _frame):
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run as root (nspawn lab)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "tests"))
    import platform_lab  # the tests' lab helper: up, site.yml, down

    if not platform_lab.usable():
        print("needs iproute2, systemd-container, debootstrap and nsenter", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    load0 = Path("/proc/loadavg").read_text().split()[0]
    lat: dict[str, list[dict[str, float]]] = {s: [] for s in SERVICES}
    pb: list[dict[str, float]] = []
    tp: dict[str, list[dict[str, Any]]] = {s: [] for s in SERVICES}
    base = Path(tempfile.mkdtemp(prefix="cerana-bench-svc-", dir=args.workdir))
    started = time.monotonic()
    try:
        extra = {"cerana_cluster_tick_enabled": False}
        with platform_lab.platform_lab(_Factory(base), extra_vars=extra, prefix="bs") as plat:
            print(f"lab {plat.name} up and deployed in {time.monotonic() - started:.0f} s", flush=True)
            bench = Bench(plat, args)
            bench.setup()
            print(f"instance addresses {bench.addresses}", flush=True)
            if args.skip_latency:
                for service in SERVICES:
                    bench.module(service, "started")
            else:
                for i in range(args.repeat):
                    bench.remove_all()
                    for service in SERVICES:
                        row = bench.start_latency(service)
                        lat[service].append(row)
                        print(f"round {i + 1} {service:7s} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()),
                              flush=True)  # fmt: skip
                for i in range(args.playbook_repeat):
                    row = bench.playbook_latency()
                    pb.append(row)
                    print(f"playbook {i + 1} front wall {row['wall']:.2f} healthy {row['healthy']:.2f}", flush=True)
            if not args.skip_throughput:
                bench.wait_serving()
                order = [(s, (k,)) for s in SERVICES for k in TARGETS] + [(s, p) for s in SERVICES for p in PAIRS]
                for i in range(args.repeat):
                    rounds: dict[str, dict[str, Any]] = {s: {} for s in SERVICES}
                    shift = i % len(order)
                    for service, kinds in order[shift:] + order[:shift]:
                        res = bench.throughput(service, kinds)
                        rounds[service][run_name(kinds)] = res
                        print(describe_run(i + 1, service, kinds, res), flush=True)
                    for service in SERVICES:
                        tp[service].append(rounds[service])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    info = machine()
    lrows = latency_rows(info, load0, args, lat, pb) if any(lat.values()) else []
    solo, paired = throughput_rows(info, load0, args, tp) if any(tp.values()) else ([], [])
    for row in lrows + solo + paired:
        print(row)
    print(json.dumps({"machine": info, "load_start": load0, "latency": lat, "playbook": pb,
                      "throughput": tp, "total_s": time.monotonic() - started}))  # fmt: skip
    if args.record:
        record(lrows, solo, paired)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``cerana-cluster-tick`` against real Consul agents, running real ansible-runner.

The daemons run as processes (``python -m cerana_cluster_tick``, configured by a TOML
file, stopped with SIGTERM). The nodes are fake: a thread plays their node ticks (the
``nodes/<id>`` keys and the dataset and bundle heartbeats), reporting whatever the
converge runs asked each node to do. The converge playbook is a stand-in
(``playbooks/cluster_tick_standin.yml``, given through the ``playbook`` setting) that
records each node's plan instead of changing a machine: these tests are about leadership,
fencing, retries, events and outages, and need several nodes and many runs in little time.
The real ``cerana.platform.converge`` runs in ``test_cluster_tick_lab.py`` on an nspawn node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _clusterstate, _planner, _store
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from cerana_cli.consul_agent import ConsulAgent, free_port
from cerana_cluster_tick import core, kv

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

STANDIN = Path(__file__).parent / "playbooks" / "cluster_tick_standin.yml"
BIN = Path(sys.executable).parent


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- the fake nodes ------------------------------------------------------------------------------


class FakeNodes(threading.Thread):
    """The node ticks of fake nodes, whose state is what the stand-in converge recorded for them."""

    def __init__(self, address: str, prefix: str, standin: Path, names: list[str], interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="fake-nodes")
        self.store = _store.Store(_store.ConnectionSettings(address=address, prefix=prefix, timeout=3))
        self.standin = standin
        self.ids = {name: f"{name}-{uuid.uuid4().hex[:6]}" for name in names}
        self.datasets: dict[str, set[str]] = {i: set() for i in self.ids.values()}
        self.bundles: dict[str, dict[str, list[str]]] = {i: {} for i in self.ids.values()}
        self.applied: dict[str, list[tuple[str, dict]]] = {i: [] for i in self.ids.values()}  # node -> [(run, plan)]
        self.interval = interval
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self._seen: set[str] = set()
        self._written: set[str] = set()

    def _apply_runs(self) -> None:
        runs = sorted(self.standin.glob("runs/*--*.json"), key=lambda p: p.name.split("--")[1])
        for path in runs:
            if path.name in self._seen:
                continue
            try:
                data = json.loads(path.read_text())
            except ValueError:
                continue  # being written
            self._seen.add(path.name)
            node, run = path.name[: -len(".json")].split("--")
            ch = data["plan"]["changes"]
            self.datasets[node] |= set(ch["add_datasets"])
            self.datasets[node] -= set(ch["remove_datasets"])
            for b in ch["start_bundles"] + ch["update_bundles"]:
                self.bundles[node][b] = data["services"].get(b, [])
            for b in ch["stop_bundles"]:
                self.bundles[node].pop(b, None)
            self.applied[node].append((run, data["plan"]))

    def tick(self) -> None:
        with self.lock:
            self._apply_runs()
            now = m.format_time(m.utc_now())
            ops, keys = [], set()
            for node in self.ids.values():
                doc = {"id": node, "hostname": node, "heartbeat": now, "addresses": ["127.0.0.1"],
                       "cpu_count": 4, "memory_total": 8 << 30, "memory_free": 8 << 30}  # fmt: skip
                keys.add(m.node_key(node))
                ops.append((m.node_key(node), m.Node.from_dict(doc).to_bytes()))
                for d in sorted(self.datasets[node]):
                    hb = m.DatasetHeartbeat.from_dict({"dataset": d, "node": node, "time": now})
                    keys.add(m.dataset_heartbeat_key(d, node))
                    ops.append((m.dataset_heartbeat_key(d, node), hb.to_bytes()))
                for b, services in sorted(self.bundles[node].items()):
                    running = {s: {"state": "running"} for s in services}
                    hb = m.BundleHeartbeat.from_dict({"bundle": b, "node": node, "time": now, "services": running})
                    keys.add(m.bundle_heartbeat_key(b, node))
                    ops.append((m.bundle_heartbeat_key(b, node), hb.to_bytes()))
            txn = [{"KV": {"Verb": "set", "Key": k, "Value": v}} for k, v in ops]
            txn += [{"KV": {"Verb": "delete", "Key": k}} for k in sorted(self._written - keys)]
            for i in range(0, len(txn), 60):
                self.store.txn(txn[i : i + 60])
            self._written = keys

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.tick()
            except _store.StoreError:
                pass  # Consul away: try again
            self.stop.wait(self.interval)

    def where(self, bundle: str) -> set[str]:
        with self.lock:
            return {n for n, bs in self.bundles.items() if bundle in bs}

    def runs_of(self, node: str) -> list[tuple[str, dict]]:
        with self.lock:
            return list(self.applied[node])


# -- the daemons ---------------------------------------------------------------------------------


class Tick:
    """A cerana-cluster-tick process."""

    def __init__(self, name: str, address: str, prefix: str, work: Path, standin: Path, **settings: Any) -> None:
        self.name = name
        self.state_dir = work / f"state-{name}"
        self.log_path = work / f"{name}.log"
        conf = {
            "name": name, "state_dir": str(self.state_dir), "playbook": str(STANDIN),
            "python_interpreter": sys.executable, "lock_ttl": "2s", "lock_delay": "1s", "resync": "10s",
            "grace": "2s", "node_retry_initial": "1s", "node_retry_max": "4s", "settle": "100ms",
            "stop_timeout": "20s", "log_level": "DEBUG", **settings,
        }  # fmt: skip
        lines = [f"{k} = {json.dumps(v)}" for k, v in conf.items()]
        lines += ["[consul]", f"address = {json.dumps(address)}", f"prefix = {json.dumps(prefix)}", 'timeout = "3s"']
        self.config = work / f"{name}.toml"
        self.config.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CERANA_", "ANSIBLE_"))}
        env.update(CERANA_STANDIN_DIR=str(standin), PATH=f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cerana_cluster_tick", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def runs(self) -> list[str]:
        runs = self.state_dir / "runs"
        return sorted(p.name for p in runs.iterdir()) if runs.exists() else []

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            tail = self.log()[-3000:]
            raise AssertionError(f"{self.name} did not stop within {timeout} s on SIGTERM:\n{tail}") from None


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "standin" / "runs").mkdir(parents=True)
    return tmp_path


def holder(store: _store.Store) -> str | None:
    entry = store.get(core.LOCK_KEY, consistent=True)
    if entry is None or not entry.session:
        return None
    return json.loads(entry.value)["name"]


def pending(store: _store.Store) -> tuple[str, ...] | None:
    """The nodes the planner still wants to change (None when Consul fails the read)."""
    try:
        state = _clusterstate.read_state(Objects(store), time.time())
    except _store.StoreError:
        return None
    return _planner.plan(state, grace=2.0).changed_nodes()


def declare(store: _store.Store, *objects: Any) -> None:
    o = Objects(store)
    for obj in objects:
        current = o.get(obj.KIND, obj.id)
        o.put(obj, cas=current.mod_index if current else 0)


def basics(env: str = "one") -> list[Any]:
    return [
        m.Dataset.from_dict({"id": "web-root", "read_only": True}),
        m.Service.from_dict({"id": "web", "dataset": "web-root", "cmd": ["/bin/httpd"], "env": {"V": env}}),
        m.Bundle.from_dict({"id": "shop", "redundancy": 2, "services": {"web": {}}}),
    ]


def run_events(store: _store.Store) -> list[dict[str, Any]]:
    return [e for e in kv.read_events(store) if e.get("kind") == "run"]


# -- the tests -------------------------------------------------------------------------------------


@pytest.fixture
def cluster(consul: ConsulAgent, kv_prefix: str, work: Path) -> Iterator[tuple[_store.Store, FakeNodes]]:
    store = _store.Store(_store.ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    nodes = FakeNodes(consul.http_addr, kv_prefix, work / "standin", ["n1", "n2", "n3"])
    nodes.tick()
    nodes.start()
    yield store, nodes
    nodes.stop.set()
    nodes.join(5)


def test_one_leader_applies_others_stand_by_and_take_over(consul, kv_prefix, work, cluster) -> None:
    store, nodes = cluster
    declare(store, *basics())
    a = Tick("tick-a", consul.http_addr, kv_prefix, work, work / "standin")
    b = None
    try:
        wait_for(lambda: holder(store) == "tick-a", 120, "tick-a to take the lock")
        b = Tick("tick-b", consul.http_addr, kv_prefix, work, work / "standin")
        wait_for(lambda: "waiting for the lock" in b.log(), 120, "tick-b to stand by")

        # tick-a converges the cluster: shop on two nodes, each with the dataset it needs
        wait_for(lambda: len(nodes.where("shop")) == 2 and pending(store) == (), 120, "the first converge")
        for node in nodes.where("shop"):
            assert "web-root" in nodes.datasets[node]
        events = run_events(store)
        assert events and {e["applier"] for e in events} == {"tick-a"}
        assert all(e["status"] == "ok" for e in events), events
        assert set(events[0]["nodes"]["ok"]) == nodes.where("shop")
        assert b.runs() == [] and holder(store) == "tick-a"
        first = sorted(nodes.where("shop"))[0]
        assert set(_clusterstate.decode_applied(store.get(_clusterstate.applied_key(first)).value)) == {"shop"}

        # nothing differs: no Ansible run, while the heartbeats keep waking the tick
        runs = a.runs()
        time.sleep(3)
        assert a.runs() == runs and len(run_events(store)) == len(events)

        # SIGTERM: tick-a releases the lock, tick-b takes over at once (no lock-delay)
        assert a.terminate() == 0
        assert "the lock is released" in a.log()
        wait_for(lambda: holder(store) == "tick-b", 60, "tick-b to take over")

        # an update goes through tick-b, one instance at a time (max_unavailable 1)
        shop_nodes = sorted(nodes.where("shop"))
        declare(store, basics("two")[1])
        wait_for(lambda: pending(store) == () and all(
            any("shop" in p["changes"]["update_bundles"] for _, p in nodes.runs_of(n)) for n in shop_nodes
        ), 120, "the rolling update")  # fmt: skip
        update_runs = {
            n: [r for r, p in nodes.runs_of(n) if "shop" in p["changes"]["update_bundles"]] for n in shop_nodes
        }
        assert all(len(r) == 1 for r in update_runs.values()), update_runs
        assert update_runs[shop_nodes[0]] != update_runs[shop_nodes[1]], "both instances were updated in one run"
        later = run_events(store)[len(events) :]
        assert later and {e["applier"] for e in later} == {"tick-b"}
    finally:
        for t in (a, b):
            if t is not None and t.proc.poll() is None:
                t.terminate()


def test_failing_node_backs_off_alone_and_bad_declarations_are_reported(consul, kv_prefix, work, cluster) -> None:
    store, nodes = cluster
    declare(store, *basics())
    broken = nodes.ids["n2"]
    (work / "standin" / f"fail-{broken}").touch()
    declare(store, m.Bundle.from_dict({"id": "blog", "redundancy": 3, "services": {"web": {}}}))
    tick = Tick("tick-c", consul.http_addr, kv_prefix, work, work / "standin")
    try:
        # the other nodes converge; the broken one fails, again, with a longer wait
        wait_for(lambda: nodes.where("blog") == {nodes.ids["n1"], nodes.ids["n3"]}, 120, "blog on the good nodes")

        def failures() -> list[dict[str, Any]]:
            return [e for e in run_events(store) if broken in e["nodes"]["failed"]]

        fails = wait_for(lambda: len(failures()) >= 2 and failures(), 120, "two failed attempts on the broken node")
        assert fails[0]["nodes"]["errors"][broken].endswith(f"node {broken} is broken")
        assert fails[0]["status"] in ("partial", "failed")
        # shop's replica that never started there goes to a node that holds its dataset by now
        # (a placement is kept once applied, not while it fails); blog, on every node, stays:
        # with the same plan, the broken node's wait grows
        wait_for(lambda: nodes.where("shop") == {nodes.ids["n1"], nodes.ids["n3"]}, 120, "shop on the good nodes")
        again = wait_for(lambda: [e for e in failures() if e["retries"][broken]["failures"] >= 2], 120,
                         "a second failure with the same plan")  # fmt: skip
        first = next(e for e in failures() if e["retries"][broken]["failures"] == 1 and e["run"] < again[0]["run"])
        assert first["retries"][broken]["retry_in"] < again[0]["retries"][broken]["retry_in"], (first, again[0])
        # the good nodes were not held back, nor run again for the broken one's sake
        assert len([r for r, p in nodes.runs_of(nodes.ids["n1"]) if "blog" in p["changes"]["start_bundles"]]) == 1

        # a bad declaration is reported as a problem, and the loop goes on
        declare(store, m.Bundle.from_dict({"id": "bad", "services": {"nope": {}}}))
        problem = wait_for(
            lambda: next((e for e in kv.read_events(store) if e.get("kind") in ("problems", "run")
                          and any(p["object"] == "bundle/bad" for p in e.get("problems", []))), None),
            120, "the bad declaration in an event",
        )  # fmt: skip
        assert problem["applier"] == "tick-c"

        # fixed: the node converges at its next retry
        (work / "standin" / f"fail-{broken}").unlink()
        wait_for(lambda: broken in nodes.where("blog"), 120, "the fixed node to converge")
        assert tick.proc.poll() is None and holder(store) == "tick-c"
    finally:
        assert tick.terminate() == 0


class ServerConsul(ConsulAgent):
    """A single-server Consul that keeps its data across restarts (the dev agent keeps nothing)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir=workdir, http_port=free_port())
        self.serf_port, self.server_port = free_port(), free_port()

    def command(self, http_port: int) -> list[str]:
        return [
            os.fspath(self.binary), "agent", "-server", "-bootstrap-expect=1", "-node=cerana-restart",
            "-bind=127.0.0.1", "-client=127.0.0.1", f"-data-dir={self.workdir / 'data'}",
            f"-http-port={http_port}", "-dns-port=-1", "-grpc-port=-1", "-serf-wan-port=-1",
            f"-serf-lan-port={self.serf_port}", f"-server-port={self.server_port}",
            "-hcl", 'session_ttl_min = "1s"', "-hcl", "disable_update_check = true",
            "-hcl", "performance { raft_multiplier = 1 }",
        ]  # fmt: skip


def test_consul_restart_in_the_middle_of_a_run(work: Path) -> None:
    agent = ServerConsul(work / "consul").start()
    prefix = "restart"
    store = _store.Store(_store.ConnectionSettings(address=agent.http_addr, prefix=prefix, timeout=3))
    nodes = FakeNodes(agent.http_addr, prefix, work / "standin", ["n1", "n2"])
    tick = None
    try:
        nodes.tick()
        nodes.start()
        hold = work / "standin" / "hold"
        hold.touch()
        declare(store, *basics())
        tick = Tick("tick-r", agent.http_addr, prefix, work, work / "standin")
        standin = work / "standin"
        wait_for(lambda: len(list(standin.glob("held-*"))) == 2, 120, "the run to wait for the hold file")
        agent.stop()
        hold.unlink()  # the run ends while Consul is away: its results cannot be written
        wait_for(lambda: len(list(standin.glob("runs/*.json"))) == 2, 120, "the run to end")
        wait_for(lambda: "Consul failed" in tick.log(), 120, "the tick to notice")
        agent.start()
        wait_for(lambda: len(nodes.where("shop")) == 2 and pending(store) == (), 120, "convergence after the restart")
        assert tick.proc.poll() is None, tick.log()[-3000:]
        assert holder(store) == "tick-r"
        events = run_events(store)
        tail = tick.log()[-4000:]
        held_ok = events[0]["run"] == tick.runs()[0] and events[0]["status"] == "ok"
        assert held_ok, f"the held run was not recorded:\n{tail}"
        # logged by the first pass that reads the cluster again, which may come after the one
        # that wrote those records failed on its read (Consul just restarted)
        wait_for(lambda: "Consul is reachable again" in tick.log(), 60, "the tick to log that Consul is back")
        holding = tick.log().count("leading: holding")

        # a Consul that comes back with nothing (its data lost): the tick takes the lock again
        agent.stop()
        shutil.rmtree(agent.workdir / "data")
        agent.start()
        wait_for(lambda: holder(store) == "tick-r", 120, "the lock to be taken again")
        declare(store, *basics())
        wait_for(lambda: pending(store) == () and run_events(store), 120, "convergence on the new Consul")
        assert tick.proc.poll() is None and tick.log().count("leading: holding") > holding, tick.log()[-4000:]
    finally:
        nodes.stop.set()
        if tick is not None:
            tick.terminate()
        agent.stop()


def test_fencing_sees_declared_changes_but_not_heartbeats(consul, kv_prefix, work, cluster) -> None:
    """The re-check before applying, and the writes that only the lock holder can make."""
    store, nodes = cluster
    declare(store, *basics())
    state = _clusterstate.read_state(Objects(store), time.time())
    nodes.tick()  # node keys and heartbeats written again: not a reason to plan again
    assert store.get("nodes/" + nodes.ids["n1"]).modify_index > state.index
    assert kv.declared_moved(store, state) is None
    declare(store, basics("changed")[1])
    assert "services/ changed" in kv.declared_moved(store, state)
    state = _clusterstate.read_state(Objects(store), time.time())
    assert kv.declared_moved(store, state) is None
    Objects(store).delete("bundle", "shop")
    assert "every bundle was deleted" in kv.declared_moved(store, state)

    # only the session holding the lock can write
    stop = threading.Event()
    mine = kv.Leadership(store, ttl=2, lock_delay=1, identity="fence-a")
    other = kv.Leadership(store, ttl=2, lock_delay=1, identity="fence-b")
    try:
        assert mine.acquire(stop) and mine.holds()
        event_key = core.event_key(m.format_time(m.utc_now()), "t")
        kv.record_event(store, core.LOCK_KEY, mine.session, event_key, {"kind": "test"}, keep=5)
        other.lock.session = store.session_create(2, lock_delay=1)
        with pytest.raises(_store.LockNotHeld):
            kv.record_event(store, core.LOCK_KEY, other.lock.session, event_key + "x", {"kind": "test"}, keep=5)
        assert [e["kind"] for e in kv.read_events(store)] == ["test"]
        # a clean release lets the other take it at once
        mine.release()
        assert other.acquire(stop) and other.holds() and not mine.holds()
    finally:
        mine.release()
        other.release()


def test_idle_pass_reads_in_one_request_and_a_pass_that_acts_takes_the_index_first(
    consul, kv_prefix, work, cluster
) -> None:
    """A pass that finds nothing to run or record reads the state in one request (the watch
    woke it for a heartbeat); one that acts (here: records the problems of a bad declaration)
    reads again, the index first, and its event carries that index."""
    from cerana_cluster_tick import loop
    from cerana_cluster_tick.config import Settings

    store, _nodes = cluster
    declare(store, m.Bundle.from_dict({"id": "lost", "services": {"nope": {}}}))  # no such service
    conf = work / "idle.toml"
    conf.write_text(f'name = "idle"\nstate_dir = "{work / "idle-state"}"\nlock_delay = "1s"\n'
                    f'[consul]\naddress = "{consul.http_addr}"\nprefix = "{kv_prefix}"\n')  # fmt: skip
    settings = Settings.load({}, environ={}, path=conf)
    stop = threading.Event()
    tick = loop.ClusterTick(settings, _store.Store(settings.consul), stop=stop)
    calls: list[tuple[str, str, tuple]] = []
    real = tick.store._call

    def counting(method, path, params=None, *args, **kwargs):
        calls.append((method, path, tuple(params or ())))
        return real(method, path, params, *args, **kwargs)

    def index_reads() -> int:
        top = "/v1/kv/" + tick.store.prefix
        return sum(1 for verb, path, params in calls if verb == "get" and path == top and ("separator", "/") in params)

    def state_reads() -> int:
        return sum(1 for method, path, _ in calls if method == "put" and path == "/v1/txn")

    try:
        assert tick.leadership.acquire(stop, poll=0.2)
        tick.store._call = counting
        tick.step()  # the problem is new: recorded
        events = [e for e in kv.read_events(store) if e.get("kind") == "problems"]
        assert len(events) == 1 and "lost" in json.dumps(events[0]["problems"])
        assert index_reads() == 1 and events[0]["index"] > 0
        calls.clear()
        tick.step()  # the same problem, nothing to run: a look and nothing else
        assert index_reads() == 0 and state_reads() == 1, calls
        assert len([e for e in kv.read_events(store) if e.get("kind") == "problems"]) == 1
    finally:
        tick.store._call = real
        tick.leadership.release()

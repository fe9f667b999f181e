"""cerana-node-tick against a real Consul dev agent (session_ttl_min = 1s), run as a subprocess."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _instances, _store
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from cerana_cli.consul_agent import ConsulAgent, free_port

pytestmark = pytest.mark.integration

NODE = "0123456789abcdef0123456789abcdef"


def wait_for(predicate, timeout=10.0, step=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Daemon:
    """One cerana-node-tick process with its own machine id, data dir and run dir."""

    def __init__(self, tmp: Path, address: str, prefix: str, *extra: str, node_id: str = NODE) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.run_dir = tmp / "run"
        self.data_dir.mkdir(exist_ok=True)
        (tmp / "machine-id").write_text(node_id + "\n")
        self.log_path = tmp / f"node-tick-{time.monotonic_ns()}.log"
        self.args = [
            sys.executable, "-m", "cerana_nodetick",
            "--machine-id-file", str(tmp / "machine-id"), "--data-dir", str(self.data_dir),
            "--run-dir", str(self.run_dir), "--interval", "300ms", "--history-interval", "500ms",
            "--retry-initial", "200ms", "--retry-max", "1s", "--consul-timeout", "1s",
            "--labels", "consul_role=server", *extra,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CERANA_"))}
        self.env = dict(env, CONSUL_HTTP_ADDR=address, CERANA_KV_PREFIX=prefix)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def store(consul, kv_prefix):
    return _store.Store(_store.ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))


@pytest.fixture
def daemons(tmp_path):
    started = []

    def make(address, prefix, *extra, node_id=NODE):
        d = Daemon(tmp_path, address, prefix, *extra, node_id=node_id).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def set_config(store, **values):
    store.put(m.CLUSTER_CONFIG_KEY, m.ClusterConfig.from_dict(values).to_bytes())


def node_entry(store):
    return store.get(m.node_key(NODE))


class OkHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *a):
        pass


@pytest.fixture
def http_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OkHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_dataset_and_bundle_heartbeats(consul, kv_prefix, store, daemons, http_port, tmp_path):
    set_config(store, node_ttl=5, dataset_ttl=5, bundle_ttl=5)
    store.put("datasets/web-data/config", m.Dataset(id="web-data").to_bytes())
    service = m.Service.from_dict(
        {
            "id": "web",
            "dataset": "web-data",
            "cmd": ["web"],
            "health_checks": {
                "http": {"kind": "http", "args": {"port": http_port}, "interval": 1, "timeout": 1},
                "port": {"kind": "tcp", "args": {"port": closed_port()}, "interval": 1, "timeout": 1},
            },
        }
    )
    store.put("services/web/config", service.to_bytes())
    store.put("bundles/shop/config", m.Bundle.from_dict({"id": "shop", "services": {"web": {"id": "web"}}}).to_bytes())
    for ds in ("web-data", "spare"):
        (tmp_path / "data" / "datasets" / ds).mkdir(parents=True)
    started = m.format_time(m.utc_now())
    _instances.write_instance(
        os.fspath(tmp_path / "run"), _instances.Instance("shop", "web", os.getpid(), started, ("web-data",))
    )

    d = daemons(consul.http_addr, kv_prefix)
    entry = wait_for(lambda: node_entry(store), what="the node key")
    node = m.Node.from_json(entry.text)
    assert entry.session, "the node key must be bound to a session"
    assert node.id == NODE and node.hostname == socket.gethostname()
    assert node.labels == {"consul_role": "server"}
    st = os.statvfs(tmp_path / "data")
    assert node.disk_total == st.f_blocks * st.f_frsize  # the data dir's file system, not /
    assert node.memory_total > 0 and node.cpu_count >= 1
    assert store.session_info(entry.session)["TTL"] == "5s"

    web = wait_for(lambda: store.get(m.dataset_heartbeat_key("web-data", NODE)), what="dataset heartbeat")
    spare = wait_for(lambda: store.get(m.dataset_heartbeat_key("spare", NODE)), what="dataset heartbeat")
    assert m.DatasetHeartbeat.from_json(web.text).in_use is True
    assert m.DatasetHeartbeat.from_json(spare.text).in_use is False

    def checked():
        e = store.get(m.bundle_heartbeat_key("shop", NODE))
        hb = m.BundleHeartbeat.from_json(e.text) if e else None
        if hb and all(v != "not checked yet" for v in hb.services["web"]["health"].values()):
            return hb
        return None

    hb = wait_for(checked, what="health check results")
    assert hb.node == NODE
    assert hb.services["web"]["state"] == "running"
    assert hb.services["web"]["health"]["http"] is None
    assert "connection refused" in hb.services["web"]["health"]["port"]

    # a dataset that goes away loses its heartbeat; the instance record going away removes the bundle's
    (tmp_path / "data" / "datasets" / "spare").rmdir()
    _instances.remove_instance(os.fspath(tmp_path / "run"), "shop", "web")
    wait_for(lambda: store.get(m.dataset_heartbeat_key("spare", NODE)) is None, what="spare heartbeat removed")
    wait_for(lambda: store.get(m.bundle_heartbeat_key("shop", NODE)) is None, what="bundle heartbeat removed")
    web = store.get(m.dataset_heartbeat_key("web-data", NODE))
    assert m.DatasetHeartbeat.from_json(web.text).in_use is False
    assert d.proc.poll() is None
    assert "Traceback" not in d.log()


def test_ttl_change_rebinds_and_history_is_pruned(consul, kv_prefix, store, daemons, tmp_path):
    (tmp_path / "data" / "datasets" / "web-data").mkdir(parents=True)
    set_config(store, node_ttl=2, dataset_ttl=2, history_retention=2)
    d = daemons(consul.http_addr, kv_prefix)
    first = wait_for(lambda: node_entry(store), what="node key")
    assert store.session_info(first.session)["TTL"] == "2s"

    set_config(store, node_ttl=3, dataset_ttl=4, history_retention=2)
    missing = []

    def rebound():
        e = node_entry(store)
        if e is None:
            missing.append(time.monotonic())
            return None
        info = store.session_info(e.session) if e.session else None
        return info if info and info["TTL"] == "3s" else None

    wait_for(rebound, what="node key on a 3s session", step=0.02)
    assert not missing, "the node key must stay present while it is re-bound"
    assert store.session_info(first.session) is None, "the old session is destroyed"
    ds = wait_for(
        lambda: (
            (e := store.get(m.dataset_heartbeat_key("web-data", NODE)))
            and e.session
            and (i := store.session_info(e.session))
            and i["TTL"] == "4s"
        ),
        what="dataset heartbeat on a 4s session",
    )
    assert ds

    # history: one sample every 0.5 s, retention 2 s: old samples go, never more than the window holds
    time.sleep(3.0)
    keys = store.keys(m.HISTORY_PREFIX + NODE + "/")
    assert 3 <= len(keys) <= 7, keys
    now = m.utc_now()
    for key in keys:
        sample = m.Node.from_json(store.get(key).text)
        age = now - __import__("datetime").datetime.fromisoformat(sample.heartbeat.replace("Z", "+00:00"))
        assert age.total_seconds() < 2 + 0.5 + 0.5, (key, age)  # retention + one history interval + slack
    set_config(store, node_ttl=3, history_retention=0)
    wait_for(lambda: not store.keys(m.HISTORY_PREFIX + NODE + "/"), what="history pruned to nothing")
    assert d.proc.poll() is None


def test_sigterm_removes_the_node_at_once(consul, kv_prefix, store, daemons, tmp_path):
    (tmp_path / "data" / "datasets" / "web-data").mkdir(parents=True)
    set_config(store, node_ttl=30, dataset_ttl=30)
    d = daemons(consul.http_addr, kv_prefix)
    wait_for(lambda: node_entry(store) and store.get(m.dataset_heartbeat_key("web-data", NODE)), what="heartbeats")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert node_entry(store) is None
    assert store.get(m.dataset_heartbeat_key("web-data", NODE)) is None
    assert "SIGTERM received" in d.log()


def test_kill9_node_leaves_within_two_ttls(consul, kv_prefix, store, daemons):
    ttl = 1
    set_config(store, node_ttl=ttl)
    d = daemons(consul.http_addr, kv_prefix)
    wait_for(lambda: node_entry(store), what="node key")
    time.sleep(0.5)
    d.proc.kill()
    killed = time.monotonic()
    d.proc.wait()
    wait_for(lambda: node_entry(store) is None, timeout=10, step=0.02, what="node key reaped")
    gone = time.monotonic() - killed
    print(f"node key gone {gone:.2f} s after kill -9 with node_ttl={ttl}s")
    assert gone <= 2 * ttl + 0.5, f"gone after {gone:.2f} s"


def test_restart_after_a_crash_takes_the_keys_over(consul, kv_prefix, store, daemons):
    set_config(store, node_ttl=60)
    first = daemons(consul.http_addr, kv_prefix)
    old = wait_for(lambda: node_entry(store), what="node key").session
    first.proc.kill()
    first.proc.wait()
    second = daemons(consul.http_addr, kv_prefix)
    new = wait_for(lambda: (e := node_entry(store)) and e.session != old and e, what="key taken over", timeout=10)
    assert store.session_info(old) is None
    assert m.Node.from_json(new.text).id == NODE
    assert "taking over" in second.log()


def test_consul_outage_logs_once_and_heartbeats_again(daemons, tmp_path):
    port = free_port()
    agent = ConsulAgent(http_port=port).start()
    try:
        store = _store.Store(_store.ConnectionSettings(address=agent.http_addr, prefix="cerana"))
        set_config(store, node_ttl=1)
        d = daemons(agent.http_addr, "cerana")
        wait_for(lambda: node_entry(store), what="node key")
        agent.stop()
        wait_for(lambda: "Consul unreachable" in d.log(), timeout=10, what="the unreachable line")
        time.sleep(2.5)  # several failed ticks, backoff growing to its 1 s cap
        agent = ConsulAgent(http_port=port).start()  # a new, empty agent on the same address
        store = _store.Store(_store.ConnectionSettings(address=agent.http_addr, prefix="cerana"))
        entry = wait_for(lambda: node_entry(store), timeout=10, what="heartbeat after the outage")
        assert entry.session and store.session_info(entry.session)["TTL"] == "30s"  # the defaults: no cluster/config
        wait_for(lambda: "Consul is back" in d.log(), what="the back line")
        assert d.proc.poll() is None
        log = d.log()
        assert log.count("Consul unreachable") == 1, log
        assert log.count("Consul is back") == 1, log
        assert "Traceback" not in log
    finally:
        agent.stop()


def test_paused_consul_is_survived_too(daemons, tmp_path):
    """SIGSTOP: requests hang until the timeout instead of being refused."""
    agent = ConsulAgent().start()
    try:
        store = _store.Store(_store.ConnectionSettings(address=agent.http_addr, prefix="cerana"))
        set_config(store, node_ttl=2)
        d = daemons(agent.http_addr, "cerana")
        wait_for(lambda: node_entry(store), what="node key")
        os.kill(agent.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: "Consul unreachable" in d.log(), timeout=10, what="the unreachable line")
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        wait_for(lambda: "Consul is back" in d.log(), timeout=10, what="the back line")
        first = node_entry(store)
        wait_for(lambda: (e := node_entry(store)) and e.modify_index != first.modify_index, what="fresh heartbeat")
        assert d.log().count("Consul unreachable") == 1
        assert json.loads(node_entry(store).text)["id"] == NODE
    finally:
        agent.stop()

"""The cerana.platform modules and kv lookup, end to end.

Every test runs real ``ansible-playbook`` processes (playbooks in ``playbooks/``)
against a real Consul agent and checks what landed in KV by reading it back over
plain HTTP. The ``record_results`` callback (``playbooks/callback_plugins``)
writes each task result as a JSON line, so assertions look at the same result a
playbook would register. Each ansible-playbook start and each module run costs
about a second of CPU here, so every playbook batches several tasks, and most
split them into two lanes that run side by side (see ``lane_hosts``).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cerana_cli.consul_agent import http_request

pytestmark = pytest.mark.integration

PLAYBOOKS = Path(__file__).parent / "playbooks"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


# ---------------------------------------------------------------------------
# Running playbooks


@dataclass
class Run:
    """One finished ansible-playbook run and the task results it recorded."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    records: list[dict]
    record_text: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def record(self, task: str) -> dict:
        """The final result of ``task`` (from the one lane that ran it, in playbooks split into lanes)."""
        found = [r for r in self.records if r["task"] == task and r["status"] not in ("retry", "skipped")]
        ran = sorted({r["task"] for r in self.records})
        assert found, f"task {task!r} did not run (ran: {ran})\n{self.output}"
        return found[-1]

    def ok(self, task: str) -> dict:
        rec = self.record(task)
        assert rec["status"] == "ok", f"{task}: {rec['status']}: {rec['result']}"
        return rec["result"]

    def failed(self, task: str) -> dict:
        rec = self.record(task)
        assert rec["status"] == "failed", f"{task} should have failed: {rec['result']}"
        return rec["result"]

    def assert_clean(self) -> None:
        """No Python traceback anywhere: failures are messages, not crashes."""
        assert "Traceback" not in self.output, self.output
        for rec in self.records:
            res = rec["result"]
            assert "module_stderr" not in res, res
            assert "module_stdout" not in res, res
            # ansible-core 2.19 adds "exception": "(traceback unavailable)" to every
            # failed result; a real traceback would mean an unhandled exception.
            assert "Traceback" not in str(res.get("exception", "")), res


def lane_hosts(playbook: str) -> list[str]:
    """The inventory of a playbook split into lanes: the hosts named in its tasks' ``when:``.

    With ``strategy: free`` and a fork per host the lanes run side by side, which
    matters because a module run costs about a second of CPU (AnsiballZ start-up).
    Two lanes (one per CPU here): every task is also a skipped task on the other
    lanes, and each skip costs a fork too.
    """
    found = re.findall(r'inventory_hostname == "(\w+)"', (PLAYBOOKS / playbook).read_text())
    return list(dict.fromkeys(found))


def run_playbook(env: dict, tmp_path: Path, playbook: str, extravars: dict, *options: str, extra_env=None) -> Run:
    """Run one playbook to the end; a playbook split into lanes gets one host and one fork per lane."""
    record = tmp_path / f"{Path(playbook).stem}-{uuid.uuid4().hex[:8]}.jsonl"
    hosts = lane_hosts(playbook) or ["localhost"]
    full_env = dict(
        env,
        ANSIBLE_CALLBACK_PLUGINS=str(PLAYBOOKS / "callback_plugins"),
        ANSIBLE_CALLBACKS_ENABLED="record_results",
        CERANA_TEST_RECORD=str(record),
        **(extra_env or {}),
    )
    argv = [ANSIBLE_PLAYBOOK, "-i", ",".join(hosts) + ",", "-f", str(len(hosts)), str(PLAYBOOKS / playbook)]
    argv += ["-e", json.dumps(extravars), *options]
    proc = subprocess.run(argv, env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    text = record.read_text(encoding="utf-8") if record.exists() else ""
    records = [json.loads(line) for line in text.splitlines()]
    return Run(argv, proc.returncode, proc.stdout, proc.stderr, records, text)


# ---------------------------------------------------------------------------
# Plain-HTTP access to KV (independent of the collection's own client)


def _url(addr: str, key: str) -> str:
    return f"{addr}/v1/kv/{urllib.parse.quote(key, safe='/')}"


def kv_put(addr: str, key: str, value: str | bytes | dict, token: str | None = None) -> int:
    """Write a value (a dict is written as JSON); returns its modify index."""
    data = json.dumps(value).encode() if isinstance(value, dict) else value
    data = data.encode() if isinstance(data, str) else data
    status, body = http_request(_url(addr, key), method="PUT", data=data, token=token)
    assert (status, body.strip()) == (200, b"true"), (status, body)
    return kv_get(addr, key, token)[1]


def kv_get(addr: str, key: str, token: str | None = None) -> tuple[bytes, int] | None:
    """(value, modify index) of one key, or None."""
    status, body = http_request(_url(addr, key), token=token)
    if status == 404:
        return None
    assert status == 200, (status, body)
    raw = json.loads(body)[0]
    return base64.b64decode(raw["Value"] or ""), raw["ModifyIndex"]


def kv_tree(addr: str, prefix: str, token: str | None = None) -> dict[str, tuple[bytes, int]]:
    """Every key below ``prefix/``, relative to it: {key: (value, modify index)}."""
    status, body = http_request(_url(addr, prefix + "/") + "?recurse=true", token=token)
    if status == 404:
        return {}
    assert status == 200, (status, body)
    base = prefix + "/"
    return {
        raw["Key"][len(base) :]: (base64.b64decode(raw["Value"] or ""), raw["ModifyIndex"]) for raw in json.loads(body)
    }


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# 1. The four-run matrix of every stateful module

# task name (= module name) -> (key it writes, result key holding the object)
MATRIX = {
    "kv": ("notes/motd", "value"),
    "dataset": ("datasets/web-root/config", "dataset"),
    "service": ("services/web/config", "service"),
    "bundle": ("bundles/shop/config", "bundle"),
    "cluster_config": ("cluster/config", "cluster_config"),
    "dhcp_config": ("dhcp/config", "dhcp_config"),
}
MOTD = "rack 3 is being recabled\nback on Monday"


def test_four_run_matrix(consul, ansible_env, kv_prefix, tmp_path):
    def play(*options):
        run = run_playbook(ansible_env, tmp_path, "matrix.yml", {"kv_prefix": kv_prefix}, *options)
        assert run.rc == 0, run.output
        run.assert_clean()
        return run, {task: run.ok(task) for task in MATRIX}

    # Run 1: check mode + diff predicts every change and writes nothing.
    run1, check1 = play("--check", "--diff")
    assert kv_tree(consul.http_addr, kv_prefix) == {}
    for task, (_key, field) in MATRIX.items():
        res = check1[task]
        assert res["changed"] is True, task
        assert res["mod_index"] is None, task
        if task == "kv":
            assert res["value"] == MOTD
            assert res["diff"]["before"] == "" and res["diff"]["after"] == MOTD + "\n"
        else:
            assert res["diff"]["before"] == {}, task
            assert res["diff"]["after"] == res[field], task
    assert "--- before: dataset (stored)" in run1.stdout  # the diff is shown, too

    # Run 2: the real change equals the prediction, with the exact index of the write.
    _, apply1 = play("--diff")
    stored = kv_tree(consul.http_addr, kv_prefix)
    assert set(stored) == {key for key, _ in MATRIX.values()}
    for task, (key, field) in MATRIX.items():
        res = apply1[task]
        assert res["changed"] is True, task
        assert res[field] == check1[task][field], task
        assert res["diff"] == check1[task]["diff"], task
        value, index = stored[key]
        assert res["mod_index"] == index, task
        if task == "kv":
            assert value.decode() == MOTD
        else:
            assert json.loads(value) == res[field], task

    # What was written is the normalised object.
    assert apply1["service"]["service"]["env"] == {"LANG": "C.UTF-8", "WORKERS": "4"}
    assert apply1["service"]["service"]["health_checks"]["http"]["interval"] == 30
    bundle = apply1["bundle"]["bundle"]
    assert bundle["services"]["web"]["datasets"]["data"]["mount_point"] == "/srv/data"
    assert bundle["ports"]["8080"]["connected_bundles"] == ["cache", "db"]
    assert bundle["services"]["web"]["health_checks"]["ready"]["interval"] == 60
    assert apply1["cluster_config"]["cluster_config"] == {
        "node_ttl": 45,
        "dataset_ttl": 60,
        "bundle_ttl": 120,
        "service_network": "10.250.0.0/16",
        "history_retention": 86400,
    }
    assert apply1["dhcp_config"]["dhcp_config"]["reservations"] == {"52:54:00:aa:bb:01": "10.77.0.31"}
    assert apply1["dhcp_config"]["dhcp_config"]["lease_duration"] == 3600

    # Runs 3 and 4: check mode, then a real run: nothing to do, nothing written.
    for options in (("--check", "--diff"), ("--diff",)):
        _, again = play(*options)
        for task in MATRIX:
            assert again[task]["changed"] is False, (options, task)
            assert again[task]["mod_index"] == apply1[task]["mod_index"], (options, task)
        assert kv_tree(consul.http_addr, kv_prefix) == stored


# ---------------------------------------------------------------------------
# 2. state=absent


def test_absent_deletes_whole_subtree(consul, ansible_env, kv_prefix, tmp_path):
    addr = consul.http_addr
    for key, value in {
        "datasets/web/config": {"id": "web", "redundancy": 2},
        "datasets/web/extra": "x",
        "datasets/web/deep/er": "y",
        "datasets/webx/config": {"id": "webx"},
        "bundles/shop/config": {"id": "shop"},
        "bundles/shop/status": "running",
        "notes": "top",
        "notes/a": "1",
        "notes/b/c": "2",
        "notesx": "keep",
    }.items():
        kv_put(addr, f"{kv_prefix}/{key}", value)

    run = run_playbook(ansible_env, tmp_path, "absent.yml", {"kv_prefix": kv_prefix})
    assert run.rc == 0, run.output
    run.assert_clean()

    checked = run.ok("check absent webx")
    assert checked["changed"] is True
    assert checked["diff"]["before"]["id"] == "webx" and checked["diff"]["after"] == {}
    removed = run.ok("absent web")
    assert removed["changed"] is True and removed["dataset"] is None and removed["mod_index"] is None
    assert removed["diff"]["before"] == {
        "id": "web",
        "parent": None,
        "parent_same_node": False,
        "read_only": False,
        "redundancy": 2,
        "quota": None,
        "nfs": False,
    }
    assert run.ok("absent web again")["changed"] is False  # a missing object is ok
    assert run.ok("absent bundle shop")["changed"] is True
    notes = run.ok("kv absent recurse")
    assert notes["changed"] is True
    assert notes["deleted"] == ["notes", "notes/a", "notes/b/c"]
    assert notes["diff"]["before"] == "notes\nnotes/a\nnotes/b/c\n"
    assert run.ok("kv absent missing")["changed"] is False

    # The whole subtrees are gone; the siblings sharing a name prefix are not,
    # and the check-mode removal of webx removed nothing.
    assert sorted(kv_tree(addr, kv_prefix)) == ["datasets/webx/config", "notesx"]


# ---------------------------------------------------------------------------
# 3. Explicit compare-and-swap


def test_explicit_cas(consul, ansible_env, kv_prefix, tmp_path):
    addr = consul.http_addr
    ds_index = kv_put(addr, f"{kv_prefix}/datasets/web/config", {"id": "web"})
    kv_index = kv_put(addr, f"{kv_prefix}/counter", "1")
    stale_ds, stale_kv = ds_index - 1, kv_index - 1
    run = run_playbook(
        ansible_env, tmp_path, "cas.yml", {"kv_prefix": kv_prefix, "ds_index": ds_index, "kv_index": kv_index}
    )
    assert run.rc == 0, run.output
    run.assert_clean()

    ds_key = "'datasets/web/config'"
    expect = {
        "dataset stale index": (ds_key, stale_ds, ds_index),
        "dataset index 0 on existing": (ds_key, 0, ds_index),
        "dataset absent stale index": (ds_key, stale_ds, ds_index),
        "kv stale cas": ("'counter'", stale_kv, kv_index),
        "kv cas 0 on existing": ("'counter'", 0, kv_index),
        "kv absent stale cas": ("'counter'", stale_kv, kv_index),
    }
    for task, (key, expected, current) in expect.items():
        res = run.failed(task)
        wanted = "expected it to be absent (index 0)" if expected == 0 else f"expected modify index {expected}"
        msg = f"compare-and-swap on {key} failed: {wanted}, but its modify index is now {current}"
        assert res["msg"] == msg, task
        assert (res["expected_index"], res["current_index"]) == (expected, current), task

    # The failed tasks wrote nothing: a CAS on the original indexes still succeeds.
    updated = run.ok("dataset current index")
    assert updated["changed"] is True and updated["dataset"]["redundancy"] == 3
    assert run.ok("kv current cas")["changed"] is True
    created = run.ok("dataset index 0 creates")
    assert created["changed"] is True

    value, index = kv_get(addr, f"{kv_prefix}/datasets/web/config")
    assert json.loads(value)["redundancy"] == 3 and index == updated["mod_index"]
    assert kv_get(addr, f"{kv_prefix}/counter")[0] == b"2"
    assert kv_get(addr, f"{kv_prefix}/datasets/fresh/config")[1] == created["mod_index"]


# ---------------------------------------------------------------------------
# 4 and 5. Bad input and an unreachable Consul


def test_bad_input_and_unreachable_fail_cleanly(consul, ansible_env, kv_prefix, tmp_path, closed_port):
    run = run_playbook(ansible_env, tmp_path, "bad_input.yml", {"kv_prefix": kv_prefix, "closed_port": closed_port})
    assert run.rc == 0, run.output
    run.assert_clean()

    messages = {
        "bundle external port out of range": "bundle.ports.80.external_port: must be 1-65535, got 70000",
        "bundle mount of an unknown dataset": 'bundle.services.web.datasets.data: no bundle dataset named "data"',
        "dhcp net with host bits": "dhcp_config.net: has host bits set; did you mean 10.77.0.0/24?",
        "service check timeout over interval": (
            "service.health_checks.http.timeout: must not exceed the interval (10s), got 20"
        ),
    }
    for task, msg in messages.items():
        res = run.failed(task)
        assert res["msg"] == msg, task
        assert res["field"] == msg.split(":", 1)[0], task
    assert run.failed("dataset id not a label")["msg"] == (
        "dataset.id: must be a lowercase DNS label (a-z, 0-9 and '-', 1-63 characters, "
        "no leading or trailing '-'), got \"Web_Root\""
    )

    unreachable = run.failed("consul unreachable")["msg"]
    assert unreachable.startswith(f"cannot reach Consul at http://127.0.0.1:{closed_port}: "), unreachable
    assert "connection refused" in unreachable

    assert kv_tree(consul.http_addr, kv_prefix) == {}  # nothing was written


# ---------------------------------------------------------------------------
# 6. ACL tokens


def test_acl_tokens(consul_acl, ansible_env, kv_prefix, tmp_path):
    addr, token = consul_acl.http_addr, consul_acl.token
    env = dict(ansible_env, CONSUL_HTTP_ADDR=addr)
    try:
        explicit = run_playbook(env, tmp_path, "acl_explicit.yml", {"kv_prefix": kv_prefix, "acl_token": token}, "-vvv")
        assert explicit.rc == 0, explicit.output
        explicit.assert_clean()
        assert explicit.ok("dataset with token")["changed"] is True
        for task in ("dataset without token", "kv without token"):
            msg = explicit.failed(task)["msg"]
            assert msg.startswith("Consul refused "), msg
            assert msg.endswith(": permission denied (no ACL token was given)"), msg
        assert sorted(kv_tree(addr, kv_prefix, token)) == ["datasets/secure/config"]  # nothing else written

        from_env = run_playbook(
            env, tmp_path, "acl_env.yml", {"kv_prefix": kv_prefix}, "-vvv", extra_env={"CONSUL_HTTP_TOKEN": token}
        )
        assert from_env.rc == 0, from_env.output
        from_env.assert_clean()
        assert from_env.ok("kv token from env")["changed"] is True
        assert [d["id"] for d in from_env.ok("dataset_info token from env")["datasets"]] == ["secure"]
        assert from_env.ok("lookup token from env")["ansible_facts"]["looked_up"]["redundancy"] == 2
        assert kv_get(addr, f"{kv_prefix}/from-env", token)[0] == b"ok"

        for run in (explicit, from_env):
            assert "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in run.output  # -vvv shows the (masked) arguments
            assert token not in run.output
            assert token not in run.record_text
    finally:
        http_request(_url(addr, kv_prefix) + "?recurse=true", method="DELETE", token=token)


# ---------------------------------------------------------------------------
# 7. bundle_info overlay

WEB_CHECK_UP = {"id": "up", "kind": "uptime", "args": {"min_uptime": 30}, "interval": 60, "timeout": 5}


def http_check(port, path="/"):
    args = {"port": port, "path": path, "scheme": "http", "host": "127.0.0.1", "expect_status": 200, "body_regex": None}
    return {"id": "http", "kind": "http", "args": args, "interval": 10, "timeout": 5}


def test_bundle_info_overlay(consul, ansible_env, kv_prefix, tmp_path):
    run = run_playbook(ansible_env, tmp_path, "overlay.yml", {"kv_prefix": kv_prefix})
    assert run.rc == 0, run.output
    run.assert_clean()

    [shop] = run.ok("bundle_info shop overlay")["bundles"]
    assert shop["services"]["web"] == {
        "id": "web",
        "dataset": "web-root",  # inherited
        "cmd": ["/bin/busybox", "httpd", "-f", "-p", "9090"],  # the bundle's
        "env": {"LANG": "C.UTF-8", "MODE": "production", "SHOP": "1"},  # merged by key
        "limits": {"cpu": 0.5, "memory": 268435456, "processes": 64},  # bundle's where set
        "health_checks": {"http": http_check(9090), "up": WEB_CHECK_UP},
        "datasets": {"data": {"name": "data", "mount_point": "/srv/data", "read_only": False}},
        "kind": "container",
    }
    assert shop["datasets"] == {
        "data": {
            "id": "shop-data",
            "name": "data",
            "type": "rw",
            "quota": 2147483648,  # the bundle's quota wins
            "parent": None,
            "parent_same_node": False,
            "read_only": False,
            "redundancy": 1,
            "nfs": False,
        },
        "tmp": {"name": "tmp", "id": None, "type": "temp", "quota": None},
    }
    assert shop["ports"] == {"9090": {"port": 9090, "public": True, "external_port": 80, "connected_bundles": []}}
    assert shop["redundancy"] == 2 and shop["instances"] == []
    stored = kv_get(consul.http_addr, f"{kv_prefix}/bundles/shop/config")
    assert shop["mod_index"] == stored[1]
    # The overlay is a view: the stored bundle keeps only its own overrides.
    assert json.loads(stored[0])["services"]["web"]["env"] == {"MODE": "production", "SHOP": "1"}

    # A bundle may be declared before its services, but its overlay names what is missing.
    assert run.ok("bundle orphan")["changed"] is True
    assert run.failed("bundle_info orphan overlay")["msg"] == 'bundle.services.ghost: service "ghost" is not declared'


# ---------------------------------------------------------------------------
# 8. The info modules over hand-written objects, nodes and heartbeats

T = "2026-11-30T03:04:05Z"
T_NORMAL = "2026-11-30T03:04:05.000000Z"


def node(node_id, hostname, address):
    return {
        "id": node_id,
        "hostname": hostname,
        "heartbeat": T,
        "addresses": [address],
        "cpu_count": 2,
        "load": [0.1, 0.2, 0.3],
        "memory_total": 4 << 30,
        "memory_free": 2 << 30,
        "disk_total": 100 << 30,
        "disk_free": 50 << 30,
        "labels": {"rack": "3"},
    }


def test_info_modules(consul, ansible_env, kv_prefix, tmp_path):
    addr = consul.http_addr
    web = {"id": "web", "dataset": "web-root", "cmd": ["/bin/true"], "env": {"A": "1"}}
    seeds = {
        "datasets/web-root/config": {"id": "web-root", "redundancy": 2, "read_only": True},
        "datasets/shop-data/config": {"id": "shop-data", "redundancy": 2},
        "datasets/shop-data/status": "not a config key: ignored",
        "services/web/config": web,
        "services/db/config": {"id": "db", "dataset": "shop-data", "cmd": ["/bin/db"]},
        "bundles/shop/config": {"id": "shop", "services": {"web": {}}},
        "nodes/node-a": node("node-a", "alpha", "10.77.0.11"),
        "nodes/node-b": node("node-b", "beta", "10.77.0.12"),
        "nodes/node-bad": "{not json",
        "heartbeats/datasets/web-root/node-a": {"dataset": "web-root", "node": "node-a", "in_use": True, "time": T},
        "heartbeats/datasets/web-root/node-b": {"dataset": "web-root", "node": "node-b", "in_use": False, "time": T},
        "heartbeats/datasets/shop-data/node-b": {"dataset": "shop-data", "node": "node-b", "in_use": True, "time": T},
        "heartbeats/bundles/shop/node-a": {
            "bundle": "shop",
            "node": "node-a",
            "time": T,
            "services": {"web": {"state": "running", "health": {"http": "connection refused"}}},
        },
        "heartbeats/bundles/shop/node-b": {
            "bundle": "shop",
            "node": "node-b",
            "time": T,
            "services": {"web": {"state": "running", "health": {"http": None}}},
        },
    }
    index = {key: kv_put(addr, f"{kv_prefix}/{key}", value) for key, value in seeds.items()}

    run = run_playbook(ansible_env, tmp_path, "info.yml", {"kv_prefix": kv_prefix})
    assert run.rc == 0, run.output
    run.assert_clean()
    assert all(rec["result"]["changed"] is False for rec in run.records)

    [shop] = run.ok("bundle_info all")["bundles"]
    assert shop["id"] == "shop" and shop["mod_index"] == index["bundles/shop/config"]
    assert [(i["node"], i["healthy"], i["time"]) for i in shop["instances"]] == [
        ("node-a", False, T_NORMAL),
        ("node-b", True, T_NORMAL),
    ]

    datasets = {d["id"]: d for d in run.ok("dataset_info all")["datasets"]}
    assert list(datasets) == ["shop-data", "web-root"]  # sorted by id
    assert datasets["web-root"]["nodes"] == ["node-a", "node-b"]
    assert datasets["web-root"]["in_use_on"] == ["node-a"]
    assert datasets["web-root"]["redundancy_met"] is True
    assert datasets["shop-data"]["nodes"] == ["node-b"]
    assert datasets["shop-data"]["redundancy_met"] is False
    assert datasets["web-root"]["mod_index"] == index["datasets/web-root/config"]
    assert run.ok("dataset_info web-root")["datasets"] == [datasets["web-root"]]

    [svc] = run.ok("service_info web")["services"]
    assert svc["id"] == "web" and svc["cmd"] == ["/bin/true"] and svc["env"] == {"A": "1"}
    assert svc["kind"] == "container" and svc["mod_index"] == index["services/web/config"]
    assert run.ok("service_info missing")["services"] == []

    nodes = run.ok("node_info all")["nodes"]
    assert [n["id"] for n in nodes] == ["node-a", "node-b"]  # node-bad does not decode: skipped
    node_a, node_b = nodes
    assert node_a["hostname"] == "alpha" and node_a["heartbeat"] == T_NORMAL
    assert node_a["addresses"] == ["10.77.0.11"] and node_a["labels"] == {"rack": "3"}
    assert (node_a["datasets"], node_a["bundles"]) == (["web-root"], ["shop"])
    assert (node_b["datasets"], node_b["bundles"]) == (["shop-data", "web-root"], ["shop"])
    assert run.ok("node_info node-b")["nodes"] == [node_b]


# ---------------------------------------------------------------------------
# 9. The kv lookup


def test_kv_lookup(consul, ansible_env, kv_prefix, tmp_path, closed_port):
    for key, value in {"greeting": "hello", "cfg/a": "1", "cfg/b/c": "2", "cfgx": "not below cfg/"}.items():
        kv_put(consul.http_addr, f"{kv_prefix}/{key}", value)
    run = run_playbook(ansible_env, tmp_path, "lookup.yml", {"kv_prefix": kv_prefix, "closed_port": closed_port})
    assert run.rc == 0, run.output
    run.assert_clean()

    facts = run.ok("values")["ansible_facts"]
    assert facts == {"values": ["hello", "1"], "one": "hello", "as_query": ["1"]}
    assert run.ok("default")["ansible_facts"] == {"fallback": "fallback", "fallback_none": None}
    missing = run.failed("missing without default")["msg"]
    assert f"key 'missing' not found in Consul (under prefix '{kv_prefix}/')" in missing, missing
    tree = run.ok("recurse")["ansible_facts"]
    assert tree["tree"] == {"cfg/a": "1", "cfg/b/c": "2"}
    assert tree["tree_slash"] == tree["tree"]
    assert tree["tree_empty"] == {}
    unreachable = run.failed("unreachable")["msg"]
    assert f"cannot reach Consul at http://127.0.0.1:{closed_port}: connection refused" in unreachable, unreachable


# ---------------------------------------------------------------------------
# 10. Concurrent writers

WRITERS = 4
BUNDLES_PER_WRITER = 2
INCREMENTS_PER_WRITER = 1


def test_parallel_writers(consul, ansible_env, kv_prefix, tmp_path):
    addr = consul.http_addr
    kv_put(addr, f"{kv_prefix}/counter", "0")
    counter_url = _url(addr, f"{kv_prefix}/counter") + "?consistent"

    def writer(n):
        bundles = [f"w{n}-b{i}" for i in range(BUNDLES_PER_WRITER)]
        extravars = {
            "kv_prefix": kv_prefix,
            "bundles": bundles,
            "increments": INCREMENTS_PER_WRITER,
            "counter_url": counter_url,
        }
        return run_playbook(ansible_env, tmp_path, "parallel.yml", extravars)

    with ThreadPoolExecutor(WRITERS) as pool:
        runs = list(pool.map(writer, range(WRITERS)))

    lost = 0
    for run in runs:
        assert run.rc == 0, run.output
        writes = [r for r in run.records if r["task"] == "Write counter + 1" and r["status"] != "skipped"]
        landed = [r for r in writes if r["status"] == "ok" and r["result"]["changed"]]
        assert len(landed) == INCREMENTS_PER_WRITER, run.output
        lost += len(writes) - len(landed)
        for rec in writes:
            if rec["status"] == "failed":  # a lost race is a clean CAS failure
                assert rec["result"]["msg"].startswith("compare-and-swap on 'counter' failed"), rec
        assert "Traceback" not in run.output

    print(f"parallel writers: {lost} write attempts lost a race")
    tree = kv_tree(addr, kv_prefix)
    declared = sorted(key.split("/")[1] for key in tree if key.startswith("bundles/"))
    assert declared == sorted(f"w{n}-b{i}" for n in range(WRITERS) for i in range(BUNDLES_PER_WRITER))
    assert tree["counter"][0] == str(WRITERS * INCREMENTS_PER_WRITER).encode(), f"{lost} attempts lost a race"

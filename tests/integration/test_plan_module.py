"""cerana.platform.plan through real ansible-playbook, and ``cerana plan``, against real Consul agents.

The cluster is written as plain keys (what the modules and node ticks would write): a
dataset, a service, a valid bundle with redundancy 2 and one naming a service that is not
declared, three live nodes, a dataset copy, and a bundle that is no longer declared but
still applied and heartbeating on one node. The module's plan must equal the planner's
on the same state read in-process, and nothing in Consul may change.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _clusterstate as cs
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _planner as P
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from ansible_collections.cerana.platform.plugins.module_utils._store import ConnectionSettings, PermissionDenied, Store
from cerana_cli.consul_agent import http_request

pytestmark = pytest.mark.integration

PLAYBOOKS = Path(__file__).parent / "playbooks"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


def iso(epoch: float) -> str:
    return m.format_time(datetime.datetime.fromtimestamp(epoch, datetime.UTC))


def put(addr: str, key: str, value: bytes) -> None:
    status, body = http_request(f"{addr}/v1/kv/{urllib.parse.quote(key)}", method="PUT", data=value)
    assert (status, body.strip()) == (200, b"true"), (status, body)


def tree(addr: str, prefix: str) -> dict[str, tuple[bytes, int]]:
    status, body = http_request(f"{addr}/v1/kv/{urllib.parse.quote(prefix)}/?recurse=true")
    assert status == 200, (status, body)
    return {r["Key"]: (base64.b64decode(r["Value"] or ""), r["ModifyIndex"]) for r in json.loads(body)}


def write_cluster(addr: str, prefix: str) -> None:
    now = time.time()
    objs = {
        "datasets/root/config": m.Dataset(id="root", read_only=True, redundancy=2),
        "services/web/config": m.Service.from_dict({"id": "web", "dataset": "root", "cmd": ["/bin/httpd"]}),
        "bundles/shop/config": m.Bundle.from_dict({"id": "shop", "redundancy": 2, "services": {"web": {}}}),
        "bundles/bad/config": m.Bundle.from_dict({"id": "bad", "services": {"nope": {}}}),
        "heartbeats/datasets/root/node-a": m.DatasetHeartbeat("root", "node-a", False, iso(now)),
        "heartbeats/bundles/old/node-b": m.BundleHeartbeat(
            "old", "node-b", iso(now), {"web": {"state": "running", "health": {}}}
        ),
    }
    for n in ("a", "b", "c"):
        objs[f"nodes/node-{n}"] = m.Node(
            id=f"node-{n}", hostname=f"host-{n}", heartbeat=iso(now), memory_total=1 << 33, memory_free=1 << 33
        )
    for key, obj in objs.items():
        put(addr, f"{prefix}/{key}", obj.to_bytes())
    put(addr, f"{prefix}/cluster/applied/node-b", cs.encode_applied({"old": P.Applied("sha256:x", now - 100)}))
    put(addr, f"{prefix}/history/nodes/node-a/2026-01-01T00:00:00.000000Z", b"{}")  # not read


def run_playbook(env: dict, tmp_path: Path, playbook: str, extravars: dict) -> tuple[subprocess.CompletedProcess, dict]:
    record = tmp_path / f"record-{uuid.uuid4().hex[:8]}.jsonl"
    full_env = dict(
        env,
        ANSIBLE_CALLBACK_PLUGINS=str(PLAYBOOKS / "callback_plugins"),
        ANSIBLE_CALLBACKS_ENABLED="record_results",
        CERANA_TEST_RECORD=str(record),
    )
    argv = [ANSIBLE_PLAYBOOK, "-i", "lane1,lane2,", "-f", "2", str(PLAYBOOKS / playbook), "-e", json.dumps(extravars)]
    proc = subprocess.run(argv, env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    results = {}
    for line in record.read_text().splitlines() if record.exists() else []:
        rec = json.loads(line)
        if rec["status"] != "skipped":
            results[rec["task"]] = rec
    return proc, results


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plan_module(consul, kv_prefix, ansible_env, tmp_path, closed_port):
    write_cluster(consul.http_addr, kv_prefix)
    before = tree(consul.http_addr, kv_prefix)

    proc, res = run_playbook(ansible_env, tmp_path, "plan.yml", {"kv_prefix": kv_prefix, "closed_port": closed_port})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    for rec in res.values():
        assert "module_stderr" not in rec["result"], rec

    # Read-only: nothing written, nothing changed.
    assert tree(consul.http_addr, kv_prefix) == before

    full = res["plan all"]
    assert full["status"] == "ok"
    r = full["result"]
    assert r["changed"] is False
    plan = r["plan"]
    shop = plan["placements"]["shop"]
    assert len(shop) == 2 and set(shop) <= {"node-a", "node-b", "node-c"}
    assert r["problems"] == [
        {"object": "bundle/bad", "field": "services.nope", "reason": 'service "nope" is not declared'}
    ]
    assert plan["nodes"]["node-b"]["changes"]["stop_bundles"] == ["old"]
    assert len(plan["dataset_nodes"]["root"]) >= 2 and "node-a" in plan["dataset_nodes"]["root"]
    assert r["pending"] is True
    assert r["changed_nodes"] == plan["changed_nodes"] and "node-b" in r["changed_nodes"]
    assert "  - bundle  old  (no longer declared)" in r["text"]
    assert '! bundle/bad services.nope: service "nope" is not declared' in r["text"]
    assert r["text"].rstrip().splitlines()[-1].startswith("Plan: 2 bundles to start, 0 to update, 1 to stop")
    assert r["index"] == plan["index"] > 0

    # The same as the planner on the same state, read in-process.
    store = Store(ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    state = cs.read_state(Objects(store), time.time())
    assert state.index == r["index"]
    assert P.plan(state).to_dict() == plan

    # Check mode works and reports the same placements.
    check = res["plan check mode"]
    assert check["status"] == "ok" and check["result"]["changed"] is False
    assert check["result"]["plan"]["placements"] == plan["placements"]

    # One node, by hostname.
    one = res["plan one node by hostname"]["result"]
    assert list(one["plan"]["nodes"]) == ["node-b"]
    assert one["changed_nodes"] == ["node-b"]
    assert all("node-b" in ns for ns in one["plan"]["placements"].values())
    assert one["problems"] == r["problems"]

    bad = res["plan unknown node"]
    assert bad["status"] == "failed"
    assert bad["result"]["msg"] == (
        "node: 'nowhere' is not a live node (live nodes: node-a (host-a), node-b (host-b), node-c (host-c))"
    )
    assert res["plan bad max_unavailable"]["result"]["msg"] == "max_unavailable: must be >= 1, got 0"
    down = res["plan unreachable consul"]
    assert down["status"] == "failed"
    assert down["result"]["msg"] == f"cannot reach Consul at http://127.0.0.1:{closed_port}: connection refused"


# ---------------------------------------------------------------------------
# cerana plan


def cerana_plan(addr: str, prefix: str, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CERANA_"))}
    env.update(CONSUL_HTTP_ADDR=addr, CERANA_KV_PREFIX=prefix)
    if token:
        env["CONSUL_HTTP_TOKEN"] = token
    argv = [sys.executable, "-m", "cerana_cli", "plan", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_cerana_plan_exit_codes_text_and_json(consul, kv_prefix, closed_port):
    empty = cerana_plan(consul.http_addr, kv_prefix)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.startswith("No changes: the cluster matches the declared state (0 live nodes")

    write_cluster(consul.http_addr, kv_prefix)
    text = cerana_plan(consul.http_addr, kv_prefix)
    assert text.returncode == 2, text.stderr
    assert text.stderr == ""
    assert "  - bundle  old  (no longer declared)" in text.stdout
    assert text.stdout.rstrip().splitlines()[-1].startswith("Plan: 2 bundles to start, 0 to update, 1 to stop")

    as_json = cerana_plan(consul.http_addr, kv_prefix, "--json")
    assert as_json.returncode == 2
    plan = json.loads(as_json.stdout)
    store = Store(ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    assert plan == P.plan(cs.read_state(Objects(store), time.time())).to_dict()

    one = json.loads(cerana_plan(consul.http_addr, kv_prefix, "--json", "--node", "host-c").stdout)
    assert list(one["nodes"]) == ["node-c"]

    # flags override the environment
    other = cerana_plan("http://127.0.0.1:%d" % closed_port, "elsewhere", "--consul-address", consul.http_addr,
                        "--kv-prefix", kv_prefix, "--json")  # fmt: skip
    assert other.returncode == 2 and json.loads(other.stdout)["placements"] == plan["placements"]

    missing = cerana_plan(consul.http_addr, kv_prefix, "--node", "nowhere")
    assert missing.returncode == 1
    assert missing.stderr.startswith("cerana plan: --node nowhere is not a live node (live nodes: node-a (host-a)")

    bad = cerana_plan(consul.http_addr, kv_prefix, "--max-unavailable", "0")
    assert bad.returncode == 2 and "must be >= 1, got 0" in bad.stderr  # argparse usage error


def test_cerana_plan_errors_are_one_line(consul_acl, closed_port):
    down = cerana_plan("http://127.0.0.1:%d" % closed_port, "cerana")
    assert down.returncode == 1
    assert down.stdout == ""
    assert down.stderr == "cerana plan: cannot reach Consul at http://127.0.0.1:%d: connection refused\n" % closed_port

    denied = cerana_plan(consul_acl.http_addr, "cerana")
    assert denied.returncode == 1
    assert "Traceback" not in denied.stderr
    assert denied.stderr.startswith("cerana plan: Consul refused")
    assert "permission denied (no ACL token was given)" in denied.stderr
    assert len(denied.stderr.splitlines()) == 1

    allowed = cerana_plan(consul_acl.http_addr, "cerana", token=consul_acl.token)
    assert allowed.returncode == 0, allowed.stderr


def acl_token(addr: str, master: str, rules: str) -> str:
    name = "plan-" + uuid.uuid4().hex[:8]
    body = json.dumps({"Name": name, "Rules": rules}).encode()
    status, out = http_request(f"{addr}/v1/acl/policy", method="PUT", data=body, token=master)
    assert status == 200, out
    body = json.dumps({"Policies": [{"Name": name}]}).encode()
    status, out = http_request(f"{addr}/v1/acl/token", method="PUT", data=body, token=master)
    assert status == 200, out
    return json.loads(out)["SecretID"]


def test_a_tree_hidden_by_an_acl_is_an_error_not_an_empty_cluster(consul_acl):
    """ACLs filter transaction reads silently: bundles the token may not see must not look deleted."""
    prefix = "acl-" + uuid.uuid4().hex[:8]
    for key, value in {"bundles/shop/config": b"{}", "nodes/node-a": b"{}"}.items():
        status, out = http_request(
            f"{consul_acl.http_addr}/v1/kv/{prefix}/{key}", method="PUT", data=value, token=consul_acl.token
        )
        assert status == 200, out
    token = acl_token(
        consul_acl.http_addr,
        consul_acl.token,
        f'key_prefix "{prefix}/" {{ policy = "read" }}\nkey_prefix "{prefix}/bundles/" {{ policy = "deny" }}',
    )
    store = Store(ConnectionSettings(address=consul_acl.http_addr, prefix=prefix, token=token))
    with pytest.raises(PermissionDenied, match="permission denied"):
        cs.read_state(Objects(store), time.time())
    hidden = cerana_plan(consul_acl.http_addr, prefix, token=token)
    assert hidden.returncode == 1 and "permission denied" in hidden.stderr, hidden
    # with read access to everything, the same store reads (the values are invalid, and reported)
    full = acl_token(consul_acl.http_addr, consul_acl.token, f'key_prefix "{prefix}/" {{ policy = "read" }}')
    state = cs.read_state(
        Objects(Store(ConnectionSettings(address=consul_acl.http_addr, prefix=prefix, token=full))), 0
    )
    assert set(state.invalid) == {"bundle/shop"}

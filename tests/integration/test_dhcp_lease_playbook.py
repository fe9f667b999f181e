"""cerana.platform.dhcp_lease through a real ansible-playbook run against Consul."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest

from cerana_cli.consul_agent import http_request

pytestmark = pytest.mark.integration

PLAYBOOKS = Path(__file__).parent / "playbooks"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


def play(env, tmp_path, playbook, extravars):
    record = tmp_path / f"record-{uuid.uuid4().hex[:8]}.jsonl"
    full_env = dict(env, ANSIBLE_CALLBACK_PLUGINS=str(PLAYBOOKS / "callback_plugins"),
                    ANSIBLE_CALLBACKS_ENABLED="record_results", CERANA_TEST_RECORD=str(record))  # fmt: skip
    argv = [ANSIBLE_PLAYBOOK, "-i", "localhost,", str(PLAYBOOKS / playbook), "-e", json.dumps(extravars)]
    proc = subprocess.run(argv, env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    records = {}
    for line in record.read_text().splitlines() if record.exists() else []:
        rec = json.loads(line)
        records[rec["task"]] = rec
    return proc, records


def test_dhcp_lease_module(consul, ansible_env, kv_prefix, tmp_path):
    try:
        proc, r = play(ansible_env, tmp_path, "dhcp_lease.yml", {"kv_prefix": kv_prefix})
    finally:
        http_request(f"{consul.http_addr}/v1/kv/{urllib.parse.quote(kv_prefix)}-small?recurse=true", method="DELETE")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out

    def ok(task):
        assert r[task]["status"] == "ok", (task, r[task])
        return r[task]["result"]

    def failed(task):
        assert r[task]["status"] == "failed", (task, r[task])
        return r[task]["result"]

    check = ok("offer check")
    assert check["changed"] and check["lease"] is None
    offer = ok("offer")
    assert offer["changed"] and offer["lease"]["state"] == "offered" and offer["diff"]["before"] == {}
    ip = offer["lease"]["ip"]
    again = ok("offer again")
    assert not again["changed"] and again["lease"]["ip"] == ip
    assert ok("bind check")["changed"] and ok("bind check")["lease"]["state"] == "bound"
    bind = ok("bind")
    assert bind["changed"] and bind["lease"]["ip"] == ip and bind["lease"]["state"] == "bound"
    assert bind["lease"]["hostname"] == "node1" and bind["lease"]["server"] == "ansible"
    assert not ok("bind again")["changed"]
    ext = ok("extend")
    assert ext["changed"] and ext["lease"]["expires"] >= bind["lease"]["expires"] + 2 * 3600 - 60
    assert "is leased to 52:54:00:aa:00:01" in failed("steal")["msg"]
    boot = ok("bootstrap bind")
    assert boot["changed"] and boot["lease"]["ip"] == "10.99.0.250" and boot["lease"]["mac"] == "52:54:00:aa:00:02"
    bad = failed("bad mac")
    assert bad["field"] == "mac" and "must be a MAC address" in bad["msg"]
    outside = failed("outside")
    assert outside["field"] == "ip" and "10.98.0.5 is outside 10.99.0.0/24" in outside["msg"]
    assert ok("release check")["changed"]
    rel = ok("release")
    assert rel["changed"] and rel["lease"] is None and rel["diff"]["before"]["ip"] == ip
    assert not ok("release again")["changed"]
    assert ok("small 1")["changed"] and ok("small 2")["changed"]
    assert failed("small full")["msg"] == "no free address in 10.99.3.0/30"
    # what landed in Consul: mac2's lease, and mac1's MAC index still remembering its address
    _status, body = http_request(f"{consul.http_addr}/v1/kv/{kv_prefix}/dhcp/?recurse=true")
    keys = sorted(item["Key"][len(kv_prefix) + 1 :] for item in json.loads(body))
    assert keys == sorted(["dhcp/config", "dhcp/leases/10.99.0.250", "dhcp/macs/52:54:00:aa:00:01",
                           "dhcp/macs/52:54:00:aa:00:02"])  # fmt: skip

"""The Consul test fixtures and `cerana consul` work against a real agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cerana_cli.consul_agent import ConsulAgent, ConsulError, http_request, pid_alive

pytestmark = pytest.mark.integration

CERANA = Path(sys.executable).parent / "cerana"


def put(url: str, data: bytes, token: str | None = None) -> int:
    """PUT a KV value; returns the HTTP status (and checks Consul's `true` on success)."""
    status, body = http_request(url, method="PUT", data=data, token=token)
    assert status != 200 or json.loads(body) is True, body
    return status


def test_kv_put_get(consul: ConsulAgent, kv_prefix: str) -> None:
    url = f"{consul.http_addr}/v1/kv/{kv_prefix}/greeting"
    assert put(url, b"hello") == 200
    assert http_request(f"{url}?raw") == (200, b"hello")


def test_kv_prefix_is_unique(kv_prefix: str, consul: ConsulAgent) -> None:
    assert kv_prefix.startswith("test-")
    status, _ = http_request(f"{consul.http_addr}/v1/kv/{kv_prefix}?recurse=true")
    assert status == 404  # nothing left over from other tests


def test_short_session_ttl_is_allowed(consul: ConsulAgent) -> None:
    body = json.dumps({"TTL": "1s", "Behavior": "delete"}).encode()
    status, reply = http_request(f"{consul.http_addr}/v1/session/create", method="PUT", data=body)
    assert status == 200, reply
    session = json.loads(reply)["ID"]
    assert http_request(f"{consul.http_addr}/v1/session/destroy/{session}", method="PUT")[0] == 200


def test_acl_agent_denies_anonymous_writes(consul_acl) -> None:
    url = f"{consul_acl.http_addr}/v1/kv/acl-check"
    assert put(url, b"x") == 403
    assert put(url, b"x", token=consul_acl.token) == 200
    assert http_request(f"{url}?raw", token=consul_acl.token) == (200, b"x")
    assert http_request(f"{url}?raw")[0] == 403  # nor read it
    assert http_request(url, method="DELETE", token=consul_acl.token)[0] == 200


def test_agent_stop_cleans_up() -> None:
    with ConsulAgent() as agent:
        pid, workdir = agent.pid, agent.workdir
        assert pid is not None and pid_alive(pid)
        assert http_request(f"{agent.http_addr}/v1/status/leader")[0] == 200
    assert not pid_alive(pid)
    assert not workdir.exists()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CERANA_CONSUL_BIN", str(tmp_path / "nope"))
    with pytest.raises(ConsulError, match="CERANA_CONSUL_BIN"):
        ConsulAgent()


def cerana(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CERANA), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def test_cli_consul_round_trip(tmp_path: Path) -> None:
    up = cerana("consul", "up", cwd=tmp_path)
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.startswith("export CONSUL_HTTP_ADDR=http://127.0.0.1:")
        addr = up.stdout.strip().split("=", 1)[1]
        pid = int((tmp_path / ".cerana/consul/consul.pid").read_text())

        assert put(f"{addr}/v1/kv/cli-check", b"1") == 200
        status = cerana("consul", "status", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert f"pid {pid}" in status.stdout
        assert cerana("consul", "env", cwd=tmp_path).stdout == up.stdout
        again = cerana("consul", "up", "--dir", str(tmp_path), cwd=Path("/"))
        assert again.returncode == 0 and again.stdout == up.stdout and "already running" in again.stderr
    finally:
        down = cerana("consul", "down", cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert not pid_alive(pid)

    after = cerana("consul", "status", cwd=tmp_path)
    assert after.returncode == 1
    assert "no consul agent running" in after.stderr and "Traceback" not in after.stderr
    assert cerana("consul", "env", cwd=tmp_path).returncode == 1


def test_cli_without_binary_fails_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "CERANA_CONSUL_BIN": str(tmp_path / "nope")}
    result = cerana("consul", "up", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "CERANA_CONSUL_BIN" in result.stderr and "Traceback" not in result.stderr


def test_collection_visible_from_any_directory(tmp_path: Path, ansible_env: dict[str, str]) -> None:
    result = subprocess.run(
        ["ansible-galaxy", "collection", "list", "cerana.platform"],
        cwd=tmp_path, env=ansible_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "cerana.platform" in result.stdout


def test_ansible_env_reaches_session_agent(tmp_path: Path, ansible_env: dict[str, str], kv_prefix: str) -> None:
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        f"""
- hosts: localhost
  gather_facts: false
  tasks:
    - ansible.builtin.setup:
        gather_subset: ["!all", "!min", "python"]
    - ansible.builtin.uri:
        url: "{{{{ lookup('ansible.builtin.env', 'CONSUL_HTTP_ADDR') }}}}/v1/kv/{kv_prefix}/from-ansible"
        method: PUT
        body: "{{{{ ansible_facts.python.executable }}}}"
"""
    )
    result = subprocess.run(
        ["ansible-playbook", "-i", "localhost,", "-c", "local", str(playbook)],
        cwd=tmp_path, env=ansible_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    status, body = http_request(f"{ansible_env['CONSUL_HTTP_ADDR']}/v1/kv/{kv_prefix}/from-ansible?raw")
    assert status == 200
    assert body.decode() == sys.executable  # modules run with the venv's Python

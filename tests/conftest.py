"""Repo-level pytest fixtures: real Consul dev agents, per-test KV prefixes, Ansible env."""

from __future__ import annotations

import os
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cerana_cli.consul_agent import ConsulAgent, ConsulError, http_request

# A fixed, well-known master token for the ACL agent (Consul 1.8 wants a UUID).
ACL_MASTER_TOKEN = "b1e5c0de-0000-4000-8000-00000000c0de"


@dataclass(frozen=True)
class AclConsul:
    http_addr: str
    token: str
    agent: ConsulAgent


def _start_agent(acl_master_token: str | None = None) -> ConsulAgent:
    try:
        return ConsulAgent(acl_master_token=acl_master_token).start()
    except ConsulError as exc:
        pytest.fail(f"cannot start a Consul agent: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def consul() -> Iterator[ConsulAgent]:
    """One Consul dev agent (no ACLs) for the whole session; use ``.http_addr``."""
    agent = _start_agent()
    yield agent
    agent.stop()


@pytest.fixture(scope="session")
def consul_acl() -> Iterator[AclConsul]:
    """A second dev agent with ACLs in default-deny mode; ``.token`` is the master token."""
    agent = _start_agent(acl_master_token=ACL_MASTER_TOKEN)
    yield AclConsul(http_addr=agent.http_addr, token=ACL_MASTER_TOKEN, agent=agent)
    agent.stop()


@pytest.fixture
def kv_prefix(consul: ConsulAgent) -> Iterator[str]:
    """A KV prefix unique to this test on the session agent; its tree is deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    yield prefix
    status, body = http_request(f"{consul.http_addr}/v1/kv/{urllib.parse.quote(prefix)}?recurse=true", method="DELETE")
    assert status == 200, f"cleanup of KV prefix {prefix} failed: {status} {body!r}"


@pytest.fixture
def ansible_env(consul: ConsulAgent) -> dict[str, str]:
    """Environment for ansible-playbook/ansible-runner subprocesses against the session agent."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONSUL_")}
    bindir = str(Path(sys.executable).parent)
    env.update(
        CONSUL_HTTP_ADDR=consul.http_addr,
        PATH=os.pathsep.join([bindir, env.get("PATH", os.defpath)]),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_RETRY_FILES_ENABLED="false",
    )
    env.pop("ANSIBLE_FORCE_COLOR", None)
    return env

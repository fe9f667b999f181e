"""The cerana.platform.nodes inventory plugin, run through ansible-inventory against a real Consul agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _store
from cerana_cli.consul_agent import free_port

pytestmark = pytest.mark.integration

ANSIBLE_INVENTORY = str(Path(sys.executable).parent / "ansible-inventory")
A, B, C = "a" * 32, "b" * 32, "c" * 32


def node(node_id, hostname, addresses=(), labels=None):
    return m.Node(
        id=node_id,
        hostname=hostname,
        heartbeat=m.format_time(m.utc_now()),
        addresses=tuple(addresses),
        cpu_count=4,
        load=(0.5, 0.25, 0.125),
        memory_total=8 << 30,
        memory_free=2 << 30,
        disk_total=100 << 30,
        disk_free=60 << 30,
        labels=labels or {},
    )


def inventory(tmp_path, ansible_env, text, *, name="x.cerana_nodes.yml", env=None):
    source = tmp_path / name
    source.write_text(text)
    r = subprocess.run(
        [ANSIBLE_INVENTORY, "-i", str(source), "--list"],
        capture_output=True,
        text=True,
        env=dict(ansible_env, **(env or {})),
        timeout=120,
    )
    return r


def unsafe(value):
    """ansible-inventory marks values from the source as unsafe: strip the wrapping."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: unsafe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unsafe(v) for v in value]
    return value


@pytest.fixture
def nodes(consul, kv_prefix):
    store = _store.Store(_store.ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    store.put(
        m.node_key(A),
        node(A, "n1", ["192.0.2.1", "2001:db8::1"], {"consul_role": "server", "zone": "eu-1.a"}).to_bytes(),
    )
    store.put(m.node_key(B), node(B, "n2", ["192.0.2.2"], {"zone": "eu-1.a"}).to_bytes())
    store.put(m.node_key(C), node(C, "n2").to_bytes())  # the same hostname as B
    store.put(m.node_key("junk"), b"not json")  # skipped
    return store


def test_hosts_groups_and_hostvars(tmp_path, ansible_env, consul, kv_prefix, nodes):
    r = inventory(
        tmp_path,
        ansible_env,
        f"plugin: cerana.platform.nodes\nconsul_url: {consul.http_addr}\nkv_prefix: {kv_prefix}\n"
        "compose:\n  free_gib: cerana_resources.disk_free // 1073741824\n"
        "groups:\n  big: cerana_resources.cpu_count >= 4\n",
    )
    assert r.returncode == 0, r.stderr
    data = unsafe(json.loads(r.stdout))
    assert sorted(data["cerana_nodes"]["hosts"]) == sorted(["n1", "n2", C])
    assert data["consul_servers"]["hosts"] == ["n1"]
    assert sorted(data["label_zone_eu_1_a"]["hosts"]) == ["n1", "n2"]
    assert data["label_consul_role_server"]["hosts"] == ["n1"]
    assert sorted(data["big"]["hosts"]) == sorted(["n1", "n2", C])
    hv = data["_meta"]["hostvars"]
    assert hv["n1"]["ansible_host"] == "192.0.2.1"
    assert hv["n1"]["cerana_addresses"] == ["192.0.2.1", "2001:db8::1"]
    assert hv["n1"]["cerana_node_id"] == A
    assert hv["n1"]["cerana_labels"] == {"consul_role": "server", "zone": "eu-1.a"}
    assert hv["n1"]["cerana_resources"] == {
        "cpu_count": 4,
        "load": [0.5, 0.25, 0.125],
        "memory_total": 8 << 30,
        "memory_free": 2 << 30,
        "disk_total": 100 << 30,
        "disk_free": 60 << 30,
    }
    assert hv["n1"]["free_gib"] == 60
    assert "ansible_host" not in hv[C]  # no address: nothing to connect to but its name
    assert "both named 'n2'" in r.stderr


def test_host_names_by_id_other_server_labels_and_cache(tmp_path, ansible_env, consul, kv_prefix, nodes):
    cache_dir = tmp_path / "cache"
    text = (
        f"plugin: cerana.platform.nodes\nconsul_url: {consul.http_addr}\nkv_prefix: {kv_prefix}\n"
        "host_name: id\nconsul_server_labels: {zone: eu-1.a}\n"
        f"cache: true\ncache_plugin: ansible.builtin.jsonfile\ncache_connection: {cache_dir}\ncache_timeout: 600\n"
    )
    r = inventory(tmp_path, ansible_env, text, name="by-id.cerana_nodes.yaml")
    assert r.returncode == 0, r.stderr
    data = unsafe(json.loads(r.stdout))
    assert sorted(data["cerana_nodes"]["hosts"]) == [A, B, C]
    assert sorted(data["consul_servers"]["hosts"]) == [A, B]
    assert any(cache_dir.iterdir())
    nodes.delete(m.node_key(A))
    cached = unsafe(json.loads(inventory(tmp_path, ansible_env, text, name="by-id.cerana_nodes.yaml").stdout))
    assert A in cached["cerana_nodes"]["hosts"]  # served from the cache, not from Consul


def test_unreachable_consul_is_a_clean_error(tmp_path, ansible_env):
    r = inventory(
        tmp_path,
        ansible_env,
        f"plugin: cerana.platform.nodes\nconsul_url: http://127.0.0.1:{free_port()}\nconsul_timeout: 2\n",
        env={"ANSIBLE_INVENTORY_UNPARSED_FAILED": "true", "ANSIBLE_INVENTORY_ENABLED": "cerana.platform.nodes"},
    )
    assert r.returncode != 0
    assert "cerana.platform.nodes: cannot read the live nodes: cannot reach Consul at http://127.0.0.1:" in r.stderr
    assert "connection refused" in r.stderr
    assert "Traceback" not in r.stderr


def test_file_name_must_end_with_cerana_nodes_yml(tmp_path):
    from ansible_collections.cerana.platform.plugins.inventory.nodes import InventoryModule, label_group

    for name, ok in (("x.cerana_nodes.yml", True), ("cerana_nodes.yaml", True), ("nodes.yml", False)):
        (tmp_path / name).write_text("plugin: cerana.platform.nodes\n")
        assert InventoryModule().verify_file(str(tmp_path / name)) is ok, name
    assert label_group("zone", "eu-1.a") == "label_zone_eu_1_a"
    assert label_group("k8s.io/role", "x y") == "label_k8s_io_role_x_y"

"""``cerana status``: the pure parts (status_data, render) on a state built from store entries."""

from __future__ import annotations

import json

from ansible_collections.cerana.platform.plugins.module_utils import _clusterstate as cs
from ansible_collections.cerana.platform.plugins.module_utils import _planner
from ansible_collections.cerana.platform.plugins.module_utils._store import Entry
from cerana_cli import status

NOW = 1_800_000_000.0
TIME = "2027-01-15T08:00:00Z"


def entries(values: dict[str, object]) -> list[Entry]:
    return [Entry(key=k, value=json.dumps(v).encode(), modify_index=i + 1) for i, (k, v) in enumerate(values.items())]


def node(node_id: str, host: str, addr: str) -> dict:
    return {"id": node_id, "hostname": host, "heartbeat": TIME, "addresses": [addr], "cpu_count": 2,
            "memory_total": 2048 * 1024 * 1024, "memory_free": 1024 * 1024 * 1024,
            "disk_total": 40 * 1024**3, "disk_free": 30 * 1024**3}  # fmt: skip


def state() -> _planner.ClusterState:
    return cs.build_state(entries({
        "datasets/app/config": {"id": "app", "read_only": True, "redundancy": 2},
        "services/web/config": {"id": "web", "dataset": "app", "cmd": ["/bin/web"]},
        "bundles/shop/config": {"id": "shop", "redundancy": 2, "services": {"web": {}},
                                "ports": {"8080": {"port": 8080, "public": True, "external_port": 30080}}},
        "bundles/lost/config": {"id": "lost", "services": {"nope": {}}},
        "nodes/aaaa": node("aaaa", "node1", "10.0.0.11"),
        "nodes/bbbb": node("bbbb", "node2", "10.0.0.12"),
        "heartbeats/datasets/app/aaaa": {"dataset": "app", "node": "aaaa", "in_use": True, "time": TIME},
        "heartbeats/bundles/shop/aaaa": {"bundle": "shop", "node": "aaaa", "time": TIME, "address": "10.240.0.5",
                                         "services": {"web": {"state": "running", "health": {"http": None}}}},
        "heartbeats/bundles/shop/bbbb": {"bundle": "shop", "node": "bbbb", "time": TIME, "address": "10.240.0.9",
                                         "services": {"web": {"state": "running", "health": {"http": "503"}}}},
    }), NOW)  # fmt: skip


EVENT = {"time": TIME, "kind": "run", "status": "ok", "applier": "node1", "duration": 1.25,
         "nodes": {"counts": {"ok": 1, "changed": 1, "failed": 0}}}  # fmt: skip


def test_status_data_shows_placements_health_and_problems():
    st = state()
    data = status.status_data(st, _planner.plan(st), [EVENT], "node1")
    shop = data["bundles"]["shop"]
    assert shop["healthy"] == 1 and shop["redundancy"] == 2 and shop["published"] == [30080]
    assert shop["instances"]["aaaa"] == {"state": "running", "healthy": True, "address": "10.240.0.5",
                                         "failing": {}, "planned": True}  # fmt: skip
    assert shop["instances"]["bbbb"]["failing"] == {"web.http": "503"}
    assert data["nodes"]["aaaa"]["bundles"] == ["shop"]
    assert data["datasets"]["app"]["copies"] == ["aaaa"]
    assert any(p["object"] == "bundle/lost" for p in data["problems"])
    assert json.loads(json.dumps(data)) == data  # --json works


def test_render_is_readable():
    st = state()
    text = status.render(status.status_data(st, _planner.plan(st), [EVENT], "node1"))
    assert "2 live node(s), 2 bundle(s) (2 below redundancy)" in text
    assert "cluster tick leader: node1" in text
    assert "shop           1/2 healthy  ports 30080" in text
    assert "node2          unhealthy 10.240.0.9  web.http: 503" in text
    assert "app            ro  1/2 copies: node1" in text
    assert "bundle/lost: " in text
    assert "node1  run ok  1 ok, 1 changed, 0 failed  1.2 s" in text

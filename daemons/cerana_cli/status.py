"""``cerana status``: the cluster at a glance - nodes, bundles with their placements and
health, datasets with their copies, the plan's problems and the cluster tick's last runs.

Everything is read from Consul (the planner's input, in two requests, plus the newest
events); nothing is written. :func:`status_data` and :func:`render` are pure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ansible_collections.cerana.platform.plugins.module_utils import _clusterstate, _planner, _store
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from cerana_cli.consul_flags import add_consul_flags, store_from_args

EVENTS_PREFIX = "cluster/events/"
LOCK_KEY = "cluster/tick/lock"
MIB = 1024 * 1024
GIB = 1024 * MIB


def _instance(hb: m.BundleHeartbeat | None) -> dict[str, Any]:
    if hb is None:
        return {"state": "missing", "healthy": False, "address": None, "failing": {}}
    failing = {
        f"{sid}.{check}": error
        for sid, status in sorted(hb.services.items())
        for check, error in sorted(status["health"].items())
        if error
    }
    failing.update({sid: status["state"] for sid, status in hb.services.items() if status["state"] != "running"})
    return {"state": "running" if hb.healthy() else "unhealthy", "healthy": hb.healthy(),
            "address": getattr(hb, "address", None), "failing": failing}  # fmt: skip


def status_data(state: _planner.ClusterState, plan: _planner.Plan, events: Sequence[Mapping[str, Any]],
                leader: str | None) -> dict[str, Any]:  # fmt: skip
    """What ``cerana status`` shows, as plain data (``--json``)."""
    bundles_on: dict[str, list[str]] = {}
    for bundle_id, per_node in state.bundle_heartbeats.items():
        for node in per_node:
            bundles_on.setdefault(node, []).append(bundle_id)
    nodes = {
        node_id: {
            "hostname": node.hostname,
            "address": node.addresses[0] if node.addresses else None,
            "load": node.load[0],
            "memory_free": node.memory_free,
            "memory_total": node.memory_total,
            "disk_free": node.disk_free,
            "disk_total": node.disk_total,
            "labels": dict(node.labels),
            "bundles": sorted(bundles_on.get(node_id, [])),
            "pending": not plan.nodes[node_id].changes.empty if node_id in plan.nodes else False,
        }
        for node_id, node in sorted(state.nodes.items())
    }
    bundles = {}
    for bundle_id, bundle in sorted(state.bundles.items()):
        running = state.bundle_heartbeats.get(bundle_id, {})
        planned = plan.placements.get(bundle_id, ())
        instances = {node: _instance(running.get(node)) for node in sorted(set(running) | set(planned))}
        for node, inst in instances.items():
            inst["planned"] = node in planned
        healthy = sum(1 for inst in instances.values() if inst["healthy"])
        bundles[bundle_id] = {
            "redundancy": bundle.redundancy,
            "healthy": healthy,
            "instances": instances,
            "published": sorted(p.external_port or p.port for p in bundle.ports.values() if p.public),
        }
    datasets = {
        dataset_id: {
            "read_only": ds.read_only,
            "redundancy": ds.redundancy,
            "copies": sorted(state.dataset_heartbeats.get(dataset_id, {})),
            "planned": list(plan.dataset_nodes.get(dataset_id, ())),
        }
        for dataset_id, ds in sorted(state.datasets.items())
    }
    return {
        "nodes": nodes,
        "bundles": bundles,
        "datasets": datasets,
        "problems": [p.to_dict() for p in plan.problems],
        "pending_nodes": list(plan.changed_nodes()),
        "tick_leader": leader,
        "events": list(events),
    }


def _name(data: Mapping[str, Any], node_id: str) -> str:
    node = data["nodes"].get(node_id)
    return node["hostname"] if node else node_id[:12] + " (not live)"


def render(data: Mapping[str, Any]) -> str:
    """The human-readable status."""
    out = []
    degraded = [b for b, v in data["bundles"].items() if v["healthy"] < v["redundancy"]]
    out.append(
        f"cluster: {len(data['nodes'])} live node(s), {len(data['bundles'])} bundle(s)"
        f" ({len(degraded)} below redundancy), {len(data['datasets'])} dataset(s);"
        f" cluster tick leader: {data['tick_leader'] or 'none'};"
        f" {len(data['pending_nodes'])} node(s) with pending changes"
    )
    out.append("")
    out.append("NODES")
    for node_id, n in data["nodes"].items():
        mem = f"{(n['memory_total'] - n['memory_free']) // MIB}/{n['memory_total'] // MIB} MiB"
        disk = f"{(n['disk_total'] - n['disk_free']) // GIB}/{n['disk_total'] // GIB} GiB"
        out.append(
            f"  {n['hostname']:<14} {node_id[:12]}  {n['address'] or '-':<15} load {n['load']:.2f}  mem {mem}"
            f"  disk {disk}  bundles: {', '.join(n['bundles']) or '-'}{'  (changes pending)' if n['pending'] else ''}"
        )
    out.append("")
    out.append("BUNDLES")
    for bundle_id, b in data["bundles"].items():
        ports = f"  ports {', '.join(map(str, b['published']))}" if b["published"] else ""
        out.append(f"  {bundle_id:<14} {b['healthy']}/{b['redundancy']} healthy{ports}")
        for node, inst in b["instances"].items():
            where = "" if inst["planned"] else "  (to be removed)"
            detail = "; ".join(f"{k}: {v}" for k, v in inst["failing"].items())
            addr = f" {inst['address']}" if inst["address"] else ""
            state = inst["state"] if inst["state"] != "missing" else "not running yet"
            out.append(f"    {_name(data, node):<14} {state}{addr}{where}{'  ' + detail if detail else ''}")
    out.append("")
    out.append("DATASETS")
    for dataset_id, d in data["datasets"].items():
        copies = ", ".join(_name(data, n) for n in d["copies"]) or "-"
        kind = "ro" if d["read_only"] else "rw"
        out.append(f"  {dataset_id:<14} {kind}  {len(d['copies'])}/{d['redundancy']} copies: {copies}")
    if data["problems"]:
        out.append("")
        out.append("PROBLEMS")
        for p in data["problems"]:
            out.append(f"  {p['object']}: {p['field']}: {p['reason']}")
    if data["events"]:
        out.append("")
        out.append("CLUSTER TICK (newest last)")
        for e in data["events"]:
            if e.get("kind") == "run":
                counts = e.get("nodes", {}).get("counts", {})
                out.append(
                    f"  {e.get('time', '?')}  {e.get('applier', '?')}  run {e.get('status', '?')}"
                    f"  {counts.get('ok', 0)} ok, {counts.get('changed', 0)} changed, {counts.get('failed', 0)} failed"
                    f"  {e.get('duration', 0):.1f} s"
                )
            else:
                what = f"{e.get('kind', '?')} {e.get('status', '')}"
                out.append(f"  {e.get('time', '?')}  {e.get('applier', '?')}  {what}")
    return "\n".join(out) + "\n"


def read_events(store: _store.Store, count: int) -> list[dict[str, Any]]:
    keys = sorted(store.keys(EVENTS_PREFIX))[-count:] if count > 0 else []
    events = []
    for key in keys:
        entry = store.get(key)
        if entry is None:
            continue
        try:
            events.append(entry.json())
        except ValueError:
            continue
    return events


def read_leader(store: _store.Store) -> str | None:
    """The name of the cluster tick holding the lock (its session's name ends with it), or None."""
    entry = store.get(LOCK_KEY)
    if entry is None or not entry.session:
        return None
    info = store.session_info(entry.session) or {}
    return str(info.get("Name", "")).rsplit("/", 1)[-1] or entry.session[:8]


def run(args: argparse.Namespace) -> int:
    try:
        store = store_from_args(args)
        state = _clusterstate.read_state(Objects(store), time.time())
        data = status_data(state, _planner.plan(state), read_events(store, args.events), read_leader(store))
    except _store.StoreError as e:
        print("cerana status: %s" % e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(data))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``status`` command to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "status",
        help="the cluster at a glance: nodes, bundles, placements, health, datasets, the tick's last runs",
        description="Show the live nodes, every bundle with its instances (node, health, address) against its "
        "placement, the datasets' copies, the plan's problems and the cluster tick's newest events. Read-only.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--events", type=int, default=5, metavar="N", help="newest tick events to show (default: 5)")
    add_consul_flags(parser)
    parser.set_defaults(func=run)
    return parser

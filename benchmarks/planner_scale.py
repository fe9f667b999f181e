"""Benchmark: the cluster planner on 10,000 bundles and 1,000 nodes; compare with a naive scan.

Run on demand (not a test):  .venv/bin/python benchmarks/planner_scale.py [--bundles 10000 --nodes 1000]

Pure CPU, no Consul: the states are built in memory from the real models. Every bundle has
1-3 of 200 services (each with a memory limit and a health check) and a redundancy of 1-3;
services run from 50 read-only datasets; nodes have 64 GiB. Three figures for
``_planner.plan()``, each the median of ``--repeat`` runs:

* cold: the first plan of a fresh process (``cerana plan``, the plan module): nothing placed
  yet, every bundle overlaid and digested;
* tick: the daemon's steady case: everything applied and healthy, then one bundle's env
  changed and one node lost; planned by a process that planned the state before (digests of
  unchanged objects memoized, as ``read_state`` returns the same objects for unchanged values);
* warm: the cold state again with the digests memoized: placement, datasets and per-node
  changes alone.

The peer is what a straightforward planner does: for each replica of each bundle, scan every
node for the least loaded one that fits (O(bundles x nodes)), on the cold state, placement
only (no datasets, no digests, no per-node changes), measured in the same run.
``peer/warm`` is how many times faster our placement-plus-everything is than its placement
alone. ``--record`` appends the figures to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _planner as P

REPO = Path(__file__).resolve().parents[1]
MIB, GIB = 1 << 20, 1 << 30
NOW = 1_800_000_000.0
SECTION = "## Planner scale"


def iso(epoch: float) -> str:
    return m.format_time(datetime.datetime.fromtimestamp(epoch, datetime.UTC))


def build(n_bundles: int, n_nodes: int, seed: int = 1) -> P.ClusterState:
    rnd = random.Random(seed)
    datasets = {f"os-{i}": m.Dataset(id=f"os-{i}", read_only=True, redundancy=2) for i in range(50)}
    services = {}
    for i in range(200):
        services[f"svc-{i}"] = m.Service.from_dict(
            {
                "id": f"svc-{i}",
                "dataset": f"os-{i % 50}",
                "cmd": ["/bin/server", "--port", str(8000 + i)],
                "env": {"ROLE": f"r{i}"},
                "limits": {"memory": rnd.choice([64, 128, 256, 512]) * MIB, "cpu": 0.5},
                "health_checks": {"up": {"kind": "tcp", "args": {"port": 8000 + i}}},
            }
        )
    bundles = {}
    for i in range(n_bundles):
        svcs = rnd.sample(sorted(services), rnd.randint(1, 3))
        bundles[f"b-{i}"] = m.Bundle.from_dict(
            {
                "id": f"b-{i}",
                "redundancy": rnd.randint(1, 3),
                "services": {s: {"env": {"BUNDLE": str(i)}} for s in svcs},
                "ports": {"80": {"port": 80}},
            }
        )
    nodes = {}
    for i in range(n_nodes):
        nid = f"node-{i:04d}"
        nodes[nid] = m.Node(
            id=nid, hostname=nid, heartbeat=iso(NOW), memory_total=64 * GIB, memory_free=64 * GIB, disk_free=500 * GIB
        )
    first = sorted(nodes)
    dhbs = {d: {first[j]: m.DatasetHeartbeat(d, first[j], False, iso(NOW)) for j in range(2)} for d in datasets}
    return P.ClusterState(
        bundles=bundles,
        services=services,
        datasets=datasets,
        nodes=nodes,
        dataset_heartbeats=dhbs,
        bundle_heartbeats={},
        applied={},
        config=m.ClusterConfig(),
        now=NOW,
        index=1,
    )


def applied(state: P.ClusterState, plan: P.Plan) -> P.ClusterState:
    """What a successful converge of ``plan`` leaves behind: applied records, healthy heartbeats, copies."""
    at = state.now
    recs, bhbs, dhbs = {}, {}, {}
    for n, p in plan.nodes.items():
        recs[n] = {b: P.Applied(d, at) for b, d in p.bundles.items()}
        for b in p.bundles:
            svcs = {s: {"state": "running", "health": {"up": None}} for s in state.bundles[b].services}
            bhbs.setdefault(b, {})[n] = m.BundleHeartbeat(b, n, iso(at + 1), svcs)
        for d in p.datasets:
            dhbs.setdefault(d, {})[n] = m.DatasetHeartbeat(d, n, True, iso(at + 1))
    return dataclasses.replace(
        state, applied=recs, bundle_heartbeats=bhbs, dataset_heartbeats=dhbs, now=at + 10, index=state.index + 1
    )


def naive_place(state: P.ClusterState) -> dict[str, list[str]]:
    """The peer: least loaded (then most free memory, then a hash) by scanning every node per replica."""
    count = dict.fromkeys(state.nodes, 0)
    free = {n: o.memory_free for n, o in state.nodes.items()}
    h = {n: int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "big") for n in state.nodes}
    need = {}
    for bid, b in state.bundles.items():
        need[bid] = sum(state.services[s].limits.memory or 0 for s in b.services)
    out = {}
    for bid in sorted(state.bundles, key=lambda b: (-need[b], b)):
        chosen: list[str] = []
        for _ in range(state.bundles[bid].redundancy):
            best, best_key = None, None
            for n in state.nodes:
                if n in chosen or free[n] < need[bid]:
                    continue
                key = (count[n], -free[n], h[n])
                if best_key is None or key < best_key:
                    best, best_key = n, key
            if best is None:
                break
            chosen.append(best)
            count[best] += 1
            free[best] -= need[bid]
        out[bid] = chosen
    return out


def timed(fn) -> tuple[float, float, object]:
    """(CPU seconds, wall seconds, result): on a shared machine the CPU time is the figure."""
    c, t = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - c, time.perf_counter() - t, result


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    free = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip(),
        "free": free[1].split()[1] if len(free) > 1 else "?",
        "cpu": cpu,
        "load": Path("/proc/loadavg").read_text().split()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each figure; medians are reported")
    parser.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    args = parser.parse_args()

    print(f"building {args.bundles} bundles on {args.nodes} nodes ...", flush=True)
    cold_state = build(args.bundles, args.nodes)
    runs: dict[str, list[float]] = {"cold": [], "tick": [], "warm": [], "peer": []}
    walls: dict[str, list[float]] = {k: [] for k in runs}

    def run(name, fn):
        cpu, wall, result = timed(fn)
        runs[name].append(cpu)
        walls[name].append(wall)
        return result

    for _ in range(args.repeat):
        P._MEMO.clear()  # a fresh process
        first = run("cold", lambda: P.plan(cold_state))
        run("warm", lambda: P.plan(cold_state))
        run("peer", lambda: naive_place(cold_state))
    placed = sum(len(ns) for ns in first.placements.values())
    assert placed == sum(b.redundancy for b in cold_state.bundles.values()), "not every replica was placed"

    # The daemon's case: all applied and healthy; then one bundle changes and one node is lost.
    steady = applied(cold_state, first)
    P._MEMO.clear()
    assert not P.plan(steady).pending(), "an applied plan must need nothing more"
    changed = sorted(steady.bundles)[0]
    old = steady.bundles[changed]
    svc = next(iter(old.services))
    new_bundle = m.Bundle.from_dict(dict(old.to_dict(), services={svc: {"env": {"BUNDLE": "changed"}}}))
    lost = first.placements[sorted(steady.bundles)[1]][0]
    tick_state = dataclasses.replace(
        steady,
        bundles=dict(steady.bundles, **{changed: new_bundle}),
        nodes={n: o for n, o in steady.nodes.items() if n != lost},
    )
    for _ in range(args.repeat):
        P.plan(steady)  # the previous tick: memo as the daemon has it
        tick_plan = run("tick", lambda: P.plan(tick_state))
    s = tick_plan.summary()

    fig = {k: statistics.median(v) for k, v in runs.items()}
    wall = {k: statistics.median(v) for k, v in walls.items()}
    for k, v in runs.items():
        print(f"{k:5s} {fig[k]:7.3f} s CPU ({', '.join(f'{x:.3f}' for x in v)}), {wall[k]:.3f} s wall")
    print(
        f"tick after a change: {s['start_bundles']} starts, {s['update_bundles']} updates, "
        f"{s['deferred']} deferred on {s['changed_nodes']} nodes (lost {lost})"
    )
    print(f"peer/warm {fig['peer'] / fig['warm']:.1f}  replicas placed {placed}  ({placed / fig['cold']:.0f}/s cold)")
    info = machine()
    print(json.dumps(info))
    row = (
        f"| {info['date']} | {info['nproc']} | {info['free']} | {info['cpu']} | {info['load']} | "
        f"{args.bundles} x {args.nodes}, median of {args.repeat} | {fig['cold']:.2f} ({wall['cold']:.2f}) | "
        f"{fig['tick']:.2f} ({wall['tick']:.2f}) | {fig['warm']:.2f} ({wall['warm']:.2f}) | "
        f"{fig['peer']:.2f} ({wall['peer']:.2f}) | {fig['peer'] / fig['warm']:.1f} |"
    )
    if args.record:
        doc = REPO / "docs" / "benchmarks.md"
        text = doc.read_text() if doc.exists() else "# Benchmarks\n"
        if SECTION not in text:
            text = text.rstrip("\n") + (
                f"\n\n{SECTION}\n\n`benchmarks/planner_scale.py`: `_planner.plan()` on 10,000 bundles (1-3 services "
                "each, redundancy 1-3: about 20,000 replicas) and 1,000 nodes, in seconds. cold: the first plan of a "
                "process, nothing placed yet (every bundle overlaid and digested); tick: everything applied and "
                "healthy, then one bundle changed and one node lost, planned by a process that planned the previous "
                "state (digests of unchanged objects memoized); warm: the cold state with digests memoized "
                "(placement, datasets, per-node changes). peer: a straightforward O(bundles x nodes) least-loaded "
                "scan, placement only, same state, same run. CPU seconds of the process (wall seconds in "
                "parentheses: on the shared machine they include waiting for a core). Goal: under 1 s.\n\n"
                "| date | nproc | memory | CPU | load | bundles x nodes | cold s | tick s | warm s | peer s | "
                "peer/warm |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
            )
        rows = text.splitlines()
        start = next(i for i, line in enumerate(rows) if line.startswith(SECTION))
        end = start + 1
        while end < len(rows) and not rows[end].startswith("|"):
            end += 1
        while end < len(rows) and rows[end].startswith("|"):
            end += 1
        doc.write_text("\n".join([*rows[:end], row, *rows[end:]]).rstrip("\n") + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

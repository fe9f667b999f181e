# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""The cluster planner: from declared objects, live nodes and heartbeats, where every
bundle and dataset should be and what each node must change to get there.

Pure: no I/O, no clock (``ClusterState.now`` is an input), no randomness; it never
raises for bad data (bad declarations become :class:`Problem` entries). The same state
always gives the same plan, ``to_dict()`` and text. ``docs/cluster-tick.md``
("Planner") states the rules; the comments below refer to them.

Cost: O(B log N + H) for B bundles, N nodes and H heartbeats/applied records, plus one
overlay and SHA-256 per bundle, memoized across calls for unchanged objects (see
:func:`_bundle_info`).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import heapq
import threading
import typing

from ansible_collections.cerana.platform.plugins.module_utils import _models as m


@dataclasses.dataclass(frozen=True)
class Applied:
    """What the cluster tick last applied for one bundle on one node.

    ``digest`` is :func:`bundle_digest` of the overlay it applied, ``time`` when the
    apply finished (epoch seconds, the tick's clock). Stored by the tick at
    ``cluster/applied/<node>`` (see ``_clusterstate``).
    """

    digest: str
    time: float


@dataclasses.dataclass(frozen=True)
class ClusterState:
    """Everything the planner reads, as read at Consul index ``index`` and time ``now``.

    ``nodes`` are the live nodes (``nodes/<id>``). Heartbeats and applied records of
    nodes that are not live are ignored.
    """

    bundles: typing.Mapping[str, m.Bundle]
    services: typing.Mapping[str, m.Service]
    datasets: typing.Mapping[str, m.Dataset]
    nodes: typing.Mapping[str, m.Node]
    dataset_heartbeats: typing.Mapping[str, typing.Mapping[str, m.DatasetHeartbeat]]  # dataset -> node -> hb
    bundle_heartbeats: typing.Mapping[str, typing.Mapping[str, m.BundleHeartbeat]]  # bundle -> node -> hb
    applied: typing.Mapping[str, typing.Mapping[str, Applied]]  # node -> bundle -> Applied
    config: m.ClusterConfig
    now: float = 0.0
    index: int = 0
    # Stored values that did not decode, "<kind>/<id>" -> reason ("bundle/shop",
    # "dataset/web", "service/x", "cluster/config", "applied/<node>"). Such objects
    # are held as they are, never taken for deleted.
    invalid: typing.Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class NodeChanges:
    """What one node must do now. Every tuple is sorted."""

    add_datasets: tuple = ()
    remove_datasets: tuple = ()
    start_bundles: tuple = ()
    update_bundles: tuple = ()
    stop_bundles: tuple = ()

    @property
    def empty(self):
        return not (
            self.add_datasets or self.remove_datasets or self.start_bundles or self.update_bundles or self.stop_bundles
        )

    def to_dict(self):
        return {
            "add_datasets": list(self.add_datasets),
            "remove_datasets": list(self.remove_datasets),
            "start_bundles": list(self.start_bundles),
            "update_bundles": list(self.update_bundles),
            "stop_bundles": list(self.stop_bundles),
        }


@dataclasses.dataclass(frozen=True)
class NodePlan:
    """One live node's desired state and the changes that lead there.

    ``bundles`` maps every bundle the node should run to its digest, including bundles
    ``held`` as they are because their declaration is invalid (digest: the one last
    applied there, or "" when unknown): a converge run must neither start, update nor
    stop those. ``deferred`` are updates held back by the rolling-update rule (not in
    ``changes``). ``notes`` explains changes and deferrals, keyed ``bundle/<id>`` or
    ``dataset/<id>``.
    """

    node: str
    datasets: tuple  # desired dataset ids, sorted
    bundles: typing.Mapping[str, str]  # desired bundle id -> digest
    changes: NodeChanges
    deferred: tuple = ()
    hostname: str = ""
    held: tuple = ()
    notes: typing.Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self):
        return {
            "node": self.node,
            "hostname": self.hostname,
            "datasets": list(self.datasets),
            "bundles": dict(sorted(self.bundles.items())),
            "changes": self.changes.to_dict(),
            "deferred": list(self.deferred),
            "held": list(self.held),
            "notes": dict(sorted(self.notes.items())),
        }


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    """A declaration the planner could not honour: ``("bundle/shop", "services.web.dataset", "...")``."""

    object: str
    field: str
    reason: str

    def to_dict(self):
        return {"object": self.object, "field": self.field, "reason": self.reason}

    def __str__(self):
        return (
            "%s %s: %s" % (self.object, self.field, self.reason)
            if self.field
            else "%s: %s" % (self.object, self.reason)
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's answer. ``placements``: bundle -> nodes (valid bundles only);
    ``dataset_nodes``: dataset -> nodes that should hold a copy; ``nodes``: one
    :class:`NodePlan` per live node. Every tuple is sorted."""

    placements: typing.Mapping[str, tuple]
    dataset_nodes: typing.Mapping[str, tuple]
    nodes: typing.Mapping[str, NodePlan]
    problems: tuple
    index: int

    def changed_nodes(self):
        """The nodes whose changes are not empty, sorted."""
        return tuple(sorted(n for n, p in self.nodes.items() if not p.changes.empty))

    def deferred(self):
        """``(node, bundle)`` of every update held back by the rolling rule, sorted."""
        return tuple(sorted((n, b) for n, p in self.nodes.items() for b in p.deferred))

    def pending(self):
        """True when the cluster does not match the plan yet (changes or deferred updates)."""
        return bool(self.changed_nodes() or self.deferred())

    def summary(self):
        counts = dict.fromkeys(
            ("start_bundles", "update_bundles", "stop_bundles", "add_datasets", "remove_datasets", "deferred"), 0
        )
        for p in self.nodes.values():
            for name in ("start_bundles", "update_bundles", "stop_bundles", "add_datasets", "remove_datasets"):
                counts[name] += len(getattr(p.changes, name))
            counts["deferred"] += len(p.deferred)
        counts.update(
            nodes=len(self.nodes),
            changed_nodes=len(self.changed_nodes()),
            bundles=len(self.placements),
            datasets=len(self.dataset_nodes),
            problems=len(self.problems),
        )
        return counts

    def only_node(self, node):
        """This plan restricted to one node: its NodePlan, and the placements and dataset
        copies that involve it; problems and index unchanged."""
        return Plan(
            placements={b: ns for b, ns in self.placements.items() if node in ns},
            dataset_nodes={d: ns for d, ns in self.dataset_nodes.items() if node in ns},
            nodes={n: p for n, p in self.nodes.items() if n == node},
            problems=self.problems,
            index=self.index,
        )

    def to_dict(self):
        """JSON-able and deterministic (every mapping sorted by key)."""
        return {
            "index": self.index,
            "placements": {b: list(ns) for b, ns in sorted(self.placements.items())},
            "dataset_nodes": {d: list(ns) for d, ns in sorted(self.dataset_nodes.items())},
            "nodes": {n: p.to_dict() for n, p in sorted(self.nodes.items())},
            "problems": [p.to_dict() for p in self.problems],
            "changed_nodes": list(self.changed_nodes()),
            "summary": self.summary(),
        }


def bundle_digest(overlaid):
    """``sha256:`` + SHA-256 of the canonical JSON of an overlaid bundle
    (``Objects.overlay()`` / ``m.overlay_bundle`` output)."""
    return "sha256:" + hashlib.sha256(m.canonical_json(overlaid).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# Per-bundle facts derived from the overlay, memoized


@dataclasses.dataclass(frozen=True)
class _Info:
    digest: str | None  # None: invalid
    memory: int  # summed service memory limits, bytes
    datasets: tuple  # declared dataset ids the bundle's instances use
    services: frozenset  # service ids (a healthy replica reports all of them)
    problem: tuple | None  # (field, reason) when invalid


_MEMO_LOCK = threading.Lock()
_MEMO: dict = {}  # id(bundle) -> (bundle, ((sid, service), ...), ((did, dataset), ...), _Info); last plan's only


def _referenced(bundle, services):
    """The service and dataset ids a bundle's overlay depends on (best effort for bad ones)."""
    dataset_ids = set()
    for sid, bsvc in bundle.services.items():
        if bsvc.dataset:
            dataset_ids.add(bsvc.dataset)
        elif sid in services:
            dataset_ids.add(services[sid].dataset)
    for bds in bundle.datasets.values():
        if bds.id:
            dataset_ids.add(bds.id)
    return tuple(bundle.services), tuple(sorted(dataset_ids))


class _Shared:
    """A declared object whose ``to_dict()`` is computed once per plan.

    ``m.overlay_bundle`` calls ``to_dict()`` on a service for every bundle that uses it
    (and on its health checks, and on datasets), and ``to_dict()`` is most of the cost of
    a first plan. The overlay only replaces top-level keys of those dicts, so a shallow
    copy of one cached dict is enough; the property tests compare every digest with
    ``m.overlay_bundle`` on the plain objects. Other attributes come from the object.
    """

    __slots__ = ("_dict", "_obj")

    def __init__(self, obj):
        self._obj = obj
        self._dict = None

    def __getattr__(self, name):
        return getattr(self._obj, name)

    def to_dict(self):
        if self._dict is None:
            self._dict = self._obj.to_dict()
        return dict(self._dict)


class _SharedService(_Shared):
    __slots__ = ("_checks",)

    def __init__(self, obj):
        super().__init__(obj)
        self._checks = None

    @property
    def health_checks(self):
        if self._checks is None:
            self._checks = {k: _Shared(v) for k, v in self._obj.health_checks.items()}
        return self._checks


class _Shares:
    """The services and datasets of one plan wrapped in :class:`_Shared`, made on first use."""

    def __init__(self, services, datasets):
        self._raw = (services, datasets)
        self._wrapped = None

    def get(self):
        if self._wrapped is None:
            services, datasets = self._raw
            self._wrapped = (
                {k: _SharedService(v) for k, v in services.items()},
                {k: _Shared(v) for k, v in datasets.items()},
            )
        return self._wrapped


def _bundle_info(bundle, services, datasets, memo_in, memo_out, shares=None):
    """The overlay-derived facts of one bundle. The overlay and its digest are the costly
    part of a plan (0.1-0.2 ms each), so results are kept for the objects they came
    from: a later plan given the very same (frozen) objects reuses them. Identity, not
    equality, is the key (equality would cost what it saves), and the cached entry holds
    the objects, so an id is never confused with a recycled one. The datasets a bundle
    references follow from the bundle and its services: when those are the same objects,
    so are the dataset ids to check."""
    hit = memo_in.get(id(bundle))
    if (
        hit is not None
        and hit[0] is bundle
        and all(services.get(s) is o for s, o in hit[1])
        and all(datasets.get(d) is o for d, o in hit[2])
    ):
        memo_out[id(bundle)] = hit
        return hit[3]
    sids, dids = _referenced(bundle, services)
    info = _compute_info(bundle, *(shares.get() if shares is not None else (services, datasets)))
    memo_out[id(bundle)] = (
        bundle,
        tuple((s, services.get(s)) for s in sids),
        tuple((d, datasets.get(d)) for d in dids),
        info,
    )
    return info


def _compute_info(bundle, services, datasets):
    if not bundle.services:
        return _Info(None, 0, (), frozenset(), ("services", "a bundle needs at least one service"))
    try:
        overlaid = m.overlay_bundle(bundle, services, datasets)
    except m.ValidationError as e:
        path = e.path[len("bundle.") :] if e.path.startswith("bundle.") else e.path
        return _Info(None, 0, (), frozenset(), (path, e.reason))
    except Exception as e:  # never raise for bad data
        return _Info(None, 0, (), frozenset(), ("", "cannot overlay the bundle: %s" % e))
    memory = 0
    used = set()
    for svc in overlaid["services"].values():
        memory += (svc.get("limits") or {}).get("memory") or 0
        used.add(svc["dataset"])
    for bds in bundle.datasets.values():
        if bds.id:
            used.add(bds.id)
    return _Info(bundle_digest(overlaid), memory, tuple(sorted(used)), frozenset(bundle.services), None)


# ---------------------------------------------------------------------------
# Helpers


def _node_hash(*parts):
    """A stable 64-bit hash (not Python's hash(), which changes per process)."""
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=8).digest(), "big")


def _epoch(rfc3339):
    try:
        return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError, OverflowError):
        return float("-inf")


def _mib(n):
    return "%d MiB" % (n >> 20) if n % (1 << 20) == 0 else "%d bytes" % n


def _short(digest):
    return (digest or "?")[: len("sha256:") + 12]


class _Replica:
    """One bundle's view of one node that has it (applied there, or heartbeating)."""

    __slots__ = ("applied", "hb", "node")

    def __init__(self, node, applied, hb):
        self.node = node
        self.applied = applied
        self.hb = hb

    def healthy(self, info):
        """Running, every service of the bundle reporting, every check passing, and the
        heartbeat written after the last apply (so a restart in progress does not count)."""
        hb = self.hb
        if hb is None or not hb.healthy() or not info.services <= hb.services.keys():
            return False
        return self.applied is None or _epoch(hb.time) >= self.applied.time


# ---------------------------------------------------------------------------
# The plan


def plan(state, *, max_unavailable=1, grace=10.0):
    """The :class:`Plan` for ``state``. ``max_unavailable``: replicas of one bundle that may
    be down for an update at once (>= 1); ``grace``: seconds after an apply before a
    bundle with no heartbeat from its node is applied again."""
    if max_unavailable < 1:
        raise ValueError("max_unavailable must be >= 1, got %r" % (max_unavailable,))
    if grace < 0:
        raise ValueError("grace must be >= 0, got %r" % (grace,))
    # A plan allocates tens of thousands of small objects and creates no reference cycles;
    # the cyclic collector's full passes over a large state cost a third of the time.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _plan(state, max_unavailable, grace)
    finally:
        if collecting:
            gc.enable()


def _plan(state, max_unavailable, grace):
    problems = []
    live = sorted(state.nodes)
    live_set = set(live)
    node_hash = {n: _node_hash(n) for n in live}
    services = state.services
    datasets = state.datasets

    # -- bundle facts (memoized overlay + digest) --------------------------------------
    with _MEMO_LOCK:
        memo_in = dict(_MEMO)
    memo_out = {}
    infos = {}
    shares = _Shares(services, datasets)
    for bid in sorted(state.bundles):
        infos[bid] = _bundle_info(state.bundles[bid], services, datasets, memo_in, memo_out, shares)
    for what, reason in sorted(state.invalid.items()):
        kind, _sep, oid = what.partition("/")
        if kind == "bundle" and oid not in infos:
            infos[oid] = _Info(None, 0, (), frozenset(), ("", reason))  # held, reported below
        elif kind != "bundle":
            problems.append(Problem(what, "", reason))
    infos = dict(sorted(infos.items()))
    with _MEMO_LOCK:
        _MEMO.clear()
        _MEMO.update(memo_out)

    # -- who has what (live nodes only) ------------------------------------------------
    replicas = {}  # bundle -> {node: _Replica}; every bundle found anywhere, declared or not
    for node in live:
        for bid, applied in (state.applied.get(node) or {}).items():
            replicas.setdefault(bid, {})[node] = _Replica(node, applied, None)
    for bid, by_node in state.bundle_heartbeats.items():
        for node, hb in by_node.items():
            if node in live_set:
                have = replicas.setdefault(bid, {})
                r = have.get(node)
                if r is None:
                    have[node] = _Replica(node, None, hb)
                else:
                    r.hb = hb

    desired = {n: {} for n in live}  # node -> {bundle: digest}
    held = {n: [] for n in live}
    notes = {n: {} for n in live}
    count = dict.fromkeys(live, 0)  # bundles per node (kept, held, then new)
    placements = {}
    to_place = []  # (bundle, missing)

    # -- pass 1: keep existing placements; trim excess; hold invalid bundles ----------
    for bid, info in infos.items():
        have = replicas.get(bid, {})
        if info.digest is None:
            problems.append(Problem("bundle/" + bid, info.problem[0], info.problem[1]))
            for node in sorted(have):
                r = have[node]
                desired[node][bid] = r.applied.digest if r.applied else ""
                held[node].append(bid)
                notes[node]["bundle/" + bid] = "held as it is: its declaration is invalid"
                count[node] += 1
            continue
        redundancy = state.bundles[bid].redundancy
        kept = sorted(have)
        if len(kept) > redundancy:
            # Keep healthy ones, then up-to-date ones, then the longest applied; stable hash last.
            def rank(node, bid=bid, info=info, have=have):
                r = have[node]
                return (
                    not r.healthy(info),
                    r.applied is None or r.applied.digest != info.digest,
                    r.applied.time if r.applied else float("inf"),
                    _node_hash(bid, node),
                )

            kept = sorted(sorted(kept, key=rank)[:redundancy])
        for node in kept:
            desired[node][bid] = info.digest
            count[node] += 1
        placements[bid] = kept
        if len(kept) < redundancy:
            to_place.append(bid)

    # -- pass 2: place missing replicas (biggest first) on the least loaded nodes ------
    # Free memory: what the node reports, but no more than its total less the memory
    # limits of the bundles it keeps (limits are reservations, not usage); then less the
    # limits of what this plan adds.
    reserved = dict.fromkeys(live, 0)
    for n in live:
        for bid in desired[n]:
            reserved[n] += infos[bid].memory
    avail = {n: min(state.nodes[n].memory_free, state.nodes[n].memory_total - reserved[n]) for n in live}
    heap = [(count[n], -avail[n], node_hash[n], n) for n in live]
    heapq.heapify(heap)
    # max_avail: a max-heap of free memory, for "fits nowhere" without scanning every node
    by_mem = [(-avail[n], n) for n in live]
    heapq.heapify(by_mem)

    def max_avail():
        while by_mem and -by_mem[0][0] != avail[by_mem[0][1]]:
            heapq.heapreplace(by_mem, (-avail[by_mem[0][1]], by_mem[0][1]))
        return -by_mem[0][0] if by_mem else 0

    def least_count():
        # Every node's current entry is in the heap; stale ones on top are dropped.
        while heap and (heap[0][0] != count[heap[0][3]] or -heap[0][1] != avail[heap[0][3]]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def take(node, bid, need, note):
        placements[bid].append(node)
        desired[node][bid] = infos[bid].digest
        count[node] += 1
        avail[node] -= need
        notes[node]["bundle/" + bid] = note
        heapq.heappush(heap, (count[node], -avail[node], node_hash[node], node))

    # Live nodes holding a copy of each dataset: among the least loaded nodes, a new
    # replica goes where its datasets already are (no copy to wait for, none to remove).
    holding = {}
    for did, by_node in state.dataset_heartbeats.items():
        holding[did] = {n for n in by_node if n in live_set}

    to_place.sort(key=lambda b: (-infos[b].memory, b))
    for bid in to_place:
        info = infos[bid]
        redundancy = state.bundles[bid].redundancy
        chosen = placements[bid]
        need = info.memory
        missing = redundancy - len(chosen)
        skipped = []
        if need <= max_avail():
            prefer = None
            for did in info.datasets:
                has = holding.get(did, set())
                prefer = set(has) if prefer is None else prefer & has
            while missing and prefer:
                low = least_count()
                fits = [n for n in prefer if count[n] == low and need <= avail[n] and bid not in desired[n]]
                if not fits:
                    break
                node = min(fits, key=lambda n: (-avail[n], node_hash[n], n))
                prefer.discard(node)
                take(node, bid, need, "new placement, where its datasets are")
                missing -= 1
            while missing and heap:
                entry = heapq.heappop(heap)
                c, negfree, _h, node = entry
                if c != count[node] or -negfree != avail[node]:
                    continue  # stale entry; the current one is in the heap too
                if bid in desired[node] or need > avail[node]:
                    skipped.append(entry)
                    continue
                take(node, bid, need, "new placement")
                missing -= 1
            for entry in skipped:
                heapq.heappush(heap, entry)
        chosen.sort()
        if len(chosen) < redundancy:
            if len(live) < redundancy:
                reason = "redundancy %d > %d live node%s" % (redundancy, len(live), "" if len(live) == 1 else "s")
            else:
                reason = "only %d of %d replicas placed: no other live node has %s of memory free" % (
                    len(chosen),
                    redundancy,
                    _mib(need),
                )
            problems.append(Problem("bundle/" + bid, "redundancy", reason))
    placements = {b: tuple(ns) for b, ns in placements.items()}

    # -- datasets --------------------------------------------------------------------
    dataset_nodes, want_ds, has_ds = _plan_datasets(state, live, infos, placements, held, problems)

    # -- per-node changes, with the rolling-update rule --------------------------------
    start = {n: [] for n in live}
    update = {n: [] for n in live}
    stop = {n: [] for n in live}
    deferred = {n: [] for n in live}
    now = state.now
    for bid in sorted(replicas.keys() | infos.keys()):
        have = replicas.get(bid, {})
        info = infos.get(bid)
        if info is not None and info.digest is None:
            continue  # held
        want = placements.get(bid, ())
        want_set = set(want)
        for node in sorted(have):
            if node not in want_set:
                stop[node].append(bid)
                notes[node]["bundle/" + bid] = (
                    "no longer declared"
                    if info is None
                    else "excess replica (redundancy %d)" % state.bundles[bid].redundancy
                )
        if info is None:
            continue
        candidates = []
        for node in want:
            r = have.get(node)
            if r is None:
                start[node].append(bid)  # new placement (note already set)
            elif r.hb is None and r.applied is not None and now - r.applied.time > grace:
                start[node].append(bid)
                notes[node]["bundle/" + bid] = "applied %.0fs ago but no heartbeat: apply again" % (
                    now - r.applied.time
                )
            elif r.applied is None or r.applied.digest != info.digest:
                candidates.append(node)
        if candidates:
            _rolling(bid, info, want, have, candidates, max_unavailable, update, deferred, notes)

    nodes = {}
    for n in live:
        want = want_ds[n]
        has = has_ds[n]
        nodes[n] = NodePlan(
            node=n,
            datasets=tuple(sorted(want)),
            bundles=dict(sorted(desired[n].items())),
            changes=NodeChanges(
                add_datasets=tuple(sorted(want - has)),
                remove_datasets=tuple(sorted(has - want)),
                start_bundles=tuple(sorted(start[n])),
                update_bundles=tuple(sorted(update[n])),
                stop_bundles=tuple(sorted(stop[n])),
            ),
            deferred=tuple(sorted(deferred[n])),
            hostname=state.nodes[n].hostname,
            held=tuple(sorted(held[n])),
            notes=dict(sorted(notes[n].items())),
        )
    if not live and state.bundles:
        problems.append(Problem("cluster", "nodes", "no live nodes: nothing can be placed"))
    return Plan(
        placements=dict(sorted(placements.items())),
        dataset_nodes=dataset_nodes,
        nodes=nodes,
        problems=tuple(sorted(set(problems))),
        index=state.index,
    )


def _rolling(bid, info, want, have, candidates, max_unavailable, update, deferred, notes):
    """At most ``max_unavailable`` replicas of one bundle down for an update at once.

    A replica that is not healthy is down already: updating it costs nothing, so it is
    always allowed (otherwise a bundle whose replicas are all broken could never receive
    its fix). A healthy one is updated only while the replicas that are down, counting
    the ones updated now, stay within ``max_unavailable``.
    """
    down = {n for n in want if n not in have or not have[n].healthy(info)}
    for node in sorted(candidates, key=lambda n: (n not in down, n)):
        if node in down or len(down) < max_unavailable:
            update[node].append(bid)
            down.add(node)
            notes[node]["bundle/" + bid] = "declaration changed" if have[node].applied else "running but never applied"
        else:
            deferred[node].append(bid)
            others = sorted(n for n in down if n != node)
            notes[node]["bundle/" + bid] = "update deferred: %d replica%s already down (%s), max_unavailable %d" % (
                len(others),
                "" if len(others) == 1 else "s",
                ", ".join(others),
                max_unavailable,
            )


def _plan_datasets(state, live, infos, placements, held, problems):
    """Which live nodes should hold each dataset.

    Returns ({declared dataset: nodes}, {node: datasets it should hold}, {node: datasets it holds}).
    """
    datasets = state.datasets
    has_by_node = {n: set() for n in live}
    holders = {}  # dataset -> {node: hb} (live nodes only)
    for did, by_node in state.dataset_heartbeats.items():
        for node, hb in by_node.items():
            if node in has_by_node:
                holders.setdefault(did, {})[node] = hb
                has_by_node[node].add(did)
    users = {}  # dataset -> set of nodes running a bundle that uses it
    for bid, nodes in placements.items():
        for did in infos[bid].datasets:
            users.setdefault(did, set()).update(nodes)
    for node in live:
        for bid in held[node]:
            if bid not in state.bundles:
                continue  # its stored value does not decode: nothing to go by
            _sids, dids = _referenced(state.bundles[bid], state.services)
            for did in dids:
                if did in datasets:
                    users.setdefault(did, set()).add(node)
    want = {}  # dataset -> set of nodes
    for did in sorted(datasets):
        ds = datasets[did]
        have = holders.get(did, {})
        need = set(users.get(did, ()))
        in_use = {n for n, hb in have.items() if hb.in_use}
        if ds.read_only:
            # Existing copies first: those in use or needed, then the others (stable order),
            # until `redundancy` existing copies are kept.
            kept = set(in_use) | (need & have.keys())
            for node in sorted(have.keys() - kept, key=lambda n, did=did: _node_hash(did, n)):
                if len(kept) >= ds.redundancy:
                    break
                kept.add(node)
            want[did] = need | kept
            if not have:
                problems.append(
                    Problem(
                        "dataset/" + did,
                        "",
                        "no live node holds a copy%s" % (" (bundles using it cannot start)" if need else ""),
                    )
                )
        else:
            # Read-write copies are data that exists nowhere else: added where a bundle needs
            # them, removed only when the dataset is no longer declared.
            want[did] = need | have.keys()
        if ds.parent is not None and ds.parent not in datasets:
            problems.append(Problem("dataset/" + did, "parent", "dataset %r is not declared" % ds.parent))
    # Undeclared datasets: removed, except copies still in use (removed once they are not)
    # and copies of datasets whose stored declaration does not decode (kept as they are).
    for did, have in holders.items():
        if did not in datasets:
            unreadable = "dataset/" + did in state.invalid
            want[did] = {n for n, hb in have.items() if unreadable or hb.in_use}
    # Read-only datasets short of redundancy get copies on the nodes with the fewest datasets
    # (then the most free disk), if any copy exists to replicate from.
    per_node = dict.fromkeys(live, 0)
    for nodes in want.values():
        for n in nodes:
            per_node[n] += 1
    heap = [(per_node[n], -state.nodes[n].disk_free, _node_hash(n), n) for n in live]
    heapq.heapify(heap)
    for did in sorted(datasets):
        ds = datasets[did]
        nodes = want[did]
        if not ds.read_only or len(nodes) >= ds.redundancy:
            continue
        if not holders.get(did):
            continue  # nothing to replicate from (reported above)
        skipped = []
        while len(nodes) < ds.redundancy and heap:
            entry = heapq.heappop(heap)
            c, _d, _h, n = entry
            if c != per_node[n]:
                continue
            if n in nodes:
                skipped.append(entry)
                continue
            nodes.add(n)
            per_node[n] += 1
            heapq.heappush(heap, (per_node[n], entry[1], entry[2], n))
        for entry in skipped:
            heapq.heappush(heap, entry)
        if len(nodes) < ds.redundancy:
            problems.append(
                Problem(
                    "dataset/" + did,
                    "redundancy",
                    "redundancy %d > %d live node%s" % (ds.redundancy, len(live), "" if len(live) == 1 else "s"),
                )
            )
    # parent_same_node: the parent goes wherever the child is (transitively).
    for did in sorted(want):
        ds = datasets.get(did)
        seen = {did}
        while ds is not None and ds.parent_same_node and ds.parent in datasets and ds.parent not in seen:
            want.setdefault(ds.parent, set()).update(want[did])
            seen.add(ds.parent)
            ds = datasets[ds.parent]
    by_node = {n: set() for n in live}
    for did, nodes in want.items():
        for n in nodes:
            by_node[n].add(did)
    dataset_nodes = {did: tuple(sorted(nodes)) for did, nodes in sorted(want.items()) if did in datasets}
    return dataset_nodes, by_node, has_by_node


# ---------------------------------------------------------------------------
# Text


def render_text(plan):
    """A human-readable diff, like ``terraform plan``: per changed node ``+``/``~``/``-``
    lines, deferred updates, problems, and a summary line."""
    out = []
    s = plan.summary()
    for n, p in sorted(plan.nodes.items()):
        if p.changes.empty and not p.deferred:
            continue
        c = p.changes
        out.append("node %s%s:" % (n, " (%s)" % p.hostname if p.hostname and p.hostname != n else ""))
        for did in c.add_datasets:
            out.append("  + dataset %s" % did)
        for bid in c.start_bundles:
            out.append(
                "  + bundle  %s  %s (%s)" % (bid, _short(p.bundles.get(bid)), p.notes.get("bundle/" + bid, "start"))
            )
        for bid in c.update_bundles:
            out.append(
                "  ~ bundle  %s  -> %s (%s)" % (bid, _short(p.bundles.get(bid)), p.notes.get("bundle/" + bid, "update"))
            )
        for bid in p.deferred:
            out.append("  . bundle  %s  (%s)" % (bid, p.notes.get("bundle/" + bid, "deferred")))
        for bid in c.stop_bundles:
            out.append("  - bundle  %s  (%s)" % (bid, p.notes.get("bundle/" + bid, "stop")))
        for did in c.remove_datasets:
            out.append("  - dataset %s" % did)
        out.append("")
    if plan.problems:
        out.append("Problems (%d):" % len(plan.problems))
        out.extend("  ! %s" % p for p in plan.problems)
        out.append("")
    where = "%d live node%s, %d bundle%s placed, %d dataset%s" % (
        s["nodes"],
        "" if s["nodes"] == 1 else "s",
        s["bundles"],
        "" if s["bundles"] == 1 else "s",
        s["datasets"],
        "" if s["datasets"] == 1 else "s",
    )
    if not plan.pending():
        out.append("No changes: the cluster matches the declared state (%s; Consul index %d)." % (where, plan.index))
    else:
        out.append(
            "Plan: %d bundle%s to start, %d to update, %d to stop, %d deferred; %d dataset cop%s to add, %d to remove; "
            "%d of %d nodes to change (%s; Consul index %d)."
            % (
                s["start_bundles"],
                "" if s["start_bundles"] == 1 else "s",
                s["update_bundles"],
                s["stop_bundles"],
                s["deferred"],
                s["add_datasets"],
                "y" if s["add_datasets"] == 1 else "ies",
                s["remove_datasets"],
                s["changed_nodes"],
                s["nodes"],
                where,
                plan.index,
            )
        )
    return "\n".join(out) + "\n"

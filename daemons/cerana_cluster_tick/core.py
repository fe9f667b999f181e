"""The cluster tick's decisions, as pure functions: no I/O, no clock, no randomness.

* which changed nodes run now and which wait for their retry (:func:`select`,
  :func:`after_run`): a failed node backs off exponentially on its own, and a node whose
  desired state changed since it failed is retried at once;
* fencing (:func:`fence`): apply only while holding the lock and while the declared state
  the plan came from is still current;
* per-host results from ansible-runner events (:func:`host_results`);
* what a node's ``cluster/applied/<node>`` record becomes after a successful run
  (:func:`applied_after`);
* the events kept in Consul: their key, their value, and which old ones go (:func:`prune`);
* how long to wait before the next pass (:func:`next_wait`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

EVENTS_PREFIX = "cluster/events/"
LOCK_KEY = "cluster/tick/lock"
# How many nodes (and problems) an event lists by name; the counts are always complete.
EVENT_LIST_MAX = 50
ERROR_MAX = 400


# -- plans as plain data -------------------------------------------------------------------

CHANGE_KINDS = ("add_datasets", "remove_datasets", "start_bundles", "update_bundles", "stop_bundles")


def fingerprint(node_plan: Any) -> str:
    """Identifies what a node is asked to do; a failed node whose fingerprint changes is retried at once."""
    d = node_plan.to_dict()
    data = json.dumps({k: d[k] for k in ("changes", "bundles", "datasets")}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def change_items(node_plan: Any) -> frozenset[str]:
    """The node's changes as items (``"add_datasets:web-root"``, ``"start_bundles:shop"``...)."""
    ch = node_plan.changes
    return frozenset(f"{kind}:{item}" for kind in CHANGE_KINDS for item in getattr(ch, kind))


def bundle_services(node_plans: Iterable[Any], bundles: Mapping[str, Any]) -> dict[str, list[str]]:
    """{bundle: [service ids]} of every bundle the node plans start or update (``cerana_bundle_services``)."""
    out: dict[str, list[str]] = {}
    for np in node_plans:
        for b in (*np.changes.start_bundles, *np.changes.update_bundles):
            if b in bundles:
                out[b] = sorted(bundles[b].services)
    return dict(sorted(out.items()))


# The converge playbook's step tags (playbooks/converge.yml) and the plan changes each step walks
CONVERGE_STEPS = (
    ("cerana_add_datasets", ("add_datasets",)),
    ("cerana_stop_bundles", ("stop_bundles",)),
    ("cerana_run_bundles", ("start_bundles", "update_bundles")),
    ("cerana_remove_datasets", ("remove_datasets",)),
)


def skip_tags(node_plans: Iterable[Any]) -> list[str]:
    """The converge playbook's tags to skip for a run of ``node_plans``: ``cerana_plan`` (the
    daemon hands the plan over) and every step with nothing to do on any of the nodes."""
    busy = set()
    for np in node_plans:
        for tag, lists in CONVERGE_STEPS:
            if any(getattr(np.changes, name) for name in lists):
                busy.add(tag)
    return ["cerana_plan", *(tag for tag, _lists in CONVERGE_STEPS if tag not in busy)]


def problems_key(problems: Iterable[Any]) -> tuple[tuple[str, str, str], ...]:
    """A comparable form of a plan's problems (an event is recorded when it changes)."""
    return tuple(sorted((p.object, p.field, p.reason) for p in problems))


# -- nodes gone silent -------------------------------------------------------------------


def silent_nodes(
    seen: Mapping[str, tuple[str, float]], heartbeats: Mapping[str, str], now: float, ttl: float
) -> tuple[dict[str, tuple[str, float]], frozenset[str]]:
    """The nodes whose node key stopped changing: (what to pass as ``seen`` next time, their ids).

    ``heartbeats``: {node id: the ``heartbeat`` value of its ``nodes/<id>`` key}; ``now``: this
    tick's clock (the nodes' clocks are never compared with it). A node is silent once its
    heartbeat has not changed for ``ttl`` seconds: its node tick would have rewritten it every
    interval. Consul deletes the key between ``ttl`` and 2 x ``ttl`` after the session's last
    renewal; counting from the last change seen here finds a dead node at about ``ttl``.
    """
    out, silent = {}, set()
    for node, hb in heartbeats.items():
        prev = seen.get(node)
        since = prev[1] if prev is not None and prev[0] == hb else now
        out[node] = (hb, since)
        if now - since >= ttl:
            silent.add(node)
    return out, frozenset(silent)


# -- retries of failed nodes ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Retry:
    """A node not to run again before ``not_before`` unless its plan changes.

    After a failure (``failures`` >= 1) that is its backoff. After a success (``failures``
    0) it is the settling time: the same changes again right after a successful run (or
    only some of them: a bundle's ``cluster/applied`` record lands before the dataset it
    needs is reported) only mean that the node's heartbeats have not caught up yet (a
    dataset copied a moment ago is not reported before the node's next tick), not that
    the run must be repeated. ``changes`` are the :func:`change_items` that run applied.
    """

    failures: int
    not_before: float
    fingerprint: str
    error: str
    changes: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Selection:
    run: tuple[str, ...]  # nodes to run now
    waiting: dict[str, float]  # node -> when it may run again


def retry_delay(failures: int, initial: float, maximum: float) -> float:
    """initial, 2 x initial, 4 x initial, ... capped at ``maximum``."""
    return min(maximum, initial * (2 ** max(0, min(failures - 1, 30))))


def select(
    changed: Mapping[str, str],
    retries: Mapping[str, Retry],
    now: float,
    changes: Mapping[str, frozenset[str]] | None = None,
) -> Selection:
    """Of the changed nodes ({node: fingerprint}), those that run now and those still backing off.

    ``changes`` ({node: :func:`change_items`}) lets a settling node wait while its plan asks
    for nothing beyond what its last run applied.
    """
    run, waiting = [], {}
    for node, fp in sorted(changed.items()):
        r = retries.get(node)
        same = r is not None and r.fingerprint == fp
        if r is not None and not same and r.failures == 0 and changes is not None and node in changes:
            same = bool(r.changes) and changes[node] <= r.changes
        if same and now < r.not_before:
            waiting[node] = r.not_before
        else:
            run.append(node)
    return Selection(tuple(run), waiting)


def forget(retries: Mapping[str, Retry], changed: Iterable[str]) -> dict[str, Retry]:
    """Drop the retries of nodes that no longer need anything (fixed by hand, or gone)."""
    keep = set(changed)
    return {n: r for n, r in retries.items() if n in keep}


def after_run(
    retries: Mapping[str, Retry],
    outcomes: Mapping[str, str | None],
    fingerprints: Mapping[str, str],
    now: float,
    initial: float,
    maximum: float,
    settle: float = 0.0,
    changes: Mapping[str, frozenset[str]] | None = None,
) -> dict[str, Retry]:
    """Retries after a run: ``outcomes`` maps each node run to None (success) or its first error.

    A node that succeeded settles for ``settle`` seconds (see :class:`Retry`); ``changes``
    are what the run applied on each node.
    """
    out = dict(retries)
    for node, error in outcomes.items():
        fp = fingerprints.get(node, "")
        if error is None:
            if settle > 0:
                out[node] = Retry(0, now + settle, fp, "", (changes or {}).get(node, frozenset()))
            else:
                out.pop(node, None)
            continue
        prev = retries.get(node)
        failures = prev.failures + 1 if prev is not None and prev.fingerprint == fp else 1
        out[node] = Retry(failures, now + retry_delay(failures, initial, maximum), fp, error)
    return out


# -- fencing -------------------------------------------------------------------------------


def fence(holds_lock: bool, moved: str | None) -> str | None:
    """Why the plan must not be applied now (None: go ahead).

    ``moved`` is why the declared state is no longer the one the plan was made from
    (None when it still is).
    """
    if not holds_lock:
        return "this tick no longer holds the lock"
    if moved:
        return moved
    return None


# -- results of a run ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostResult:
    status: str  # ok | failed | unreachable | not run
    changed: int = 0
    error: str | None = None


def _error_text(event_data: Mapping[str, Any]) -> str:
    res = event_data.get("res") or {}
    msg = res.get("msg") or res.get("stderr") or res.get("reason") or ""
    if not msg and isinstance(res.get("results"), list):  # a loop: the first failed item
        for item in res["results"]:
            if isinstance(item, Mapping) and item.get("failed"):
                msg = item.get("msg") or item.get("stderr") or ""
                if msg:
                    break
    msg = " ".join(str(msg).split()) or "failed"
    task = event_data.get("task") or ""
    text = f"{task}: {msg}" if task else msg
    return text if len(text) <= ERROR_MAX else text[: ERROR_MAX - 3] + "..."


def host_results(events: Iterable[Mapping[str, Any]], hosts: Iterable[str]) -> dict[str, HostResult]:
    """Per-host outcome of a playbook run from its ansible-runner events.

    A host is ``ok`` when the final stats show no failure and it was processed,
    ``failed``/``unreachable`` with the first such error, and ``not run`` when it never
    appears (the run was cancelled, or it was not in the inventory).
    """
    first_error: dict[str, tuple[str, str]] = {}
    stats: Mapping[str, Any] | None = None
    for ev in events:
        kind = ev.get("event")
        data = ev.get("event_data") or {}
        if kind == "runner_on_failed" and not data.get("ignore_errors"):
            first_error.setdefault(str(data.get("host")), ("failed", _error_text(data)))
        elif kind == "runner_on_unreachable":
            first_error.setdefault(str(data.get("host")), ("unreachable", _error_text(data)))
        elif kind == "playbook_on_stats":
            stats = data
    out = {}
    for host in hosts:
        if stats is None:
            status, error = first_error.get(host, ("not run", None))
            out[host] = HostResult(status, 0, error)
            continue
        failures = (stats.get("failures") or {}).get(host, 0)
        dark = (stats.get("dark") or {}).get(host, 0)
        processed = host in (stats.get("processed") or {})
        changed = int((stats.get("changed") or {}).get(host, 0))
        if dark:
            out[host] = HostResult("unreachable", changed, first_error.get(host, ("", "unreachable"))[1])
        elif failures:
            out[host] = HostResult("failed", changed, first_error.get(host, ("", "failed"))[1])
        elif processed:
            out[host] = HostResult("ok", changed)
        else:
            why = "the playbook did nothing on this host (no plan for its cerana_node_id?)"
            out[host] = HostResult("not run", 0, first_error.get(host, ("", why))[1])
    return out


def run_status(results: Mapping[str, HostResult], canceled: bool = False) -> str:
    if canceled:
        return "canceled"
    good = sum(1 for r in results.values() if r.status == "ok")
    if good == len(results):
        return "ok"
    return "partial" if good else "failed"


# -- applied records -------------------------------------------------------------------------


def applied_after(previous: Mapping[str, Any], node_plan: Any, now: float, applied_cls: type) -> dict[str, Any]:
    """The node's ``cluster/applied/<node>`` ({bundle: Applied}) after its plan was applied.

    Bundles started or updated now get the planned digest at ``now``; the node's other
    desired bundles keep their record (deferred updates keep the old digest); bundles no
    longer desired on the node are dropped.
    """
    touched = set(node_plan.changes.start_bundles) | set(node_plan.changes.update_bundles)
    out = {}
    for bundle, digest in sorted(node_plan.bundles.items()):
        if bundle in touched:
            out[bundle] = applied_cls(digest=digest, time=now)
        elif bundle in previous:
            out[bundle] = previous[bundle]
    return out


# -- events ------------------------------------------------------------------------------------

_EVENT_KEY = re.compile(r"^cluster/events/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z(-[0-9a-z]+)?$")


def event_key(time_text: str, tag: str) -> str:
    """``cluster/events/<RFC 3339 UTC time>-<tag>``: keys sort by time."""
    return f"{EVENTS_PREFIX}{time_text}-{tag}"


def prune(keys: Sequence[str], keep: int) -> list[str]:
    """The oldest event keys beyond the newest ``keep`` (keys that are not events are left alone)."""
    events = sorted(k for k in keys if _EVENT_KEY.match(k))
    return events[: max(0, len(events) - keep)]


def oldest_beyond(names: Iterable[str], keep: int) -> list[str]:
    """Of names that sort by age, those beyond the newest ``keep`` (old run directories)."""
    ordered = sorted(names)
    return ordered[: max(0, len(ordered) - keep)]


def _bounded(items: Sequence[Any], limit: int = EVENT_LIST_MAX) -> list[Any]:
    return list(items[:limit])


def plan_summary(node_plans: Mapping[str, Any], changed: Sequence[str]) -> dict[str, Any]:
    """Counts of every kind of change, and the first nodes' changes by name."""
    counts = dict.fromkeys(CHANGE_KINDS, 0)
    nodes = {}
    for node in changed:
        np = node_plans[node]
        entry = {}
        for kind in CHANGE_KINDS:
            items = list(getattr(np.changes, kind))
            counts[kind] += len(items)
            if items:
                entry[kind] = items
        if len(nodes) < EVENT_LIST_MAX:
            nodes[node] = entry
    deferred = {n: list(p.deferred) for n, p in sorted(node_plans.items()) if p.deferred}
    return {
        "changed_nodes": len(changed),
        "counts": counts,
        "nodes": nodes,
        "deferred": dict(list(deferred.items())[:EVENT_LIST_MAX]),
    }


def run_event(
    *,
    time_text: str,
    applier: str,
    index: int,
    status: str,
    summary: Mapping[str, Any],
    results: Mapping[str, HostResult],
    hosts: Mapping[str, str],
    retries: Mapping[str, Retry],
    problems: Sequence[Mapping[str, str]],
    duration: float,
    run_id: str,
    now: float,
) -> dict[str, Any]:
    """The event of one converge run.

    ``hosts`` maps node ids to inventory host names; ``retries`` are the nodes backing off
    after the run (those that failed in it, and those still waiting from before).
    """
    by_status: dict[str, list[str]] = {"ok": [], "failed": [], "unreachable": [], "not run": []}
    for node in sorted(results):
        by_status.setdefault(results[node].status, []).append(node)
    errors = {n: results[n].error for n in sorted(results) if results[n].status != "ok" and results[n].error}
    changed = [n for n in sorted(results) if results[n].status == "ok" and results[n].changed]
    failed = by_status["failed"] + by_status["unreachable"] + by_status["not run"]
    return {
        "time": time_text,
        "kind": "run",
        "status": status,
        "applier": applier,
        "index": index,
        "run": run_id,
        "duration": round(duration, 3),
        "plan": dict(summary),
        "nodes": {
            "run": len(results),
            "counts": {"ok": len(by_status["ok"]), "changed": len(changed), "failed": len(failed)},
            "ok": _bounded(by_status["ok"]),
            "changed": _bounded(changed),
            "failed": _bounded(failed),
            "errors": dict(list(errors.items())[:EVENT_LIST_MAX]),
            "hosts": {n: hosts[n] for n in sorted(results)[:EVENT_LIST_MAX] if hosts.get(n, n) != n},
        },
        "retries": {
            n: {"failures": r.failures, "retry_in": round(max(0.0, r.not_before - now), 1)}
            for n, r in sorted(retries.items())[:EVENT_LIST_MAX]
            if r.failures
        },
        "problems": _bounded(problems),
    }


def problems_event(
    *, time_text: str, applier: str, index: int, problems: Sequence[Mapping[str, str]]
) -> dict[str, Any]:
    """The event recorded when the plan's problems change and nothing is run."""
    return {
        "time": time_text,
        "kind": "problems",
        "status": "problems" if problems else "resolved",
        "applier": applier,
        "index": index,
        "problems": _bounded(problems),
        "problem_count": len(problems),
    }


def log_line(event: Mapping[str, Any]) -> str:
    """One log line summarising an event."""
    if event.get("kind") == "problems":
        probs = event.get("problems") or []
        if not probs:
            return "plan problems resolved"
        shown = "; ".join(f"{p['object']} {p['field']}: {p['reason']}" for p in probs[:5])
        return f"plan problems: {event.get('problem_count', 0)}" + (f" ({shown})" if shown else "")
    nodes = event["nodes"]
    parts = [
        f"run {event['run']}: {event['status']} in {event['duration']:.1f} s",
        f"{nodes['run']} node(s), {nodes['counts']['changed']} changed",
    ]
    if nodes["failed"]:
        parts.append("failed: " + ", ".join(f"{n} ({nodes['errors'].get(n, '?')})" for n in nodes["failed"][:5]))
    if event.get("retries"):
        parts.append(f"{len(event['retries'])} node(s) to retry")
    if event.get("problems"):
        parts.append(f"{len(event['problems'])} plan problem(s)")
    return "; ".join(parts)


# -- inventory ---------------------------------------------------------------------------------


def host_map(inventory: Mapping[str, Any]) -> dict[str, str]:
    """{node id: inventory host} from ``ansible-inventory --list`` output.

    A host's node id is its ``cerana_node_id`` variable, else its name.
    """
    hostvars = (inventory.get("_meta") or {}).get("hostvars") or {}
    hosts = set(hostvars)
    for name, group in inventory.items():
        if name != "_meta" and isinstance(group, Mapping):
            hosts.update(group.get("hosts") or ())
    out = {}
    for host in sorted(hosts):
        node = _plain((hostvars.get(host) or {}).get("cerana_node_id")) or host
        out.setdefault(str(node), host)
    return out


def _plain(value: Any) -> Any:
    """A value of ``ansible-inventory --list`` JSON without its tag: ansible-core 2.19 writes
    variables from inventory plugins as ``{"__ansible_unsafe": "..."}``."""
    if isinstance(value, Mapping) and len(value) == 1 and "__ansible_unsafe" in value:
        return value["__ansible_unsafe"]
    return value


def generated_inventory(nodes: Mapping[str, Any], targets: Iterable[str], group_vars: Mapping[str, Any]) -> dict:
    """An inventory of the target nodes, named by node id, reached at their first address.

    ``group_vars`` go to the group ``cerana_nodes`` (not ``all``, whose variables the
    implicit localhost would pick up too).
    """
    hosts = {}
    for node_id in sorted(targets):
        node = nodes.get(node_id)
        hv: dict[str, Any] = {"cerana_node_id": node_id}
        if node is not None and node.addresses:
            hv["ansible_host"] = node.addresses[0]
        hosts[node_id] = hv
    return {"all": {"children": {"cerana_nodes": {"hosts": hosts, "vars": dict(group_vars)}}}}


# -- waiting -------------------------------------------------------------------------------------


def next_wait(now: float, deadlines: Iterable[float], resync_at: float) -> float:
    """Seconds until the next pass must run regardless of Consul changes."""
    return max(0.0, min([resync_at, *deadlines]) - now)

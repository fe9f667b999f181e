"""The pure core of cerana-node-tick: no I/O, no clock, no logging.

Everything here takes what was collected and the current time as arguments and returns
values: the Node and heartbeat objects to write, which checks are due, which historical
samples to prune, how long to back off, and what a change of connection state means.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from cerana_nodetick.collect import Running, Sample

NOT_CHECKED = "not checked yet"
NOT_RUNNING = "service is not running"
RUNNING, STOPPED = "running", "stopped"
DEFAULT_HOST = "127.0.0.1"  # the default ``host`` of http and tcp checks (``_models.HEALTH_CHECK_ARGS``)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a bundle's checks run on this node: its instance ``address`` and network namespace file."""

    address: str
    netns: str


def placed_args(check: m.HealthCheck, place: Placement | None) -> dict:
    """The arguments ``check`` runs with: an http/tcp check to the default host goes to the instance's address.

    A bundle with a network listens on its own address, not on the node's 127.0.0.1; a
    ``host`` given explicitly (anything but 127.0.0.1) is kept.
    """
    args = dict(check.args)
    if place is not None and check.kind in ("http", "tcp") and args.get("host", DEFAULT_HOST) == DEFAULT_HOST:
        args["host"] = place.address
    return args


def build_node(node_id: str, sample: Sample, labels: Mapping[str, str], now: datetime.datetime) -> m.Node:
    return m.Node(
        id=node_id,
        hostname=sample.hostname,
        heartbeat=m.format_time(now),
        addresses=tuple(sample.addresses),
        cpu_count=sample.cpu_count,
        load=tuple(round(x, 2) for x in sample.load),
        memory_total=sample.memory.total,
        memory_free=sample.memory.available,
        disk_total=sample.disk_total,
        disk_free=sample.disk_free,
        labels=dict(sorted(labels.items())),
    )


def dataset_heartbeats(
    node_id: str, dataset_ids: Iterable[str], running: Iterable[Running], now: datetime.datetime
) -> dict[str, m.DatasetHeartbeat]:
    """{key: heartbeat} for each dataset present; in use when a live instance on this node mounts it."""
    in_use = {d for r in running if r.running for d in r.instance.datasets}
    when = m.format_time(now)
    return {
        m.dataset_heartbeat_key(d, node_id): m.DatasetHeartbeat(dataset=d, node=node_id, in_use=d in in_use, time=when)
        for d in sorted(set(dataset_ids))
    }


def service_checks(overlaid: Mapping | None) -> dict[str, dict[str, m.HealthCheck]]:
    """{service id: {check id: HealthCheck}} from an overlaid bundle (``Objects.overlay``) or a plain bundle dict."""
    out: dict[str, dict[str, m.HealthCheck]] = {}
    for sid, svc in ((overlaid or {}).get("services") or {}).items():
        checks = svc.get("health_checks") or {}
        out[sid] = {
            cid: m.HealthCheck.from_dict(c, f"bundle.services.{sid}.health_checks.{cid}") for cid, c in checks.items()
        }
    return out


CheckId = tuple[str, str, str]  # (bundle, service, check)


def bundle_heartbeats(
    node_id: str,
    running: Iterable[Running],
    checks: Mapping[str, Mapping[str, Mapping[str, m.HealthCheck]]],
    results: Mapping[CheckId, str | None],
    now: datetime.datetime,
    addresses: Mapping[str, str] | None = None,
) -> dict[str, m.BundleHeartbeat]:
    """{key: heartbeat} per bundle with instances on this node.

    ``checks`` is {bundle: {service: {check id: HealthCheck}}}; ``results`` the latest
    outcome of each check (None: passed, text: the error). A check with no result yet
    reports :data:`NOT_CHECKED`; the checks of a stopped instance report :data:`NOT_RUNNING`.
    ``addresses`` maps a bundle to its network's address on this node (its heartbeat's
    ``address``; null for a bundle without one).
    """
    addresses = addresses or {}
    per_bundle: dict[str, dict[str, dict]] = {}
    for r in running:
        inst = r.instance
        svc_checks = (checks.get(inst.bundle) or {}).get(inst.service) or {}
        if r.running:
            health = {cid: results.get((inst.bundle, inst.service, cid), NOT_CHECKED) for cid in svc_checks}
        else:
            health = dict.fromkeys(svc_checks, NOT_RUNNING)
        per_bundle.setdefault(inst.bundle, {})[inst.service] = {
            "state": RUNNING if r.running else STOPPED,
            "health": dict(sorted(health.items())),
        }
    when = m.format_time(now)
    return {
        m.bundle_heartbeat_key(b, node_id): m.BundleHeartbeat(
            bundle=b, node=node_id, time=when, services=dict(sorted(s.items())), address=addresses.get(b)
        )
        for b, s in sorted(per_bundle.items())
    }


def due_checks(
    wanted: Mapping[CheckId, m.HealthCheck],
    last_started: Mapping[CheckId, float],
    in_flight: Iterable[CheckId],
    now: float,
) -> list[CheckId]:
    """The checks to start now: never run, or ``interval`` seconds since they last started, and not running."""
    busy = set(in_flight)
    return sorted(
        cid
        for cid, check in wanted.items()
        if cid not in busy and (cid not in last_started or now - last_started[cid] >= check.interval)
    )


def history_due(last_sample: float | None, now: float, interval: float) -> bool:
    return last_sample is None or now - last_sample >= interval


def history_to_prune(keys: Iterable[str], node_id: str, now: datetime.datetime, retention: int) -> list[str]:
    """The keys of ``history/nodes/<node_id>/<time>`` samples older than ``retention`` seconds.

    ``retention`` 0 keeps no history. Keys whose last part is not a time are left alone.
    """
    base = m.HISTORY_PREFIX + node_id + "/"
    cutoff = now - datetime.timedelta(seconds=retention)
    out = []
    for key in keys:
        if not key.startswith(base):
            continue
        try:
            when = datetime.datetime.fromisoformat(key[len(base) :].replace("Z", "+00:00"))
        except ValueError:
            continue
        if when.tzinfo is None:
            continue
        if retention == 0 or when < cutoff:
            out.append(key)
    return sorted(out)


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): ``initial * 2**(attempt-1)``, at most ``cap``."""
    if attempt < 1:
        return 0.0
    return min(cap, initial * (2.0 ** min(attempt - 1, 62)))


@dataclasses.dataclass(frozen=True)
class Link:
    """The daemon's view of Consul: ``connected``, ``unreachable`` or ``failing`` (any other store error)."""

    state: str = "starting"
    detail: str = ""
    since: float = 0.0
    failures: int = 0


def link_after(link: Link, outcome: str, detail: str, now: float) -> tuple[Link, str | None]:
    """The next Link after a tick's ``outcome`` (``ok``, ``unreachable``, ``failing``) and the line to log, if any.

    A line is produced only when the state changes (or, while failing, when the error
    text changes), so an outage logs once however long it lasts.
    """
    if outcome == "ok":
        if link.state == "connected":
            return link, None
        if link.state == "starting":
            msg = "connected to Consul; heartbeating"
        else:
            msg = f"Consul is back after {now - link.since:.1f} s ({link.failures} failed ticks); heartbeating again"
        return Link("connected", "", now, 0), msg
    state = "unreachable" if outcome == "unreachable" else "failing"
    if link.state == state and (state == "unreachable" or link.detail == detail):
        return dataclasses.replace(link, failures=link.failures + 1), None
    since = link.since if link.state in ("unreachable", "failing") else now
    if state == "unreachable":
        msg = f"Consul unreachable: {detail}; retrying with backoff"
    else:
        msg = f"tick failed: {detail}; retrying with backoff"
    return Link(state, detail, since, link.failures + 1), msg


def next_wait(link: Link, interval: float, elapsed: float, initial: float, cap: float) -> float:
    """Seconds to wait before the next tick: the rest of the interval when connected, else the backoff."""
    if link.state == "connected":
        return max(0.0, interval - elapsed)
    return backoff(link.failures, initial, cap)

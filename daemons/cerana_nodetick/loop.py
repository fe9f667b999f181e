"""The tick loop: collect, decide (``core``), write (``kv``); survive Consul outages.

:func:`run` ticks every ``interval`` seconds until ``stop`` is set. A tick that fails
because Consul is unreachable (or refuses) is retried with capped exponential backoff;
the connection state is logged once per change. On the way out the daemon destroys its
sessions, so its keys vanish at once (unless Consul is unreachable: then they expire
with their TTL).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _objects, _store
from cerana_nodetick import collect, core, health, kv
from cerana_nodetick.config import Settings

log = logging.getLogger(__name__)


class Checks:
    """Runs health checks in a thread pool at each check's interval and keeps the latest results."""

    def __init__(self, workers: int) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="health")
        self.defs: dict[core.CheckId, m.HealthCheck] = {}
        self.last_started: dict[core.CheckId, float] = {}
        self.futures: dict[core.CheckId, concurrent.futures.Future[str | None]] = {}
        self.results: dict[core.CheckId, str | None] = {}

    def _harvest(self) -> None:
        for cid, fut in list(self.futures.items()):
            if fut.done():
                del self.futures[cid]
                if cid in self.defs:
                    self.results[cid] = fut.result()

    def update(
        self,
        wanted: dict[core.CheckId, tuple[m.HealthCheck, str]],
        now: float,
        wall: datetime.datetime,
        settle: float,
    ) -> dict[core.CheckId, str | None]:
        """Start the due checks of ``wanted`` ({id: (check, instance start time)}); return the latest results.

        Waits up to ``settle`` seconds for the checks started now, so a first result
        usually makes it into this tick's heartbeat.
        """
        self._harvest()
        for cid in list(self.defs):
            if cid not in wanted or self.defs[cid] != wanted[cid][0]:
                self.defs.pop(cid, None)
                self.last_started.pop(cid, None)
                self.results.pop(cid, None)
        self.defs.update({cid: check for cid, (check, _) in wanted.items()})
        started = []
        for cid in core.due_checks(self.defs, self.last_started, self.futures, now):
            check, since = wanted[cid]
            self.last_started[cid] = now
            fut = self.pool.submit(health.run_check, check.kind, check.args, check.timeout, started=since, now=wall)
            self.futures[cid] = fut
            started.append(fut)
        if started and settle > 0:
            concurrent.futures.wait(started, timeout=settle)
            self._harvest()
        return dict(self.results)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class NodeTick:
    """One node's heartbeats; :meth:`tick` does one pass and raises StoreError when Consul fails it."""

    def __init__(
        self,
        settings: Settings,
        node_id: str,
        store: _store.Store,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime.datetime] = m.utc_now,
        sample: Callable[[Path, tuple[str, ...]], collect.Sample] = collect.read_sample,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.store = store
        self.objects = _objects.Objects(store)
        self.clock = clock
        self.wall = wall
        self.sample = sample
        self.node = kv.NodeKey(store, node_id)
        self.datasets = kv.HeartbeatGroup(store, node_id, m.DATASET_HEARTBEATS_PREFIX)
        self.bundles = kv.HeartbeatGroup(store, node_id, m.BUNDLE_HEARTBEATS_PREFIX)
        self.checks = Checks(settings.check_workers)
        self.config = m.ClusterConfig()
        self.last_history: float | None = None
        self._reported: dict[str, object] = {}

    def _report_once(self, topic: str, value: object, level: int, msg: str, *args: object) -> None:
        """Log ``msg`` when ``value`` for ``topic`` differs from last time (no log spam every tick)."""
        if self._reported.get(topic) != value:
            self._reported[topic] = value
            if value:
                log.log(level, msg, *args)

    def read_config(self) -> m.ClusterConfig:
        try:
            stored = self.objects.get_config(m.ClusterConfig, m.CLUSTER_CONFIG_KEY)
        except _objects.StoredValueError as e:
            self._report_once("cluster-config", str(e), logging.ERROR, "%s; keeping the last good settings", e)
            return self.config
        self._report_once("cluster-config", None, logging.INFO, "")
        return stored.obj if stored else m.ClusterConfig()

    def bundle_checks(self, bundle_ids: set[str]) -> dict[str, dict[str, dict[str, m.HealthCheck]]]:
        """{bundle: {service: {check id: HealthCheck}}} for the local bundles, from their overlaid configuration."""
        if not bundle_ids:
            return {}
        try:
            bundles = {s.obj.id: s.obj for s in self.objects.list("bundle") if s.obj.id in bundle_ids}
            services = {s.obj.id: s.obj for s in self.objects.list("service")}
            datasets = {s.obj.id: s.obj for s in self.objects.list("dataset")}
        except _objects.StoredValueError as e:
            self._report_once("declared", str(e), logging.ERROR, "%s; health checks are not run", e)
            return {}
        self._report_once("declared", None, logging.INFO, "")
        out = {}
        for bid, bundle in bundles.items():
            try:
                out[bid] = core.service_checks(m.overlay_bundle(bundle, services, datasets))
                self._report_once("overlay:" + bid, None, logging.INFO, "")
            except m.ValidationError as e:
                self._report_once(
                    "overlay:" + bid, str(e), logging.WARNING, "bundle %s: %s; using its own checks only", bid, e
                )
                out[bid] = core.service_checks(bundle.to_dict())
        unknown = sorted(bundle_ids - set(bundles))
        self._report_once(
            "unknown-bundles", tuple(unknown), logging.WARNING, "instances of undeclared bundles: %s", unknown
        )
        return out

    def tick(self) -> None:
        s = self.settings
        now, mono = self.wall(), self.clock()
        self.config = cfg = self.read_config()

        sample = self.sample(s.data_dir, s.interfaces)
        node = core.build_node(self.node_id, sample, s.labels, now)
        self.node.put(node.to_bytes(), cfg.node_ttl)

        running, errors = collect.read_instances(s.run_dir)
        self._report_once("instance-errors", tuple(errors), logging.WARNING, "unreadable instance records: %s", errors)
        dataset_ids, ignored = collect.read_datasets(s.data_dir)
        self._report_once("ignored-datasets", ignored, logging.WARNING, "not dataset ids, ignored: %s", list(ignored))
        hbs = core.dataset_heartbeats(self.node_id, dataset_ids, running, now)
        self.datasets.sync({k: v.to_bytes() for k, v in hbs.items()}, cfg.dataset_ttl)

        checks = self.bundle_checks({r.instance.bundle for r in running})
        starts = {(r.instance.bundle, r.instance.service): r.instance.started for r in running if r.running}
        wanted = {
            (b, sid, cid): (check, starts[(b, sid)])
            for b, svcs in checks.items()
            for sid, svc_checks in svcs.items()
            if (b, sid) in starts
            for cid, check in svc_checks.items()
        }
        results = self.checks.update(wanted, mono, now, settle=min(1.0, s.interval / 2))
        bhbs = core.bundle_heartbeats(self.node_id, running, checks, results, self.wall())
        self.bundles.sync({k: v.to_bytes() for k, v in bhbs.items()}, cfg.bundle_ttl)

        if core.history_due(self.last_history, mono, s.history_interval):
            pruned = kv.write_history(self.store, node, now, cfg.history_retention)
            self.last_history = mono
            if pruned:
                log.debug("pruned %d historical samples", pruned)

    def lost_contact(self) -> None:
        """After an outage, re-read which heartbeat keys exist instead of trusting memory."""
        self.datasets.forget()
        self.bundles.forget()

    def shutdown(self, reachable: bool) -> None:
        self.checks.close()
        if not reachable:
            log.warning("stopping while Consul is unreachable: this node's keys expire with their TTL")
            return
        try:
            self.node.destroy()
            self.datasets.destroy()
            self.bundles.destroy()
            log.info("stopped; this node's keys and sessions are removed")
        except _store.StoreError as e:
            log.warning("stopping: could not remove this node's keys (%s); they expire with their TTL", e)


def run(
    settings: Settings,
    node_id: str,
    *,
    store: _store.Store,
    stop: threading.Event,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], datetime.datetime] = m.utc_now,
    ticker: NodeTick | None = None,
) -> None:
    """Tick until ``stop`` is set."""
    tick = ticker or NodeTick(settings, node_id, store, clock=clock, wall=wall)
    link = core.Link()
    log.info("node %s: ticking every %g s against Consul at %s", node_id, settings.interval, store.address)
    try:
        while not stop.is_set():
            started = clock()
            outcome, detail = "ok", ""
            try:
                tick.tick()
            except _store.Unreachable as e:
                outcome, detail = "unreachable", e.reason
            except _store.StoreError as e:
                outcome, detail = "failing", str(e)
            except collect.CollectError as e:
                outcome, detail = "failing", str(e)
            except Exception as e:  # a bug must not stop the heartbeats of a whole node
                outcome, detail = "failing", f"{type(e).__name__}: {e}"
                log.debug("unexpected error in a tick", exc_info=True)
            before = link.state
            link, msg = core.link_after(link, outcome, detail, clock())
            if msg:
                log.log(logging.INFO if outcome == "ok" else logging.WARNING, msg)
            if before == "connected" and link.state != "connected":
                tick.lost_contact()
            stop.wait(
                core.next_wait(link, settings.interval, clock() - started, settings.retry_initial, settings.retry_max)
            )
    finally:
        tick.shutdown(reachable=link.state == "connected")

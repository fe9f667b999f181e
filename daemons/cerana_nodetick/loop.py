"""The tick loop: collect, decide (``core``), write (``kv``); survive Consul outages.

After the heartbeats, each tick keeps the node's networking in line with the cluster
(:meth:`NodeTick.network_tick`): the vxlan overlay's peers and the published ports
(``_portmap``: nftables, loaded only when the rendered text changed).

:func:`run` ticks every ``interval`` seconds until ``stop`` is set. A tick that fails
because Consul is unreachable (or refuses) is retried with capped exponential backoff;
the connection state is logged once per change. On the way out the daemon destroys its
sessions, so its keys vanish at once (unless Consul is unreachable: then they expire
with their TTL).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net, _objects, _portmap, _store
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from cerana_nodetick import collect, core, health, kv
from cerana_nodetick.config import Settings

log = logging.getLogger(__name__)
# bundle_network binds service-network leases for a day; renewing every hour keeps them
LEASE_RENEWAL_INTERVAL = 3600.0


# How long the first check of a new (or restarted) instance keeps being retried while it fails
# (each failure is reported meanwhile): the time an instance may take to start listening.
FIRST_CHECK_WINDOW = 10.0


class Checks:
    """Runs health checks in a thread pool at each check's interval and keeps the latest results.

    ``wake`` is set when the first check of an instance has finished: the loop then ticks at
    once, so a passing first check reaches the heartbeat without waiting for the interval.
    """

    def __init__(self, workers: int) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="health")
        self.defs: dict[core.CheckId, tuple[m.HealthCheck, core.Placement | None, str]] = {}
        self.last_started: dict[core.CheckId, float] = {}
        self.futures: dict[core.CheckId, concurrent.futures.Future[str | None]] = {}
        self.results: dict[core.CheckId, str | None] = {}
        self.wake = threading.Event()
        self.stops: dict[core.CheckId, threading.Event] = {}  # ends the retries of a first check

    def _interim(self, cid: core.CheckId, defn: object, result: str | None) -> None:
        """A failed try of a first check, reported while it is retried (if the check is still the same)."""
        if self.defs.get(cid) is defn:
            self.results[cid] = result

    def _harvest(self) -> None:
        for cid, fut in list(self.futures.items()):
            if fut.done():
                del self.futures[cid]
                if cid in self.defs:
                    self.results[cid] = fut.result()

    def update(
        self,
        wanted: dict[core.CheckId, tuple[m.HealthCheck, str, core.Placement | None]],
        now: float,
        wall: datetime.datetime,
        settle: float,
    ) -> dict[core.CheckId, str | None]:
        """Start the due checks of ``wanted``; return the latest results.

        ``wanted`` is {check id: (check, instance start time, placement)}. A check whose
        definition or placement (the bundle network) changed, or whose instance started again
        (a restart: the old process's result says nothing of the new one), starts afresh: its
        first run is retried while it fails (:func:`health.run_first_check`, for up to
        :data:`FIRST_CHECK_WINDOW` seconds), each failure reported meanwhile, and ``wake`` is
        set when it ends. Waits up to ``settle`` seconds for the checks started now, so a
        first result usually makes it into this tick's heartbeat.
        """
        self._harvest()
        for cid in list(self.defs):
            if cid not in wanted or self.defs[cid] != (wanted[cid][0], wanted[cid][2], wanted[cid][1]):
                self.defs.pop(cid, None)
                self.last_started.pop(cid, None)
                self.results.pop(cid, None)
                self.futures.pop(cid, None)  # still running for the old one: its result is dropped
                self.stops.pop(cid, threading.Event()).set()  # and its retries end
        for cid, (check, since, place) in wanted.items():
            if cid not in self.defs:
                self.defs[cid] = (check, place, since)
        started = []
        defs = {cid: check for cid, (check, _, _) in self.defs.items()}
        for cid in core.due_checks(defs, self.last_started, self.futures, now):
            check, since, place = wanted[cid]
            first = cid not in self.last_started  # a new instance, or its check changed
            self.last_started[cid] = now
            run, extra = health.run_check, {}
            if first:
                report = functools.partial(self._interim, cid, self.defs[cid])
                stop = self.stops[cid] = threading.Event()
                run = health.run_first_check
                extra = {"within": FIRST_CHECK_WINDOW, "report": report, "stop": stop, "sleep": stop.wait}
            fut = self.pool.submit(
                run,
                check.kind,
                core.placed_args(check, place),
                check.timeout,
                started=since,
                now=wall,
                netns=place.netns if place else None,
                **extra,
            )
            self.futures[cid] = fut
            started.append(fut)
            if first:
                fut.add_done_callback(lambda _fut: self.wake.set())
        if started and settle > 0:
            concurrent.futures.wait(started, timeout=settle)
            self._harvest()
        return dict(self.results)

    def close(self) -> None:
        for stop in self.stops.values():
            stop.set()
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
        self.last_lease_renewal: float | None = None
        self._reported: dict[str, object] = {}
        self.bridge = _bundle_net.BRIDGE
        self.nft = "nft"
        self.applied_ports: str | None = None  # the ruleset text last loaded (None: not known, load the next one)

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

    def read_bundles(self) -> list[m.Bundle] | None:
        """The declared bundles (one recursive read), or None when a stored bundle does not decode."""
        try:
            bundles = [s.obj for s in self.objects.list("bundle")]
        except _objects.StoredValueError as e:
            self._report_once(
                "declared", str(e), logging.ERROR, "%s; health checks are not run, published ports are kept", e
            )
            return None
        self._report_once("declared", None, logging.INFO, "")
        return bundles

    def read_networks(self) -> dict[str, _bundle_net.NetworkRecord]:
        """{bundle: NetworkRecord} of the bundle networks on this node (``<run_dir>/networks/``)."""
        records, errors = _bundle_net.read_networks(str(self.settings.run_dir))
        self._report_once(
            "network-errors", tuple(errors), logging.WARNING, "unreadable bundle network records: %s", errors
        )
        return {r.bundle: r for r in records}

    def bundle_checks(
        self, bundle_ids: set[str], declared: list[m.Bundle] | None
    ) -> dict[str, dict[str, dict[str, m.HealthCheck]]]:
        """{bundle: {service: {check id: HealthCheck}}} for the local bundles, from their overlaid configuration."""
        if not bundle_ids or declared is None:
            return {}
        try:
            bundles = {b.id: b for b in declared if b.id in bundle_ids}
            services = {s.obj.id: s.obj for s in self.objects.list("service")}
            datasets = {s.obj.id: s.obj for s in self.objects.list("dataset")}
        except _objects.StoredValueError as e:
            self._report_once("declared-parts", str(e), logging.ERROR, "%s; health checks are not run", e)
            return {}
        self._report_once("declared-parts", None, logging.INFO, "")
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

        networks = self.read_networks()
        has_bridge = self.bridge_exists()
        local = {r.instance.bundle for r in running}
        # the declared bundles are read only when something here needs them (an idle node stays cheap)
        declared = self.read_bundles() if local or has_bridge else []
        checks = self.bundle_checks(local, declared)
        places = {b: core.Placement(r.address, r.netns_path) for b, r in networks.items()}
        starts = {(r.instance.bundle, r.instance.service): r.instance.started for r in running if r.running}
        wanted = {
            (b, sid, cid): (check, starts[(b, sid)], places.get(b))
            for b, svcs in checks.items()
            for sid, svc_checks in svcs.items()
            if (b, sid) in starts
            for cid, check in svc_checks.items()
        }
        results = self.checks.update(wanted, mono, now, settle=min(1.0, s.interval / 2))
        addresses = {b: r.address for b, r in networks.items()}
        bhbs = core.bundle_heartbeats(self.node_id, running, checks, results, self.wall(), addresses)
        self.bundles.sync({k: v.to_bytes() for k, v in bhbs.items()}, cfg.bundle_ttl)

        self.network_tick(cfg, has_bridge, declared, list(bhbs.values()), networks)

        if core.history_due(self.last_history, mono, s.history_interval):
            pruned = kv.write_history(self.store, node, now, cfg.history_retention)
            self.last_history = mono
            if pruned:
                log.debug("pruned %d historical samples", pruned)

    def bridge_exists(self) -> bool:
        try:
            socket.if_nametoindex(self.bridge)
        except OSError:
            return False
        return True

    def network_tick(
        self,
        cfg: m.ClusterConfig,
        has_bridge: bool,
        declared: list[m.Bundle] | None,
        own: list[m.BundleHeartbeat],
        networks: dict[str, _bundle_net.NetworkRecord],
    ) -> None:
        """Overlay peers and published ports. Consul read errors raise (the tick fails); nothing else does."""
        trusted = {r.gateway for r in networks.values()}
        if has_bridge:
            nodes = self.objects.nodes()
            self.sync_overlay(nodes, cfg.service_network)
            self.renew_leases(cfg.service_network)
            net = ipaddress.IPv4Network(cfg.service_network)
            for node in nodes:  # the nodes' own addresses on their bridges (reported in their heartbeats)
                trusted.update(a for a in node.addresses if _in_network(a, net))
        if declared is None:
            return  # a stored bundle does not decode: keep the rules as they are
        if not has_bridge or not any(b.ports for b in declared):
            text = ""
        else:
            heartbeats = [
                hb
                for hbs in self.objects.bundle_heartbeats().values()
                for hb in hbs
                if hb.node != self.node_id  # this node's own: the ones just computed
            ]
            try:
                ruleset = _portmap.render(declared, heartbeats + own, self.bridge, sorted(trusted))
            except ValueError as e:
                self._report_once("ports", str(e), logging.ERROR, "published ports: %s", e)
                return
            self._report_once(
                "ports-problems", ruleset.problems, logging.WARNING, "published ports: %s", "; ".join(ruleset.problems)
            )
            text = ruleset.text
        self.apply_ports(text)

    def apply_ports(self, text: str) -> None:
        """Load the ruleset when it changed; log once per distinct failure and retry on the next tick."""
        try:
            if _portmap.apply_ruleset(text, self.applied_ports, nft=self.nft):
                log.info("published ports: %s", "ruleset loaded" if text else "no rules (tables removed)")
        except _portmap.NftMissing as e:
            if not text:  # without nft there are no tables to remove either
                self.applied_ports = text
                return
            self._report_once("ports", "missing", logging.WARNING, "published ports are not set: %s", e)
            return
        except Exception as e:  # never let the ports stop the heartbeats
            detail = str(e) if isinstance(e, _portmap.NftError) else f"{type(e).__name__}: {e}"
            self._report_once("ports", detail, logging.ERROR, "published ports: nft failed: %s; retrying", detail)
            return
        self.applied_ports = text
        if self._reported.get("ports"):
            log.info("published ports: loaded again")
        self._report_once("ports", None, logging.INFO, "")

    def sync_overlay(self, nodes: list[m.Node], service_network: str) -> None:
        try:
            from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio

            done = _bundle_netio.sync_overlay(nodes, self.node_id, service_network)
        except Exception as e:  # never let the overlay stop the heartbeats
            detail = f"{type(e).__name__}: {e}"
            self._report_once("overlay", detail, logging.ERROR, "overlay peers not synced: %s", detail)
            return
        self._report_once("overlay", None, logging.INFO, "")
        if done.get("added") or done.get("removed"):
            log.info("overlay peers: added %s, removed %s", done.get("added"), done.get("removed"))

    def renew_leases(self, service_network: str) -> None:
        """Once an hour, renew this node's service-network leases (bridge and bundle networks),
        which bundle_network binds for a day: a long-lived network keeps its address."""
        mono = time.monotonic()
        if not core.history_due(self.last_lease_renewal, mono, LEASE_RENEWAL_INTERVAL):
            return
        try:
            from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio

            done = _bundle_netio.renew_leases(self.store, self.node_id, str(self.settings.run_dir), service_network)
        except Exception as e:  # never let the leases stop the heartbeats; retried next tick
            detail = f"{type(e).__name__}: {e}"
            self._report_once("leases", detail, logging.ERROR, "service leases not renewed: %s", detail)
            return
        self.last_lease_renewal = mono
        errors = "; ".join(done["errors"])
        self._report_once("leases", errors or None, logging.ERROR, "service leases: %s", errors)
        if done["renewed"]:
            log.info("service leases renewed: %s", ", ".join(done["renewed"]))

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


def _in_network(text: str, net: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.ip_address(text) in net
    except ValueError:
        return False


def records_changed(run_dir: Path, seen: tuple[tuple[str, int], ...], wake: threading.Event) -> bool:
    return wake.is_set() or collect.records_signature(run_dir) != seen


RECORDS_POLL = 0.1  # seconds between looks at the instance records while waiting for the next tick


def wait_or_change(
    stop: threading.Event,
    seconds: float,
    changed: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
    poll: float = RECORDS_POLL,
) -> bool:
    """Wait up to ``seconds``, looking every ``poll`` s whether ``changed()``; True when it did
    (or ``stop`` was set), False when the time ran out."""
    deadline = clock() + seconds
    while True:
        left = deadline - clock()
        if left <= 0:
            return False
        if stop.wait(min(poll, left)) or changed():
            return True


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
            records = collect.records_signature(settings.run_dir)
            tick.checks.wake.clear()
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
            elapsed = clock() - started
            wait = core.next_wait(link, settings.interval, elapsed, settings.retry_initial, settings.retry_max)
            if link.state == "connected":
                # an instance started, restarted or stopped here, or its first check ended: tick now
                changed = functools.partial(records_changed, settings.run_dir, records, tick.checks.wake)
                wait_or_change(stop, wait, changed, clock)
            else:
                stop.wait(wait)
    finally:
        tick.shutdown(reachable=link.state == "connected")

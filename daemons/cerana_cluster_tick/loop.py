"""The reconcile loop: lead, read, plan, fence, converge, record, wait; survive Consul outages.

:func:`run` loops until ``stop`` is set:

1. Not leading: wait for the lock (:meth:`kv.Leadership.acquire`).
2. A pass (:meth:`ClusterTick.step`): read the state, plan; nodes whose plan is empty
   need nothing (no Ansible run at all when none differs); nodes backing off after a
   failure wait for their retry. Then fencing: the lock is still ours and the declared
   objects did not change since the read (else plan again at once). Then one converge
   run through ansible-runner, limited to those nodes; ``cluster/applied/<node>`` for
   each node that succeeded, an event for the run; failed nodes back off.
3. Wait for a change under the store prefix (:class:`kv.Watcher`), a retry falling due,
   a re-check of what was just applied (``grace``), or the periodic full resync.

Errors from Consul back off exponentially (logged once when the link goes and once when
it is back); a lost lock stops leading; any other error is logged and retried - the
loop itself never dies.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ansible_collections.cerana.platform.plugins.module_utils import _clusterstate, _planner, _store
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from cerana_cluster_tick import core, kv
from cerana_cluster_tick import runner as runner_mod
from cerana_cluster_tick.config import Settings

log = logging.getLogger(__name__)


class LostLock(Exception):
    """This tick found out it no longer holds the lock."""


@dataclasses.dataclass
class Unrecorded:
    """A run's results not written to Consul yet: applied records (NodePlans) and its event."""

    applied: list[Any]
    event: dict[str, Any]
    when: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Look:
    """What one read of the cluster shows: the state, its plan, what to run now, the problems."""

    state: Any
    plan: Any
    selection: core.Selection
    problems: list[dict[str, str]]
    problems_key: Any

    def new_problems(self, recorded: Any) -> bool:
        """Whether the problems differ from those last ``recorded`` in an event (and are worth one)."""
        return self.problems_key != recorded and bool(self.problems or recorded)


def run_id(when: datetime.datetime) -> str:
    """``20261130T030405.123456Z``: sortable, safe as a directory name."""
    return m.format_time(when).replace("-", "").replace(":", "")


class ClusterTick:
    """The leader's work; one :meth:`step` is one pass."""

    def __init__(
        self,
        settings: Settings,
        store: _store.Store,
        *,
        stop: threading.Event,
        executor: runner_mod.Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
        epoch: Callable[[], float] = time.time,
        wall: Callable[[], datetime.datetime] = m.utc_now,
    ) -> None:
        self.settings = settings
        self.store = store
        self.objects = Objects(store)
        self.stop = stop
        self.executor = executor or runner_mod.Executor(settings.state_dir, settings.keep_runs)
        self.clock = clock
        self.epoch = epoch
        self.wall = wall
        self.identity = settings.identity
        self.leadership = kv.Leadership(
            store, ttl=settings.lock_ttl, lock_delay=settings.lock_delay, identity=self.identity, wall=wall
        )
        self.retries: dict[str, core.Retry] = {}
        self.problems: tuple | None = None  # the problems last recorded in an event
        self.rechecks: list[float] = []  # clock() times to look again at what was applied
        self.hosts: dict[str, str] = {}  # node id -> inventory host (configured inventory)
        self._stop_seen: float | None = None
        self.unrecorded: Unrecorded | None = None
        self.on_reachable: Callable[[], Any] | None = None  # called once Consul answered in a pass
        self.runs = 0
        self.node_seen: dict[str, tuple[str, float]] = {}  # node -> (its heartbeat, clock() when it changed)
        self.silent: frozenset[str] = frozenset()
        self._node_ttl = 30.0

    # -- one pass ---------------------------------------------------------------------------

    def step(self) -> float | None:
        """One pass; returns the clock() time by which another pass is due (None: only on changes).

        A first look reads the state without its Consul index (one request less: most passes
        are woken by heartbeats and find nothing to do). Only when it finds something to run
        or to record is the state read again, index first, and that second look is the one
        acted on (fenced against its index)."""
        self._flush()
        now = self.clock()
        self.rechecks = [t for t in self.rechecks if t > now]
        look = self._look(now, with_index=False)
        if look.selection.run or look.new_problems(self.problems):
            look = self._look(now, with_index=True)
        plan, state, selection, problems = look.plan, look.state, look.selection, look.problems
        if not selection.run:
            if look.new_problems(self.problems):
                self._problems_event(plan.index, problems)
            self.problems = look.problems_key
            if selection.waiting:
                log.debug("nothing to run now; %d node(s) waiting (retry or settling)", len(selection.waiting))
            return self._due(selection.waiting)

        reason = core.fence(self.leadership.holds(), kv.declared_moved(self.store, state))
        if reason is not None:
            if not self.leadership.holds():
                raise LostLock(reason)
            log.info("not applying: %s; planning again", reason)
            return now
        self._converge(plan, state, selection, problems)
        self.problems = look.problems_key
        return self._due(self.retries_waiting())

    def _look(self, now: float, *, with_index: bool) -> Look:
        s = self.settings
        state = _clusterstate.read_state(self.objects, self.epoch(), with_index=with_index)
        if self.on_reachable is not None:
            self.on_reachable()
        state = self._without_silent_nodes(state, now)
        plan = _planner.plan(state, max_unavailable=s.max_unavailable, grace=s.grace)
        changed = plan.changed_nodes()
        fingerprints = {n: core.fingerprint(plan.nodes[n]) for n in changed}
        items = {n: core.change_items(plan.nodes[n]) for n in changed}
        self.retries = core.forget(self.retries, changed)
        selection = core.select(fingerprints, self.retries, now, items)
        return Look(state, plan, selection, [p.to_dict() for p in plan.problems], core.problems_key(plan.problems))

    def stand_down(self, why: str) -> None:
        """Stop leading after losing the lock: what was not recorded is dropped (another tick may lead now)."""
        log.warning("lost the lock (%s): standing by", why)
        if self.unrecorded is not None:
            log.warning("the results of the last run were not recorded: %s", core.log_line(self.unrecorded.event))
        self.unrecorded = None
        self.retries = {}
        self.lost_sight()
        self.leadership.release()

    def lost_sight(self) -> None:
        """Consul could not be read: the nodes could not write their heartbeats either, so
        silence is counted afresh from the next pass that reads them."""
        self.node_seen, self.silent = {}, frozenset()

    def retries_waiting(self) -> dict[str, float]:
        return {n: r.not_before for n, r in self.retries.items()}

    def _due(self, waiting: Mapping[str, float]) -> float | None:
        deadlines = [*waiting.values(), *self.rechecks]
        if self.node_seen and len(self.silent) < len(self.node_seen):
            # look again when the quietest node that still counts as live would go silent
            ttl = self._node_ttl
            deadlines.append(min(t for n, (_hb, t) in self.node_seen.items() if n not in self.silent) + ttl + 0.05)
        return min(deadlines) if deadlines else None

    def _without_silent_nodes(self, state: Any, now: float) -> Any:
        """The state less the nodes whose heartbeat stopped changing for ``node_ttl`` (see
        :func:`core.silent_nodes`): a lost node is replaced without waiting for Consul to
        expire its key (up to 2 x ``node_ttl``)."""
        self._node_ttl = float(state.config.node_ttl)
        beats = {n: node.heartbeat for n, node in state.nodes.items()}
        self.node_seen, silent = core.silent_nodes(self.node_seen, beats, now, self._node_ttl)
        if silent != self.silent:
            for n in sorted(silent - self.silent):
                log.warning("node %s: no heartbeat for %g s, treated as lost", n, self._node_ttl)
            for n in sorted(self.silent - silent):
                if n in beats:
                    log.info("node %s: heartbeating again", n)
            self.silent = silent
        if not silent:
            return state
        return dataclasses.replace(state, nodes={n: v for n, v in state.nodes.items() if n not in silent})

    # -- a converge run -----------------------------------------------------------------------

    def _converge(self, plan: Any, state: Any, selection: core.Selection, problems: list[dict[str, str]]) -> None:
        s = self.settings
        started_wall = self.wall()
        rid = run_id(started_wall)
        targets = list(selection.run)
        hosts, missing = self._hosts(targets, state)
        outcomes: dict[str, str | None] = {n: f"not in the inventory {s.inventory}" for n in missing}
        results: dict[str, core.HostResult] = {n: core.HostResult("not run", 0, outcomes[n]) for n in missing}
        run_nodes = [n for n in targets if n in hosts]
        status = "failed"
        duration = 0.0
        if run_nodes:
            shown = ", ".join(hosts[n] for n in run_nodes[:10]) + (" ..." if len(run_nodes) > 10 else "")
            log.info("run %s: converging %d node(s): %s", rid, len(run_nodes), shown)
            request = runner_mod.RunRequest(
                run_id=rid,
                playbook=s.playbook,
                inventory=self._inventory(state, run_nodes),
                hosts=[hosts[n] for n in run_nodes],
                extravars=self._extravars(plan, state, run_nodes, rid),
                envvars=self._envvars(),
                forks=s.forks,
                timeout=s.run_timeout,
                skip_tags=core.skip_tags(plan.nodes[n] for n in run_nodes),
            )
            self._stop_seen = None
            result = self.executor.run(request, cancel=self._cancel)
            self.runs += 1
            duration = result.duration
            for n in run_nodes:
                r = result.results.get(hosts[n], core.HostResult("not run", 0, result.error))
                results[n] = r
                outcomes[n] = None if r.status == "ok" else (r.error or r.status)
            status = core.run_status(results, canceled=result.canceled)
            if self.leadership.lost.is_set():
                raise LostLock("the lock was lost during run %s" % rid)
            ok = [plan.nodes[n] for n in run_nodes if outcomes[n] is None]
            if ok and any(np.changes.start_bundles or np.changes.update_bundles for np in ok):
                self.rechecks.append(self.clock() + s.grace + 0.5)
        else:
            ok = []
            status = core.run_status(results)
        fingerprints = {n: core.fingerprint(plan.nodes[n]) for n in targets}
        items = {n: core.change_items(plan.nodes[n]) for n in targets}
        self.retries = core.after_run(
            self.retries, outcomes, fingerprints, self.clock(), s.node_retry_initial, s.node_retry_max,
            settle=s.grace, changes=items,
        )  # fmt: skip
        event = core.run_event(
            time_text=m.format_time(self.wall()),
            applier=self.identity,
            index=plan.index,
            status=status,
            summary=core.plan_summary(plan.nodes, targets),
            results=results,
            hosts=hosts,
            retries=self.retries,
            problems=problems,
            duration=duration,
            run_id=rid,
            now=self.clock(),
        )
        level = logging.INFO if status == "ok" else logging.WARNING
        log.log(level, core.log_line(event))
        # What the run did is recorded even if Consul fails right now: kept, and written
        # (still fenced by the lock) at the start of the next pass.
        self.unrecorded = Unrecorded(ok, event, started_wall)
        self._flush()

    def _flush(self) -> None:
        """Write the applied records and the event of the last run, if not written yet."""
        pending = self.unrecorded
        if pending is None:
            return
        if pending.applied:
            # Stamped now, not when the run ended: the heartbeats that confirm it could not be
            # written either while Consul was away, and the planner's grace starts here.
            kv.write_applied(self.store, core.LOCK_KEY, self._session(), pending.applied, self.epoch())
            pending.applied = []
        self._record(pending.event, pending.when)
        self.unrecorded = None

    def _cancel(self) -> bool:
        if self.leadership.lost.is_set():
            return True
        if self.stop.is_set():
            now = self.clock()
            if self._stop_seen is None:
                self._stop_seen = now
                log.info("stopping: letting the current run finish (up to %g s)", self.settings.stop_timeout)
            return now - self._stop_seen >= self.settings.stop_timeout
        return False

    def _session(self) -> str:
        session = self.leadership.session
        if session is None:
            raise LostLock("no session")
        return session

    def _record(self, event: dict[str, Any], when: datetime.datetime) -> None:
        key = core.event_key(m.format_time(when), (self.leadership.session or "x")[:8])
        try:
            pruned = kv.record_event(self.store, core.LOCK_KEY, self._session(), key, event, self.settings.keep_events)
        except _store.LockNotHeld as e:
            raise LostLock(str(e)) from None
        if pruned:
            log.debug("pruned %d old event(s)", pruned)

    def _problems_event(self, index: int, problems: list[dict[str, str]]) -> None:
        event = core.problems_event(
            time_text=m.format_time(self.wall()), applier=self.identity, index=index, problems=problems
        )
        self._record(event, self.wall())
        log.log(logging.WARNING if problems else logging.INFO, core.log_line(event))

    # -- what a run is given ---------------------------------------------------------------------

    def _hosts(self, targets: list[str], state: Any) -> tuple[dict[str, str], list[str]]:
        """({node: inventory host} of the targets found, [targets not in the inventory])."""
        if not self.settings.inventory:
            return {n: n for n in targets}, []
        if any(n not in self.hosts for n in targets):
            try:
                self.hosts = runner_mod.inventory_hosts(self.settings.inventory, self._envvars())
            except Exception as e:
                log.warning("cannot read the inventory %s: %s", self.settings.inventory, e)
        return {n: self.hosts[n] for n in targets if n in self.hosts}, [n for n in targets if n not in self.hosts]

    def _inventory(self, state: Any, nodes: list[str]) -> str | dict[str, Any]:
        s = self.settings
        if s.inventory:
            return s.inventory
        group_vars: dict[str, Any] = {}
        if s.remote_user:
            group_vars["ansible_user"] = s.remote_user
        if s.private_key_file:
            group_vars["ansible_ssh_private_key_file"] = s.private_key_file
        if s.python_interpreter:
            group_vars["ansible_python_interpreter"] = s.python_interpreter
        return core.generated_inventory(state.nodes, nodes, group_vars)

    def _extravars(self, plan: Any, state: Any, nodes: list[str], rid: str) -> dict[str, Any]:
        s = self.settings
        node_plans = [plan.nodes[n] for n in nodes]
        extra: dict[str, Any] = {
            "cerana_plan": {np.node: np.to_dict() for np in node_plans},
            "cerana_bundle_services": core.bundle_services(node_plans, state.bundles),
            "cerana_kv_prefix": s.consul.prefix,
            "cerana_run_id": rid,
            "cerana_service_settle": s.service_settle,
        }
        if s.node_consul_url:
            extra["cerana_consul_url"] = s.node_consul_url
        if s.consul.token:
            extra["cerana_consul_token"] = s.consul.token
        return extra

    def _envvars(self) -> dict[str, str]:
        s = self.settings
        c = s.consul
        env = {
            "CONSUL_HTTP_ADDR": c.address,
            "CONSUL_HTTP_SSL_VERIFY": "true" if c.validate_certs else "false",
            "CERANA_KV_PREFIX": c.prefix,
            "ANSIBLE_HOST_KEY_CHECKING": "True" if s.host_key_checking else "False",
            "ANSIBLE_PIPELINING": "True" if s.pipelining else "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
        }
        for name, value in (
            ("CONSUL_HTTP_TOKEN", c.token),
            ("CONSUL_CACERT", c.ca_path),
            ("CONSUL_CLIENT_CERT", c.client_cert),
            ("CONSUL_CLIENT_KEY", c.client_key),
        ):
            if value:
                env[name] = value
        if s.inventory:  # defaults the configured inventory may override per host
            if s.remote_user:
                env["ANSIBLE_REMOTE_USER"] = s.remote_user
            if s.private_key_file:
                env["ANSIBLE_PRIVATE_KEY_FILE"] = s.private_key_file
            if s.python_interpreter:
                env["ANSIBLE_PYTHON_INTERPRETER"] = s.python_interpreter
        return env


# -- the loop ------------------------------------------------------------------------------------


class Link:
    """Consul reachability, for logging once per change and backing off."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failing: str | None = None
        self.delay = initial

    def ok(self) -> None:
        if self.failing is not None:
            log.info("Consul is reachable again")
        self.failing = None
        self.delay = self.initial

    def failed(self, reason: str) -> float:
        if self.failing is None:
            log.warning("Consul failed: %s; retrying", reason)
        elif reason != self.failing:
            log.debug("still failing: %s", reason)
        self.failing = reason
        delay, self.delay = self.delay, min(self.maximum, self.delay * 2)
        return delay


def run(
    settings: Settings,
    *,
    store: _store.Store,
    stop: threading.Event,
    executor: runner_mod.Executor | None = None,
    clock: Callable[[], float] = time.monotonic,
    tick: ClusterTick | None = None,
) -> None:
    """Lead and reconcile until ``stop`` is set; releases the lock on the way out."""
    tick = tick or ClusterTick(settings, store, stop=stop, executor=executor, clock=clock)
    wake = threading.Event()
    watch_stop = threading.Event()
    tick.leadership.on_lost = wake.set
    watcher = kv.Watcher(
        settings.consul, wake, watch_stop, wait=min(30.0, settings.resync),
        retry_initial=settings.retry_initial, retry_max=settings.retry_max,
    )  # fmt: skip
    threading.Thread(target=lambda: (stop.wait(), wake.set()), daemon=True, name="cerana-cluster-tick-stop").start()
    link = Link(settings.retry_initial, settings.retry_max)
    tick.on_reachable = link.ok
    log.info("cluster tick %s: Consul at %s, prefix %r", tick.identity, store.address, settings.consul.prefix)
    watcher.start()
    try:
        while not stop.is_set():
            due: float | None = None
            try:
                if not tick.leadership.leading:
                    log.info("waiting for the lock %s", core.LOCK_KEY)
                    if not tick.leadership.acquire(stop, poll=min(1.0, settings.lock_delay or 1.0)):
                        break
                    link.ok()
                    log.info("leading: holding %s (session %s)", core.LOCK_KEY, tick.leadership.session)
                resync_at = clock() + settings.resync
                due = tick.step()
                link.ok()
                wait = core.next_wait(clock(), [] if due is None else [due], resync_at)
            except LostLock as e:
                tick.stand_down(str(e))
                continue
            except (_store.Unreachable, _store.StoreError) as e:
                if isinstance(e, _store.LockNotHeld) and tick.leadership.leading:
                    tick.stand_down(str(e))
                    continue
                tick.lost_sight()
                wait = link.failed(str(e))
            except Exception as e:  # a bug must not stop the cluster's reconciliation
                log.exception("pass failed: %s", e)
                wait = link.failed(f"{type(e).__name__}: {e}")
            if tick.leadership.lost.is_set() and tick.leadership.leading:
                try:
                    if tick.leadership.confirm():
                        log.info("the lock is still held after all (Consul answered before it was ready)")
                    else:
                        tick.stand_down("its session is gone")
                        continue
                except _store.StoreError as e:
                    wait = max(wait, link.failed(str(e)))
            if wait > 0:
                wake.wait(wait)
            if wake.is_set() and not stop.is_set():
                wake.clear()
                stop.wait(settings.settle)  # let a burst of changes land
    finally:
        watch_stop.set()
        if tick.leadership.leading:
            tick.leadership.release()
            log.info("stopped; the lock is released")
        else:
            log.info("stopped")

"""The cluster tick's Consul side: the leader lock, fenced writes, the fencing index, the watch.

* :class:`Leadership` - the lock ``cluster/tick/lock`` (a session with Behavior
  ``release`` and a lock-delay), renewed by a background thread; a standby waits with a
  blocking read of the lock key (no write traffic) and tries to take it when it is free.
* Fenced writes - every write of the leader (``cluster/applied/<node>``, events) is one
  transaction that starts with ``check-session`` on the lock key: a tick that lost the
  lock cannot write anything, even if it does not know it yet.
* :func:`declared_moved` - the cheap re-check before applying: has any declared object
  (``bundles/``, ``services/``, ``datasets/``, ``cluster/config``) changed since the
  state's index? Heartbeats and node keys are left out on purpose: they change every few
  seconds per node, and a plan is not made unsafe by them.
* :class:`Watcher` - a thread doing blocking queries over the whole store prefix; any
  change sets an event that wakes the loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ansible_collections.cerana.platform.plugins.module_utils import _clusterstate as cs
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _store
from cerana_cluster_tick import core

log = logging.getLogger(__name__)

SESSION_NAME = "cerana-cluster-tick"


# -- fencing --------------------------------------------------------------------------------

_DECLARED = (("bundle", "bundles"), ("service", "services"), ("dataset", "datasets"))


def _subtree_index(store: _store.Store, prefix: str) -> int | None:
    """X-Consul-Index of everything under ``prefix`` (no trailing slash: one name comes back),
    or None when nothing is there. ``Store`` has no public call that returns the index of a
    plain read, hence ``_call`` (as ``_clusterstate.read_index``)."""
    resp = store._call("get", "/v1/kv/" + store.prefix + prefix, [("keys", ""), ("separator", "/")])
    if resp.code == 404:
        # Consul then answers with the graveyard's index or the whole table's: neither says
        # anything about this subtree.
        return None
    return int(resp.headers.get("X-Consul-Index", 0) or 0)


def declared_moved(store: _store.Store, state: Any) -> str | None:
    """Why the declared objects are no longer those of ``state`` (None: they still are).

    ``state.index`` was taken before its data, so a declared key written since has a
    higher index. An empty subtree counts as moved only if the state had objects there.
    """
    for kind, prefix in _DECLARED:
        index = _subtree_index(store, prefix)
        had = bool(getattr(state, prefix)) or any(k.startswith(kind + "/") for k in state.invalid)
        if index is None:
            if had:
                return f"every {kind} was deleted since the plan was made"
        elif index > state.index:
            return f"{prefix}/ changed since the plan was made (index {index} > {state.index})"
    index = _subtree_index(store, m.CLUSTER_CONFIG_KEY)
    if index is not None and index > state.index:
        return f"{m.CLUSTER_CONFIG_KEY} changed since the plan was made"
    return None


# -- the lock ---------------------------------------------------------------------------------


class Leadership:
    """Holds (or waits for) the cluster tick's lock."""

    def __init__(
        self,
        store: _store.Store,
        *,
        key: str = core.LOCK_KEY,
        ttl: float,
        lock_delay: float,
        identity: str,
        wall: Callable[[], Any] = m.utc_now,
        on_lost: Callable[[], Any] | None = None,
    ) -> None:
        self.store = store
        self.on_lost = on_lost
        self.key = key
        self.ttl = ttl
        self.lock_delay = lock_delay
        self.identity = identity
        self.wall = wall
        self.lock = _store.Lock(
            store, key, ttl=ttl, lock_delay=lock_delay, value=b"", name=f"{SESSION_NAME}/{identity}"
        )
        self.lost = threading.Event()
        self._renewer: _store.Renewer | None = None
        self._watch_store: _store.Store | None = None
        self.leading = False

    @property
    def session(self) -> str | None:
        return self.lock.session

    def _value(self) -> bytes:
        data = {"name": self.identity, "pid": os.getpid(), "since": m.format_time(self.wall())}
        return json.dumps(data, sort_keys=True).encode()

    def acquire(self, stop: threading.Event, *, poll: float = 1.0, block: float = 2.0) -> bool:
        """Wait until this tick holds the lock (True) or ``stop`` is set (False).

        While another tick holds it, a blocking read of the key (``block`` seconds at a
        time) waits for it to be released; a free key is then acquired, which Consul
        refuses during the lock-delay after a holder died (tried again every ``poll`` s).
        """
        while not stop.is_set():
            entry = self.store.get(self.key, consistent=True)
            if entry is None or not entry.session:
                self.lock.value = self._value()
                if self.lock.acquire():
                    self._start()
                    return True
                stop.wait(poll)  # lock-delay, or someone was faster
                continue
            if entry.session == self.lock.session:  # ours already (e.g. after an outage)
                self._start()
                return True
            self._drop_session()
            if self._watch_store is None:  # a blocking read needs a longer timeout than other requests
                self._watch_store = type(self.store)(dataclasses.replace(self.store.settings, timeout=block * 1.1 + 5))
            watch = self._watch_store.watch(
                self.key, index=entry.modify_index, wait=f"{max(1, round(block))}s", stop=stop
            )
            next(watch, None)  # returns when the key changes (or stop is set)
        return False

    def _start(self) -> None:
        self.lost.clear()
        self.leading = True
        renew_store = type(self.store)(self.store.settings)
        self._renewer = _store.Renewer(renew_store, self.lock.session, self.ttl, on_lost=self._lost)
        self._renewer.start()

    def _lost(self) -> None:
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost()

    def _drop_session(self) -> None:
        session, self.lock.session = self.lock.session, None
        if session is not None:
            try:
                self.store.session_destroy(session)
            except _store.StoreError:
                pass  # it expires with its TTL

    def holds(self) -> bool:
        """Whether the lock is still ours (a consistent read; raises StoreError when Consul fails)."""
        if not self.leading:
            return False
        return self.lock.held()

    def confirm(self) -> bool:
        """After the renewer found the session gone: is the lock still ours after all?

        A Consul server that has just restarted can answer "no such session" before it
        has replayed its log. If the session renews and still holds the key, leading
        goes on with a new renewer; otherwise the lock is lost. Raises StoreError when
        Consul cannot tell.
        """
        if not self.leading or self.lock.session is None:
            return False
        try:
            self.store.session_renew(self.lock.session)
        except _store.LockNotHeld:
            return False
        if not self.lock.held():
            return False
        if self._renewer is not None:
            self._renewer.stop()
        self._start()
        return True

    def release(self) -> None:
        """Stop leading: stop renewing, release the key (others can take it at once), destroy the session."""
        if self._renewer is not None:
            self._renewer.stop()
            self._renewer = None
        self.leading = False
        session = self.lock.session
        if session is None:
            return
        try:
            self.lock.release()
        except _store.StoreError as e:
            self.lock.session = None
            log.debug("releasing the lock: %s (it expires with its session)", e)

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now, from its value (None when nobody does)."""
        entry = self.store.get(self.key, consistent=True)
        if entry is None or not entry.session:
            return None
        try:
            return dict(json.loads(entry.value or b"{}"), session=entry.session)
        except ValueError:
            return {"session": entry.session}


# -- fenced writes ------------------------------------------------------------------------------


def fenced_txn(store: _store.Store, lock_key: str, session: str, ops: Sequence[Mapping[str, Any]]) -> None:
    """Run ``ops`` in transactions that each first check that ``session`` holds ``lock_key``."""
    check = {"KV": {"Verb": "check-session", "Key": lock_key, "Session": session}}
    step = _store.TXN_MAX_OPS - 1
    for i in range(0, len(ops), step):
        store.txn([check, *ops[i : i + step]])


def write_applied(
    store: _store.Store,
    lock_key: str,
    session: str,
    node_plans: Iterable[Any],
    now: float,
    *,
    attempts: int = 3,
) -> None:
    """Record in ``cluster/applied/<node>`` what was applied on each of ``node_plans`` (CAS, fenced)."""
    plans = list(node_plans)
    for attempt in range(attempts):
        ops = []
        current = {e.key: e for e in store.list(cs.APPLIED_PREFIX, consistent=True)}  # one read for all nodes
        for np in plans:
            key = cs.applied_key(np.node)
            entry = current.get(key)
            previous = {}
            if entry is not None:
                try:
                    previous = cs.decode_applied(entry.value)
                except m.ValidationError as e:
                    log.warning("replacing an invalid %s: %s", key, e)
            new = core.applied_after(previous, np, now, cs.Applied)
            value = cs.encode_applied(new)
            if entry is not None and entry.value == value:
                continue
            if not new:
                if entry is not None:
                    ops.append({"KV": {"Verb": "delete-cas", "Key": key, "Index": entry.modify_index}})
                continue
            ops.append({"KV": {"Verb": "cas", "Key": key, "Value": value, "Index": entry.modify_index if entry else 0}})
        try:
            fenced_txn(store, lock_key, session, ops)
            return
        except _store.CasConflict:
            if attempt == attempts - 1:
                raise


def record_event(
    store: _store.Store, lock_key: str, session: str, key: str, event: Mapping[str, Any], keep: int
) -> int:
    """Write one event and delete the oldest beyond ``keep``, fenced; returns how many were pruned."""
    existing = store.keys(core.EVENTS_PREFIX)
    old = [k for k in core.prune([*existing, key], keep) if k != key]
    ops = [{"KV": {"Verb": "set", "Key": key, "Value": json.dumps(event, sort_keys=True)}}]
    ops += [{"KV": {"Verb": "delete", "Key": k}} for k in old]
    fenced_txn(store, lock_key, session, ops)
    return len(old)


def read_events(store: _store.Store) -> list[dict[str, Any]]:
    """Every event, oldest first (for tools and tests)."""
    out = []
    for entry in store.list(core.EVENTS_PREFIX):
        try:
            out.append(dict(json.loads(entry.value), key=entry.key))
        except ValueError:
            continue
    return out


# -- the watch ------------------------------------------------------------------------------------


def wait_index(store: _store.Store, index: int, wait: float) -> int:
    """Block until something under the store prefix changes after ``index`` (or ``wait`` s pass);
    returns the new index. A key listing with a separator: a few names come back, whatever
    the size of the store, and the index covers everything below the prefix."""
    params = [("keys", ""), ("separator", "/"), ("index", str(index)), ("wait", f"{max(1, int(wait))}s")]
    resp = store._call("get", "/v1/kv/" + store.prefix, params)
    return max(1, int(resp.headers.get("X-Consul-Index", 0) or 0))


class Watcher(threading.Thread):
    """Blocking queries over the store prefix; sets ``wake`` on every change.

    Consul's rules for blocking queries: an index that goes backwards (a restored
    snapshot, a new cluster) starts again from 0, which answers at once and wakes the
    loop; errors back off exponentially.
    """

    def __init__(
        self,
        settings: _store.ConnectionSettings,
        wake: threading.Event,
        stop: threading.Event,
        *,
        wait: float = 30.0,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
    ) -> None:
        super().__init__(daemon=True, name="cerana-cluster-tick-watch")
        self.wake = wake
        self.stop = stop
        self.wait = wait
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        # A request may block for wait + wait/16 of Consul's jitter: its timeout must be longer.
        self.store = _store.Store(dataclasses.replace(settings, timeout=wait * 1.1 + 10))
        self.index = 0

    def run(self) -> None:
        delay = self.retry_initial
        while not self.stop.is_set():
            try:
                new = wait_index(self.store, self.index, self.wait)
            except _store.StoreError as e:
                log.debug("watch: %s", e)
                self.index = 0  # after an outage, start afresh (Consul may have restarted)
                self.stop.wait(delay)
                delay = min(self.retry_max, delay * 2)
                continue
            except Exception:  # never let the watch thread die silently
                log.exception("watch failed; retrying")
                self.stop.wait(delay)
                delay = min(self.retry_max, delay * 2)
                continue
            delay = self.retry_initial
            if new < self.index:
                self.index = 0
                continue
            if new != self.index:
                self.index = new
                self.wake.set()

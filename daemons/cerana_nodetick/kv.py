"""The daemon's writes to Consul, on top of the collection's state store.

* the node key: an :class:`_store.EphemeralKey` (its own session, TTL ``node_ttl``),
  re-bound with :meth:`EphemeralKey.rebind` when the TTL changes;
* the dataset and bundle heartbeats: a :class:`HeartbeatGroup` each, i.e. all of this
  node's keys of one kind bound to one session (TTL ``dataset_ttl``/``bundle_ttl``) and
  written in one transaction per tick, instead of one session and two requests per key;
* historical samples, written and pruned by :func:`write_history`.

Sessions are named ``cerana-node-tick/<node id>``. After a crash the previous run's
sessions still hold this node's keys until they expire; a new run takes the keys over by
destroying those sessions (only sessions carrying our name: a key held by anyone else is
an error).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _store
from cerana_nodetick import core

log = logging.getLogger(__name__)


def session_name(node_id: str) -> str:
    return f"cerana-node-tick/{node_id}"


def take_over(store: _store.Store, key: str, name: str, own: str | None) -> None:
    """Free ``key`` from a session of an earlier run of this daemon (same session name)."""
    entry = store.get(key, consistent=True)
    if entry is None or entry.session is None or entry.session == own:
        return
    info = store.session_info(entry.session)
    if info is None:
        return  # gone meanwhile
    if info.get("Name") != name:
        raise _store.LockNotHeld(
            f"{key} is held by session {entry.session} named {info.get('Name')!r}, not by this daemon"
        )
    log.warning(
        "taking over %s from session %s of an earlier run (or another daemon with this node id)", key, entry.session
    )
    store.session_destroy(entry.session)


class NodeKey:
    """``nodes/<id>``: set every tick, re-bound when ``node_ttl`` changes, destroyed on shutdown."""

    def __init__(self, store: _store.Store, node_id: str) -> None:
        self.store = store
        self.name = session_name(node_id)
        self.key = _store.EphemeralKey(store, m.node_key(node_id), 0, name=self.name)

    @property
    def session(self) -> str | None:
        return self.key.session

    def put(self, value: bytes, ttl: int) -> None:
        if self.key.session is not None and ttl != self.key.ttl:
            try:
                self.key.rebind(ttl, value)
                log.info("node_ttl is now %d s: node key re-bound to a new session", ttl)
                return
            except _store.LockNotHeld:
                self.key.session = None  # the old session is gone: start afresh below
        self.key.ttl = ttl
        try:
            self.key.set(value)
        except _store.LockNotHeld:
            take_over(self.store, self.key.key, self.name, self.key.session)
            self.key.set(value)

    def destroy(self) -> None:
        self.key.destroy()


def _chunks(groups: list[list[dict]], size: int = _store.TXN_MAX_OPS) -> Iterable[list[dict]]:
    chunk: list[dict] = []
    for ops in groups:
        if chunk and len(chunk) + len(ops) > size:
            yield chunk
            chunk = []
        chunk.extend(ops)
    if chunk:
        yield chunk


class HeartbeatGroup:
    """All of this node's heartbeat keys below ``prefix``, bound to one session with Behavior ``delete``.

    :meth:`sync` makes the keys equal ``values``: writes them all, deletes the ones that
    disappeared, renews (or re-creates) the session, and moves the keys to a new session
    when the TTL changed. The session exists only while there are keys.
    """

    def __init__(self, store: _store.Store, node_id: str, prefix: str) -> None:
        self.store = store
        self.node_id = node_id
        self.prefix = prefix
        self.name = session_name(node_id)
        self.session: str | None = None
        self.ttl: int | None = None
        self.written: set[str] | None = None  # None: not known (start-up, after an outage)

    def _create(self, ttl: int) -> str:
        return self.store.session_create(ttl, behavior="delete", lock_delay=0, name=self.name)

    def forget(self) -> None:
        """After an outage nothing is known: the next sync re-reads which keys exist."""
        self.written = None

    def sync(self, values: Mapping[str, bytes], ttl: int) -> None:
        if self.written is None:
            suffix = "/" + self.node_id
            self.written = {k for k in self.store.keys(self.prefix) if k.endswith(suffix)}
        stale = sorted(self.written - set(values))
        moved_from = None
        if values:
            if self.session is not None and ttl != self.ttl:
                moved_from, self.session = self.session, self._create(ttl)
                self.ttl = ttl
            elif self.session is not None:
                try:
                    self.store.session_renew(self.session)
                except _store.LockNotHeld:
                    self.session = None
            if self.session is None:
                self.session, self.ttl = self._create(ttl), ttl
        try:
            self._write(values, stale, moved_from)
        except _store.LockNotHeld:
            self._recover(values)
            self._write(values, stale, None)
        if moved_from is not None:
            self.store.session_destroy(moved_from)
            log.info("%s heartbeats re-bound to a session with TTL %d s", self.prefix, ttl)
        if not values and self.session is not None:
            self.store.session_destroy(self.session)
            self.session = None
        self.written = set(values)

    def _write(self, values: Mapping[str, bytes], stale: list[str], moved_from: str | None) -> None:
        groups = [[{"KV": {"Verb": "delete", "Key": k}}] for k in stale]
        for key, value in sorted(values.items()):
            ops = []
            if moved_from is not None and self.written and key in self.written:
                ops.append({"KV": {"Verb": "unlock", "Key": key, "Value": value, "Session": moved_from}})
            ops.append({"KV": {"Verb": "lock", "Key": key, "Value": value, "Session": self.session}})
            groups.append(ops)
        for chunk in _chunks(groups):
            self.store.txn(chunk)

    def _recover(self, values: Mapping[str, bytes]) -> None:
        """A lock failed: make sure our session lives and free our keys from earlier runs' sessions."""
        if self.session is not None:
            try:
                self.store.session_renew(self.session)
            except _store.LockNotHeld:
                self.session = None
        if self.session is None:
            self.session = self._create(self.ttl or 1)
        for key in sorted(values):
            take_over(self.store, key, self.name, self.session)

    def destroy(self) -> None:
        if self.session is not None:
            self.store.session_destroy(self.session)  # Behavior delete: its keys go with it
            self.session = None
        for chunk in _chunks([[{"KV": {"Verb": "delete", "Key": k}}] for k in sorted(self.written or ())]):
            self.store.txn(chunk)
        self.written = set()


def write_history(store: _store.Store, node: m.Node, now: datetime.datetime, retention: int) -> int:
    """Write one sample (unless ``retention`` is 0) and prune this node's older ones; returns how many were pruned."""
    if retention > 0:
        store.put(m.history_key(node.id, m.format_time(now)), node.to_bytes())
    keys = store.keys(m.HISTORY_PREFIX + node.id + "/")
    prune = core.history_to_prune(keys, node.id, now, retention)
    for chunk in _chunks([[{"KV": {"Verb": "delete", "Key": k}}] for k in prune]):
        store.txn(chunk)
    return len(prune)

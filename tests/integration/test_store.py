"""module_utils/_store.py against a real Consul dev agent (spec section 2, with its bugs fixed).

Sessions use TTLs of 1-2 s (the agent runs with session_ttl_min = 1s); Consul reaps an
expired session between TTL and 2 x TTL, so waits poll for up to 3 x TTL + 2 s.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _store as s
from cerana_cli.consul_agent import ConsulAgent, free_port, http_request

pytestmark = pytest.mark.integration


@pytest.fixture
def store(consul, kv_prefix) -> s.Store:
    return s.Store(s.ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))


def raw_get(consul, full_key):
    """The entry as Consul itself reports it (no Store involved)."""
    status, body = http_request(f"{consul.http_addr}/v1/kv/{full_key}")
    return json.loads(body)[0] if status == 200 else None


def wait_until(predicate, timeout, step=0.05):
    """Poll ``predicate`` until it is true; returns the seconds it took, or None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    return None


def gone_within(store, key, ttl):
    return wait_until(lambda: store.get(key) is None, 3 * ttl + 2)


# ---------------------------------------------------------------------------
# reads and writes


def test_put_get(store, consul, kv_prefix):
    entry = store.put("greeting", "hello")
    assert entry.key == "greeting"
    assert entry.value == b"hello" and entry.text == "hello"
    got = store.get("greeting")
    assert got == entry
    assert raw_get(consul, f"{kv_prefix}/greeting")["ModifyIndex"] == entry.modify_index
    assert store.put("blob", b"\x00\xff").value == b"\x00\xff"
    assert store.get("blob", consistent=True).value == b"\x00\xff"
    assert store.put("doc", json.dumps({"a": 1})).value == b'{"a": 1}'
    assert store.get("doc").json() == {"a": 1}
    assert store.put("empty", "").value == b""
    assert store.get("empty").value == b""


def test_get_missing(store):
    assert store.get("nothing/here") is None
    with pytest.raises(s.NotFound, match="'nothing/here' not found"):
        store.require("nothing/here")


def test_put_returns_the_exact_new_index(store, consul, kv_prefix):
    first = store.put("k", "1")
    assert first.create_index == first.modify_index
    second = store.put("k", "2")
    assert second.modify_index > first.modify_index
    assert second.create_index == first.modify_index
    assert second.value == b"2"
    raw = raw_get(consul, f"{kv_prefix}/k")
    assert raw["ModifyIndex"] == second.modify_index
    # the returned index is the one to CAS on
    third = store.put("k", "3", cas=second.modify_index)
    assert store.get("k", consistent=True).modify_index == third.modify_index


def test_put_index_is_exact_under_concurrent_writes(consul, kv_prefix):
    """The index comes from the write itself, not from a second, racy read."""
    stores = [s.Store(s.ConnectionSettings(address=consul.http_addr, prefix=kv_prefix)) for _ in range(4)]
    results = []
    lock = threading.Lock()

    def writer(st, n):
        for i in range(15):
            entry = st.put("hot", "%d-%d" % (n, i))
            with lock:
                results.append(entry)

    threads = [threading.Thread(target=writer, args=(st, n)) for n, st in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    indexes = [e.modify_index for e in results]
    assert len(set(indexes)) == len(indexes) == 60
    last = max(results, key=lambda e: e.modify_index)
    assert stores[0].get("hot", consistent=True) == last


def test_list_keys_children(store):
    for key in ("app", "app/a", "app/c/d", "app/c/e/f", "apple/x", "zeta"):
        store.put(key, key.upper())
    assert [e.key for e in store.list("app/")] == ["app/a", "app/c/d", "app/c/e/f"]
    assert [e.value for e in store.list("app/")] == [b"APP/A", b"APP/C/D", b"APP/C/E/F"]
    assert [e.key for e in store.list()] == ["app", "app/a", "app/c/d", "app/c/e/f", "apple/x", "zeta"]
    # Consul's prefix semantics: without the slash "app" also matches "apple"
    assert [e.key for e in store.list("app")] == ["app", "app/a", "app/c/d", "app/c/e/f", "apple/x"]
    assert store.keys("app/") == ["app/a", "app/c/d", "app/c/e/f"]
    assert store.keys("app/", separator="/") == ["app/a", "app/c/"]
    assert store.keys(separator="/") == ["app", "app/", "apple/", "zeta"]
    assert store.children("app") == ["a", "c"]
    assert store.children("app/") == ["a", "c"]
    assert store.children("app/c") == ["d", "e"]
    # the top level of the store (was empty: the prefix became "<prefix>//")
    assert store.children("") == ["app", "apple", "zeta"]
    assert store.list("missing/") == []
    assert store.keys("missing/") == []
    assert store.children("missing") == []


def test_prefixes_are_isolated(consul, store, kv_prefix):
    other = s.Store(s.ConnectionSettings(address=consul.http_addr, prefix=kv_prefix + "-other"))
    try:
        other.put("k", "other")
        store.put("k", "mine")
        assert store.list() == [store.get("k")]
        assert other.get("k").value == b"other"
    finally:
        other.delete_tree("k")


def test_create_only_conflict(store):
    created = store.put("once", "a", cas=0)
    with pytest.raises(s.CasConflict) as info:
        store.put("once", "b", cas=0)
    err = info.value
    assert (err.key, err.expected, err.current) == ("once", 0, created.modify_index)
    assert str(err) == (
        "compare-and-swap on 'once' failed: expected it to be absent (index 0), "
        "but its modify index is now %d" % created.modify_index
    )
    assert store.get("once").value == b"a"


def test_stale_cas_fails_and_leaves_the_value(store):
    v1 = store.put("k", "v1")
    v2 = store.put("k", "v2", cas=v1.modify_index)
    with pytest.raises(s.CasConflict) as info:
        store.put("k", "v3", cas=v1.modify_index)
    assert (info.value.expected, info.value.current) == (v1.modify_index, v2.modify_index)
    assert "expected modify index %d, but its modify index is now %d" % (v1.modify_index, v2.modify_index) in str(
        info.value
    )
    assert store.get("k", consistent=True) == v2
    # CAS on a key that does not exist (any index but 0)
    with pytest.raises(s.CasConflict) as info:
        store.put("absent", "x", cas=v2.modify_index)
    assert info.value.current is None and "it is absent" in str(info.value)
    assert store.get("absent") is None


def test_delete_with_cas(store):
    v1 = store.put("k", "1")
    v2 = store.put("k", "2")
    with pytest.raises(s.CasConflict) as info:
        store.delete("k", cas=v1.modify_index)
    assert (info.value.expected, info.value.current) == (v1.modify_index, v2.modify_index)
    assert store.get("k").value == b"2"
    store.delete("k", cas=v2.modify_index)
    assert store.get("k") is None
    # deleting what is not there is not an error, with or without CAS 0
    store.delete("k")
    store.delete("k", cas=0)


def test_delete_tree_spares_siblings_with_the_same_prefix(store):
    for key in ("a", "a/b", "a/c/d", "ab", "ab/x", "abc/y"):
        store.put(key, "1")
    store.delete_tree("a")
    assert store.keys() == ["ab", "ab/x", "abc/y"]
    store.put("ab/z", "1")
    store.delete_tree("ab/")
    assert store.keys() == ["abc/y"]


def test_delete_tree_with_cas(store):
    config = store.put("datasets/web/config", "{}")
    store.put("datasets/web/extra", "1")
    store.put("datasets/webapp/config", "{}")
    changed = store.put("datasets/web/config", '{"x": 1}', cas=config.modify_index)
    with pytest.raises(s.CasConflict) as info:
        store.delete_tree("datasets/web", cas_key="datasets/web/config", cas=config.modify_index)
    assert (info.value.key, info.value.expected, info.value.current) == (
        "datasets/web/config",
        config.modify_index,
        changed.modify_index,
    )
    assert store.keys("datasets/") == ["datasets/web/config", "datasets/web/extra", "datasets/webapp/config"]
    store.delete_tree("datasets/web", cas_key="datasets/web/config", cas=changed.modify_index)
    assert store.keys("datasets/") == ["datasets/webapp/config"]


def test_delete_tree_refuses_the_whole_store(store):
    store.put("keep", "1")
    for prefix in ("", "/", "//"):
        with pytest.raises(s.Invalid, match="refusing to delete the whole store"):
            store.delete_tree(prefix)
    assert store.get("keep") is not None


def test_txn_is_atomic(store):
    guard = store.put("guard", "1")
    store.put("guard", "2")
    ops = [
        {"KV": {"Verb": "set", "Key": "x", "Value": "1"}},
        {"KV": {"Verb": "set", "Key": "y", "Value": b"2"}},
        {"KV": {"Verb": "check-index", "Key": "guard", "Index": guard.modify_index}},
    ]
    with pytest.raises(s.CasConflict) as info:
        store.txn(ops)
    assert info.value.key == "guard"
    assert store.get("x") is None and store.get("y") is None
    # with the right index everything is applied, in one index
    ops[2]["KV"]["Index"] = store.get("guard").modify_index
    results = store.txn(ops)
    assert [e.key for e in results] == ["x", "y", "guard"]
    assert store.get("x").value == b"1" and store.get("y").value == b"2"
    assert results[0].modify_index == results[1].modify_index
    assert store.txn([]) == []


def test_txn_limit(store):
    ops = [{"KV": {"Verb": "set", "Key": "k%d" % i, "Value": "1"}} for i in range(s.TXN_MAX_OPS + 1)]
    with pytest.raises(s.Invalid, match="at most 64 operations"):
        store.txn(ops)
    assert store.keys() == []
    assert len(store.txn(ops[: s.TXN_MAX_OPS])) == s.TXN_MAX_OPS


def test_txn_lock_failure_is_not_a_cas_conflict(store):
    """Consul's message quotes the key; a key containing "cas" made this a CasConflict."""
    holder = store.session_create(5, lock_delay=0)
    other = store.session_create(5, lock_delay=0)
    try:
        assert store.acquire("cas-lock", "held", holder)
        with pytest.raises(s.LockNotHeld):
            store.txn([{"KV": {"Verb": "lock", "Key": "cas-lock", "Value": "x", "Session": other}}])
        with pytest.raises(s.Invalid):
            store.txn([{"KV": {"Verb": "get", "Key": "index-of-missing-cas"}}])
    finally:
        store.session_destroy(holder)
        store.session_destroy(other)


@pytest.mark.parametrize("key", ["/a", "/", "a/../b", "..", "a//b", "./a", "//"])
def test_invalid_keys(store, key):
    for call in (
        lambda: store.get(key),
        lambda: store.put(key, "x"),
        lambda: store.delete(key),
        lambda: store.list(key),
        lambda: store.keys(key),
    ):
        with pytest.raises(s.Invalid):
            call()
    assert store.keys() == []


def test_keys_cannot_escape_the_prefix(store, consul, kv_prefix):
    """keys() did not check its prefix: keys("../") listed every key in Consul."""
    outside = kv_prefix + "-outside"
    http_request(f"{consul.http_addr}/v1/kv/{outside}", method="PUT", data=b"1")
    try:
        with pytest.raises(s.Invalid):
            store.keys("../")
        with pytest.raises(s.Invalid):
            store.children("..")
    finally:
        http_request(f"{consul.http_addr}/v1/kv/{outside}", method="DELETE")


def test_update_read_modify_write(store):
    def incr(old):
        return str(int(old or b"0") + 1)

    assert store.update("n", incr).value == b"1"
    assert store.update("n", incr).value == b"2"
    before = store.get("n")
    assert store.update("n", lambda old: None) == before
    assert store.update("absent", lambda old: None) is None
    assert store.get("absent") is None


def test_ping(store):
    assert store.ping().startswith("127.0.0.1:")


# ---------------------------------------------------------------------------
# transport and ACL errors


def test_unreachable():
    port = free_port()
    store = s.Store(s.ConnectionSettings(address="127.0.0.1:%d" % port, timeout=2))
    for call in (lambda: store.get("k"), lambda: store.put("k", "v"), store.ping, lambda: store.session_create(5)):
        with pytest.raises(s.Unreachable) as info:
            call()
        assert str(info.value) == "cannot reach Consul at http://127.0.0.1:%d: connection refused" % port
        assert info.value.address == "http://127.0.0.1:%d" % port
        assert info.value.reason == "connection refused"


def test_acl_permission_denied_without_token(consul_acl):
    prefix = "test-%s" % uuid.uuid4().hex[:8]
    anonymous = s.Store(s.ConnectionSettings(address=consul_acl.http_addr, prefix=prefix))
    bad_token = s.Store(s.ConnectionSettings(address=consul_acl.http_addr, prefix=prefix, token=str(uuid.uuid4())))
    master = s.Store(s.ConnectionSettings(address=consul_acl.http_addr, prefix=prefix, token=consul_acl.token))
    try:
        entry = master.put("k", "v")
        assert master.get("k") == entry
        for st, why in ((anonymous, "no ACL token was given"), (bad_token, "the token lacks the right")):
            for call in (
                lambda st=st: st.get("k"),
                lambda st=st: st.put("k", "x"),
                lambda st=st: st.put("new", "x", cas=0),
                lambda st=st: st.delete("k"),
                lambda st=st: st.session_create(5),
            ):
                with pytest.raises(s.PermissionDenied) as info:
                    call()
                assert why in str(info.value)
        assert master.get("k").value == b"v"
        assert master.get("new") is None
    finally:
        master.delete_tree("k")
        master.delete_tree("new")


# ---------------------------------------------------------------------------
# sessions, ephemeral keys


def test_ephemeral_key_lives_while_renewed(store):
    ek = s.EphemeralKey(store, "nodes/n1", ttl=1)
    ek.set("alive")
    try:
        entry = store.get("nodes/n1")
        assert entry.value == b"alive" and entry.session == ek.session
        info = store.session_info(ek.session)
        assert (info["TTL"], info["Behavior"]) == ("1s", "delete")
        deadline = time.monotonic() + 2.6  # past 2 x TTL
        while time.monotonic() < deadline:
            ek.renew()
            assert store.get("nodes/n1") is not None
            time.sleep(0.3)
        # set() renews and rewrites under the same session
        session = ek.session
        ek.set("still alive")
        assert ek.session == session
        assert store.get("nodes/n1").value == b"still alive"
    finally:
        ek.destroy()


def test_ephemeral_key_vanishes_after_its_ttl(store):
    ek = s.EphemeralKey(store, "nodes/n2", ttl=1)
    ek.set("x")
    lost = ek.session
    took = gone_within(store, "nodes/n2", 1)
    assert took is not None, "the key outlived 3 x TTL + 2 s"
    assert store.session_info(lost) is None
    with pytest.raises(s.LockNotHeld):
        ek.renew()
    assert ek.session is None
    # set() after the loss starts a new session
    ek.set("back")
    try:
        assert ek.session not in (None, lost)
        assert store.get("nodes/n2").value == b"back"
    finally:
        ek.destroy()


def test_ephemeral_key_destroy_is_immediate(store):
    ek = s.EphemeralKey(store, "nodes/n3", ttl=2)
    ek.set("x")
    session = ek.session
    ek.destroy()
    assert store.get("nodes/n3") is None
    assert store.session_info(session) is None
    assert ek.session is None
    ek.destroy()  # twice is fine
    with pytest.raises(s.LockNotHeld):
        ek.renew()


def test_ephemeral_key_held_by_another_session(store):
    first = s.EphemeralKey(store, "nodes/n4", ttl=2)
    second = s.EphemeralKey(store, "nodes/n4", ttl=2)
    first.set("first")
    try:
        with pytest.raises(s.LockNotHeld, match="held by another session"):
            second.set("second")
        assert store.get("nodes/n4").value == b"first"
    finally:
        first.destroy()
        if second.session:
            store.session_destroy(second.session)


def test_ephemeral_key_rebind(store):
    ek = s.EphemeralKey(store, "nodes/n5", ttl=1)
    ek.set("payload")
    old = ek.session
    try:
        ek.rebind(10)
        new = ek.session
        assert new != old
        assert ek.ttl == 10
        assert store.session_info(new)["TTL"] == "10s"
        assert store.session_info(new)["Behavior"] == "delete"
        assert store.session_info(old) is None  # the old session is destroyed
        entry = store.get("nodes/n5")
        assert entry.session == new and entry.value == b"payload"
        # well past 2 x the old TTL the key is still there, without any renewal
        time.sleep(2.6)
        assert store.get("nodes/n5").value == b"payload"
        # rebind with a new value
        ek.rebind(2, value="changed")
        assert store.session_info(ek.session)["TTL"] == "2s"
        assert store.get("nodes/n5").value == b"changed"
    finally:
        ek.destroy()
    assert store.get("nodes/n5") is None


def test_renewer_keeps_a_session_and_reports_its_loss(store):
    sid = store.session_create(1, behavior="delete", lock_delay=0)
    assert store.acquire("r", "x", sid)
    lost = threading.Event()
    renewer = s.Renewer(store, sid, 1, on_lost=lost.set)
    renewer.start()
    try:
        time.sleep(2.6)
        assert store.get("r") is not None and not lost.is_set()
        store.session_destroy(sid)
        assert lost.wait(3)
        renewer.join(2)
        assert not renewer.is_alive()
    finally:
        renewer.stop()
    assert store.get("r") is None


# ---------------------------------------------------------------------------
# locks


def test_lock_excludes_and_release_lets_another_in(store):
    first = s.Lock(store, "leader", ttl=5, lock_delay=0, value="first")
    second = s.Lock(store, "leader", ttl=5, lock_delay=0, value="second")
    try:
        assert first.acquire()
        assert not second.acquire()
        assert first.held() and not second.held()
        assert store.get("leader").value == b"first"
        first.renew()
        first.release()
        assert not first.held()
        first.release()  # twice is fine
        assert second.acquire()
        assert second.held()
        assert store.get("leader").value == b"second"
    finally:
        first.release()
        second.release()


def test_lock_blocking_acquire_waits_for_release(store):
    holder = s.Lock(store, "leader", ttl=5, lock_delay=0)
    waiter = s.Lock(store, "leader", ttl=5, lock_delay=0)
    assert holder.acquire()
    result = {}

    def wait():
        start = time.monotonic()
        result["ok"] = waiter.acquire(blocking=True, timeout=10, poll=0.1)
        result["waited"] = time.monotonic() - start

    thread = threading.Thread(target=wait)
    thread.start()
    try:
        time.sleep(0.6)
        assert "ok" not in result
        holder.release()
        thread.join(5)
        assert result["ok"] is True
        assert 0.5 <= result["waited"] < 5
        assert waiter.held()
    finally:
        holder.release()
        waiter.release()


def test_lock_blocking_acquire_times_out_or_stops(store):
    holder = s.Lock(store, "leader", ttl=5, lock_delay=0)
    waiter = s.Lock(store, "leader", ttl=5, lock_delay=0)
    assert holder.acquire()
    try:
        start = time.monotonic()
        assert waiter.acquire(blocking=True, timeout=0.5, poll=0.1) is False
        assert 0.4 <= time.monotonic() - start < 3
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        assert waiter.acquire(blocking=True, stop=stop, poll=0.1) is False
        assert stop.is_set()
    finally:
        holder.release()
        waiter.release()


def test_lock_as_context_manager(store):
    with s.Lock(store, "leader", ttl=5, lock_delay=0) as lock:
        assert lock.held()
        assert store.get("leader").session == lock.session
    assert store.get("leader").session is None


def test_lock_lost_when_its_session_is_destroyed(store):
    lock = s.Lock(store, "leader", ttl=5, lock_delay=0)
    assert lock.acquire()
    store.session_destroy(lock.session)
    assert not lock.held()
    with pytest.raises(s.LockNotHeld):
        lock.renew()
    # release() of a lost lock does not raise (Consul answers false); it only cleans up
    lock.release()
    assert lock.session is None
    other = s.Lock(store, "leader", ttl=5, lock_delay=0)
    assert other.acquire()
    other.release()


def test_lock_acquire_after_losing_its_session(store):
    """A non-blocking acquire() with a lost session used to fail with a 500 (invalid session)."""
    holder = s.Lock(store, "leader", ttl=5, lock_delay=0)
    other = s.Lock(store, "leader", ttl=5, lock_delay=0)
    try:
        assert holder.acquire()
        assert other.acquire() is False  # other keeps its (idle, unrenewed) session ...
        idle = other.session
        store.session_destroy(idle)  # ... which it loses, as when its TTL runs out
        store.session_destroy(holder.session)  # and the holder goes away
        assert other.acquire() is True
        assert other.session != idle and other.held()
        with pytest.raises(s.LockNotHeld):
            store.acquire("leader", "x", idle)
    finally:
        other.release()
        try:
            holder.release()
        except s.LockNotHeld:
            pass


def test_lock_delay_after_invalidation(store):
    holder = s.Lock(store, "leader", ttl=5, lock_delay=1)
    contender = s.Lock(store, "leader", ttl=5, lock_delay=1)
    try:
        assert holder.acquire()
        start = time.monotonic()
        store.session_destroy(holder.session)  # invalidation, not a clean release
        entry = store.get("leader")
        assert entry is not None and entry.session is None  # the key is free ...
        early = time.monotonic() - start < 0.8  # (a loaded machine may take longer than the delay)
        first = contender.acquire()
        if early:
            assert first is False  # ... but the lock-delay holds it
        took = wait_until(contender.acquire, 5, step=0.1)
        assert took is not None
        assert 0.9 <= time.monotonic() - start < 5
        assert contender.held()
        # a clean release has no lock-delay
        contender.release()
        assert holder.acquire() is True
    finally:
        holder.release()
        contender.release()


# ---------------------------------------------------------------------------
# watches


def run_watch(store, prefix, stop, **kwargs):
    """Start store.watch in a thread; returns (thread, list it appends (index, keys) to, new-item event)."""
    seen = []
    arrived = threading.Condition()

    def loop():
        for index, entries in store.watch(prefix, stop=stop, **kwargs):
            with arrived:
                seen.append((index, [e.key for e in entries]))
                arrived.notify_all()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def wait_for(predicate, timeout=10):
        with arrived:
            return arrived.wait_for(lambda: any(predicate(i, k) for i, k in seen), timeout)

    return thread, seen, wait_for


def test_watch_initial_listing_changes_and_stop(store):
    first = store.put("w/a", "1")
    store.put("elsewhere", "1")
    stop = threading.Event()
    thread, seen, wait_for = run_watch(store, "w/", stop, wait="1s")
    try:
        assert wait_for(lambda i, keys: keys == ["w/a"])
        assert seen[0][0] >= first.modify_index
        second = store.put("w/b", "2")
        assert wait_for(lambda i, keys: keys == ["w/a", "w/b"])
        assert seen[-1][0] == second.modify_index
        store.delete("w/a")
        assert wait_for(lambda i, keys: keys == ["w/b"])
        # quiet periods (the 1 s blocking queries time out) yield nothing
        count = len(seen)
        time.sleep(1.5)
        assert len(seen) == count
        assert [i for i, _ in seen] == sorted(i for i, _ in seen)
    finally:
        stop.set()
        thread.join(4)
    assert not thread.is_alive(), "the watch did not stop within wait + 3 s"


def test_watch_from_an_index_sees_only_later_changes(store):
    first = store.put("w/a", "1")
    stop = threading.Event()
    thread, seen, wait_for = run_watch(store, "w/", stop, index=first.modify_index, wait="1s")
    try:
        time.sleep(0.3)
        assert seen == []
        second = store.put("w/b", "1")
        assert wait_for(lambda i, keys: i == second.modify_index)
        assert seen == [(second.modify_index, ["w/a", "w/b"])]
    finally:
        stop.set()
        thread.join(4)


def test_watch_resets_when_a_snapshot_restore_moves_the_index_back():
    """Index going backwards (spec: blocking-query rules) -> the restored listing is yielded.

    Uses a private agent: restoring a snapshot rewinds the whole agent's state.
    """
    agent = ConsulAgent().start()
    stop = threading.Event()
    thread = None
    try:
        store = s.Store(s.ConnectionSettings(address=agent.http_addr, prefix="snap"))
        store.put("p/a", "1")
        status, snapshot = http_request(f"{agent.http_addr}/v1/snapshot", timeout=10)
        assert status == 200 and snapshot
        for i in range(10):
            store.put("p/b%d" % i, "1")
        late = store.put("p/late", "1")
        thread, seen, wait_for = run_watch(store, "p/", stop, wait="1s")
        assert wait_for(lambda i, keys: i == late.modify_index and len(keys) == 12)
        status, body = http_request(f"{agent.http_addr}/v1/snapshot", method="PUT", data=snapshot, timeout=10)
        assert status == 200, body
        assert wait_for(lambda i, keys: keys == ["p/a"])
        restored = next(i for i, keys in seen if keys == ["p/a"])
        assert restored < late.modify_index
        # and it keeps watching from the restored index
        again = store.put("p/again", "1")
        assert wait_for(lambda i, keys: keys == ["p/a", "p/again"] and i == again.modify_index)
    finally:
        stop.set()
        if thread is not None:
            thread.join(4)
        agent.stop()


# ---------------------------------------------------------------------------
# concurrency: no lost updates


def incr(old):
    return str(int(old or b"0") + 1)


def raw_increment(store, key):
    """A hand-written read-modify-CAS loop (get + put(cas)); returns the attempts it took."""
    attempts = 0
    while True:
        attempts += 1
        current = store.get(key, consistent=True)
        try:
            store.put(key, incr(current.value if current else None), cas=current.modify_index if current else 0)
            return attempts
        except s.CasConflict:
            continue


def increment_worker(address, prefix, key, times, mode, start=None):
    """Thread or process body: ``times`` increments of one counter."""
    store = s.Store(s.ConnectionSettings(address=address, prefix=prefix))
    if start is not None:
        start.wait(30)
    for _ in range(times):
        if mode == "update":
            store.update(key, incr)
        else:
            raw_increment(store, key)


@pytest.mark.parametrize("mode", ["update", "raw"])
def test_threads_lose_no_update(consul, kv_prefix, mode):
    """8 threads x 25 increments. Store.update on one shared Store (as a daemon would use it);
    the raw get + put(cas) loop with a Store per thread."""
    shared = s.Store(s.ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    start = threading.Barrier(8)
    errors = []

    def body():
        try:
            if mode == "update":
                start.wait(30)
                for _ in range(25):
                    shared.update("counter", incr)
            else:
                increment_worker(consul.http_addr, kv_prefix, "counter", 25, mode, start)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=body) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert shared.get("counter", consistent=True).value == b"200"


@pytest.mark.parametrize("mode", ["update", "raw"])
def test_processes_lose_no_update(consul, kv_prefix, mode):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    procs = [
        ctx.Process(target=increment_worker, args=(consul.http_addr, kv_prefix, "counter", 25, mode, start))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = s.Store(s.ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    assert store.get("counter", consistent=True).value == b"100"

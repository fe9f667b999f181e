"""The daemons' keep-alive Consul transport (``cerana_daemon.kvhttp``) against a real agent:
one connection per thread, so a store shared by threads never mixes their requests, and
py-consul's own client wherever the environment asks for what only ``requests`` honours."""

from __future__ import annotations

import threading

import pytest

from ansible_collections.cerana.platform.plugins.module_utils._store import ConnectionSettings, Store
from cerana_daemon.kvhttp import KeepAliveStore, daemon_store

pytestmark = pytest.mark.integration


def test_threads_sharing_a_store_each_have_their_connection(consul, kv_prefix):
    store = KeepAliveStore(ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    store.put("w", b"0")
    index = store.get("w").modify_index
    blocked, answered = threading.Event(), {}

    def watcher():
        blocked.set()
        # a blocking query: no answer until "w" changes (or 10 s pass)
        for new, entries in store.watch("w", index=index, wait="10s"):
            answered["index"], answered["values"] = new, [e.value for e in entries]
            return

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    blocked.wait(5)
    # While that request is outstanding, this thread's own requests go out and come back.
    for i in range(20):
        store.put("k%d" % i, str(i).encode())
        assert store.get("k%d" % i).value == str(i).encode()
    assert thread.is_alive() and not answered
    main_conn = store._consul.http._conn
    store.put("w", b"1")  # ends the blocking query
    thread.join(10)
    assert answered["values"] == [b"1"] and answered["index"] > index
    assert store._consul.http._conn is main_conn  # this thread kept its one connection


def test_daemon_store_follows_the_environment(consul, kv_prefix, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle", "curl_ca_bundle"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    settings = ConnectionSettings(address=consul.http_addr, prefix=kv_prefix)
    lean = daemon_store(settings)
    assert isinstance(lean, KeepAliveStore)
    monkeypatch.setenv("NO_PROXY", "example.invalid")  # something requests would read
    plain = daemon_store(settings)
    assert type(plain) is Store
    lean.put("x", b"1")
    assert plain.get("x").value == b"1"

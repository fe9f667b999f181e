"""The Store's HTTP transports against a real agent: ``http.client`` with one kept-alive
connection per thread (a store shared by threads never mixes their requests; a connection
Consul closed is replaced), and py-consul's ``requests`` client wherever the environment asks
for what only ``requests`` honours, with the same results and errors."""

from __future__ import annotations

import socket
import threading

import pytest

from ansible_collections.cerana.platform.plugins.module_utils._store import (
    CasConflict,
    ConnectionSettings,
    HttpTransport,
    RequestsTransport,
    Store,
    Unreachable,
)
from cerana_cli.consul_agent import free_port

pytestmark = pytest.mark.integration

_REQUESTS_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle", "curl_ca_bundle")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc
    for name in _REQUESTS_ENV:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_threads_sharing_a_store_each_have_their_connection(consul, kv_prefix, clean_env):
    store = Store(ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    assert isinstance(store.transport, HttpTransport)
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
    main_conn = store.transport.connection
    store.put("w", b"1")  # ends the blocking query
    thread.join(10)
    assert answered["values"] == [b"1"] and answered["index"] > index
    assert store.transport.connection is main_conn  # this thread kept its one connection


@pytest.mark.parametrize("transport", ["http", "requests"])
def test_both_transports_read_write_and_map_errors_alike(consul, kv_prefix, transport):
    store = Store(ConnectionSettings(address=consul.http_addr, prefix=kv_prefix), transport=transport)
    assert store.ping()
    assert store.get("a") is None
    first = store.txn([{"KV": {"Verb": "cas", "Key": "a", "Value": b"1", "Index": 0}}])[0]
    with pytest.raises(CasConflict):
        store.txn([{"KV": {"Verb": "cas", "Key": "a", "Value": b"2", "Index": 0}}])
    entry = store.get("a", consistent=True)
    assert entry.value == b"1" and entry.modify_index == first.modify_index
    assert [e.key for e in store.list("")] == ["a"]
    index, entries = store._list("", index=entry.modify_index, wait="100ms")  # a blocking query that times out
    assert index >= entry.modify_index and [e.value for e in entries] == [b"1"]
    store.delete("a", cas=entry.modify_index)
    store.close()
    assert store.get("a") is None
    down = Store(ConnectionSettings(address="http://127.0.0.1:%d" % free_port(), prefix="x", timeout=2),
                 transport=transport)  # fmt: skip
    with pytest.raises(Unreachable, match="connection refused"):
        down.get("a")


def test_a_connection_consul_closed_is_replaced(consul, kv_prefix, clean_env):
    store = Store(ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    store.put("a", b"1")
    conn = store.transport.connection
    assert conn is not None and store.get("a").value == b"1" and store.transport.connection is conn
    conn.sock.shutdown(socket.SHUT_RDWR)  # what the client sees: EOF instead of an answer
    assert store.get("a").value == b"1"
    assert store.transport.connection is not conn


def test_the_transport_follows_the_environment(consul, kv_prefix, clean_env):
    settings = ConnectionSettings(address=consul.http_addr, prefix=kv_prefix)
    lean = Store(settings)
    assert isinstance(lean.transport, HttpTransport)
    clean_env.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")  # nothing to an http:// agent
    assert isinstance(Store(settings).transport, HttpTransport)
    # a proxy for http:// (which requests skips for the agent, named in NO_PROXY)
    clean_env.setenv("HTTP_PROXY", "http://127.0.0.1:%d" % free_port())
    clean_env.setenv("NO_PROXY", "127.0.0.1,localhost")
    plain = Store(settings)
    assert isinstance(plain.transport, RequestsTransport)
    lean.put("x", b"1")
    assert plain.get("x").value == b"1"

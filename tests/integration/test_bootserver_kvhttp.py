"""The bootserver's keep-alive Consul transport against a real agent: same results and errors as the Store."""

from __future__ import annotations

import socket

import pytest

from ansible_collections.cerana.platform.plugins.module_utils._store import (
    CasConflict,
    ConnectionSettings,
    Unreachable,
)
from cerana_bootserver.kvhttp import KeepAliveStore
from cerana_cli.consul_agent import free_port

pytestmark = pytest.mark.integration


def test_keepalive_store_reads_writes_and_maps_errors(consul, kv_prefix):
    store = KeepAliveStore(ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    assert store.ping()
    assert store.get("a") is None
    first = store.txn([{"KV": {"Verb": "cas", "Key": "a", "Value": b"1", "Index": 0}}])[0]
    with pytest.raises(CasConflict):
        store.txn([{"KV": {"Verb": "cas", "Key": "a", "Value": b"2", "Index": 0}}])
    entry = store.get("a", consistent=True)
    assert entry.value == b"1" and entry.modify_index == first.modify_index
    assert [e.key for e in store.list("")] == ["a"]
    conn = store._consul.http._conn
    assert conn is not None and store.get("a").value == b"1" and store._consul.http._conn is conn  # one connection
    # Consul closed the idle connection: the next request goes out again on a new one
    conn.sock.shutdown(socket.SHUT_RDWR)  # what the client sees: EOF instead of an answer
    assert store.get("a").value == b"1"
    store.close()
    assert store.get("a").value == b"1"


def test_keepalive_store_unreachable():
    store = KeepAliveStore(ConnectionSettings(address="http://127.0.0.1:%d" % free_port(), prefix="x", timeout=2))
    with pytest.raises(Unreachable, match="connection refused"):
        store.get("a")

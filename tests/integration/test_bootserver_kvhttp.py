"""The bootserver's event-loop Consul transport (AsyncTxn) against a real agent: the same
results and errors as the Store."""

from __future__ import annotations

import asyncio

import pytest

from ansible_collections.cerana.platform.plugins.module_utils._store import (
    CasConflict,
    ConnectionSettings,
    Store,
    Unreachable,
)
from cerana_bootserver.kvhttp import AsyncTxn, Conflicts
from cerana_cli.consul_agent import free_port

pytestmark = pytest.mark.integration


def test_async_txn_results_conflicts_and_large_answers(consul, kv_prefix):
    """The event loop's transaction client: Store.txn's results, every failed key of a conflict,
    Consul's chunked answers (large results), its keep-alive connection reused, prefixes."""
    settings = ConnectionSettings(address=consul.http_addr, prefix=kv_prefix)
    store = Store(settings)

    async def main():
        txn = AsyncTxn(settings)
        try:
            created = await txn([{"KV": {"Verb": "cas", "Key": "t/%d" % i, "Value": b"x" * 200, "Index": 0}}
                                 for i in range(60)])  # fmt: skip
            assert [e.key for e in created] == ["t/%d" % i for i in range(60)]  # 60 results: a chunked answer
            idx = {e.key: e.modify_index for e in created}
            assert len(txn._idle) == 1
            with pytest.raises(Conflicts) as lost:
                await txn([{"KV": {"Verb": "cas", "Key": "t/1", "Value": "y", "Index": idx["t/1"]}},
                           {"KV": {"Verb": "cas", "Key": "t/2", "Value": "y", "Index": 0}},
                           {"KV": {"Verb": "cas", "Key": "t/3", "Value": "y", "Index": idx["t/3"] + 1}}])  # fmt: skip
            assert lost.value.keys == {"t/2", "t/3"} and isinstance(lost.value, CasConflict)
            assert store.get("t/1").value == b"x" * 200  # all or nothing
            got = await txn([{"KV": {"Verb": "cas", "Key": "t/1", "Value": "z", "Index": idx["t/1"]}}])
            assert got[0].key == "t/1" and got[0].modify_index > idx["t/1"] and len(txn._idle) == 1
            # the idle connection closed by the other side: the next call goes out on a new one
            txn._idle[0][1].transport.abort()
            await asyncio.sleep(0.05)
            assert (await txn([{"KV": {"Verb": "get", "Key": "t/1"}}]))[0].value == b"z"
        finally:
            txn.close()

    asyncio.run(main())
    assert store.get("t/1").value == b"z"


def test_async_txn_unreachable():
    settings = ConnectionSettings(address="http://127.0.0.1:%d" % free_port(), prefix="x", timeout=2)

    async def main():
        with pytest.raises(Unreachable):
            await AsyncTxn(settings)([{"KV": {"Verb": "set", "Key": "a", "Value": "1"}}])

    asyncio.run(main())

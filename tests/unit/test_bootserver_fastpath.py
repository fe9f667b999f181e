"""The non-blocking way of the DHCP server: offers from what the server knows, single writes batched
into one Consul transaction, claims that move on when an address is taken, shedding under
overload, and the owner rule end to end on loopback (all over the in-memory store)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from bootserver_fakes import MemoryStore
from test_bootserver_handler import SERVER, Clock, mac, make, packet

from ansible_collections.cerana.platform.plugins.module_utils import _leases as L
from ansible_collections.cerana.platform.plugins.module_utils._store import CasConflict, Unreachable
from cerana_bootserver import dhcp, peers
from cerana_bootserver import handler as h
from cerana_bootserver.batch import Batcher
from cerana_bootserver.config import Settings
from cerana_bootserver.leasing import IN_FLIGHT, Commit
from cerana_bootserver.server import (
    DISCOVER_BUDGET,
    Pending,
    Slow,
    _chosen_server,
    _Protocol,
    open_socket,
    serve,
)

IP = ipaddress.IPv4Address


def drive(hd, raw, store):
    """One datagram the way the server runs it, with each commit sent alone: (reply, way).

    way: "fast" (no store request), "commit" (transactions only), "blocking" (the worker-pool way).
    """
    got = hd.fast(raw, admitted=True)
    way = "fast"
    while isinstance(got, Pending):
        way = "commit"
        try:
            results = store.txn(got.commit.ops)
        except CasConflict as e:
            retry = got.commit.failed(frozenset((e.key,)))
            if retry is None:
                return _reply(hd.carry_on(got)), "blocking"
            got.commit = retry
            continue
        return _reply(hd.reply(got.packet, got.intent, got.commit.done(results), got.ctx)), way
    if isinstance(got, Slow):
        return _reply(hd.carry_on(got)), "blocking"
    return _reply(got), way


def _reply(out):
    return dhcp.parse(out[0]) if out is not None else None


def dora(hd, store, i):
    offer, w1 = drive(hd, dhcp.build(packet(dhcp.DISCOVER, i)), store)
    ack, w2 = drive(hd, dhcp.build(packet(dhcp.REQUEST, i, requested=offer.yiaddr, server=SERVER)), store)
    assert offer.message_type == dhcp.OFFER and ack.message_type == dhcp.ACK and ack.yiaddr == offer.yiaddr
    return offer.yiaddr, (w1, w2)


def test_a_known_client_costs_one_write_and_a_new_one_two():
    store, service, hd = make()
    service.config_refresh = 3600
    store.calls = 0
    _, ways = dora(hd, store, 1)  # nothing known yet: the blocking way finds Consul reachable
    assert ways == ("blocking", "commit") and service.online is True
    store.calls = 0
    ip2, ways = dora(hd, store, 2)  # a new client: its claim and its binding, one transaction each
    assert ways == ("commit", "commit") and store.calls == 2
    store.calls = 0
    again, ways = dora(hd, store, 2)  # the same client again: offered from memory, one write to bind
    assert again == ip2 and ways == ("fast", "commit") and store.calls == 1
    lease = L.LeaseStore(store).get(ip2)
    assert lease.state == L.BOUND and lease.mac == mac(2) and lease.expires == int(Clock.t) + 600
    assert service.counts["offers_known"] == 1


def test_a_claim_moves_on_when_its_address_is_taken_and_reads_when_the_mac_is_known():
    store, service, hd = make()
    service.config_refresh = 3600
    dora(hd, store, 1)  # online
    pool = service.cached_config()[1]
    first = next(iter(pool.candidates(mac(7))))
    other = L.Lease(ip=str(first), mac=mac(99), state=L.BOUND, expires=2_000_000)
    store.data[L.lease_key(first)] = (other.to_bytes(), 1)  # written by another server meanwhile
    ip, ways = dora(hd, store, 7)
    assert ip != first and ways == ("commit", "commit")
    assert service.counts["claims_address_taken"] == 1
    # a MAC another server already offered an address: the claim fails on its MAC index, the
    # blocking way reads it and offers the same address
    theirs = L.LeaseStore(MemoryStore(), server="10.99.0.3")
    theirs.store = store
    held = theirs.offer(pool, mac(8))
    offer, way = drive(hd, dhcp.build(packet(dhcp.DISCOVER, 8)), store)
    assert way == "blocking" and str(offer.yiaddr) == held.ip
    assert service.counts["claims_mac_known"] == 1


def test_two_owners_claim_new_clients_from_their_own_shares_of_the_pool():
    """While both are alive, two servers' claims for their new clients never meet on one address:
    each takes addresses from its own share (rendezvous over the addresses, as over the MACs)."""
    store = MemoryStore()
    ids = (SERVER, "10.99.0.3")
    services = {}
    for sid in ids:
        _, service, _ = make(store=store, server=sid)
        service.config_refresh = 3600
        service.config()
        service.online = True  # as after a first exchange the blocking way
        service.gate = peers.Gate(sid)
        service.gate.update(ids)
        services[sid] = service
    claimed = {}
    for i in range(1, 71):
        sid = peers.owner(mac(i), ids)
        commit = services[sid].fast(h.Offer(mac(i), None))
        granted = commit.done(store.txn(commit.ops))  # a conflict would raise here
        claimed[mac(i)] = granted.ip
        assert peers.owner(str(granted.ip), ids) == sid
    assert len(set(claimed.values())) == 70
    assert sum(s.counts["claims_address_taken"] for s in services.values()) == 0


def test_a_retransmitted_discover_waits_for_the_claim_under_way():
    store, service, hd = make()
    service.config_refresh = 3600
    dora(hd, store, 1)
    got = hd.fast(dhcp.build(packet(dhcp.DISCOVER, 5)), admitted=True)
    assert isinstance(got, Pending) and got.commit.claim
    assert hd.fast(dhcp.build(packet(dhcp.DISCOVER, 5)), admitted=True) is None  # silent: IN_FLIGHT
    assert service.fast(h.Offer(mac(5), None)) == h.Silent(IN_FLIGHT)
    got.commit.done(store.txn(got.commit.ops))
    assert service.fast(h.Offer(mac(5), None)) == h.Granted(IP(L.LeaseStore(store).lease_of(mac(5)).ip))
    # a claim the batcher had no room for is forgotten: the client's next DISCOVER is answered
    full = type("Full", (), {"full": lambda *_: True, "queue": (), "limit": 0})()
    proto = _Protocol(None, None, handler=hd, batcher=full)
    proto.datagram_received(dhcp.build(packet(dhcp.DISCOVER, 7)), None)
    assert proto.dropped == 1 and mac(7) not in service._claiming
    offer, way = drive(hd, dhcp.build(packet(dhcp.DISCOVER, 7)), store)
    assert offer.message_type == dhcp.OFFER and way == "blocking"  # heard of before: the table is read


def test_a_stale_binding_goes_the_blocking_way_and_the_same_clients_next_exchange_rebinds():
    store, service, hd = make()
    service.config_refresh = 3600
    ip, _ = dora(hd, store, 3)
    # someone else renewed it (the index moved on): the batched CAS fails, the blocking way re-reads
    ls = L.LeaseStore(store)
    lease = ls.get(ip)
    store.txn(ls.rewrite_ops(lease, lease))
    offer, way = drive(hd, dhcp.build(packet(dhcp.DISCOVER, 3)), store)
    assert way == "fast" and offer.yiaddr == ip
    ack, way = drive(hd, dhcp.build(packet(dhcp.REQUEST, 3, requested=ip, server=SERVER)), store)
    assert ack.message_type == dhcp.ACK and way == "blocking"
    assert service.counts["binds_stale"] == 1
    # two exchanges of one client in one batch: the second binds against the first's write
    cfg = service.cached_config()[0]
    intent = h.Ack(mac(3), ip, "selecting")
    one, two = service.fast(intent), service.fast(intent)
    assert isinstance(one, Commit) and isinstance(two, Commit)
    one.done(store.txn(one.ops))
    with pytest.raises(CasConflict) as lost:
        store.txn(two.ops)
    retry = two.failed(frozenset((lost.value.key,)))
    assert isinstance(retry, Commit) and retry.done(store.txn(retry.ops)) == h.Granted(ip)
    assert ls.get(ip).expires == int(Clock.t) + cfg.lease_duration


def test_a_released_address_taken_by_another_client_is_naked():
    store, service, hd = make()
    service.config_refresh = 3600
    ip, _ = dora(hd, store, 4)
    ls = L.LeaseStore(store)
    ls.release(mac(4), ip)
    ls.ack(service.cached_config()[1], mac(40), ip, duration=600, allow_unallocated=True)
    offer, way = drive(hd, dhcp.build(packet(dhcp.DISCOVER, 4)), store)  # what the server remembers
    nak, way = drive(hd, dhcp.build(packet(dhcp.REQUEST, 4, requested=offer.yiaddr, server=SERVER)), store)
    assert nak.message_type == dhcp.NAK and way == "blocking"
    assert ls.get(ip).mac == mac(40)


def test_after_the_live_set_changed_a_known_client_is_read_again():
    store, service, hd = make()
    service.config_refresh = 3600
    dora(hd, store, 6)
    service.forget_trusted()
    _, ways = dora(hd, store, 6)
    assert ways[0] == "blocking"


def test_nothing_is_answered_from_memory_while_consul_is_away():
    store, service, hd = make()
    service.config_refresh = 3600
    dora(hd, store, 2)
    service._went_offline(Unreachable("memory://", "down"))
    assert service.fast(h.Offer(mac(2), None)) is None
    assert service.after_failure(h.Offer(mac(9), None), Unreachable("memory://", "down")) == h.Silent(
        "Consul unreachable: no new leases"
    )


# -- the batcher ---------------------------------------------------------------------------------


class AsyncStore:
    """``await txn(ops)`` over a MemoryStore, counting transactions; ``fail`` raises instead."""

    def __init__(self, store):
        self.store = store
        self.sizes = []
        self.fail = None

    async def __call__(self, ops):
        await asyncio.sleep(0)
        self.sizes.append(len(ops))
        if self.fail is not None:
            raise self.fail
        return self.store.txn(ops)


def cas(key, index, value=b"v"):
    return [{"KV": {"Verb": "cas", "Key": key, "Value": value, "Index": index}}]


def test_batcher_puts_what_waits_into_one_transaction_and_isolates_the_losers():
    async def main():
        store = MemoryStore()
        txn = AsyncStore(store)
        batcher = Batcher(txn, in_flight=1)
        first = batcher.submit(cas("k0", 0))  # goes alone, at once
        rest = [batcher.submit(cas("k%d" % i, 0)) for i in range(1, 30)]
        results = await asyncio.gather(first, *rest)
        assert txn.sizes == [1, 29] and all(r and r[0].key == "k%d" % i for i, r in enumerate(results))
        index = {k: v[1] for k, v in store.data.items()}
        txn.sizes.clear()
        # 10 writes, 3 of them against stale indexes: those 3 fail (with their keys), the others are written
        futures = [batcher.submit(cas("k%d" % i, index["k%d" % i] - (1 if i in (2, 5, 7) else 0), b"w"))
                   for i in range(10)]  # fmt: skip
        got = await asyncio.gather(*futures, return_exceptions=True)
        failed = [i for i, r in enumerate(got) if isinstance(r, CasConflict)]
        assert failed == [2, 5, 7] and got[2].keys == {"k2"}
        assert all(store.data["k%d" % i][0] == (b"v" if i in failed else b"w") for i in range(10))
        assert batcher.conflicts == 3 and batcher.jobs_done == 40

    asyncio.run(main())


def test_batcher_never_puts_one_key_twice_in_flight_and_respects_the_size_limit():
    async def main():
        store = MemoryStore()
        txn = AsyncStore(store)
        batcher = Batcher(txn, max_ops=8, in_flight=2)
        a = batcher.submit(cas("same", 0))
        b = batcher.submit(cas("same", 0))  # would lose against a's write if sent with it
        many = [batcher.submit(cas("n%d" % i, 0)) for i in range(20)]
        got = await asyncio.gather(a, b, *many, return_exceptions=True)
        assert not isinstance(got[0], Exception) and isinstance(got[1], CasConflict)
        assert max(txn.sizes) <= 8 and sum(txn.sizes) >= 22
        # any other error fails every job of the transaction
        txn.fail = Unreachable("memory://", "down")
        futures = [batcher.submit(cas("x%d" % i, 0)) for i in range(3)]
        got = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, Unreachable) for r in got)
        assert not batcher.busy_keys and not batcher.queue

    asyncio.run(main())


def test_the_same_clients_next_binding_waits_and_binds_against_the_first():
    store, service, hd = make()
    service.config_refresh = 3600
    ip, _ = dora(hd, store, 3)
    intent = h.Ack(mac(3), ip, "selecting")

    async def main():
        batcher = Batcher(AsyncStore(store), in_flight=2)
        outcomes, futures = [], []
        for commit in (service.fast(intent), service.fast(intent)):  # both made from the same lease
            future = batcher.submit(commit.ops, prepare=commit.prepare)
            future.add_done_callback(lambda f, c=commit: f.exception() or outcomes.append(c.done(f.result())))
            futures.append(future)
        await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        await asyncio.sleep(0)  # the done callbacks
        return outcomes, batcher

    outcomes, batcher = asyncio.run(main())
    assert outcomes == [h.Granted(ip)] * 2 and batcher.conflicts == 0 and batcher.transactions == 2


# -- the transport: shedding and the owner rule -----------------------------------------------------


class FakeSocket:
    def __init__(self, datagrams):
        self.queue = list(datagrams)
        self.sent = []

    def recvfrom(self, _size):
        if not self.queue:
            raise BlockingIOError
        return self.queue.pop(0), ("10.99.0.200", 67)

    def sendto(self, data, dest):
        self.sent.append((data, dest))

    def fileno(self):
        return -1


class RecordingHandler:
    def __init__(self, offered=()):
        self.seen = []
        self.server_id = IP(SERVER)
        self.service = type("Service", (), {"offered": lambda _self, m: m in offered})()

    def fast(self, data, admitted=False):
        self.seen.append(dhcp.parse(data))
        return None


def test_a_wake_up_finishes_exchanges_first_and_sheds_old_discovers():
    discovers = [dhcp.build(packet(dhcp.DISCOVER, i)) for i in range(40)]
    requests = [dhcp.build(packet(dhcp.REQUEST, 100 + i, requested="10.99.0.50", server=SERVER)) for i in range(5)]
    handler = RecordingHandler()
    proto = _Protocol(None, None, handler=handler)
    proto.sock = FakeSocket(discovers[:20] + requests + discovers[20:])
    proto._readable()
    types = [p.message_type for p in handler.seen]
    assert types[:5] == [dhcp.REQUEST] * 5 and types[5:] == [dhcp.DISCOVER] * DISCOVER_BUDGET
    assert [p.xid for p in handler.seen[5:]] == list(range(40 - DISCOVER_BUDGET, 40))  # the newest
    assert proto.shed == 40 - DISCOVER_BUDGET and proto.received == 45
    # a few at a time: nothing is shed
    handler.seen.clear()
    proto.sock = FakeSocket(discovers[:3])
    proto._readable()
    assert len(handler.seen) == 3 and proto.shed == 40 - DISCOVER_BUDGET


def test_a_discover_of_another_servers_mac_is_dropped_before_parsing():
    gate = peers.Gate(SERVER)
    gate.update((SERVER, "10.99.0.3"))
    handler = RecordingHandler()
    proto = _Protocol(None, None, handler=handler, gate=gate)
    for i in range(60):
        proto.datagram_received(dhcp.build(packet(dhcp.DISCOVER, i)), None)
    assert sorted(p.mac for p in handler.seen) == sorted(mac(i) for i in range(60) if gate.owner(mac(i)) == SERVER)
    assert gate.passed == 60 - len(handler.seen) > 0


def test_a_request_for_another_server_is_dropped_unparsed_unless_this_server_made_an_offer():
    ours = dhcp.build(packet(dhcp.REQUEST, 1, requested="10.99.0.50", server=SERVER))
    theirs = [dhcp.build(packet(dhcp.REQUEST, i, requested="10.99.0.50", server="10.99.0.3")) for i in (2, 3)]
    renewal = dhcp.build(packet(dhcp.REQUEST, 4, ciaddr="10.99.0.50"))
    assert _chosen_server(ours) == IP(SERVER).packed and _chosen_server(theirs[0]) == IP("10.99.0.3").packed
    assert _chosen_server(renewal) is None and _chosen_server(dhcp.build(packet(dhcp.DISCOVER, 5))) is None
    head = dhcp.build(packet(dhcp.REQUEST, 6))[:243]  # header, cookie, option 53
    overloaded = head + bytes((dhcp.OVERLOAD, 1, 1, dhcp.SERVER_ID, 4)) + IP("10.99.0.3").packed + b"\xff"
    assert _chosen_server(overloaded) is None  # option 52: the parser decides
    handler = RecordingHandler(offered={mac(3)})  # this server offered client 3 an address before
    proto = _Protocol(None, None, handler=handler)
    for raw in [ours, *theirs, renewal]:
        proto.datagram_received(raw, None)
    assert [p.xid for p in handler.seen] == [1, 3, 4]  # 3: its offer may have to be freed (execute)


def test_two_servers_on_loopback_only_the_owner_answers_and_a_dora_is_batched():
    """Two daemons' serve() over one store, heartbeats included: a DISCOVER sent to both gets one
    OFFER, from the MAC's owner; the REQUEST to it gets the ACK; the table holds one bound lease."""
    store = MemoryStore()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(10)
    ids = (SERVER, "10.99.0.3")
    socks = {sid: open_socket("", "127.0.0.1", 0) for sid in ids}
    services = {sid: make(store=store, server=sid)[1] for sid in ids}

    def settings(sid):
        return Settings.load(environ={}, flags={
            "interface": "lo", "server_address": sid, "port": socks[sid].getsockname()[1],
            "client_port": client.getsockname()[1], "broadcast_address": "127.0.0.1", "peer_interval": 0.1,
            "peer_ttl": 2, "config_refresh": 0.2,
        })  # fmt: skip

    async def exchange(loop, i, to):
        for sid in to:
            client.sendto(dhcp.build(packet(dhcp.DISCOVER, i)), ("127.0.0.1", socks[sid].getsockname()[1]))
        offer = dhcp.parse(await loop.run_in_executor(None, client.recv, 2048))
        sid = str(offer.server_id)
        request = packet(dhcp.REQUEST, i, requested=offer.yiaddr, server=sid)
        client.sendto(dhcp.build(request), ("127.0.0.1", socks[sid].getsockname()[1]))
        ack = dhcp.parse(await loop.run_in_executor(None, client.recv, 2048))
        return offer, ack

    async def main():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        txn = AsyncStore(store)
        tasks = [asyncio.create_task(serve(settings(sid), stop, service=services[sid], sock=socks[sid], txn=txn))
                 for sid in ids]  # fmt: skip
        while not all("dhcp/servers/" + sid in store.data for sid in ids):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a few beats: both see both
        results = []
        for i in range(1, 9):
            offer, ack = await exchange(loop, i, ids)
            results.append((i, offer, ack))
        client.settimeout(0.5)
        extra = await loop.run_in_executor(None, _drain, client)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return results, extra

    try:
        results, extra = asyncio.run(main())
    finally:
        client.close()
    assert extra == []  # exactly one OFFER per DISCOVER, though both servers heard each
    for i, offer, ack in results:
        assert str(offer.server_id) == peers.owner(mac(i), ids)
        assert ack.message_type == dhcp.ACK and ack.yiaddr == offer.yiaddr
    table = L.LeaseStore(store).list()
    assert sorted(lease.mac for lease in table if lease.state == L.BOUND) == [mac(i) for i in range(1, 9)]
    assert {str(offer.server_id) for _, offer, _ in results} == set(ids)  # both had clients
    assert "dhcp/servers/" + SERVER not in store.data  # a clean stop deletes the heartbeat


def _drain(sock):
    out = []
    while True:
        try:
            out.append(dhcp.parse(sock.recv(2048)))
        except TimeoutError:
            return out

"""Which bootserver answers a client: rendezvous hashing over the live servers, the fallback for a
silent owner, and the heartbeats the live set is read from (over the in-memory store)."""

from __future__ import annotations

import collections
import json

from bootserver_fakes import MemoryStore

from cerana_bootserver import peers

A, B, C, D = "10.99.0.2", "10.99.0.3", "10.99.0.4", "10.99.0.5"
MACS = ["52:54:00:%02x:%02x:%02x" % (i // 65536, (i // 256) % 256, i % 256) for i in range(3000)]


def test_every_server_computes_the_same_owner_and_the_load_is_shared():
    owners = [peers.owner(mac, (A, B, C)) for mac in MACS]
    assert owners == [peers.owner(mac, (C, A, B)) for mac in MACS]  # the order of the live set is irrelevant
    share = collections.Counter(owners)
    assert set(share) == {A, B, C}
    assert all(800 <= n <= 1200 for n in share.values()), share  # about a third each
    assert all(peers.rank(mac, (A, B, C))[0] == owner for mac, owner in zip(MACS, owners, strict=True))
    assert peers.owner("52:54:00:00:00:01", ()) is None


def test_a_leaving_server_hands_its_macs_to_the_next_in_their_order_and_nobody_else_moves():
    before = {mac: peers.rank(mac, (A, B, C)) for mac in MACS}
    for mac, order in before.items():
        after = peers.owner(mac, (A, C))  # B left
        assert after == (order[1] if order[0] == B else order[0])
    # a joining server takes about a quarter of the MACs, each from whoever had it
    moved = [mac for mac in MACS if peers.owner(mac, (A, B, C, D)) != before[mac][0]]
    assert all(peers.owner(mac, (A, B, C, D)) == D for mac in moved)
    assert 500 <= len(moved) <= 1000


def test_live_set_from_heartbeats():
    entries = {A: 1000.0, B: 999.0, C: 1003.0}
    assert peers.live_from(entries, 1000.0) == (C,)
    assert peers.live_from(entries, 1000.0, me=B) == (B, C)  # a server always counts itself
    assert peers.live_from({}, 5.0, me=A) == (A,)


def test_gate_admits_the_owner_and_passes_the_others():
    gates = {s: peers.Gate(s, fallback=1.0) for s in (A, B, C)}
    for gate in gates.values():
        assert gate.update((A, B, C)) and gate.epoch == 1
        assert not gate.update((C, B, A))  # the same set: no change
    for mac in MACS[:300]:
        admitted = [s for s, gate in gates.items() if gate.admit(mac, 7, 0, now=0.0)]
        assert admitted == [peers.owner(mac, (A, B, C))]
    assert sum(g.passed for g in gates.values()) == 600
    alone = peers.Gate(A)
    assert all(alone.admit(mac, 1, 0, now=0.0) for mac in MACS[:50])  # alone: every MAC is its own


def test_a_silent_owner_is_covered_when_the_client_retransmits_or_says_it_has_waited():
    gate = peers.Gate(A, fallback=1.0)
    gate.update((A, B))
    mac = next(m for m in MACS if peers.owner(m, (A, B)) == B)
    assert not gate.admit(mac, 0x1234, 0, now=10.0)  # B's client: B answers
    assert not gate.admit(mac, 0x1234, 0, now=10.5)  # retransmitted too soon
    assert gate.admit(mac, 0x1234, 0, now=11.2)  # still trying after a second: B is silent, A answers
    assert gate.taken_over == 1
    assert not gate.admit(mac, 0x9999, 0, now=11.3)  # a new exchange (new xid): B's again
    assert gate.admit(mac, 0x7777, 3, now=11.4)  # secs (RFC 2131) says the client has waited 3 s
    assert gate.taken_over == 2


def test_failover_after_the_owner_left():
    gate = peers.Gate(A)
    gate.update((A, B, C))
    mine = [m for m in MACS if gate.owner(m) == A]
    theirs = [m for m in MACS if gate.owner(m) == B]
    assert not any(gate.admit(m, 1, 0, now=0.0) for m in theirs)
    gate.update((A, C))  # B's heartbeat expired
    taken = [m for m in theirs if gate.admit(m, 2, 0, now=0.0)]
    assert taken == [m for m in theirs if peers.rank(m, (A, B, C))[1] == A]  # the second in their order
    assert all(gate.admit(m, 3, 0, now=0.0) for m in mine)  # its own stay its own


class Clock:
    t = 1_000_000.0

    def __call__(self):
        return self.t


def test_heartbeats_in_the_store_make_the_live_set():
    store, clock = MemoryStore(), Clock()
    hearts = {s: peers.Peers(peers.Gate(s), pool="dhcp", ttl=5, clock=clock) for s in (A, B, C)}
    assert [heart.beat(store) for heart in hearts.values()] == [False, True, True]  # A alone, then A+B, A+B+C
    assert [heart.beat(store) for heart in hearts.values()] == [True, True, False]  # now everybody sees all
    assert all(heart.gate.live == (A, B, C) for heart in hearts.values())
    value = json.loads(store.data["dhcp/servers/" + A][0])
    assert value == {"server": A, "expires": 1_000_005}
    # B stops cleanly: its key goes at once; C is killed: its heartbeat expires
    hearts[B].leave(store)
    assert hearts[A].beat(store) and hearts[A].gate.live == (A, C)
    clock.t += 6
    hearts[A].beat(store)
    assert hearts[A].gate.live == (A,)
    # a key expired long ago is removed by whoever beats
    clock.t += peers.FORGET_AFTER
    hearts[A].beat(store)
    assert "dhcp/servers/" + C not in store.data and "dhcp/servers/" + A in store.data


def test_a_bad_heartbeat_value_counts_as_expired():
    store, clock = MemoryStore(), Clock()
    store.data["dhcp/servers/" + B] = (b"not json", 1)
    heart = peers.Peers(peers.Gate(A), clock=clock)
    heart.beat(store)
    assert heart.gate.live == (A,)

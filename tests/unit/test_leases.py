"""Pure parts of the lease allocator (pool arithmetic, candidate order) and its logic over an in-memory store."""

from __future__ import annotations

import ipaddress

import pytest
from bootserver_fakes import MemoryStore
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.cerana.platform.plugins.module_utils import _leases as L
from ansible_collections.cerana.platform.plugins.module_utils import _models as m

IP = ipaddress.IPv4Address
NET = "10.99.0.0/24"


def mac(i):
    return "52:54:00:00:%02x:%02x" % (i // 256, i % 256)


def pool(**kw):
    data = {"net": NET, **kw}
    return L.Pool.from_config(m.DHCPConfig.from_dict(data))


class Clock:
    def __init__(self, t=1_000_000):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def env():
    store, clock = MemoryStore(), Clock()
    return store, clock, L.LeaseStore(store, server="10.99.0.2", offer_hold=30, clock=clock)


# -- pool arithmetic -----------------------------------------------------------------


def test_pool_size_and_bounds():
    p = pool()
    assert p.size == 254 and p.first == IP("10.99.0.1")
    assert p.why_not("10.99.0.0", mac(1)).endswith("network or broadcast address of 10.99.0.0/24")
    assert "network or broadcast" in p.why_not("10.99.0.255", mac(1))
    assert p.why_not("10.99.1.1", mac(1)) == "10.99.1.1 is outside 10.99.0.0/24"
    assert p.usable("10.99.0.1", mac(1)) and p.usable("10.99.0.254", mac(1))


def test_pool_excludes_gateway_ranges_and_other_reservations():
    p = pool(gateway="10.99.0.1", excluded=[{"start": "10.99.0.10", "end": "10.99.0.19"}],
             reservations={mac(7): "10.99.0.50"})  # fmt: skip
    assert p.why_not("10.99.0.1", mac(1)) == "10.99.0.1 is the gateway"
    assert "excluded range 10.99.0.10-10.99.0.19" in p.why_not("10.99.0.15", mac(1))
    assert p.why_not("10.99.0.50", mac(1)) == "10.99.0.50 is reserved for %s" % mac(7)
    assert p.usable("10.99.0.50", mac(7))
    assert "has the reservation 10.99.0.50" in p.why_not("10.99.0.51", mac(7))
    assert list(p.candidates(mac(7))) == [IP("10.99.0.50")]
    got = set(p.candidates(mac(1)))
    assert len(got) == 254 - 1 - 10 - 1
    assert IP("10.99.0.1") not in got and IP("10.99.0.50") not in got and IP("10.99.0.12") not in got


@pytest.mark.parametrize("size", [1, 2, 3, 4, 6, 14, 254, 256 * 256 - 2])
def test_candidate_order_is_a_permutation(size):
    order = list(L.candidate_order("52:54:00:12:34:56", size)) if size < 100000 else None
    if order is not None:
        assert sorted(order) == list(range(size))


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=2000), st.binary(min_size=6, max_size=6))
def test_candidate_order_permutation_property(size, raw):
    mac_s = ":".join("%02x" % b for b in raw)
    assert sorted(L.candidate_order(mac_s, size)) == list(range(size))


def test_candidate_order_spreads_macs():
    starts = {next(L.candidate_order(mac(i), 254)) for i in range(100)}
    assert len(starts) > 60  # different MACs start at different places


def test_lease_json_round_trip_and_bad_values():
    lease = L.Lease(ip="10.99.0.5", mac=mac(1), state=L.BOUND, expires=123, server="s", hostname="h")
    assert L.Lease.from_bytes("10.99.0.5", lease.to_bytes(), 9) == L.Lease(**{**lease.__dict__, "index": 9})
    with pytest.raises(m.ValidationError, match=r"lease 10\.99\.0\.5\.state"):
        L.Lease.from_bytes("10.99.0.5", b'{"mac":"52:54:00:00:00:01","state":"x","expires":1}')
    with pytest.raises(m.ValidationError, match="not JSON"):
        L.Lease.from_bytes("10.99.0.5", b"\xff")


def test_expiry_decisions():
    lease = L.Lease(ip="10.99.0.5", mac=mac(1), state=L.OFFERED, expires=100)
    assert not lease.expired(99) and lease.expired(100)
    assert not lease.expired(102, skew=5) and lease.expired(105, skew=5)
    assert lease.owned_by(mac(1)) and not lease.owned_by(mac(2))
    assert not L.Lease(ip="x", mac=mac(1), state=L.DECLINED, expires=0).owned_by(mac(1))


# -- allocation logic over a fake store ---------------------------------------------------


def test_offer_then_ack_same_lease(env):
    store, clock, ls = env
    p = pool(gateway="10.99.0.1")
    offer = ls.offer(p, mac(1))
    assert offer.state == L.OFFERED and offer.expires == clock.t + 30 and IP(offer.ip) in p.net
    assert ls.offer(p, mac(1)).ip == offer.ip  # a repeated DISCOVER gets the same address, no write
    lease, changed = ls.ack(p, mac(1), offer.ip, duration=3600)
    assert changed and lease.state == L.BOUND and lease.expires == clock.t + 3600
    assert store.data["dhcp/macs/" + mac(1)][0] == offer.ip.encode()
    # acking again extends (a renewal); with min_remaining it is a no-op while the lease is fresh
    clock.t += 100
    lease2, changed = ls.ack(p, mac(1), offer.ip, duration=3600)
    assert changed and lease2.expires == clock.t + 3600
    lease3, changed = ls.ack(p, mac(1), offer.ip, duration=3600, min_remaining=1800)
    assert not changed and lease3 == lease2


def test_second_mac_gets_other_address_and_cannot_take_the_first(env):
    _, _, ls = env
    p = pool()
    a = ls.offer(p, mac(1))
    b = ls.offer(p, mac(2), requested=a.ip)  # requested but taken: ignored
    assert a.ip != b.ip
    with pytest.raises(L.HeldByOther, match="%s is leased to %s" % (a.ip, mac(1))):
        ls.ack(p, mac(2), a.ip, duration=60)
    with pytest.raises(L.NoSuchLease):
        ls.ack(p, mac(2), "10.99.0.200" if a.ip != "10.99.0.200" and b.ip != "10.99.0.200" else "10.99.0.201",
               duration=60)  # fmt: skip


def test_requested_free_address_is_honoured(env):
    _, _, ls = env
    assert ls.offer(pool(), mac(1), requested="10.99.0.77").ip == "10.99.0.77"
    assert ls.offer(pool(gateway="10.99.0.78"), mac(2), requested="10.99.0.78").ip != "10.99.0.78"


def test_almost_full_pool_offers_the_single_free_address_and_full_pool_fails(env):
    store, _, ls = env
    p = pool()
    free = IP("10.99.0.173")
    for i, host in enumerate(p.net.hosts()):
        if host != free:
            lease = L.Lease(ip=str(host), mac=mac(1000 + i), state=L.BOUND, expires=2_000_000)
            store.data[L.lease_key(host)] = (lease.to_bytes(), 1)
    store.calls = 0
    got = ls.offer(p, mac(1))
    assert got.ip == str(free)
    # 1 MAC index read + at most 16 probes * 2 + 1 listing + the claim
    assert store.calls <= 1 + 2 * 16 + 1 + 1
    with pytest.raises(L.NoFreeAddress, match=r"^no free address in 10\.99\.0\.0/24$"):
        ls.offer(p, mac(2))


def test_expired_offers_are_reclaimed_and_bindings_last(env):
    _store, clock, ls = env
    p = pool(excluded=[{"start": "10.99.0.3", "end": "10.99.0.254"}])  # two addresses: .1 and .2
    a = ls.offer(p, mac(1))
    b = ls.offer(p, mac(2))
    with pytest.raises(L.NoFreeAddress):
        ls.offer(p, mac(3))
    clock.t += 31  # offers run out, but not past the skew allowance
    with pytest.raises(L.NoFreeAddress):
        ls.offer(p, mac(3))
    clock.t += 5
    c = ls.offer(p, mac(3))
    assert c.ip in (a.ip, b.ip)
    # the old owner's MAC index is a stale hint now: it gets the other address
    other = ls.offer(p, mac(1) if c.ip == a.ip else mac(2))
    assert {c.ip, other.ip} == {a.ip, b.ip}


def test_release_frees_and_returning_client_gets_previous_address(env):
    _, _, ls = env
    p = pool()
    a = ls.offer(p, mac(1))
    ls.ack(p, mac(1), a.ip, duration=600)
    assert ls.release(mac(2), a.ip) is None  # not yours
    assert ls.release(mac(1), a.ip).ip == a.ip
    assert ls.get(a.ip) is None
    assert ls.offer(p, mac(1)).ip == a.ip  # the MAC index remembers the previous address


def test_release_offer_only_frees_own_offers(env):
    _store, _, ls = env
    p = pool()
    a = ls.offer(p, mac(1))
    assert ls.release(mac(1), only_offer_of="10.99.0.3") is None
    assert ls.release(mac(1), only_offer_of="10.99.0.2").ip == a.ip
    b = ls.offer(p, mac(2))
    ls.ack(p, mac(2), b.ip, duration=60)
    assert ls.release(mac(2), only_offer_of="10.99.0.2") is None  # bound: not an offer any more


def test_decline_quarantines(env):
    _, clock, ls = env
    p = pool(excluded=[{"start": "10.99.0.2", "end": "10.99.0.254"}])  # a single address
    a = ls.offer(p, mac(1))
    ls.decline(mac(1), a.ip)
    with pytest.raises(L.NoFreeAddress):
        ls.offer(p, mac(1))
    clock.t += 600 + 5
    assert ls.offer(p, mac(2)).ip == a.ip


def test_reservation_always_wins(env):
    _, clock, ls = env
    p = pool(reservations={mac(9): "10.99.0.9"})
    assert ls.offer(p, mac(9), requested="10.99.0.20").ip == "10.99.0.9"
    # held by another MAC from before the reservation existed: refused until it expires
    p0 = pool()
    ls2 = L.LeaseStore(MemoryStore(), clock=clock)
    ls2.ack(p0, mac(1), "10.99.0.9", duration=60, allow_unallocated=True)
    with pytest.raises(L.HeldByOther):
        ls2.offer(p, mac(9))
    with pytest.raises(L.NotLeasable, match="reserved for"):
        ls2.ack(p, mac(1), "10.99.0.9", duration=60)  # its renewal is NAKed
    clock.t += 60 + 5
    assert ls2.offer(p, mac(9)).ip == "10.99.0.9"


def test_ack_validation_table(env):
    _, _, ls = env
    p = pool(gateway="10.99.0.1")
    with pytest.raises(m.ValidationError, match="mac: must be a MAC"):
        ls.ack(p, "junk", "10.99.0.5", duration=60)
    with pytest.raises(L.NotLeasable, match="outside"):
        ls.ack(p, mac(1), "10.98.0.5", duration=60)
    with pytest.raises(L.NotLeasable, match="gateway"):
        ls.ack(p, mac(1), "10.99.0.1", duration=60)
    lease, changed = ls.ack(p, mac(1), "10.99.0.5", duration=60, allow_unallocated=True)  # bootstrap
    assert changed and lease.state == L.BOUND


def test_ack_unallocated_moves_the_macs_old_lease(env):
    _, _, ls = env
    p = pool()
    a = ls.offer(p, mac(1))
    target = "10.99.0.250" if a.ip != "10.99.0.250" else "10.99.0.251"
    ls.ack(p, mac(1), target, duration=60, allow_unallocated=True)
    assert ls.get(a.ip) is None and ls.lease_of(mac(1)).ip == target


def test_sweep_and_garbage_values(env):
    store, clock, ls = env
    store.data["dhcp/leases/10.99.0.7"] = (b"garbage", 3)
    assert ls.get("10.99.0.7").expires == 0  # readable, reclaimable, never crashes
    ls.offer(pool(), mac(1))
    clock.t += 86400 + 100
    assert ls.sweep() == 2 and ls.list() == []


def test_cost_of_a_dora_on_an_empty_pool(env):
    store, _, ls = env
    p = pool()
    store.calls = 0
    offer = ls.offer(p, mac(1))
    ls.ack(p, mac(1), offer.ip, duration=600)
    assert store.calls == 4  # GET mac index, claim txn, GET lease, CAS txn


# -- the DHCP server's shortcuts: optimistic first claim, ACK against a known offer ------------


def test_cost_of_a_dora_for_a_dhcp_server(env):
    store, clock, _ = env
    ls = L.LeaseStore(store, server="10.99.0.2", offer_hold=30, clock=clock, optimistic=True)
    p = pool()
    store.calls = 0
    offer = ls.offer(p, mac(1))
    lease, changed = ls.ack(p, mac(1), offer.ip, duration=600, known=offer)
    assert changed and lease.state == L.BOUND and lease.ip == offer.ip
    assert store.calls == 2  # claim txn, CAS txn
    assert ls.get(offer.ip) == lease


def test_optimistic_offer_falls_back_for_known_macs_and_taken_addresses(env):
    store, clock, plain = env
    ls = L.LeaseStore(store, server="10.99.0.3", offer_hold=30, clock=clock, optimistic=True)
    p = pool()
    first = plain.offer(p, mac(1))
    plain.ack(p, mac(1), first.ip, duration=600)
    plain.release(mac(1), first.ip)
    # a returning MAC gets its previous address back (the create-only claim on its MAC index fails)
    again = ls.offer(p, mac(1))
    assert again.ip == first.ip and again.state == L.OFFERED
    # a new MAC whose first candidate is taken by another MAC gets another address
    victim = next(iter(p.candidates(mac(3))))
    other = L.Lease(ip=str(victim), mac=mac(99), state=L.BOUND, expires=2_000_000)
    store.data[L.lease_key(victim)] = (other.to_bytes(), 1)
    got = ls.offer(p, mac(3))
    assert got.ip != str(victim) and ls.get(victim).mac == mac(99)
    # one live lease per MAC, one MAC per address
    leases = [x for x in ls.list() if x.state != L.DECLINED]
    assert len({x.mac for x in leases}) == len(leases)


def test_optimistic_allocators_racing_for_one_mac_offer_the_same_address(env):
    store, clock, _ = env
    a, b = (L.LeaseStore(store, server=s, offer_hold=30, clock=clock, optimistic=True)
            for s in ("10.99.0.2", "10.99.0.3"))  # fmt: skip
    p = pool()
    first = a.offer(p, mac(5))
    second = b.offer(p, mac(5))  # b's create-only claim loses: it returns a's live offer
    assert (second.ip, second.server) == (first.ip, "10.99.0.2")
    assert len(a.list()) == 1


def test_ack_against_a_stale_known_lease_reads_and_retries(env):
    store, clock, ls = env
    p = pool()
    offer = ls.offer(p, mac(1))
    renewed, _ = ls.ack(p, mac(1), offer.ip, duration=600)  # the key moved on: offer.index is stale
    store.calls = 0
    lease, changed = ls.ack(p, mac(1), offer.ip, duration=900, known=offer)
    assert changed and lease.expires == clock.t + 900
    assert store.calls == 3  # failed CAS, read, CAS
    # a known lease of another address or MAC is ignored
    store.calls = 0
    elsewhere = "10.99.0.1" if offer.ip != "10.99.0.1" else "10.99.0.2"
    ls.ack(p, mac(1), offer.ip, duration=900, known=L.Lease(ip=elsewhere, mac=mac(1), state=L.OFFERED, expires=0,
                                                          index=renewed.index))  # fmt: skip
    assert store.calls == 2
    with pytest.raises(L.HeldByOther):  # another MAC's known lease is no shortcut around the read
        ls.ack(p, mac(2), offer.ip, duration=600, known=lease)


def test_first_candidate_skips_known_taken_addresses_and_prefers_a_share(env):
    _, _, ls = env
    p = pool(gateway="10.99.0.1")
    order = list(p.candidates(mac(5)))
    assert ls.first_candidate(p, mac(5)) == order[0]
    assert ls.first_candidate(p, mac(5), requested="10.99.0.77") == IP("10.99.0.77")
    assert ls.first_candidate(p, mac(5), requested="10.99.0.1") == order[0]  # the gateway: not usable
    taken = set(order[:3])
    assert ls.first_candidate(p, mac(5), taken=taken.__contains__) == order[3]
    assert ls.first_candidate(p, mac(5), requested=order[0], taken=taken.__contains__) == order[3]
    odd = lambda ip: int(ip) % 2 == 1  # noqa: E731 - a share of the pool
    assert ls.first_candidate(p, mac(5), prefer=odd) == next(ip for ip in order if odd(ip))
    assert ls.first_candidate(p, mac(5), taken=taken.__contains__, prefer=lambda ip: False) == order[3]
    everything = set(order)
    assert ls.first_candidate(p, mac(5), taken=everything.__contains__) == order[4 * ls.max_probes]
    assert ls.first_candidate(pool(reservations={mac(5): "10.99.0.9"}), mac(5)) == IP("10.99.0.9")

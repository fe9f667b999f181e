"""The lease store against a real Consul agent: concurrent allocators, renewals, release, expiry."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _leases as L
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._store import ConnectionSettings, Store

pytestmark = pytest.mark.integration


class CountingStore(Store):
    """A Store that counts its HTTP requests (to measure the cost of a lease)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.requests = 0

    def _call(self, *a, **kw):
        self.requests += 1
        return super()._call(*a, **kw)


def mac(i):
    return "52:54:00:%02x:%02x:%02x" % (i // 65536, (i // 256) % 256, i % 256)


@pytest.fixture
def store_factory(consul, kv_prefix):
    def make():
        return CountingStore(ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))

    return make


def pool(net="10.99.0.0/24", **kw):
    return L.Pool.from_config(m.DHCPConfig.from_dict({"net": net, **kw}))


def test_concurrent_allocators_hand_out_distinct_addresses(store_factory):
    p = pool(gateway="10.99.0.1")
    servers = 3
    stores = [store_factory() for _ in range(servers)]
    allocators = [L.LeaseStore(s, server="10.99.0.%d" % (2 + i)) for i, s in enumerate(stores)]
    got = {}
    lock = threading.Lock()
    barrier = threading.Barrier(servers)

    def work(k):
        ls = allocators[k]
        barrier.wait()
        for i in range(k, 100, servers):
            offer = ls.offer(p, mac(i))
            lease, _ = ls.ack(p, mac(i), offer.ip, duration=600)
            with lock:
                got[mac(i)] = lease.ip

    start = time.monotonic()
    with ThreadPoolExecutor(servers) as ex:
        list(ex.map(work, range(servers)))
    elapsed = time.monotonic() - start
    per_dora = sum(s.requests for s in stores) / 100
    assert len(got) == 100 and len(set(got.values())) == 100
    listed = L.LeaseStore(stores[0]).list()
    assert len(listed) == 100 and all(lease.state == L.BOUND for lease in listed)
    assert {lease.ip for lease in listed} == set(got.values())
    for i in range(100):
        assert L.LeaseStore(stores[0]).lease_of(mac(i)).ip == got[mac(i)]
    print("\n100 DORAs by %d allocators: %.2f s, %.2f Consul requests per DORA" % (servers, elapsed, per_dora))
    assert per_dora < 6  # 4 on an empty pool; collisions add a claim and a read each


def test_two_servers_racing_for_one_mac_offer_the_same_address(store_factory):
    p = pool()
    for i in range(20):
        a, b = L.LeaseStore(store_factory(), server="a"), L.LeaseStore(store_factory(), server="b")
        barrier = threading.Barrier(2)

        def go(ls, i=i, barrier=barrier):
            barrier.wait()
            return ls.offer(p, mac(1000 + i)).ip

        with ThreadPoolExecutor(2) as ex:
            ips = list(ex.map(go, (a, b)))
        assert ips[0] == ips[1]
    assert len(L.LeaseStore(store_factory()).list()) == 20


def test_contended_small_pool_never_duplicates(store_factory):
    p = pool("10.99.1.0/28")  # 14 addresses, 20 clients, 3 allocators
    results, errors = {}, []
    lock = threading.Lock()

    def work(k):
        ls = L.LeaseStore(store_factory(), server=str(k))
        for i in range(k, 20, 3):
            try:
                offer = ls.offer(p, mac(2000 + i))
            except L.NoFreeAddress as e:
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                results[mac(2000 + i)] = offer.ip

    with ThreadPoolExecutor(3) as ex:
        list(ex.map(work, range(3)))
    assert len(results) == 14 and len(set(results.values())) == 14
    assert errors == ["no free address in 10.99.1.0/28"] * 6


def test_renew_release_decline_and_expiry(store_factory):
    now = [time.time()]
    ls = L.LeaseStore(store_factory(), server="s1", offer_hold=30, clock=lambda: now[0])
    p = pool()
    offer = ls.offer(p, mac(1))
    lease, _ = ls.ack(p, mac(1), offer.ip, duration=600)
    now[0] += 300
    renewed, changed = ls.ack(p, mac(1), offer.ip, duration=600)
    assert changed and renewed.expires == lease.expires + 300 and renewed.index > lease.index
    assert ls.release(mac(1)).ip == offer.ip and ls.get(offer.ip) is None
    # an expired offer of another client is reclaimed by a third one
    small = pool("10.99.2.0/30")  # two addresses
    o1, o2 = ls.offer(small, mac(11)), ls.offer(small, mac(12))
    with pytest.raises(L.NoFreeAddress):
        ls.offer(small, mac(13))
    now[0] += 31 + ls.skew  # expiries are whole seconds, rounded up
    o3 = ls.offer(small, mac(13))
    assert o3.ip in (o1.ip, o2.ip) and ls.get(o3.ip).mac == mac(13)
    ls.decline(mac(13), o3.ip)
    assert ls.get(o3.ip).state == L.DECLINED

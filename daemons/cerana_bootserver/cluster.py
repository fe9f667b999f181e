"""The cluster view behind the iPXE scripts, read from Consul (the only I/O of the script path).

One :class:`ClusterState` per daemon. The cluster-wide parts (reservations, live nodes,
Consul server addresses) are cached for ``refresh`` seconds, so a burst of booting nodes
costs one read of each; the MAC's lease (its MAC index key) is read per request.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._leases import DEFAULT_POOL, LeaseStore
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError
from cerana_bootserver import ipxe

log = logging.getLogger(__name__)


def consul_servers(store) -> tuple[str, ...]:
    """Addresses of the Consul servers (Raft peers ``ip:8300`` without the port), or ()."""
    try:
        peers = store.peers()
    except StoreError as e:
        log.debug("cannot read Consul peers: %s", e)
        return ()
    out = []
    for peer in peers:
        host = str(peer).rsplit(":", 1)[0].strip("[]")
        try:
            out.append(str(ipaddress.ip_address(host)))
        except ValueError:
            continue
    return tuple(sorted(set(out), key=lambda a: ipaddress.ip_address(a)))


class ClusterState:
    """``view_for(mac) -> ipxe.ClusterView`` over a Store (created lazily by ``store_factory``)."""

    def __init__(self, store_factory, *, pool=DEFAULT_POOL, cluster_ips=(), refresh=5.0, clock=time.monotonic):
        self._factory = store_factory
        self._store = None
        self.pool = pool
        self.cluster_ips = tuple(cluster_ips)
        self.refresh = refresh
        self.clock = clock
        self._lock = threading.Lock()
        self._cached = None  # (time, reservations, nodes, servers)

    def _get_store(self):
        if self._store is None:
            self._store = self._factory()
        return self._store

    def _shared(self):
        with self._lock:
            now = self.clock()
            if self._cached is not None and now - self._cached[0] < self.refresh:
                return self._cached[1:]
            store = self._get_store()
            objects = Objects(store)
            cfg = objects.get_config(m.DHCPConfig, m.DHCP_CONFIG_KEY)
            reservations = dict(cfg.obj.reservations) if cfg is not None else {}
            nodes = tuple(ipxe.NodeInfo.from_node(n) for n in objects.nodes())
            servers = self.cluster_ips or consul_servers(store)
            self._cached = (now, reservations, nodes, servers)
            return self._cached[1:]

    def view_for(self, mac: str) -> ipxe.ClusterView:
        reservations, nodes, servers = self._shared()
        lease = LeaseStore(self._get_store(), pool=self.pool).lease_of(mac)
        leased = {mac: str(lease.ip)} if lease is not None else {}
        return ipxe.ClusterView(cluster_ips=servers, reservations=reservations, leased=leased, nodes=nodes)

"""Executes the handler's intents against the shared lease table, and rides out Consul outages.

While Consul cannot be reached the server keeps renewing the leases *it* granted (a
local cache of its ACKs), refuses new ones (a duplicate address is worse than a slow
boot), and stays silent where it cannot know the answer. It logs each change between
"online" and "offline" once, and writes the renewals it granted offline back to Consul
when it is reachable again.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import threading
import time

from ansible_collections.cerana.platform.plugins.module_utils import _leases as L
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError, Unreachable
from cerana_bootserver import handler as h

log = logging.getLogger(__name__)


SEEN_MAX = 65536


class LeaseService:
    """Thread-safe: the transport calls :meth:`execute` from a worker pool.

    ``store_factory()`` returns a new :class:`_store.Store` (one per worker thread).
    """

    def __init__(self, store_factory, *, server_id, pool="dhcp", offer_hold=60, decline_hold=600, skew=5,
                 max_probes=16, config_refresh=10.0, clock=time.time, optimistic=True):  # fmt: skip
        self.store_factory = store_factory
        self.server_id = ipaddress.IPv4Address(server_id)
        self.pool_name = pool
        self.lease_args = dict(
            pool=pool, server=str(self.server_id), offer_hold=offer_hold, decline_hold=decline_hold,
            skew=skew, max_probes=max_probes, clock=clock, optimistic=optimistic,
        )  # fmt: skip
        self.config_refresh = config_refresh
        self.clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._config = None  # (DHCPConfig, Pool, fetched at)
        self._cache = {}  # mac -> Lease this server bound (ACK/renewal)
        self._offers = {}  # mac -> Lease this server last offered (its modify index spares the ACK a read)
        self._pending = {}  # mac -> Lease renewed while offline, to write back
        self._seen = collections.OrderedDict()  # MACs recently heard from (at most SEEN_MAX, oldest first)
        self.online = None  # None (unknown), True, False

    # -- plumbing -----------------------------------------------------------------

    def leases(self):
        ls = getattr(self._local, "leases", None)
        if ls is None:
            ls = self._local.leases = L.LeaseStore(self.store_factory(), **self.lease_args)
        return ls

    def _went_offline(self, err):
        with self._lock:
            changed, self.online = self.online is not False, False
            cached = len(self._cache)
        if changed:
            log.warning(
                "Consul is unreachable (%s): renewing the %d leases this server granted from its cache, "
                "refusing new leases until it is back", err, cached,
            )  # fmt: skip

    def _went_online(self):
        with self._lock:
            was, self.online = self.online, True
            pending = dict(self._pending)
        if was is not False:  # unknown (start-up) or already online: nothing to announce
            return
        written = 0
        for mac, lease in pending.items():
            if self._write_back(mac, lease):
                written += 1
        log.info("Consul is reachable again: serving new leases (%d offline renewals written back)", written)

    def _write_back(self, mac, lease):
        cfg = self._config
        if cfg is None:
            return False
        now = self.clock()
        try:
            self.leases().ack(cfg[1], mac, lease.ip, duration=max(1, lease.expires - now))
        except L.LeaseError as e:
            log.error("renewal of %s for %s granted while Consul was away cannot be written back: %s", lease.ip, mac, e)
        except StoreError as e:
            log.warning("writing back the offline renewal of %s for %s failed: %s", lease.ip, mac, e)
            return False
        with self._lock:
            if self._pending.get(mac) == lease:
                del self._pending[mac]
        return True

    def config(self):
        """(DHCPConfig, Pool), refreshed every ``config_refresh`` s; the last good one while Consul is away.

        None when there is no configuration at all.
        """
        now = time.monotonic()
        cached = self._config
        if cached is not None and now - cached[2] < self.config_refresh:
            return cached[:2]
        try:
            entry = self.leases().store.get(m.DHCP_CONFIG_KEY, consistent=False)
        except Unreachable as e:
            self._went_offline(e)
            return cached[:2] if cached else None
        if entry is None:
            self._config = None
            return None
        try:
            cfg = m.DHCPConfig.from_json(entry.value.decode("utf-8", "replace"))
        except m.ValidationError as e:
            log.error("the DHCP configuration at %s is invalid, keeping the last good one: %s", m.DHCP_CONFIG_KEY, e)
            return cached[:2] if cached else None
        if cached is None or cached[0] != cfg:
            log.info("DHCP configuration: %s", cfg.to_json())
        self._config = (cfg, L.Pool.from_config(cfg), now)
        return self._config[:2]

    def tick(self):
        """Periodic housekeeping: refresh the config, retry pending write-backs, drop expired cache entries."""
        got = self.config()
        if self.online is False and got is not None:
            try:
                self.leases().store.ping()
            except StoreError:
                pass
            else:
                self._went_online()
        now = self.clock()
        with self._lock:
            for mac in [k for k, v in self._cache.items() if v.expires <= now]:
                del self._cache[mac]
            for mac in [k for k, v in self._offers.items() if v.expires <= now]:
                del self._offers[mac]

    # -- the one entry point ------------------------------------------------------------

    def execute(self, intent):
        """Run ``intent`` (from :func:`handler.decide`); returns Granted, Denied or Silent."""
        if isinstance(intent, (h.Ignore, h.Nak)):
            return h.Silent(getattr(intent, "reason", ""))
        got = self.config()
        if got is None:
            return h.Silent("no DHCP configuration at %s yet" % m.DHCP_CONFIG_KEY)
        cfg, pool = got
        try:
            outcome = self._execute(intent, cfg, pool)
        except Unreachable as e:
            self._went_offline(e)
            return self._offline(intent, cfg)
        if self.online is not True:
            self._went_online()
        return outcome

    def _execute(self, intent, cfg, pool):
        ls = self.leases()
        if isinstance(intent, h.Offer):
            # A MAC this server has not heard from lately is most likely new to the table too:
            # claim its first address straight away (see LeaseStore.offer, ``optimistic``).
            with self._lock:
                new = intent.mac not in self._seen
                self._seen[intent.mac] = True
                self._seen.move_to_end(intent.mac)
                if len(self._seen) > SEEN_MAX:
                    self._seen.popitem(last=False)
            try:
                lease = ls.offer(pool, intent.mac, requested=intent.requested, hostname=intent.hostname,
                                 optimistic=new and ls.optimistic)  # fmt: skip
            except L.LeaseError as e:
                log.warning("no offer for %s: %s", intent.mac, e)
                return h.Silent(str(e))
            with self._lock:
                self._offers[intent.mac] = lease
            return h.Granted(ipaddress.IPv4Address(lease.ip))
        if isinstance(intent, h.Ack):
            # The lease as this server last wrote or saw it (the offer, or the binding being
            # renewed): ack() compare-and-swaps against it without reading it first.
            with self._lock:
                known = self._offers.pop(intent.mac, None)
                if known is None or known.ip != str(intent.ip):
                    known = self._cache.get(intent.mac)
            try:
                lease, _ = ls.ack(pool, intent.mac, intent.ip, duration=cfg.lease_duration, hostname=intent.hostname,
                                  known=known)  # fmt: skip
            except L.LeaseError as e:
                return h.Denied(str(e))
            with self._lock:
                self._cache[intent.mac] = lease
                self._pending.pop(intent.mac, None)
            return h.Granted(intent.ip)
        if isinstance(intent, h.ReleaseOffer):
            with self._lock:
                mine = self._offers.pop(intent.mac, None)
            if mine is not None and (mine.server != str(self.server_id) or mine.ip == str(intent.requested)):
                # What this server offered was another server's offer, or the very address the
                # client chose: there is nothing of ours to free (release() would find the same).
                return h.Silent("client chose server %s" % intent.chosen)
            freed = ls.release(intent.mac, only_offer_of=str(self.server_id), keep_ip=intent.requested)
            if freed is not None:
                log.info("%s chose server %s: freed our offer of %s", intent.mac, intent.chosen, freed.ip)
            return h.Silent("client chose server %s" % intent.chosen)
        if isinstance(intent, h.Release):
            freed = ls.release(intent.mac, intent.ip)
            with self._lock:
                self._cache.pop(intent.mac, None)
                self._pending.pop(intent.mac, None)
            return h.Silent("released" if freed else "nothing to release")
        if isinstance(intent, h.Decline):
            ls.decline(intent.mac, intent.ip)
            log.warning("%s declined %s (address in use?): quarantined for %ss", intent.mac, intent.ip, ls.decline_hold)
            with self._lock:
                self._cache.pop(intent.mac, None)
            return h.Silent("declined")
        if isinstance(intent, h.Inform):
            return h.Granted(None)
        return h.Silent("unhandled intent %r" % (intent,))

    def _offline(self, intent, cfg):
        if isinstance(intent, h.Ack):
            now = self.clock()
            with self._lock:
                cached = self._cache.get(intent.mac)
                if cached is not None and ipaddress.IPv4Address(cached.ip) == intent.ip and cached.expires > now:
                    renewed = dataclasses.replace(cached, expires=L.expiry(now, cfg.lease_duration))
                    self._cache[intent.mac] = renewed
                    self._pending[intent.mac] = renewed
                    return h.Granted(intent.ip)
            return h.Silent("Consul unreachable and %s is not a lease this server granted" % intent.ip)
        if isinstance(intent, h.Inform):
            return h.Granted(None)
        return h.Silent("Consul unreachable: no new leases")

    def cached(self):
        with self._lock:
            return dict(self._cache)

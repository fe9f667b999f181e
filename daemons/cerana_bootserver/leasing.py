"""Executes the handler's intents against the shared lease table, and rides out Consul outages.

Two ways in: :meth:`LeaseService.execute` (blocking, from a worker thread: any intent) and
:meth:`LeaseService.fast` (from the event loop, no I/O): it answers what this server's own
state already decides, e.g. an OFFER of the binding it granted the MAC, and turns an ACK
against a lease whose modify index it knows, or the claim of a new MAC's first address,
into a :class:`Commit`: transaction operations the server batches with other exchanges'
into one Consul transaction (``batch.py``). Everything else, and every commit that loses
its compare-and-swap, goes the blocking way.

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
TAKEN_MAX = 65536  # addresses remembered as taken (forgotten all at once beyond that)
TAKEN_RECHECK = 60  # seconds an address a claim found taken (by an unknown lease) is skipped
IN_FLIGHT = "an offer to this client is being written"
CLAIM_WAIT = 5.0  # seconds a retransmitted DISCOVER waits for the first one's claim, at most


@dataclasses.dataclass
class Commit:
    """What :meth:`LeaseService.fast` returns when an intent needs one transaction and nothing else.

    ``ops`` go to Consul in one transaction (possibly batched with other commits);
    ``done(results)`` (the result entries of the transaction) returns the outcome;
    ``failed(keys)`` (the keys whose compare-and-swap lost) forgets what turned out to be stale
    and returns another Commit to try instead, or None: the intent goes the blocking way.
    """

    ops: list
    done: object
    failed: object
    claim: bool = False  # a new MAC's claim (an OFFER): shed first under overload
    prepare: object = None  # () -> ops, called as the commit goes into a transaction (see batch.py)


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
        # mac -> Lease as this server last wrote or read it since the live set of bootservers last
        # changed: while it owns the MAC nobody else writes it, so an OFFER can be made from it.
        self._trusted = {}
        self._pure = L.LeaseStore(None, **self.lease_args)  # builds leases and operations, no I/O
        self._claiming = {}  # mac -> when its first claim went on its way to Consul (monotonic)
        self.counts = collections.Counter()  # what the non-blocking way did (the periodic log line)
        self._taken = {}  # IPv4Address -> until when it is taken, as far as this server knows
        self.gate = None  # peers.Gate: new clients' claims prefer this server's share of the pool
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

    def cached_config(self):
        """(DHCPConfig, Pool) as last read, without any I/O; None before the first read."""
        cached = self._config
        return cached[:2] if cached is not None else None

    def offered(self, mac):
        """Whether this server has an offer for ``mac`` that the client has not answered yet."""
        return mac in self._offers

    def forget_trusted(self):
        """The live set of bootservers changed: other servers may write this server's MACs now."""
        with self._lock:
            self._trusted.clear()
            self._taken.clear()

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
            for mac in [k for k, v in self._trusted.items() if v.expires <= now]:
                del self._trusted[mac]

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
            self._note_taken(lease.ip, lease.expires)
            with self._lock:
                self._offers[intent.mac] = lease
                self._trusted[intent.mac] = lease
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
                with self._lock:
                    self._trusted.pop(intent.mac, None)
                return h.Denied(str(e))
            self._note_taken(lease.ip, lease.expires)
            with self._lock:
                self._cache[intent.mac] = lease
                self._trusted[intent.mac] = lease
                self._pending.pop(intent.mac, None)
            return h.Granted(intent.ip)
        if isinstance(intent, h.ReleaseOffer):
            with self._lock:
                mine = self._offers.get(intent.mac)
                if mine is None or mine.server != str(self.server_id) or mine.ip == str(intent.requested):
                    # This server offered the client nothing (another server answered its DISCOVER;
                    # an offer made before a restart just expires), or what it offered was another
                    # server's offer, or the very address the client chose: nothing of ours to free.
                    return h.Silent("client chose server %s" % intent.chosen)
                del self._offers[intent.mac]
            freed = ls.release(intent.mac, only_offer_of=str(self.server_id), keep_ip=intent.requested)
            if freed is not None:
                log.info("%s chose server %s: freed our offer of %s", intent.mac, intent.chosen, freed.ip)
            return h.Silent("client chose server %s" % intent.chosen)
        if isinstance(intent, h.Release):
            freed = ls.release(intent.mac, intent.ip)
            with self._lock:
                if freed is not None:
                    self._taken.pop(ipaddress.IPv4Address(freed.ip), None)
                self._trusted.pop(intent.mac, None)
                self._cache.pop(intent.mac, None)
                self._pending.pop(intent.mac, None)
            return h.Silent("released" if freed else "nothing to release")
        if isinstance(intent, h.Decline):
            declined = ls.decline(intent.mac, intent.ip)
            if declined is not None:
                self._note_taken(declined.ip, declined.expires)
            log.warning("%s declined %s (address in use?): quarantined for %ss", intent.mac, intent.ip, ls.decline_hold)
            with self._lock:
                self._cache.pop(intent.mac, None)
                self._trusted.pop(intent.mac, None)
            return h.Silent("declined")
        if isinstance(intent, h.Inform):
            return h.Granted(None)
        return h.Silent("unhandled intent %r" % (intent,))

    # -- the non-blocking way ---------------------------------------------------------------

    def fast(self, intent):
        """The outcome of ``intent`` from this server's own state (no I/O), a :class:`Commit`, or None.

        None means: use :meth:`execute` (from a worker thread). Only while Consul is known to be
        reachable and the configuration has been read.
        """
        cached = self._config
        if self.online is not True or cached is None:
            return None
        cfg, pool = cached[0], cached[1]
        if isinstance(intent, h.Offer):
            return self._fast_offer(intent, pool)
        if isinstance(intent, h.Ack):
            return self._fast_ack(intent, cfg, pool)
        if isinstance(intent, h.ReleaseOffer):
            with self._lock:
                mine = self._offers.get(intent.mac)
            if mine is not None and mine.server == str(self.server_id) and mine.ip != str(intent.requested):
                return None  # our own offer of another address: execute() frees it
            return h.Silent("client chose server %s" % intent.chosen)
        if isinstance(intent, h.Inform):
            return h.Granted(None)
        return None

    def _fast_offer(self, intent, pool):
        mac, ls = intent.mac, self._pure
        if mac in pool.reservations:
            return None
        now = self.clock()
        with self._lock:
            lease = self._trusted.get(mac)
            if lease is not None:
                if not (lease.owned_by(mac) and pool.usable(lease.ip, mac)):
                    return None
                # The binding this server granted or renewed (offered again, nothing to write), or
                # its own live offer (a retransmitted DISCOVER); anything else: read the table.
                bound = lease.state == L.BOUND and lease.expires - ls.skew > now
                offered = lease.state == L.OFFERED and lease.server == ls.server
                if not (bound or (offered and lease.remaining(now) >= ls.offer_hold / 2)):
                    return None
                self._offers[mac] = lease
                self.counts["offers_known"] += 1
                return h.Granted(ipaddress.IPv4Address(lease.ip))
            since = self._claiming.get(mac)
            if since is not None and time.monotonic() - since < CLAIM_WAIT:
                return h.Silent(IN_FLIGHT)  # a retransmission: the first DISCOVER's offer is on its way
            if mac in self._seen:
                return None  # heard of before but nothing trusted about it: read the table
            self._seen[mac] = True
            if len(self._seen) > SEEN_MAX:
                self._seen.popitem(last=False)
        # Most likely new to the whole table: claim its first address, creating its MAC index
        # (CAS index 0 fails for any MAC the table knows; then execute() takes the normal path).
        got = self._claim(pool, mac, intent.requested, intent.hostname, now, 1)
        if got is not None:
            with self._lock:
                self._claiming[mac] = time.monotonic()
        return got

    def _is_taken(self, ip, now):
        return self._taken.get(ip, 0) > now

    def _note_taken(self, ip, until):
        with self._lock:
            if len(self._taken) >= TAKEN_MAX:
                self._taken.clear()
            self._taken[ipaddress.IPv4Address(ip)] = until

    def _mine(self, ip):
        """Whether ``ip`` is in this server's share of the pool (rendezvous over the live set, as MACs):
        new clients' claims of two live servers then never meet on one free address."""
        gate = self.gate
        return gate is None or len(gate.live) == 1 or gate.owner(str(ip)) == gate.me

    def _claim(self, pool, mac, requested, hostname, now, tries):
        """The Commit of claiming ``mac``'s first candidate not known to be taken, in this server's
        share of the pool if one is near the start of the MAC's order.

        When only the address was taken, the next candidate is tried (up to ``max_probes``
        claims), all on the non-blocking way; when the MAC index was not new, the blocking way
        reads the MAC's lease.
        """
        ls = self._pure
        ip = ls.first_candidate(pool, mac, requested, taken=lambda a: self._is_taken(a, now), prefer=self._mine)
        if ip is None:
            with self._lock:
                self._claiming.pop(mac, None)
            return None
        new = ls.offer_lease(ip, mac, now, hostname)
        mac_key = L.mac_key(mac, ls.pool_name)

        def done(results):
            lease = ls.written(new, results)
            self._note_taken(ip, lease.expires)
            with self._lock:
                self._offers[mac] = lease
                self._trusted[mac] = lease
                self._claiming.pop(mac, None)
            return h.Granted(ip)

        def failed(keys):
            with self._lock:
                if mac_key in keys or tries >= ls.max_probes:
                    self.counts["claims_mac_known" if mac_key in keys else "claims_given_up"] += 1
                    self._claiming.pop(mac, None)
                    return None
                self.counts["claims_address_taken"] += 1
            self._note_taken(ip, now + TAKEN_RECHECK)
            return self._claim(pool, mac, None, hostname, now, tries + 1)

        return Commit(ls.claim_ops(new, 0), done, failed, claim=True)

    def _fast_ack(self, intent, cfg, pool):
        mac = intent.mac
        if pool.why_not(intent.ip, mac):
            return None  # execute() NAKs it with the reason
        with self._lock:
            known = self._offers.pop(mac, None)
            if known is None or known.ip != str(intent.ip):
                known = self._cache.get(mac)
        return self._bind(intent, cfg, known, 1)

    def _bind(self, intent, cfg, known, tries):
        """The Commit of binding ``intent.ip`` against ``known`` (the lease as this server last saw it).

        When the commit waited in the batcher behind another write of the same lease by this
        server (the same client's previous exchange), it binds against that write instead.
        """
        mac, ls = intent.mac, self._pure
        if known is None or known.ip != str(intent.ip) or not known.owned_by(mac) or not known.index:
            return None
        state = {"known": known, "new": ls.bound(known, cfg.lease_duration, self.clock(), intent.hostname)}

        def prepare():
            with self._lock:
                later = self._cache.get(mac)
            if later is not None and later.ip == known.ip and later.index > state["known"].index:
                state["known"] = later
                state["new"] = ls.bound(later, cfg.lease_duration, self.clock(), intent.hostname)
            return ls.rewrite_ops(state["known"], state["new"])

        def done(results):
            lease = ls.written(state["new"], results)
            self._note_taken(lease.ip, lease.expires)
            with self._lock:
                self._cache[mac] = lease
                self._trusted[mac] = lease
                self._pending.pop(mac, None)
            return h.Granted(intent.ip)

        def failed(_keys):
            with self._lock:
                later = self._cache.get(mac)
                self.counts["binds_stale"] += 1
                if tries < 3 and later is not None and later.index > state["known"].index:
                    # This server wrote the lease since (the same client's previous exchange,
                    # in the same transaction or just before): bind against that.
                    return self._bind(intent, cfg, later, tries + 1)
                # Somebody else changed the lease: what we knew is stale.
                self._trusted.pop(mac, None)
                if self._cache.get(mac) == state["known"]:
                    del self._cache[mac]
            return None

        return Commit(ls.rewrite_ops(known, state["new"]), done, failed, prepare=prepare)

    def abandon(self, intent):
        """The commit of ``intent`` was not sent (the batcher is full): forget that it is under way."""
        if isinstance(intent, h.Offer):
            with self._lock:
                self._claiming.pop(intent.mac, None)

    def after_failure(self, intent, err):
        """A commit failed for another reason than a lost compare-and-swap: the outcome when Consul
        is unreachable (the offline rules), else None (use :meth:`execute`)."""
        if isinstance(intent, h.Offer):
            with self._lock:
                self._claiming.pop(intent.mac, None)
        if isinstance(err, Unreachable):
            self._went_offline(err)
            cached = self._config
            return self._offline(intent, cached[0]) if cached is not None else h.Silent(str(err))
        return None

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

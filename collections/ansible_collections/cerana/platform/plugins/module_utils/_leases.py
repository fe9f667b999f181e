# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Address leases shared by every bootserver of the cluster (and later the service networks).

Key layout, relative to the store prefix; ``<pool>`` is ``dhcp`` for the boot network::

    <pool>/leases/<ip>   {"ip", "mac", "state": "offered"|"bound"|"declined", "expires": <epoch s>,
                          "server", "hostname"?}                      the authority for one address
    <pool>/macs/<mac>    "<ip>"                                      the address this MAC holds or held

Every change is one Consul transaction that compare-and-swaps the lease key *and* the
MAC index together, so two servers (or two threads) never hand out one address, and a
MAC never holds two. The MAC index is a hint that is always checked against the lease
key: it lets a returning client find its lease (or its previous address) in O(1).

**Expiry by timestamp, not by Consul sessions.** A lease carries ``expires`` (epoch
seconds) and whoever needs the address after that time takes it over with a CAS on the
lease's modify index; nothing deletes it in the background. One session per lease was
rejected because (1) a session must be renewed by a live process, while a DHCP lease must
outlive the server that granted it (the client renews or rebinds with any server);
(2) every live lease would cost a renewal request per TTL period and Consul keeps
sessions in its Raft log; (3) session TTLs are capped at 24 h and are enforced lazily (up
to twice the TTL); (4) the original platform's lease bug came precisely from a session TTL
that could not be changed after the first set. The price: stale keys stay in KV until
reclaimed or swept (:meth:`LeaseStore.sweep`), and the servers' clocks must agree within
``skew`` seconds (another server's expired lease is taken over only ``skew`` seconds late).

**Cost.** Offering to a new MAC in a pool with load factor ``a`` costs one read of the MAC
index plus about ``1/(1-a)`` claim transactions (the candidate order is a double-hash
permutation of the pool seeded by the MAC, so concurrent allocators start at different
places); an occupied candidate costs one more read. After ``max_probes`` occupied
candidates one recursive listing of ``<pool>/leases/`` replaces further probing. A
returning client costs two reads (MAC index, lease) and no write while its offer or
lease is live. An ACK or renewal costs one read and one transaction. So a whole
DISCOVER/OFFER/REQUEST/ACK on a lightly used pool is 4 Consul requests.

A DHCP server cuts that to 2 (``optimistic=True`` and ``ack(known=...)``): it claims a new
MAC's first candidate without reading first (the create-only CAS on the MAC index fails
for any MAC the table already knows, which then takes the normal path), and it binds
against the offer it made itself, whose modify index it knows, without reading it again.
Both only skip reads: every write is still a compare-and-swap, so a stale guess costs a
failed transaction and a retry, never a duplicate.

Standard library plus :mod:`_store` only; pure parts (:class:`Pool`, :class:`Lease`,
:func:`candidate_order`) do no I/O and take ``now`` as an argument.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import math
import time

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._store import CasConflict, StoreError

OFFERED = "offered"
BOUND = "bound"
DECLINED = "declined"
STATES = (OFFERED, BOUND, DECLINED)

DEFAULT_POOL = "dhcp"
DEFAULT_OFFER_HOLD = 60
DEFAULT_DECLINE_HOLD = 600
DEFAULT_SKEW = 5
DEFAULT_MAX_PROBES = 16


def leases_prefix(pool=DEFAULT_POOL):
    return "%s/leases/" % pool


def lease_key(ip, pool=DEFAULT_POOL):
    return "%s%s" % (leases_prefix(pool), ip)


def mac_key(mac, pool=DEFAULT_POOL):
    return "%s/macs/%s" % (pool, mac)


# ---------------------------------------------------------------------------
# Errors


class LeaseError(StoreError):
    """A lease operation that cannot be done (the DHCP server answers NAK or nothing)."""


class NoFreeAddress(LeaseError):
    def __init__(self, net):
        self.net = str(net)
        super().__init__("no free address in %s" % net)


class NotLeasable(LeaseError):
    """The address can never be leased to this MAC (outside the pool, gateway, excluded, reserved)."""


class HeldByOther(LeaseError):
    def __init__(self, ip, mac, expires):
        self.ip, self.mac, self.expires = str(ip), mac, expires
        super().__init__("%s is leased to %s until %s" % (ip, mac, _rfc3339(expires)))


class NoSuchLease(LeaseError):
    """The MAC has neither an offer nor a lease at the address."""


# ---------------------------------------------------------------------------
# Pure parts


def _rfc3339(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _probe_step(seed, size):
    """A stride coprime with ``size``, so ``start + k*step`` visits every slot exactly once."""
    if size <= 2:
        return 1
    step = 1 + seed % (size - 1)
    while math.gcd(step, size) != 1:
        step = step % (size - 1) + 1
    return step


def candidate_order(mac, size):
    """Slot numbers ``0..size-1`` in the MAC's probe order (a double-hash permutation), lazily."""
    digest = hashlib.sha256(mac.encode("ascii")).digest()
    start = int.from_bytes(digest[:8], "big") % size
    step = _probe_step(int.from_bytes(digest[8:16], "big"), size)
    slot = start
    for _slot in range(size):
        yield slot
        slot = (slot + step) % size


@dataclasses.dataclass(frozen=True)
class Pool:
    """The leasable addresses of a network: all hosts except the gateway, excluded ranges
    and other MACs' reservations. Addresses are :class:`ipaddress.IPv4Address`."""

    net: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None = None
    excluded: tuple = ()  # ((start, end), ...) inclusive IPv4Address pairs
    reservations: dict = dataclasses.field(default_factory=dict)  # mac -> IPv4Address

    @classmethod
    def from_config(cls, config):
        """From a :class:`_models.DHCPConfig`."""
        return cls(
            net=ipaddress.IPv4Network(config.net),
            gateway=ipaddress.IPv4Address(config.gateway) if config.gateway else None,
            excluded=tuple((ipaddress.IPv4Address(r.start), ipaddress.IPv4Address(r.end)) for r in config.excluded),
            reservations={mac: ipaddress.IPv4Address(ip) for mac, ip in config.reservations.items()},
        )

    def __post_init__(self):
        if self.net.prefixlen > 30:
            raise ValueError("a pool needs at least a /30, got %s" % self.net)
        object.__setattr__(self, "_reserved_by", {ip: mac for mac, ip in self.reservations.items()})

    @property
    def first(self):
        return self.net.network_address + 1

    @property
    def size(self):
        """Number of host addresses (network and broadcast excluded)."""
        return self.net.num_addresses - 2

    def why_not(self, ip, mac):
        """None when ``ip`` may be leased to ``mac``, else the reason (a sentence)."""
        ip = ipaddress.IPv4Address(ip)
        if ip not in self.net:
            return "%s is outside %s" % (ip, self.net)
        if ip in (self.net.network_address, self.net.broadcast_address):
            return "%s is the network or broadcast address of %s" % (ip, self.net)
        if ip == self.gateway:
            return "%s is the gateway" % ip
        for start, end in self.excluded:
            if start <= ip <= end:
                return "%s is in the excluded range %s-%s" % (ip, start, end)
        owner = self._reserved_by.get(ip)
        if owner is not None and owner != mac:
            return "%s is reserved for %s" % (ip, owner)
        mine = self.reservations.get(mac)
        if mine is not None and mine != ip:
            return "%s has the reservation %s" % (mac, mine)
        return None

    def usable(self, ip, mac):
        return self.why_not(ip, mac) is None

    def candidates(self, mac):
        """Addresses to try for a new lease of ``mac``, in its probe order; only usable ones.

        A reserved MAC has exactly one candidate, its reservation.
        """
        if mac in self.reservations:
            yield self.reservations[mac]
            return
        first = int(self.first)
        for slot in candidate_order(mac, self.size):
            ip = ipaddress.IPv4Address(first + slot)
            if self.usable(ip, mac):
                yield ip


@dataclasses.dataclass(frozen=True)
class Lease:
    """One address lease. ``index`` is the lease key's modify index (not stored in the value)."""

    ip: str
    mac: str
    state: str
    expires: int
    server: str = ""
    hostname: str | None = None
    index: int = 0

    @classmethod
    def from_bytes(cls, ip, raw, index=0):
        """Decode a stored value; raises :class:`_models.ValidationError` naming the key."""
        where = "lease %s" % ip
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise m.ValidationError(where, "stored value is not JSON: %s" % e) from None
        m._fields(
            data, where, {"ip", "mac", "state", "expires", "server", "hostname"}, required=("mac", "state", "expires")
        )
        state = data["state"]
        if state not in STATES:
            raise m.ValidationError(where + ".state", "must be one of %s, got %r" % (", ".join(STATES), state))
        return cls(
            ip=str(ip),
            mac=m.normalize_mac(data["mac"], where + ".mac"),
            state=state,
            expires=m._int(data["expires"], where + ".expires", 0),
            server=data.get("server") or "",
            hostname=data.get("hostname") or None,
            index=index,
        )

    def to_bytes(self):
        data = {"ip": self.ip, "mac": self.mac, "state": self.state, "expires": self.expires, "server": self.server}
        if self.hostname:
            data["hostname"] = self.hostname
        return m.canonical_json(data).encode("utf-8")

    def to_dict(self):
        """For module results: the stored fields plus ``expires_at`` (RFC 3339)."""
        return {
            "ip": self.ip,
            "mac": self.mac,
            "state": self.state,
            "expires": self.expires,
            "expires_at": _rfc3339(self.expires),
            "server": self.server,
            "hostname": self.hostname,
        }

    def expired(self, now, skew=0):
        return now >= self.expires + skew

    def owned_by(self, mac):
        """Whether the lease is ``mac``'s (an offer or a binding; a declined address is nobody's)."""
        return self.mac == mac and self.state != DECLINED

    def remaining(self, now):
        return self.expires - now


def expiry(now, seconds):
    return math.ceil(now + seconds)


# ---------------------------------------------------------------------------
# Store I/O


class _Conflict(Exception):
    def __init__(self, key):
        self.key = key


class LeaseStore:
    """Lease operations over a :class:`_store.Store` (any object with get/list/txn).

    ``server`` is written into the leases this instance grants (the DHCP server
    identifier, or the name of whoever acked through Ansible). ``clock`` returns epoch
    seconds. All methods are safe to call from several threads and processes at once;
    they retry internally when a compare-and-swap loses.
    """

    def __init__(
        self,
        store,
        *,
        pool=DEFAULT_POOL,
        server="",
        offer_hold=DEFAULT_OFFER_HOLD,
        decline_hold=DEFAULT_DECLINE_HOLD,
        skew=DEFAULT_SKEW,
        max_probes=DEFAULT_MAX_PROBES,
        clock=time.time,
        attempts=20,
        optimistic=False,
    ):
        self.store = store
        self.pool_name = pool
        self.server = server
        self.offer_hold = offer_hold
        self.decline_hold = decline_hold
        self.skew = skew
        self.max_probes = max_probes
        self.clock = clock
        self.attempts = attempts
        self.optimistic = optimistic

    # -- reads ------------------------------------------------------------------

    def get(self, ip):
        entry = self.store.get(lease_key(ip, self.pool_name), consistent=True)
        if entry is None:
            return None
        return self._decode(str(ip), entry)

    def _decode(self, ip, entry):
        try:
            return Lease.from_bytes(ip, entry.value, entry.modify_index)
        except m.ValidationError:
            # A value written by hand or by an older version: treat it as an expired
            # lease of nobody, so it can be taken over by CAS (never silently lost).
            return Lease(ip=ip, mac="00:00:00:00:00:00", state=DECLINED, expires=0, index=entry.modify_index)

    def mac_hint(self, mac):
        """(ip or None, modify index of the MAC index key or 0)."""
        entry = self.store.get(mac_key(mac, self.pool_name), consistent=True)
        if entry is None:
            return None, 0
        try:
            return ipaddress.IPv4Address(entry.value.decode("ascii").strip()), entry.modify_index
        except (UnicodeDecodeError, ValueError):
            return None, entry.modify_index

    def lease_of(self, mac):
        """The MAC's current offer or lease (live or expired but not yet taken over), or None."""
        ip, _index = self.mac_hint(mac)
        if ip is None:
            return None
        lease = self.get(ip)
        return lease if lease is not None and lease.owned_by(mac) else None

    def list(self):
        """Every stored lease, sorted by address."""
        out = []
        prefix = leases_prefix(self.pool_name)
        for entry in self.store.list(prefix, consistent=True):
            ip = entry.key[len(prefix) :]
            try:
                ipaddress.IPv4Address(ip)
            except ValueError:
                continue
            out.append(self._decode(ip, entry))
        return sorted(out, key=lambda lease: ipaddress.IPv4Address(lease.ip))

    # -- writes -----------------------------------------------------------------

    def claim_ops(self, new, mac_index, *, previous=None, move_from=None):
        """The transaction of a claim: write ``new`` (CAS against ``previous`` or create-only), point
        the MAC index at it (CAS ``mac_index``), and delete the MAC's old lease ``move_from``."""
        ops = [
            {
                "KV": {
                    "Verb": "cas",
                    "Key": lease_key(new.ip, self.pool_name),
                    "Value": new.to_bytes(),
                    "Index": previous.index if previous is not None else 0,
                }
            },
            {"KV": {"Verb": "cas", "Key": mac_key(new.mac, self.pool_name), "Value": new.ip, "Index": mac_index}},
        ]
        if move_from is not None and move_from.ip != new.ip:
            ops.append(
                {"KV": {"Verb": "delete-cas", "Key": lease_key(move_from.ip, self.pool_name), "Index": move_from.index}}
            )
        return ops

    def rewrite_ops(self, old, new):
        """The transaction of a rewrite: CAS-update an existing lease key (the MAC index is unchanged)."""
        return [{"KV": {"Verb": "cas", "Key": lease_key(old.ip, self.pool_name), "Value": new.to_bytes(),
                        "Index": old.index}}]  # fmt: skip

    def written(self, new, results):
        """``new`` with the modify index of its lease key from a transaction's result entries."""
        key = lease_key(new.ip, self.pool_name)
        index = next((e.modify_index for e in results if e.key == key), results[0].modify_index if results else 0)
        return dataclasses.replace(new, index=index)

    def _claim(self, new, mac_index, *, previous=None, move_from=None):
        """One transaction of :meth:`claim_ops`; returns ``new`` with its modify index."""
        try:
            results = self.store.txn(self.claim_ops(new, mac_index, previous=previous, move_from=move_from))
        except CasConflict as e:
            raise _Conflict(e.key) from None
        return self.written(new, results)

    def _rewrite(self, old, new):
        """CAS-update an existing lease key (the MAC index is unchanged)."""
        try:
            results = self.store.txn(self.rewrite_ops(old, new))
        except CasConflict as e:
            raise _Conflict(e.key) from None
        return self.written(new, results)

    def bound(self, lease, duration, now, hostname=None):
        """``lease`` (the MAC's offer or binding) as bound for ``duration`` seconds from ``now``."""
        return dataclasses.replace(
            lease, state=BOUND, expires=expiry(now, duration), server=self.server or lease.server,
            hostname=hostname or lease.hostname,
        )  # fmt: skip

    def first_candidate(self, pool, mac, requested=None, taken=None, prefer=None):
        """The address an optimistic claim tries for ``mac``: ``requested`` when usable, else the first
        candidate in the MAC's probe order that is not known to be taken (``taken(ip)``) and, among
        the first ``max_probes`` such, that ``prefer(ip)`` (e.g. the caller's share of the pool, so
        that concurrent allocators do not try the same free address); None when none is usable."""
        if requested is not None:
            try:
                requested = ipaddress.IPv4Address(requested)
            except ValueError:
                requested = None
        if requested is not None and pool.usable(requested, mac) and not (taken and taken(requested)):
            return requested
        fallback = None
        free = 0
        for n, ip in enumerate(pool.candidates(mac)):
            if taken is not None and taken(ip):
                if n >= 4 * self.max_probes and fallback is None:
                    return ip  # everything near the start is known taken: let the claim find out
                continue
            if prefer is None or prefer(ip):
                return ip
            if fallback is None:
                fallback = ip
            free += 1
            if free >= self.max_probes:
                break
        return fallback

    def offer_lease(self, ip, mac, now, hostname=None):
        """A new offer of ``ip`` to ``mac`` held for ``offer_hold`` seconds from ``now``."""
        return self._lease(ip, mac, OFFERED, expiry(now, self.offer_hold), hostname)

    def _delete(self, lease):
        ops = [{"KV": {"Verb": "delete-cas", "Key": lease_key(lease.ip, self.pool_name), "Index": lease.index}}]
        try:
            self.store.txn(ops)
        except CasConflict as e:
            raise _Conflict(e.key) from None

    def offer(self, pool, mac, *, requested=None, hostname=None, now=None, optimistic=None):
        """Hold an address for ``mac`` for ``offer_hold`` seconds and return the Lease.

        Preference (RFC 2131 4.3.1): the MAC's current offer or binding (returned without a
        write while it is live), its previous address, the ``requested`` address when it
        is usable and free, then new addresses in the MAC's probe order (never-used ones
        before expired bindings of others). A reserved MAC only ever gets its reservation.
        Raises NoFreeAddress, or HeldByOther when a reservation is still leased to another MAC.
        ``optimistic`` (default: the store's setting) first tries :meth:`_offer_new`.
        """
        mac = m.normalize_mac(mac, "mac")
        optimistic = self.optimistic if optimistic is None else optimistic
        for attempt in range(self.attempts):
            now = self.clock() if now is None else now
            if attempt == 0 and optimistic:
                got = self._offer_new(pool, mac, requested, hostname, now)
                if got is not None:
                    return got
            try:
                return self._offer_once(pool, mac, requested, hostname, now)
            except _Conflict:
                now = None  # lost a race on the MAC index: read it again
                continue
        raise StoreError("could not allocate an address for %s: too many concurrent changes" % mac)

    def _offer_new(self, pool, mac, requested, hostname, now):
        """The optimistic first try (``optimistic``): assume ``mac`` is new and claim its first
        candidate (the requested address when usable) without reading anything first.

        The claim creates the MAC index key (CAS index 0), so it fails for any MAC the table
        knows; then, or when the address is taken, None sends the caller down the normal path.
        One exception, for servers that see the same DISCOVER at once: when the address turns
        out to be this MAC's live offer or binding (another server claimed it a moment ago),
        that lease is returned, as the normal path would. A new client costs one transaction.
        """
        ip = self.first_candidate(pool, mac, requested)
        if ip is None:
            return None
        new = self.offer_lease(ip, mac, now, hostname)
        try:
            return self._claim(new, 0)
        except _Conflict as c:
            if c.key != lease_key(ip, self.pool_name):
                return None
        lease = self.get(ip)
        if (
            lease is not None
            and lease.owned_by(mac)
            and not lease.expired(now)
            and (lease.state == BOUND or lease.remaining(now) >= self.offer_hold / 2)
        ):
            return lease
        return None

    def _offer_once(self, pool, mac, requested, hostname, now):
        hint, mac_index = self.mac_hint(mac)
        current = None
        tried = set()
        first = []
        if hint is not None and pool.usable(hint, mac):
            lease = self.get(hint)
            if lease is not None and lease.owned_by(mac):
                current = lease
                if not lease.expired(now):
                    if lease.state == BOUND or lease.remaining(now) >= self.offer_hold / 2:
                        return lease
                    try:
                        return self._rewrite(lease, dataclasses.replace(lease, expires=expiry(now, self.offer_hold)))
                    except _Conflict:
                        pass  # somebody changed it: fall through to the normal path below
                try:
                    new = self._lease(hint, mac, OFFERED, expiry(now, self.offer_hold), hostname)
                    return self._claim(new, mac_index, previous=lease)
                except _Conflict as c:
                    if c.key == mac_key(mac, self.pool_name):
                        raise
                tried.add(hint)
            elif lease is None:
                first.append(hint)  # the previous address, released since
        elif hint is not None:
            # The address became unusable for this MAC (excluded or reserved since): move.
            lease = self.get(hint)
            if lease is not None and lease.owned_by(mac):
                current = lease
            tried.add(hint)
        if requested is not None:
            try:
                requested = ipaddress.IPv4Address(requested)
            except ValueError:
                requested = None
            if requested is not None and pool.usable(requested, mac):
                first.append(requested)
        return self._probe(pool, mac, mac_index, hostname, now, first, tried, current)

    def _lease(self, ip, mac, state, expires, hostname):
        return Lease(ip=str(ip), mac=mac, state=state, expires=expires, server=self.server, hostname=hostname or None)

    def _probe(self, pool, mac, mac_index, hostname, now, first, tried, current):
        expires = expiry(now, self.offer_hold)
        expired_bindings = []
        probes = 0

        def attempt(ip, previous=None):
            new = self._lease(ip, mac, OFFERED, expires, hostname)
            try:
                return self._claim(new, mac_index, previous=previous, move_from=current)
            except _Conflict as c:
                if c.key != lease_key(ip, self.pool_name):
                    raise  # the MAC index (or the old lease) changed: start over
                return None

        def candidates():
            yield from first
            yield from pool.candidates(mac)

        for ip in candidates():
            if ip in tried or not pool.usable(ip, mac):
                continue
            if probes >= self.max_probes:
                break
            probes += 1
            tried.add(ip)
            got = attempt(ip)
            if got is not None:
                return got
            lease = self.get(ip)
            if lease is None:
                got = attempt(ip)  # released in between
                if got is not None:
                    return got
                continue
            if lease.owned_by(mac) and not lease.expired(now):
                return lease  # another server offered it to this MAC a moment ago
            if lease.expired(now, self.skew):
                if lease.state == BOUND:
                    expired_bindings.append(lease)
                    continue
                got = attempt(ip, lease)
                if got is not None:
                    return got
            if mac in pool.reservations:
                raise HeldByOther(ip, lease.mac, lease.expires)
        for lease in expired_bindings:
            got = attempt(ipaddress.IPv4Address(lease.ip), lease)
            if got is not None:
                return got
        if mac in pool.reservations:
            raise NoFreeAddress(pool.net)
        # Too many occupied candidates: one listing instead of more probes.
        taken = {ipaddress.IPv4Address(lease.ip): lease for lease in self.list()}
        reclaim = []
        for ip in pool.candidates(mac):
            lease = taken.get(ip)
            if lease is None:
                got = attempt(ip)
                if got is not None:
                    return got
            elif lease.expired(now, self.skew):
                reclaim.append(lease)
        for lease in sorted(reclaim, key=lambda x: (x.state == BOUND, x.expires)):
            got = attempt(ipaddress.IPv4Address(lease.ip), lease)
            if got is not None:
                return got
        raise NoFreeAddress(pool.net)

    def ack(self, pool, mac, ip, *, duration, hostname=None, allow_unallocated=False, min_remaining=None, now=None,
            known=None):  # fmt: skip
        """Bind ``ip`` to ``mac`` for ``duration`` seconds (an ACK or a renewal). Returns (Lease, changed).

        The MAC must hold an offer or lease at ``ip`` (live, or expired but not yet taken
        over), unless ``allow_unallocated`` (an Ansible-driven bind, e.g. the bootstrap node):
        then a free or reclaimable address is taken too. With ``min_remaining`` an already
        bound lease with at least that many seconds left is returned unchanged.
        Raises NotLeasable, HeldByOther or NoSuchLease (a DHCP server answers NAK).

        ``known`` is a Lease of ``ip`` this caller read or wrote earlier (with its modify
        index), e.g. the offer a server made: the first attempt then skips the read and
        compare-and-swaps against it directly; if the key moved on, the CAS fails and the
        next attempt reads it as usual.
        """
        mac = m.normalize_mac(mac, "mac")
        ip = ipaddress.IPv4Address(ip)
        reason = pool.why_not(ip, mac)
        if reason:
            raise NotLeasable(reason)
        if known is not None and (
            known.ip != str(ip) or not known.owned_by(mac) or not known.index or min_remaining is not None
        ):
            known = None
        for _attempt in range(self.attempts):
            t = self.clock() if now is None else now
            lease, known = (known, None) if known is not None else (self.get(ip), None)
            try:
                if lease is not None and lease.owned_by(mac):
                    if (
                        min_remaining is not None
                        and lease.state == BOUND
                        and lease.remaining(t) >= min_remaining
                        and (hostname is None or hostname == lease.hostname)
                    ):
                        return lease, False
                    return self._rewrite(lease, self.bound(lease, duration, t, hostname)), True
                if lease is not None and not lease.expired(t, self.skew):
                    raise HeldByOther(ip, lease.mac, lease.expires)
                if not allow_unallocated:
                    raise NoSuchLease("%s holds no offer or lease at %s" % (mac, ip))
                hint, mac_index = self.mac_hint(mac)
                old = None
                if hint is not None and hint != ip:
                    old = self.get(hint)
                    if old is not None and not old.owned_by(mac):
                        old = None
                new = self._lease(ip, mac, BOUND, expiry(t, duration), hostname)
                return self._claim(new, mac_index, previous=lease, move_from=old), True
            except _Conflict:
                continue
        raise StoreError("could not bind %s to %s: too many concurrent changes" % (ip, mac))

    def release(self, mac, ip=None, *, only_offer_of=None, keep_ip=None):
        """Free the MAC's lease (at ``ip``, or wherever the MAC index points). Returns the freed Lease or None.

        With ``only_offer_of`` (a server id), only an *offer* made by that server is freed:
        what a DHCP server does when the client chose another server.
        The MAC index keeps pointing at the address, so the client gets it back when it returns.
        """
        mac = m.normalize_mac(mac, "mac")
        for _attempt in range(self.attempts):
            if ip is None:
                lease = self.lease_of(mac)
            else:
                lease = self.get(ip)
            if lease is None or not lease.owned_by(mac):
                return None
            if only_offer_of is not None and (lease.state != OFFERED or lease.server != only_offer_of):
                return None
            if keep_ip is not None and lease.ip == str(keep_ip):
                return None
            try:
                self._delete(lease)
                return lease
            except _Conflict:
                continue
        raise StoreError("could not release %s of %s: too many concurrent changes" % (ip, mac))

    def decline(self, mac, ip, *, now=None):
        """The client found ``ip`` in use (DHCPDECLINE): quarantine it for ``decline_hold`` seconds."""
        mac = m.normalize_mac(mac, "mac")
        ip = ipaddress.IPv4Address(ip)
        for _attempt in range(self.attempts):
            t = self.clock() if now is None else now
            lease = self.get(ip)
            if lease is not None and not lease.owned_by(mac) and not lease.expired(t, self.skew):
                return None  # someone else's live lease: not the decliner's to change
            new = self._lease(ip, mac, DECLINED, expiry(t, self.decline_hold), None)
            ops = [{"KV": {"Verb": "cas", "Key": lease_key(ip, self.pool_name), "Value": new.to_bytes(),
                           "Index": lease.index if lease is not None else 0}}]  # fmt: skip
            try:
                results = self.store.txn(ops)
            except CasConflict:
                continue
            return dataclasses.replace(new, index=results[0].modify_index if results else 0)
        raise StoreError("could not decline %s: too many concurrent changes" % ip)

    def sweep(self, *, now=None, grace=86400):
        """Delete leases expired for more than ``grace`` seconds (housekeeping; CAS, so safe to race)."""
        t = self.clock() if now is None else now
        removed = 0
        for lease in self.list():
            if lease.expired(t, grace):
                try:
                    self._delete(lease)
                    removed += 1
                except _Conflict:
                    pass
        return removed

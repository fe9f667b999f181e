"""Which bootserver answers a client: rendezvous hashing of the MAC over the live bootservers.

Every bootserver of a pool writes a heartbeat ``<pool>/servers/<server id>`` =
``{"server", "expires"}`` every ``interval`` seconds (expiry ``ttl`` seconds ahead) and
reads the others' from the same listing. The live set is this server plus every peer whose
heartbeat has not expired; a server that stops cleanly deletes its key, so the others see
it gone at their next beat.

While its peers are alive, only the *owner* of a MAC answers its DISCOVER and its
INIT-REBOOT REQUEST: the live server with the highest ``hash(server, mac)`` (rendezvous, or
highest-random-weight, hashing). Every server computes the same owner from the same live
set; when a server leaves, only its own MACs move, each to the next server in its order,
and when one joins it takes over about ``1/n`` of the MACs. The others stay silent, so an
exchange costs the cluster one allocation instead of one per server.

The live sets of two servers can disagree for up to one beat. Then either two servers
answer (the behaviour without this rule: compare-and-swap keeps it correct) or none does,
and the client retransmits. A silent server answers anyway (:meth:`Gate.admit`) when the
client has been trying for ``fallback`` seconds: the DHCP ``secs`` field says so (RFC 2131;
as RFC 3074's load balancing does), or the server heard the same DISCOVER (same MAC and
``xid``, as clients retransmit it) that long ago. That covers an owner that is alive in
Consul but does not answer on the wire, and the seconds before a killed owner's heartbeat
expires.

Pure parts (:func:`rank`, :func:`owner`, :func:`live_from`, :class:`Gate`) do no I/O and
take ``now`` as an argument; :class:`Peers` adds the Consul heartbeat.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import threading
import time

from ansible_collections.cerana.platform.plugins.module_utils._store import CasConflict, StoreError

log = logging.getLogger(__name__)

HEARD_MAX = 65536  # DISCOVERs remembered per server for the retransmission rule (oldest dropped)
FORGET_AFTER = 3600  # seconds after its expiry a dead server's heartbeat key is deleted


def servers_prefix(pool):
    return "%s/servers/" % pool


def _score(server, mac):
    return hashlib.blake2b(("%s|%s" % (server, mac)).encode("ascii"), digest_size=8).digest()


def rank(mac, servers):
    """``servers`` in the MAC's order of preference: the owner first, then who takes over from it."""
    return sorted(servers, key=lambda s: (_score(s, mac), s), reverse=True)


def owner(mac, servers):
    """The server that answers ``mac`` (None when there is none)."""
    return max(servers, key=lambda s: (_score(s, mac), s), default=None)


def live_from(entries, now, *, me=None):
    """The live servers (sorted) from heartbeat entries ``{server: expires}``; ``me`` is always live."""
    live = {s for s, expires in entries.items() if expires > now}
    if me is not None:
        live.add(me)
    return tuple(sorted(live))


def mac_text(chaddr):
    """``aa:bb:cc:dd:ee:ff`` of the first 6 octets of ``chaddr`` (bytes)."""
    return ":".join("%02x" % b for b in chaddr[:6])


class Gate:
    """The owner rule for one server, over a live set that :meth:`update` replaces. Thread-safe.

    ``admit(mac, xid, secs, now)`` says whether this server answers a DISCOVER or an INIT-REBOOT
    REQUEST of ``mac``: it owns the MAC, or the client has been trying for ``fallback`` seconds.
    """

    def __init__(self, me, *, fallback=1.0):
        self.me = me
        self.fallback = fallback
        self.live = (me,)
        self.epoch = 0  # bumped whenever the live set changes
        self._owner = {}  # mac -> owner under the current live set
        self._heard = collections.OrderedDict()  # mac -> (xid, first heard) of DISCOVERs not ours
        self._lock = threading.Lock()
        self.passed = 0  # requests left to their owner (statistics)
        self.taken_over = 0  # requests answered for a silent owner

    def update(self, live):
        """Replace the live set; returns True when it changed (the epoch moved on)."""
        live = tuple(sorted(set(live) | {self.me}))
        with self._lock:
            if live == self.live:
                return False
            self.live = live
            self.epoch += 1
            self._owner = {}
            return True

    def owner(self, mac):
        got = self._owner.get(mac)
        if got is None:
            got = owner(mac, self.live)
            with self._lock:
                if len(self._owner) >= HEARD_MAX:
                    self._owner.clear()
                self._owner[mac] = got
        return got

    def admit(self, mac, xid=None, secs=0, now=None):
        """True when this server should answer; also True for any MAC while it is alone."""
        if len(self.live) == 1:
            return True
        who = self.owner(mac)
        if who == self.me:
            return True
        if secs >= self.fallback > 0:
            self.taken_over += 1
            return True
        if xid is None:
            self.passed += 1
            return False
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._heard.get(mac)
            if seen is not None and seen[0] == xid:
                if now - seen[1] >= self.fallback:
                    self.taken_over += 1
                    self._heard.pop(mac, None)
                    return True
                self.passed += 1
                return False
            self._heard[mac] = (xid, now)
            self._heard.move_to_end(mac)
            if len(self._heard) > HEARD_MAX:
                self._heard.popitem(last=False)
        self.passed += 1
        return False


class Peers:
    """The heartbeat of one server in ``<pool>/servers/`` and the live set read back from it.

    ``beat(store)`` is called every ``interval`` seconds from a worker thread; it writes this
    server's key, lists the others and updates ``gate``. It returns True when the live set
    changed. Errors propagate (the caller logs them and tries again at the next beat).
    """

    def __init__(self, gate, *, pool="dhcp", ttl=5.0, clock=time.time):
        self.gate = gate
        self.pool = pool
        self.ttl = ttl
        self.clock = clock
        self.prefix = servers_prefix(pool)
        self.failing = None  # the last heartbeat error, None while they succeed

    def key(self, server=None):
        return self.prefix + (server or self.gate.me)

    def beat(self, store):
        now = self.clock()
        value = json.dumps({"server": self.gate.me, "expires": math.ceil(now + self.ttl)}, sort_keys=True)
        store.txn([{"KV": {"Verb": "set", "Key": self.key(), "Value": value.encode("ascii")}}])
        entries = {}
        for entry in store.list(self.prefix):
            name = entry.key[len(self.prefix) :]
            try:
                expires = float(json.loads(entry.value.decode("utf-8"))["expires"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                expires = 0.0
            entries[name] = expires
            if name != self.gate.me and expires + FORGET_AFTER < now:
                try:  # a server gone for good: its key goes (CAS, so a restarted one keeps its own)
                    store.txn([{"KV": {"Verb": "delete-cas", "Key": entry.key, "Index": entry.modify_index}}])
                except (CasConflict, StoreError):
                    pass
        before = self.gate.live
        changed = self.gate.update(live_from(entries, now, me=self.gate.me))
        if changed:
            log.info("live bootservers: %s (was %s); this server answers the MACs that hash to it",
                     ", ".join(self.gate.live), ", ".join(before))  # fmt: skip
        return changed

    def leave(self, store):
        """Delete this server's heartbeat (a clean stop): the peers take its MACs at their next beat."""
        store.txn([{"KV": {"Verb": "delete", "Key": self.key()}}])

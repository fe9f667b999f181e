# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Published ports and port filters of the bundles, as one nftables ruleset per node.

:func:`render` is pure: from the declared bundles, the bundle heartbeats of the whole
cluster (each with its instance ``address`` and health) and the node's bridge, it returns
the ruleset text for two tables named ``cerana``:

``table ip cerana`` (published ports, every node the same)
    ``prerouting`` (traffic from outside, other nodes included) and ``output`` (traffic
    made on the node; not to 127.0.0.0/8, which cannot be routed to the bridge) DNAT
    ``tcp dport <external_port>`` to a local address of the node across the **healthy**
    instances of the bundle, cluster-wide: ``numgen inc mod N map { ... }`` (round robin,
    per new connection). ``postrouting`` masquerades those connections when they leave
    through the bridge, so replies come back through this node. A published port without
    a healthy instance is answered by ``input`` with a TCP reset (the client fails at
    once instead of waiting for a timeout).

``table bridge cerana`` (non-public ports)
    ``forward`` sees every frame the node's bridges forward between their ports (veths of
    the local instances, the vxlan port to the other nodes). A connection attempt (a TCP
    SYN without ACK) to a non-public port of an instance is dropped unless it comes from
    an instance of the same bundle, of a bundle in the port's ``connected_bundles``, or
    from a ``trusted`` address (the nodes' own addresses on the bridge). The node's own
    traffic to its instances goes through the bridge's ``output`` hook, not ``forward``,
    so the node always reaches them. The bridge family needs neither ``br_netfilter`` nor
    bridge conntrack (this kernel has no ``nf_conntrack_bridge``): matching on the SYN
    alone makes the filter stateless and still blocks every new connection.

Ports are TCP. The text is deterministic (everything sorted), so "unchanged" is a string
comparison. :func:`apply_ruleset` loads it in one ``nft -f`` transaction that deletes and
re-creates both tables, and removes them when the text is empty. Standard library only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shutil
import subprocess

TABLE = "cerana"
FAMILIES = ("ip", "bridge")
LOOPBACK = "127.0.0.0/8"
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


@dataclasses.dataclass(frozen=True)
class Published:
    """``external_port`` on every node reaches ``port`` of ``bundle`` on ``targets`` (the healthy instances)."""

    external_port: int
    bundle: str
    port: int
    targets: tuple = ()


@dataclasses.dataclass(frozen=True)
class Guarded:
    """Only ``allowed`` source addresses may open connections to ``port`` of ``bundle`` on ``targets``."""

    bundle: str
    port: int
    targets: tuple
    allowed: tuple


@dataclasses.dataclass(frozen=True)
class Ruleset:
    """What :func:`render` decided: the published ports, the guarded ports, the problems and the text."""

    published: tuple = ()
    guarded: tuple = ()
    problems: tuple = ()
    text: str = ""

    @property
    def empty(self):
        return not self.text


def _ip_key(text):
    return ipaddress.IPv4Address(text)


def _addresses(values):
    return tuple(sorted(set(values), key=_ip_key))


def instance_addresses(heartbeats, services=None):
    """({bundle: (addresses)}, {bundle: (healthy addresses)}, problems) from bundle heartbeats.

    A heartbeat without an address (the bundle has no network on that node) is in neither.
    An instance is healthy when it reports every service of its bundle (``services``:
    {bundle: set of service ids}, when known), all running with every check passing
    (``BundleHeartbeat.healthy``): an instance whose front is not started yet stays out. An address claimed by two heartbeats is a problem and
    is left out everywhere: it is stale on one of the nodes.
    """
    owners = {}
    for hb in heartbeats:
        if hb.address is None:
            continue
        try:
            addr = str(ipaddress.IPv4Address(hb.address))
        except ValueError:
            continue
        owners.setdefault(addr, []).append(hb)
    everyone, healthy, problems = {}, {}, []
    for addr in sorted(owners, key=_ip_key):
        hbs = owners[addr]
        if len(hbs) > 1:
            who = ", ".join(sorted("%s on %s" % (hb.bundle, hb.node) for hb in hbs))
            problems.append("address %s is claimed by %s; left out" % (addr, who))
            continue
        hb = hbs[0]
        everyone.setdefault(hb.bundle, []).append(addr)
        complete = services is None or set(services.get(hb.bundle, ())) <= set(hb.services)
        if hb.services and complete and hb.healthy():
            healthy.setdefault(hb.bundle, []).append(addr)
    return (
        {b: _addresses(a) for b, a in everyone.items()},
        {b: _addresses(a) for b, a in healthy.items()},
        problems,
    )


def plan(bundles, heartbeats, trusted=()):
    """(published, guarded, problems): the ports to publish and to guard, sorted.

    ``bundles`` are the declared ``_models.Bundle`` objects; ``heartbeats`` the
    ``_models.BundleHeartbeat`` objects of the whole cluster; ``trusted`` addresses may
    reach every non-public port. A public port is published on its ``external_port``,
    else on its own number; when two bundles publish the same external port, the first
    bundle by id keeps it and the other is a problem.
    """
    everyone, healthy, problems = instance_addresses(heartbeats, {b.id: set(b.services) for b in bundles})
    trusted = [str(ipaddress.IPv4Address(a)) for a in trusted]
    published, guarded, taken = [], [], {}
    for bundle in sorted(bundles, key=lambda b: b.id):
        for number in sorted(bundle.ports):
            port = bundle.ports[number]
            if port.public:
                external = port.external_port if port.external_port is not None else port.port
                if external in taken:
                    problems.append(
                        "bundle %s port %d: external port %d is already published for bundle %s port %d; not published"
                        % ((bundle.id, port.port, external) + taken[external])
                    )
                    continue
                taken[external] = (bundle.id, port.port)
                published.append(Published(external, bundle.id, port.port, healthy.get(bundle.id, ())))
            else:
                targets = everyone.get(bundle.id, ())
                if not targets:
                    continue
                sources = list(targets) + trusted
                for other in port.connected_bundles:
                    sources.extend(everyone.get(other, ()))
                guarded.append(Guarded(bundle.id, port.port, targets, _addresses(sources)))
    return tuple(sorted(published, key=lambda p: p.external_port)), tuple(guarded), tuple(problems)


def _set(addresses):
    return "{ %s }" % ", ".join(addresses)


def _dnat(p):
    if len(p.targets) == 1:
        return "dnat to %s:%d" % (p.targets[0], p.port)
    pairs = ", ".join("%d : %s" % (i, a) for i, a in enumerate(p.targets))
    return "dnat to numgen inc mod %d map { %s } : %d" % (len(p.targets), pairs, p.port)


def _comment(*parts):
    return 'comment "%s"' % " ".join(str(p) for p in parts)


def _chain(name, hook, lines):
    out = ["\tchain %s {" % name, "\t\t%s" % hook]
    out.extend("\t\t" + line for line in lines)
    out.append("\t}")
    return out


def render_text(published, guarded, bridge):
    """The ruleset text for ``published`` and ``guarded`` (see :func:`plan`); "" when there is nothing to do."""
    if not _IFNAME.match(bridge or ""):
        raise ValueError("bridge must be an interface name, got %r" % (bridge,))
    lines = []
    live = [p for p in published if p.targets]
    dead = [p for p in published if not p.targets]
    if published:
        lines.append("table ip %s {" % TABLE)
        if live:
            dnat = [
                "fib daddr type local tcp dport %d %s %s" % (p.external_port, _dnat(p), _comment(p.bundle, p.port))
                for p in live
            ]
            lines += _chain("prerouting", "type nat hook prerouting priority dstnat; policy accept;", dnat)
            lines += _chain(
                "output",
                "type nat hook output priority -100; policy accept;",
                ["ip daddr != %s %s" % (LOOPBACK, rule) for rule in dnat],
            )
            ports = ", ".join(str(p.external_port) for p in live)
            lines += _chain(
                "postrouting",
                "type nat hook postrouting priority srcnat; policy accept;",
                [
                    'oifname "%s" ct status dnat meta l4proto tcp ct original proto-dst { %s } masquerade'
                    % (bridge, ports)
                ],
            )
        if dead:
            lines += _chain(
                "input",
                "type filter hook input priority filter; policy accept;",
                [
                    "tcp dport %d reject with tcp reset %s"
                    % (p.external_port, _comment(p.bundle, p.port, "no healthy instance"))
                    for p in dead
                ],
            )
        lines.append("}")
    if guarded:
        lines.append("table bridge %s {" % TABLE)
        lines += _chain(
            "forward",
            "type filter hook forward priority filter; policy accept;",
            [
                "ip daddr %s tcp dport %d tcp flags & (syn | ack) == syn ip saddr != %s drop %s"
                % (_set(g.targets), g.port, _set(g.allowed), _comment(g.bundle, g.port))
                for g in guarded
            ],
        )
        lines.append("}")
    return "".join(line + "\n" for line in lines)


def render(bundles, heartbeats, bridge, trusted=()):
    """The node's :class:`Ruleset` (see the module docstring); ``text`` is "" when there is nothing to publish or guard."""
    published, guarded, problems = plan(bundles, heartbeats, trusted)
    return Ruleset(published, guarded, problems, render_text(published, guarded, bridge))


# ---------------------------------------------------------------------------
# Applying


class NftMissing(Exception):
    """The ``nft`` binary is not there."""


class NftError(Exception):
    """``nft`` refused the ruleset; the message is its error output."""


def load_script(text):
    """The ``nft -f`` input that replaces both tables with ``text`` in one transaction.

    ``table X`` before ``delete table X`` makes the delete succeed when the table does not
    exist yet; with an empty ``text`` the script only removes the tables.
    """
    drop = "".join("table %s %s\ndelete table %s %s\n" % (f, TABLE, f, TABLE) for f in FAMILIES)
    return drop + text


def _run_nft(nft, script, timeout):
    path = shutil.which(nft)
    if path is None:
        raise NftMissing("%s: not found" % nft)
    try:
        proc = subprocess.run(
            [path, "-f", "-"], input=script, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise NftMissing("%s: not found" % nft) from None
    except subprocess.TimeoutExpired:
        raise NftError("nft did not finish within %g s" % timeout) from None
    if proc.returncode != 0:
        err = " ".join((proc.stderr or proc.stdout or "exit status %d" % proc.returncode).split())
        raise NftError(err[:500])


def apply_ruleset(text, last_applied=None, nft="nft", timeout=30.0, run=None):
    """Load ``text`` (a :func:`render` text; "" removes the tables) unless it equals ``last_applied``.

    Returns True when it loaded something. Raises :class:`NftMissing` or
    :class:`NftError` (the old tables stay as they were: the transaction is all or
    nothing). ``run(nft, script, timeout)`` replaces the subprocess call in tests.
    """
    if last_applied is not None and text == last_applied:
        return False
    (run or _run_nft)(nft, load_script(text), timeout)
    return True

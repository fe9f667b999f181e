"""The pure DHCP server core (RFC 2131 4.3): request packet -> lease intent -> reply packet.

No I/O, clock or logging. The server runs three steps per datagram:

1. :func:`decide` turns a parsed request into an *intent* (what to ask the lease store);
2. the lease service executes it and returns an *outcome* (:class:`Granted`,
   :class:`Denied` -> NAK, :class:`Silent` -> no reply);
3. :func:`respond` builds the reply packet and :func:`destination` says where it goes.

Deviations from RFC 2131, on purpose:

* INIT-REBOOT for an address this cluster has no lease for is NAKed, not ignored
  (4.3.2 says a server with no record MUST stay silent). Every bootserver reads the
  same lease table, so "no record" means "not leased", and a NAK sends the client
  back to DISCOVER at once. When the table cannot be read, the server stays silent.
* Replies to clients without an address are always broadcast (4.1 allows this; a
  unicast to ``yiaddr`` would need a hand-made ARP entry for an address the client
  does not have yet, which a portable UDP socket cannot do).
"""

from __future__ import annotations

import dataclasses
import ipaddress

from cerana_bootserver import dhcp, pxe

BROADCAST = ipaddress.IPv4Address("255.255.255.255")


# -- intents ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Offer:
    mac: str
    requested: ipaddress.IPv4Address | None
    hostname: str | None = None


@dataclasses.dataclass(frozen=True)
class Ack:
    mac: str
    ip: ipaddress.IPv4Address
    kind: str  # selecting | init-reboot | renewing
    hostname: str | None = None


@dataclasses.dataclass(frozen=True)
class ReleaseOffer:
    """The client chose another server: free what this server offered it, unless the chosen
    server offered the same address (both servers found the MAC's offer in the shared table)."""

    mac: str
    chosen: ipaddress.IPv4Address
    requested: ipaddress.IPv4Address | None = None


@dataclasses.dataclass(frozen=True)
class Release:
    mac: str
    ip: ipaddress.IPv4Address


@dataclasses.dataclass(frozen=True)
class Decline:
    mac: str
    ip: ipaddress.IPv4Address


@dataclasses.dataclass(frozen=True)
class Inform:
    mac: str
    ip: ipaddress.IPv4Address


@dataclasses.dataclass(frozen=True)
class Nak:
    """Decided without the lease store (malformed or impossible request)."""

    mac: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Ignore:
    reason: str


# -- outcomes -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Granted:
    ip: ipaddress.IPv4Address | None  # None for INFORM


@dataclasses.dataclass(frozen=True)
class Denied:
    reason: str


@dataclasses.dataclass(frozen=True)
class Silent:
    reason: str


# -- context ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Boot:
    """PXE hand-off. ``next_server`` serves TFTP; ``ipxe_url`` is given to iPXE (user class ``iPXE``)."""

    next_server: ipaddress.IPv4Address | None = None
    bios_file: str | None = "undionly.kpxe"
    efi_file: str | None = "ipxe.efi"
    ipxe_url: str | None = None
    http_base: str | None = None
    """``http://<server>[:port]`` of the boot HTTP server (UEFI HTTP boot; the per-MAC script URL)."""


@dataclasses.dataclass(frozen=True)
class Context:
    """What every reply carries: this server and the network's configuration."""

    server_id: ipaddress.IPv4Address
    net: ipaddress.IPv4Network
    lease_time: int
    gateway: ipaddress.IPv4Address | None = None
    dns: tuple = ()
    boot: Boot = Boot()

    @classmethod
    def from_config(cls, server_id, config, boot=Boot()):
        """From a :class:`_models.DHCPConfig`."""
        return cls(
            server_id=ipaddress.IPv4Address(server_id),
            net=ipaddress.IPv4Network(config.net),
            lease_time=config.lease_duration,
            gateway=ipaddress.IPv4Address(config.gateway) if config.gateway else None,
            dns=tuple(ipaddress.IPv4Address(d) for d in config.dns),
            boot=boot,
        )


# -- step 1: decide -------------------------------------------------------------------


def _safe(getter):
    try:
        return getter(), None
    except dhcp.CodecError as e:
        return None, str(e)


def decide(packet, server_id, net):
    """The intent for one request (RFC 2131 4.3), given this server's id and the served network."""
    if packet.op != dhcp.BOOTREQUEST:
        return Ignore("not a BOOTREQUEST")
    if packet.htype != 1 or packet.hlen != 6:
        return Ignore("hardware type %d/%d is not Ethernet" % (packet.htype, packet.hlen))
    mtype, err = _safe(lambda: packet.message_type)
    if err or mtype is None:
        return Ignore(err or "no message type (a BOOTP client)")
    mac = packet.mac
    hostname, _ = _safe(lambda: packet.hostname)
    sid, sid_err = _safe(lambda: packet.server_id)
    if mtype == dhcp.DISCOVER:
        requested, _ = _safe(lambda: packet.requested_ip)
        return Offer(mac, requested if requested not in (None, dhcp.ZERO) else None, hostname)
    if mtype == dhcp.REQUEST:
        if sid_err:
            return Ignore(sid_err)
        requested, err = _safe(lambda: packet.requested_ip)
        if err:
            return Nak(mac, "malformed requested address: %s" % err)
        if sid is not None:  # SELECTING (4.3.2)
            if sid != server_id:
                return ReleaseOffer(mac, sid, requested)
            if requested is None or requested == dhcp.ZERO:
                return Nak(mac, "REQUEST in SELECTING state without a requested address")
            return Ack(mac, requested, "selecting", hostname)
        if requested is not None:  # INIT-REBOOT
            if requested == dhcp.ZERO:
                return Nak(mac, "requested address 0.0.0.0")
            if requested not in net:
                return Nak(mac, "requested address %s is not on %s" % (requested, net))
            return Ack(mac, requested, "init-reboot", hostname)
        if packet.ciaddr != dhcp.ZERO:  # RENEWING (unicast) or REBINDING (broadcast)
            if packet.ciaddr not in net:
                return Nak(mac, "client address %s is not on %s" % (packet.ciaddr, net))
            return Ack(mac, packet.ciaddr, "renewing", hostname)
        return Nak(mac, "REQUEST without a requested address or ciaddr")
    if mtype in (dhcp.DECLINE, dhcp.RELEASE):
        if sid_err or (sid is not None and sid != server_id):
            return Ignore("addressed to server %s" % sid)
        if mtype == dhcp.DECLINE:
            requested, _ = _safe(lambda: packet.requested_ip)
            if requested in (None, dhcp.ZERO):
                return Ignore("DECLINE without a requested address")
            return Decline(mac, requested)
        if packet.ciaddr == dhcp.ZERO:
            return Ignore("RELEASE without ciaddr")
        return Release(mac, packet.ciaddr)
    if mtype == dhcp.INFORM:
        if packet.ciaddr == dhcp.ZERO:
            return Ignore("INFORM without ciaddr")
        return Inform(mac, packet.ciaddr)
    return Ignore("message type %d is not for a server" % mtype)


# -- step 3: respond ------------------------------------------------------------------


def boot_options(packet, boot, server_id):
    """(siaddr, file, options) of the PXE hand-off for this client, or None for a plain client.

    The decision is :func:`pxe.decide`: iPXE (user class ``iPXE``) gets the HTTP script URL
    (``{mac}`` in it becomes the client's MAC); a PXE ROM gets the TFTP boot file for its
    architecture (option 93; a ``PXEClient`` vendor class alone means BIOS): the original
    gave plain PXE ROMs no boot file at all.
    """
    if all(packet.get(code) is None for code in (dhcp.USER_CLASS, dhcp.CLIENT_ARCH, dhcp.VENDOR_CLASS)):
        return None  # what pxe.decide says of a client without any of the three options, cheaper
    policy = pxe.BootPolicy(
        next_server=boot.next_server or server_id,
        http_base=boot.http_base or pxe.http_base(str(server_id), 80),
        bios_file=boot.bios_file,
        efi_file=boot.efi_file,
        ipxe_url=boot.ipxe_url or "",
    )
    offer = pxe.decide(pxe.ClientInfo.from_packet(packet), policy)
    return None if offer is None else (offer.siaddr, offer.file_field, offer.options)


def _order(options, requested):
    """53 and 54 first, then the options the client asked for in its order (option 55), then the rest."""
    head = [o for o in options if o[0] in (dhcp.MESSAGE_TYPE, dhcp.SERVER_ID)]
    rest = [o for o in options if o[0] not in (dhcp.MESSAGE_TYPE, dhcp.SERVER_ID)]
    if requested:
        rank = {code: i for i, code in enumerate(requested)}
        rest.sort(key=lambda o: rank.get(o[0], len(rank)))
    return tuple(head + rest)


_NET_OPTIONS = [None]  # (Context, its options): the last one computed (the server has one Context at a time)


def _network_options(ctx):
    cached = _NET_OPTIONS[0]  # one read: another thread may replace it meanwhile
    if cached is not None and cached[0] is ctx:
        return list(cached[1])
    opts = _compute_network_options(ctx)
    _NET_OPTIONS[0] = (ctx, tuple(opts))
    return opts


def _compute_network_options(ctx):
    opts = [(dhcp.SUBNET_MASK, ctx.net.netmask.packed)]
    if ctx.gateway is not None:
        opts.append((dhcp.ROUTER, ctx.gateway.packed))
    if ctx.dns:
        opts.append((dhcp.DNS_SERVERS, dhcp.enc_ips(ctx.dns)))
    opts.append((dhcp.BROADCAST_ADDRESS, ctx.net.broadcast_address.packed))
    return opts


def respond(packet, intent, outcome, ctx):
    """The reply to ``packet`` (RFC 2131 4.3.1-4.3.5, table 3), or None for no reply."""
    base = dict(
        op=dhcp.BOOTREPLY, htype=packet.htype, hlen=packet.hlen, xid=packet.xid, flags=packet.flags,
        giaddr=packet.giaddr, chaddr=packet.chaddr,
    )  # fmt: skip
    sid = (dhcp.SERVER_ID, ctx.server_id.packed)
    prl, _ = _safe(lambda: packet.parameter_request_list)
    nak = None
    if isinstance(intent, Nak):
        nak = intent.reason
    elif isinstance(outcome, Denied) and isinstance(intent, Ack):
        nak = outcome.reason
    if nak is not None:
        opts = ((dhcp.MESSAGE_TYPE, bytes((dhcp.NAK,))), sid, (dhcp.MESSAGE, nak.encode()[:255]))
        return dhcp.Packet.trusted(**base, options=opts)
    if not isinstance(outcome, Granted):
        return None
    if isinstance(intent, Inform):
        opts = [(dhcp.MESSAGE_TYPE, bytes((dhcp.ACK,))), sid, *_network_options(ctx)]
        return dhcp.Packet(**base, ciaddr=packet.ciaddr, options=_order(opts, prl))
    if not isinstance(intent, (Offer, Ack)) or outcome.ip is None:
        return None
    mtype = dhcp.OFFER if isinstance(intent, Offer) else dhcp.ACK
    lease = ctx.lease_time
    opts = [
        (dhcp.MESSAGE_TYPE, bytes((mtype,))),
        sid,
        (dhcp.LEASE_TIME, dhcp.enc_u32(lease)),
        (dhcp.RENEWAL_TIME, dhcp.enc_u32(lease // 2)),  # T1 = 0.5 (RFC 2131 4.4.5)
        (dhcp.REBINDING_TIME, dhcp.enc_u32(lease * 7 // 8)),  # T2 = 0.875
        *_network_options(ctx),
    ]
    siaddr, file = dhcp.ZERO, b""
    handoff = boot_options(packet, ctx.boot, ctx.server_id)
    # A plain client's reply is made of checked parts only: no need to check them again.
    make = dhcp.Packet.trusted if handoff is None else dhcp.Packet
    if handoff is not None:
        siaddr, file, extra = handoff
        opts += extra
    return make(
        **base,
        ciaddr=packet.ciaddr if mtype == dhcp.ACK else dhcp.ZERO,
        yiaddr=outcome.ip,
        siaddr=siaddr,
        file=file,
        options=_order(opts, prl),
    )


def destination(request, reply, *, server_port=67, client_port=68, broadcast=BROADCAST):
    """Where ``reply`` goes (RFC 2131 4.1): the relay, the client's own address, or broadcast."""
    if request.giaddr != dhcp.ZERO:
        return str(request.giaddr), server_port
    if reply.message_type == dhcp.NAK:
        return str(broadcast), client_port
    if request.ciaddr != dhcp.ZERO:
        return str(request.ciaddr), client_port
    return str(broadcast), client_port

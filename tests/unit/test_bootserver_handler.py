"""The DHCP handler core, table tests after the original's bootserver tests (spec section 11), plus
RFC 2131 4.3 states, PXE hand-off, reply addressing, settings and the Consul-outage behaviour."""

from __future__ import annotations

import ipaddress
import logging

import pytest
from bootserver_fakes import MemoryStore

from ansible_collections.cerana.platform.plugins.module_utils import _leases as L
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from cerana_bootserver import dhcp
from cerana_bootserver import handler as h
from cerana_bootserver.config import ConfigError, Settings
from cerana_bootserver.leasing import LeaseService
from cerana_bootserver.server import Handler

IP = ipaddress.IPv4Address
SERVER = "10.99.0.2"
OTHER = "10.99.0.3"


def mac(i):
    return "52:54:00:00:%02x:%02x" % (i // 256, i % 256)


class Clock:
    t = 1_000_000.0

    def __call__(self):
        return self.t


def make(store=None, config=None, clock=None, server=SERVER):
    store = store or MemoryStore()
    if config is not False:
        cfg = m.DHCPConfig.from_dict(config or {"net": "10.99.0.0/24", "gateway": "10.99.0.1", "dns": ["10.99.0.1"],
                                                "lease_duration": 600})  # fmt: skip
        store.data[m.DHCP_CONFIG_KEY] = (cfg.to_bytes(), 1)
    settings = Settings.load(environ={}, flags={"interface": "lo", "server_address": server})
    service = LeaseService(lambda: store, server_id=server, offer_hold=30, clock=clock or Clock(), config_refresh=0)
    return store, service, Handler(settings, service)


def packet(mtype, m_=1, *, requested=None, server=None, ciaddr=None, flags=0, extra=()):
    opts = [(dhcp.MESSAGE_TYPE, bytes((mtype,)))]
    if requested is not None:
        opts.append((dhcp.REQUESTED_IP, requested if isinstance(requested, bytes) else IP(requested).packed))
    if server is not None:
        opts.append((dhcp.SERVER_ID, IP(server).packed))
    opts += list(extra)
    return dhcp.Packet(xid=m_, flags=flags, ciaddr=ciaddr or dhcp.ZERO, chaddr=bytes.fromhex(mac(m_).replace(":", "")),
                       options=tuple(opts))  # fmt: skip


def send(handler, pkt):
    out = handler(dhcp.build(pkt))
    if out is None:
        return None, None
    raw, dest = out
    return dhcp.parse(raw), dest


# -- the original's table ----------------------------------------------------------------


def test_original_bootserver_table():
    store, _, hd = make()
    offer, dest = send(hd, packet(dhcp.DISCOVER, 1))
    assert offer.message_type == dhcp.OFFER and IP(offer.yiaddr) in ipaddress.IPv4Network("10.99.0.0/24")
    assert offer.server_id == IP(SERVER) and dest == ("255.255.255.255", 68)
    ip1 = offer.yiaddr
    for _ in range(2):  # REQUEST for the offered IP, twice: the same ACK
        ack, _ = send(hd, packet(dhcp.REQUEST, 1, requested=ip1, server=SERVER))
        assert ack.message_type == dhcp.ACK and ack.yiaddr == ip1
    offer2, _ = send(hd, packet(dhcp.DISCOVER, 2))
    assert offer2.message_type == dhcp.OFFER and offer2.yiaddr != ip1  # a second DISCOVER: another IP
    nak, dest = send(hd, packet(dhcp.REQUEST, 3, requested=ip1, server=SERVER))  # another MAC's IP
    assert nak.message_type == dhcp.NAK and nak.yiaddr == dhcp.ZERO and dest == ("255.255.255.255", 68)
    assert b"leased to" in nak.get(dhcp.MESSAGE)
    nak, _ = send(hd, packet(dhcp.REQUEST, 3, requested="10.99.0.200", server=SERVER))  # unallocated
    assert nak.message_type == dhcp.NAK and b"no offer or lease" in nak.get(dhcp.MESSAGE)
    # REQUEST naming another server: no reply. If that server offered the same address (both found the
    # MAC's offer in the shared table) it is kept for the other server's ACK; otherwise ours is released.
    assert send(hd, packet(dhcp.REQUEST, 2, requested=offer2.yiaddr, server=OTHER)) == (None, None)
    assert L.LeaseStore(store).get(offer2.yiaddr) is not None
    assert send(hd, packet(dhcp.REQUEST, 2, requested="10.99.0.201", server=OTHER)) == (None, None)
    assert L.LeaseStore(store).get(offer2.yiaddr) is None
    for bad in (b"\x00" * 16, "0.0.0.0"):  # IPv6 or zero requested IP
        nak, _ = send(hd, packet(dhcp.REQUEST, 4, requested=bad, server=SERVER))
        assert nak.message_type == dhcp.NAK


def test_almost_full_and_full_pool(caplog):
    store = MemoryStore()
    free = IP("10.99.0.99")
    for i, host in enumerate(ipaddress.IPv4Network("10.99.0.0/24").hosts()):
        if host not in (free, IP("10.99.0.1")):
            lease = L.Lease(ip=str(host), mac=mac(500 + i), state=L.BOUND, expires=2_000_000)
            store.data[L.lease_key(host)] = (lease.to_bytes(), 1)
    _, _, hd = make(store)
    offer, _ = send(hd, packet(dhcp.DISCOVER, 1))
    assert offer.yiaddr == free
    with caplog.at_level(logging.WARNING):
        assert send(hd, packet(dhcp.DISCOVER, 2)) == (None, None)
    assert "no free address in 10.99.0.0/24" in caplog.text


# -- RFC 2131 4.3.2 client states ----------------------------------------------------------


def test_init_reboot_renewing_rebinding():
    _, _, hd = make()
    offer, _ = send(hd, packet(dhcp.DISCOVER, 1))
    send(hd, packet(dhcp.REQUEST, 1, requested=offer.yiaddr, server=SERVER))
    ack, _ = send(hd, packet(dhcp.REQUEST, 1, requested=offer.yiaddr))  # INIT-REBOOT
    assert ack.message_type == dhcp.ACK
    nak, _ = send(hd, packet(dhcp.REQUEST, 1, requested="192.168.1.5"))  # wrong network
    assert nak.message_type == dhcp.NAK and b"not on 10.99.0.0/24" in nak.get(dhcp.MESSAGE)
    ack, dest = send(hd, packet(dhcp.REQUEST, 1, ciaddr=offer.yiaddr))  # RENEWING: unicast to ciaddr
    assert ack.message_type == dhcp.ACK and ack.ciaddr == offer.yiaddr and dest == (str(offer.yiaddr), 68)
    assert ack.lease_time == 600 and ack.renewal_time == 300 and ack.rebinding_time == 525
    nak, _ = send(hd, packet(dhcp.REQUEST, 2, ciaddr=offer.yiaddr))  # someone else's address
    assert nak.message_type == dhcp.NAK


def test_reply_options_and_order():
    _, _, hd = make()
    prl = (dhcp.PARAMETER_REQUEST_LIST, bytes((6, 3, 1)))
    offer, _ = send(hd, packet(dhcp.DISCOVER, 1, extra=[prl]))
    codes = [c for c, _ in offer.options]
    assert codes[:5] == [dhcp.MESSAGE_TYPE, dhcp.SERVER_ID, 6, 3, 1]
    assert offer.subnet_mask == IP("255.255.255.0") and offer.routers == (IP("10.99.0.1"),)
    assert offer.dns_servers == (IP("10.99.0.1"),) and offer.lease_time == 600
    assert offer.broadcast_address == IP("10.99.0.255")


def test_requested_address_in_discover_is_honoured():
    _, _, hd = make()
    offer, _ = send(hd, packet(dhcp.DISCOVER, 1, requested="10.99.0.123"))
    assert offer.yiaddr == IP("10.99.0.123")


def test_release_decline_inform():
    store, _, hd = make()
    offer, _ = send(hd, packet(dhcp.DISCOVER, 1))
    send(hd, packet(dhcp.REQUEST, 1, requested=offer.yiaddr, server=SERVER))
    ls = L.LeaseStore(store)
    assert send(hd, packet(dhcp.RELEASE, 1, ciaddr=offer.yiaddr, server=SERVER)) == (None, None)
    assert ls.get(offer.yiaddr) is None
    offer, _ = send(hd, packet(dhcp.DISCOVER, 1))
    assert send(hd, packet(dhcp.DECLINE, 1, requested=offer.yiaddr, server=SERVER)) == (None, None)
    assert ls.get(offer.yiaddr).state == L.DECLINED
    offer2, _ = send(hd, packet(dhcp.DISCOVER, 1))
    assert offer2.yiaddr != offer.yiaddr
    ack, dest = send(hd, packet(dhcp.INFORM, 5, ciaddr="10.99.0.250"))
    assert ack.message_type == dhcp.ACK and ack.yiaddr == dhcp.ZERO and ack.lease_time is None
    assert dest == ("10.99.0.250", 68) and ack.subnet_mask == IP("255.255.255.0")


@pytest.mark.parametrize(
    ("extra", "siaddr", "file", "opt67"),
    [
        ([(dhcp.USER_CLASS, b"iPXE")], dhcp.ZERO, b"http://10.99.0.2/boot.ipxe", b"http://10.99.0.2/boot.ipxe"),
        ([(dhcp.VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001")], IP(SERVER), b"undionly.kpxe", b"undionly.kpxe"),
        ([(dhcp.CLIENT_ARCH, b"\x00\x07")], IP(SERVER), b"ipxe.efi", b"ipxe.efi"),
        ([], dhcp.ZERO, b"", None),  # a plain client (udhcpc, dhclient): no boot file
    ],
)
def test_pxe_hand_off(extra, siaddr, file, opt67):
    _, _, hd = make()
    offer, _ = send(hd, packet(dhcp.DISCOVER, 1, extra=extra))
    assert offer.siaddr == siaddr and offer.file == file and offer.get(dhcp.BOOTFILE_NAME) == opt67


def test_destination_rules():
    req = packet(dhcp.DISCOVER, 1)
    offer = dhcp.Packet(op=2, options=((dhcp.MESSAGE_TYPE, bytes((dhcp.OFFER,))),))
    assert h.destination(req, offer) == ("255.255.255.255", 68)
    assert h.destination(req.replace(giaddr=IP("10.1.1.1")), offer) == ("10.1.1.1", 67)
    assert h.destination(req.replace(ciaddr=IP("10.99.0.9")), offer) == ("10.99.0.9", 68)
    nak = offer.replace(options=((dhcp.MESSAGE_TYPE, bytes((dhcp.NAK,))),))
    assert h.destination(req.replace(ciaddr=IP("10.99.0.9")), nak) == ("255.255.255.255", 68)


def test_ignored_requests():
    _, _, hd = make()
    assert hd(b"garbage") is None
    assert send(hd, packet(dhcp.DISCOVER, 1).replace(op=dhcp.BOOTREPLY)) == (None, None)
    assert send(hd, packet(dhcp.OFFER, 1)) == (None, None)
    assert send(hd, dhcp.Packet(chaddr=b"\x01" * 6)) == (None, None)  # BOOTP, no option 53
    _, _, hd = make(config=False)
    assert send(hd, packet(dhcp.DISCOVER, 1)) == (None, None)  # no dhcp/config yet


# -- Consul outage ---------------------------------------------------------------------------


def test_outage_renews_known_leases_refuses_new_ones_and_logs_state_changes(caplog):
    clock = Clock()
    store, service, hd = make(clock=clock)
    offer, _ = send(hd, packet(dhcp.DISCOVER, 1))
    send(hd, packet(dhcp.REQUEST, 1, requested=offer.yiaddr, server=SERVER))
    store.down = True
    clock.t += 100
    with caplog.at_level(logging.INFO):
        ack, _ = send(hd, packet(dhcp.REQUEST, 1, ciaddr=offer.yiaddr))  # renewal from the cache
        assert ack.message_type == dhcp.ACK
        assert send(hd, packet(dhcp.DISCOVER, 2)) == (None, None)  # no new leases
        assert send(hd, packet(dhcp.REQUEST, 2, requested="10.99.0.77")) == (None, None)  # unknown: silent
        ack, _ = send(hd, packet(dhcp.REQUEST, 1, ciaddr=offer.yiaddr))
        assert ack.message_type == dhcp.ACK
    assert caplog.text.count("Consul is unreachable") == 1
    store.down = False
    with caplog.at_level(logging.INFO):
        service.tick()
        service.tick()
    assert caplog.text.count("Consul is reachable again") == 1 and "1 offline renewals written back" in caplog.text
    assert L.LeaseStore(store).get(offer.yiaddr).expires == int(clock.t) + 600


def test_no_config_at_all_while_consul_is_down():
    store = MemoryStore()
    store.down = True
    _, _, hd = make(store, config=False)
    assert send(hd, packet(dhcp.DISCOVER, 1)) == (None, None)


# -- settings ---------------------------------------------------------------------------------


def test_settings_sources_and_errors(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text('interface = "br0"\nport = 1067\noffer_hold = 45\n[consul]\naddress = "http://127.0.0.1:18500"\n')
    s = Settings.load(environ={"CERANA_BOOTSERVER_PORT": "2067", "CONSUL_HTTP_TOKEN": "t"}, flags={"config": str(f)})
    assert (s.interface, s.port, s.offer_hold) == ("br0", 2067, 45)
    assert s.consul.address == "http://127.0.0.1:18500" and s.consul.token == "t"
    s = Settings.load(environ={"CERANA_BOOTSERVER_CONFIG": str(f)}, flags={"port": 3067})
    assert s.port == 3067
    for env, flags, match in [
        ({}, {}, "interface: required"),
        ({"CERANA_BOOTSERVER_PORT": "x"}, {"interface": "a"}, "port: must be a int"),
        ({}, {"interface": "a", "server_address": "nope"}, "server_address: must be an IPv4"),
        ({}, {"interface": "a", "workers": 0}, "workers: must be at least 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Settings.load(environ=env, flags=flags)
    f.write_text('interface = "a"\nbogus = 1\n')
    with pytest.raises(ConfigError, match="bogus: unknown setting"):
        Settings.load(environ={}, flags={"config": str(f)})
    assert Settings.load(environ={}, flags={"interface": "lo"}).with_server_address().server_address == "127.0.0.1"


# -- the asyncio transport on loopback --------------------------------------------------------


def test_transport_on_loopback():
    import asyncio
    import socket

    from cerana_bootserver.server import open_socket, serve

    _, service, _ = make()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(10)
    sock = open_socket("", "127.0.0.1", 0)
    settings = Settings.load(
        environ={},
        flags={"interface": "lo", "server_address": SERVER, "port": sock.getsockname()[1],
               "client_port": client.getsockname()[1], "broadcast_address": "127.0.0.1"},
    )  # fmt: skip

    async def main():
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(settings, stop, service=service, ready=ready, sock=sock))
        await ready.wait()
        loop = asyncio.get_running_loop()
        client.sendto(dhcp.build(packet(dhcp.DISCOVER, 1)), ("127.0.0.1", sock.getsockname()[1]))
        data = await loop.run_in_executor(None, client.recv, 2048)
        stop.set()
        await asyncio.wait_for(task, 10)
        return dhcp.parse(data)

    try:
        offer = asyncio.run(main())
    finally:
        client.close()
    assert offer.message_type == dhcp.OFFER and offer.xid == 1 and offer.yiaddr in ipaddress.IPv4Network("10.99.0.0/24")


# -- the server's shortcuts: binding against its own offer, choosing another server, overload --------


def test_a_dora_costs_two_consul_requests_and_another_servers_choice_none():
    store, mine, hd = make()
    _, theirs, other = make(store=store, server=OTHER)
    for service in (mine, theirs):
        service.config_refresh = 3600  # count lease requests only
        service.config()
    store.calls = 0
    offer, _ = send(hd, packet(dhcp.DISCOVER, 1))
    also, _ = send(other, packet(dhcp.DISCOVER, 1))  # both servers hear it; they offer the same address
    assert offer.yiaddr == also.yiaddr
    assert store.calls == 3  # hd: claim txn; other: failed claim, lease read
    store.calls = 0
    ack, _ = send(hd, packet(dhcp.REQUEST, 1, requested=offer.yiaddr, server=SERVER))
    assert send(other, packet(dhcp.REQUEST, 1, requested=offer.yiaddr, server=SERVER)) == (None, None)
    assert ack.message_type == dhcp.ACK and ack.yiaddr == offer.yiaddr
    assert store.calls == 1  # one CAS against the offer hd made; other frees nothing and asks nothing
    # a renewal binds against the cached binding: one request again
    store.calls = 0
    renew, _ = send(hd, packet(dhcp.REQUEST, 1, ciaddr=offer.yiaddr))
    assert renew.message_type == dhcp.ACK and store.calls == 1


def test_a_server_whose_own_offer_was_not_chosen_frees_it():
    store, _, hd = make()
    send(hd, packet(dhcp.DISCOVER, 1))
    assert L.LeaseStore(store).lease_of(mac(1)).state == L.OFFERED
    assert send(hd, packet(dhcp.REQUEST, 1, requested="10.99.0.77", server=OTHER)) == (None, None)
    assert L.LeaseStore(store).lease_of(mac(1)) is None


def test_overload_sheds_discovers_first():
    import asyncio

    from cerana_bootserver.server import _is_discover, _Protocol

    discover, request = dhcp.build(packet(dhcp.DISCOVER, 1)), dhcp.build(packet(dhcp.REQUEST, 1, ciaddr="10.99.0.5"))
    assert _is_discover(discover) and not _is_discover(request) and not _is_discover(b"x" * 10)

    async def main():
        proto = _Protocol(lambda data: None, None, backlog=4)
        proto.tasks = {object(), object()}  # half the backlog busy
        proto.datagram_received(discover, None)
        assert proto.dropped == 1
        proto.tasks.add(object())
        proto.datagram_received(request, None)  # REQUESTs are taken up to the full backlog
        assert proto.dropped == 1 and len(proto.tasks) == 4
        proto.datagram_received(request, None)
        assert proto.dropped == 2
        for task in [t for t in proto.tasks if isinstance(t, asyncio.Future)]:
            task.cancel()

    asyncio.run(main())

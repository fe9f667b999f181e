"""RFC 2131/2132 codec: known packets, round trips, and fuzzing (only CodecError may escape parse)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cerana_bootserver import dhcp

IP = ipaddress.IPv4Address
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def discover(**kw):
    opts = kw.pop("options", None)
    if opts is None:
        opts = (
            (dhcp.MESSAGE_TYPE, bytes((dhcp.DISCOVER,))),
            (dhcp.CLIENT_ID, b"\x01\x52\x54\x00\x12\x34\x56"),
            (dhcp.PARAMETER_REQUEST_LIST, bytes((1, 3, 6, 12, 15, 28, 42))),
            (dhcp.CLIENT_ARCH, b"\x00\x07"),
            (dhcp.USER_CLASS, b"iPXE"),
            (dhcp.VENDOR_CLASS, b"PXEClient:Arch:00007:UNDI:003016"),
            (dhcp.HOSTNAME, b"node1"),
            (dhcp.REQUESTED_IP, IP("10.99.0.5").packed),
            (224, b"\x01\x02"),  # unknown, private use: kept
        )
    return dhcp.Packet(
        xid=0x12345678, flags=dhcp.FLAG_BROADCAST, chaddr=bytes.fromhex("525400123456"), options=opts, **kw
    )


def test_rfc2131_layout_and_cookie():
    raw = dhcp.build(discover())
    assert len(raw) >= 300  # RFC 1542 2.1
    assert raw[0] == 1 and raw[1] == 1 and raw[2] == 6
    assert struct.unpack("!I", raw[4:8])[0] == 0x12345678
    assert struct.unpack("!H", raw[10:12])[0] == 0x8000
    assert raw[28:34] == bytes.fromhex("525400123456")
    assert raw[236:240] == b"\x63\x82\x53\x63"
    assert raw[240:243] == b"\x35\x01\x01"  # option 53 first, as given


def test_typed_accessors():
    p = dhcp.parse(dhcp.build(discover()))
    assert p.message_type == dhcp.DISCOVER and p.mac == "52:54:00:12:34:56" and p.broadcast
    assert p.requested_ip == IP("10.99.0.5") and p.hostname == "node1"
    assert p.client_arch == (7,) and p.user_classes == (b"iPXE",) and p.vendor_class.startswith("PXEClient")
    assert p.parameter_request_list == (1, 3, 6, 12, 15, 28, 42)
    assert p.client_id == b"\x01\x52\x54\x00\x12\x34\x56"
    assert p.get(224) == b"\x01\x02" and p.server_id is None


def test_reply_option_accessors():
    p = dhcp.Packet(op=dhcp.BOOTREPLY, options=(
        (dhcp.MESSAGE_TYPE, bytes((dhcp.ACK,))), (dhcp.SERVER_ID, IP("10.0.0.1").packed),
        (dhcp.LEASE_TIME, dhcp.enc_u32(3600)), (dhcp.RENEWAL_TIME, dhcp.enc_u32(1800)),
        (dhcp.REBINDING_TIME, dhcp.enc_u32(3150)), (dhcp.SUBNET_MASK, IP("255.255.255.0").packed),
        (dhcp.ROUTER, dhcp.enc_ips(["10.0.0.1"])), (dhcp.DNS_SERVERS, dhcp.enc_ips(["1.1.1.1", "8.8.8.8"])),
        (dhcp.BROADCAST_ADDRESS, IP("10.0.0.255").packed), (dhcp.TFTP_SERVER_NAME, b"10.0.0.1"),
        (dhcp.BOOTFILE_NAME, b"undionly.kpxe"),
    ))  # fmt: skip
    q = dhcp.parse(dhcp.build(p))
    assert q == p
    assert (q.lease_time, q.renewal_time, q.rebinding_time) == (3600, 1800, 3150)
    assert q.dns_servers == (IP("1.1.1.1"), IP("8.8.8.8")) and q.routers == (IP("10.0.0.1"),)
    assert q.subnet_mask == IP("255.255.255.0") and q.broadcast_address == IP("10.0.0.255")
    assert q.server_id == IP("10.0.0.1") and q.bootfile_name == "undionly.kpxe" and q.tftp_server_name == "10.0.0.1"


def test_rfc3004_user_class_instances():
    p = discover(options=((dhcp.USER_CLASS, b"\x04iPXE\x03foo"),))
    assert p.user_classes == (b"iPXE", b"foo")


def test_pads_are_skipped_and_missing_end_tolerated():
    raw = bytearray(dhcp.build(dhcp.Packet()))[:240] + b"\x00\x00\x35\x01\x03\x00"
    assert dhcp.parse(bytes(raw)).message_type == dhcp.REQUEST


def test_long_option_split_and_concatenated_rfc3396():
    value = bytes(range(256)) * 2  # 512 octets
    p = dhcp.Packet(options=((dhcp.MESSAGE_TYPE, b"\x01"), (43, value)))
    raw = dhcp.build(p)
    assert raw.count(b"\x2b\xff") >= 2
    assert dhcp.parse(raw) == p


def test_overload_rfc2132_9_3():
    file = bytes((dhcp.HOSTNAME, 3)) + b"abc" + bytes((dhcp.END,))
    sname = bytes((dhcp.VENDOR_CLASS, 2)) + b"xy" + bytes((dhcp.END,))
    base = dhcp.build(dhcp.Packet(sname=sname, file=file, options=((dhcp.MESSAGE_TYPE, b"\x01"),)))
    raw = base[:240] + b"\x35\x01\x01\x34\x01\x03\xff"
    p = dhcp.parse(raw)
    assert p.hostname == "abc" and p.vendor_class == "xy" and p.file == b"" and p.sname == b""
    assert p.get(dhcp.OVERLOAD) is None


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "too short"),
        (b"\x01" * 239, "too short"),
        (b"\x01" * 236 + b"\x00\x00\x00\x00", "magic cookie"),
        (dhcp.build(dhcp.Packet())[:240] + b"\x35", "no length octet"),
        (dhcp.build(dhcp.Packet())[:240] + b"\x35\x05\x01", "claims 5 octets"),
        (dhcp.build(dhcp.Packet())[:240] + b"\x34\x01\x07\xff", "option 52"),
        (bytes((1, 1, 17)) + dhcp.build(dhcp.Packet())[3:], "hlen 17"),
    ],
)
def test_malformed_packets_raise_codec_error(raw, match):
    with pytest.raises(dhcp.CodecError, match=match):
        dhcp.parse(raw)


@pytest.mark.parametrize(
    ("code", "value", "attr"),
    [
        (dhcp.REQUESTED_IP, b"\x00" * 16, "requested_ip"),  # an IPv6 address
        (dhcp.SERVER_ID, b"\x01", "server_id"),
        (dhcp.MESSAGE_TYPE, b"", "message_type"),
        (dhcp.LEASE_TIME, b"\x01\x02", "lease_time"),
        (dhcp.ROUTER, b"\x01\x02\x03", "routers"),
        (dhcp.CLIENT_ARCH, b"\x00", "client_arch"),
        (dhcp.CLIENT_ID, b"\x01", "client_id"),
    ],
)
def test_bad_option_lengths_raise_codec_error(code, value, attr):
    p = dhcp.parse(dhcp.build(dhcp.Packet(options=((code, value),))))
    with pytest.raises(dhcp.CodecError, match="option %d" % code):
        getattr(p, attr)


def test_build_rejects_bad_fields():
    for kw in ({"xid": -1}, {"op": 256}, {"chaddr": b"x" * 17}, {"file": b"x" * 129}, {"ciaddr": "nope"},
               {"options": ((dhcp.END, b""),)}, {"options": ((1, b"a"), (1, b"b"))}, {"options": ((300, b""),)},
               {"options": ((1, "str"),)}):  # fmt: skip
        with pytest.raises(dhcp.CodecError):
            dhcp.Packet(**kw)
    with pytest.raises(dhcp.CodecError, match="52"):
        dhcp.build(dhcp.Packet(options=((dhcp.OVERLOAD, b"\x01"),)))


# -- property tests -----------------------------------------------------------------------

ADDR = st.integers(min_value=0, max_value=2**32 - 1).map(IP)
OPTION_CODES = st.integers(min_value=1, max_value=254).filter(lambda c: c != dhcp.OVERLOAD)
PACKETS = st.builds(
    dhcp.Packet,
    op=st.integers(0, 255), htype=st.integers(0, 255), hlen=st.integers(0, 16), hops=st.integers(0, 255),
    xid=st.integers(0, 2**32 - 1), secs=st.integers(0, 65535), flags=st.integers(0, 65535),
    ciaddr=ADDR, yiaddr=ADDR, siaddr=ADDR, giaddr=ADDR,
    chaddr=st.binary(max_size=16), sname=st.binary(max_size=64), file=st.binary(max_size=128),
    options=st.dictionaries(OPTION_CODES, st.binary(max_size=600), max_size=12).map(lambda d: tuple(d.items())),
)  # fmt: skip


@FUZZ
@given(PACKETS)
def test_round_trip(packet):
    assert dhcp.parse(dhcp.build(packet)) == packet


def _only_codec_errors(data):
    try:
        p = dhcp.parse(data)
    except dhcp.CodecError:
        return
    for attr in ("message_type", "requested_ip", "server_id", "lease_time", "routers", "dns_servers",
                 "parameter_request_list", "client_id", "hostname", "client_arch", "user_classes",
                 "vendor_class", "bootfile_name", "mac", "subnet_mask"):  # fmt: skip
        try:
            getattr(p, attr)
        except dhcp.CodecError:
            pass
    assert dhcp.parse(dhcp.build(p)) == p  # whatever parsed can be written back


@FUZZ
@given(st.binary(max_size=700))
def test_random_bytes_only_raise_codec_error(data):
    _only_codec_errors(data)


@FUZZ
@given(PACKETS, st.data())
def test_mutated_and_truncated_packets_only_raise_codec_error(packet, data):
    raw = bytearray(dhcp.build(packet))
    for _ in range(data.draw(st.integers(0, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _only_codec_errors(bytes(raw[:cut]))
    _only_codec_errors(bytes(raw))

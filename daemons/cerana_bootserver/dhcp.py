"""A pure DHCPv4 message codec: ``parse(bytes) -> Packet`` and ``build(Packet) -> bytes``.

RFC 2131 section 2 (message format, the fixed 236-octet header and the magic cookie),
RFC 2132 (options: pad 0, end 255, option overload 52, and the option codes below),
RFC 3396 (a long option is split into several instances that the receiver concatenates),
RFC 1542 section 2.1 (a BOOTP message is padded to at least 300 octets),
RFC 4578 (option 93 client system architecture), RFC 3004 (option 77 user class).

Nothing here does I/O, logs or reads a clock. Every malformed input raises
:class:`CodecError` (a ValueError), never IndexError or struct.error. Unknown options
are kept (as raw bytes, in their original order) and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

BOOTREQUEST = 1
BOOTREPLY = 2

# RFC 2132 9.6 / RFC 2131 table 2: DHCP message types (option 53)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_TYPES = {
    DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE",
    ACK: "ACK", NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM",
}  # fmt: skip

# Option codes (RFC 2132 unless noted)
PAD = 0
SUBNET_MASK = 1
ROUTER = 3
DNS_SERVERS = 6
HOSTNAME = 12
BROADCAST_ADDRESS = 28
REQUESTED_IP = 50
LEASE_TIME = 51
OVERLOAD = 52
MESSAGE_TYPE = 53
SERVER_ID = 54
PARAMETER_REQUEST_LIST = 55
MESSAGE = 56
MAX_MESSAGE_SIZE = 57
RENEWAL_TIME = 58  # T1
REBINDING_TIME = 59  # T2
VENDOR_CLASS = 60
CLIENT_ID = 61
TFTP_SERVER_NAME = 66
BOOTFILE_NAME = 67
USER_CLASS = 77  # RFC 3004
CLIENT_ARCH = 93  # RFC 4578
END = 255

MAGIC_COOKIE = b"\x63\x82\x53\x63"  # RFC 2131 3, RFC 2132 2: 99.130.83.99
FLAG_BROADCAST = 0x8000  # RFC 2131 2, figure 2
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # 236 octets
MIN_LENGTH = HEADER.size + len(MAGIC_COOKIE)  # 240
BOOTP_MIN_LENGTH = 300  # RFC 1542 2.1
ZERO = ipaddress.IPv4Address(0)


class CodecError(ValueError):
    """The bytes are not a well-formed DHCP message, or a field cannot be encoded."""


def _ip(value, name):
    if isinstance(value, ipaddress.IPv4Address):
        return value
    try:
        return ipaddress.IPv4Address(value)
    except (ValueError, TypeError) as e:
        raise CodecError("%s: not an IPv4 address: %r (%s)" % (name, value, e)) from None


def _uint(value, bits, name):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise CodecError("%s: must be an integer 0-%d, got %r" % (name, (1 << bits) - 1, value))
    return value


def _fixed(value, size, name):
    if not isinstance(value, (bytes, bytearray)):
        raise CodecError("%s: must be bytes, got %s" % (name, type(value).__name__))
    if len(value) > size:
        raise CodecError("%s: at most %d octets, got %d" % (name, size, len(value)))
    return bytes(value)


@dataclasses.dataclass(frozen=True)
class Packet:
    """One DHCP message. ``options`` is an ordered tuple of ``(code, value bytes)`` with each
    code at most once (repeated instances are concatenated by :func:`parse`, RFC 3396).
    ``sname`` and ``file`` are stored without their trailing NUL padding; ``chaddr`` is
    always 16 octets (use :attr:`mac` for the first ``hlen``)."""

    op: int = BOOTREQUEST
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: ipaddress.IPv4Address = ZERO
    yiaddr: ipaddress.IPv4Address = ZERO
    siaddr: ipaddress.IPv4Address = ZERO
    giaddr: ipaddress.IPv4Address = ZERO
    chaddr: bytes = b""
    sname: bytes = b""
    file: bytes = b""
    options: tuple = ()

    def __post_init__(self):
        for name, bits in (("op", 8), ("htype", 8), ("hlen", 8), ("hops", 8), ("xid", 32), ("secs", 16), ("flags", 16)):
            _uint(getattr(self, name), bits, name)
        if self.hlen > 16:
            raise CodecError("hlen: at most 16, got %d" % self.hlen)
        for name in ("ciaddr", "yiaddr", "siaddr", "giaddr"):
            object.__setattr__(self, name, _ip(getattr(self, name), name))
        object.__setattr__(self, "chaddr", _fixed(self.chaddr, 16, "chaddr").ljust(16, b"\0"))
        object.__setattr__(self, "sname", _fixed(self.sname, 64, "sname").rstrip(b"\0"))
        object.__setattr__(self, "file", _fixed(self.file, 128, "file").rstrip(b"\0"))
        seen = set()
        opts = []
        for item in self.options:
            if not isinstance(item, tuple) or len(item) != 2:
                raise CodecError("options: each item must be a (code, bytes) pair, got %r" % (item,))
            code, value = item
            _uint(code, 8, "option code")
            if code in (PAD, END):
                raise CodecError("option %d (pad/end) is framing, not an option" % code)
            if code in seen:
                raise CodecError("option %d appears twice; concatenate the values instead (RFC 3396)" % code)
            seen.add(code)
            if not isinstance(value, (bytes, bytearray)):
                raise CodecError("option %d: value must be bytes, got %s" % (code, type(value).__name__))
            opts.append((code, bytes(value)))
        object.__setattr__(self, "options", tuple(opts))

    @classmethod
    def trusted(cls, **fields):
        """A Packet from fields already in their final form (IPv4Address addresses, ``chaddr`` of 16
        octets, ``sname``/``file`` without padding, options a tuple of (int, bytes) with each code
        once), without :meth:`__post_init__`'s checks: what :func:`parse` decoded, or a reply the
        server core assembled. About ten times cheaper; anything else uses the constructor."""
        obj = object.__new__(cls)
        for name, default in _DEFAULTS:
            object.__setattr__(obj, name, fields.pop(name, default))
        if fields:
            raise TypeError("unknown Packet fields: %s" % ", ".join(sorted(fields)))
        return obj

    # -- generic option access ---------------------------------------------------

    def get(self, code):
        """The raw value of option ``code``, or None."""
        for c, value in self.options:
            if c == code:
                return value
        return None

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # -- typed accessors (each raises CodecError on a malformed value) -------------

    @property
    def mac(self):
        """``chaddr`` as ``aa:bb:cc:dd:ee:ff`` (first ``hlen`` octets)."""
        return self.chaddr[: self.hlen].hex(":")

    @property
    def broadcast(self):
        return bool(self.flags & FLAG_BROADCAST)

    @property
    def message_type(self):
        value = self.get(MESSAGE_TYPE)
        if value is None:
            return None
        if len(value) != 1:
            raise CodecError("option 53 (message type): length must be 1, got %d" % len(value))
        return value[0]

    def _addr(self, code, what):
        value = self.get(code)
        if value is None:
            return None
        if len(value) != 4:
            raise CodecError("option %d (%s): length must be 4, got %d" % (code, what, len(value)))
        return ipaddress.IPv4Address(value)

    def _addrs(self, code, what):
        value = self.get(code)
        if value is None:
            return None
        if not value or len(value) % 4:
            raise CodecError("option %d (%s): length must be a multiple of 4, got %d" % (code, what, len(value)))
        return tuple(ipaddress.IPv4Address(value[i : i + 4]) for i in range(0, len(value), 4))

    def _u32(self, code, what):
        value = self.get(code)
        if value is None:
            return None
        if len(value) != 4:
            raise CodecError("option %d (%s): length must be 4, got %d" % (code, what, len(value)))
        return struct.unpack("!I", value)[0]

    @property
    def requested_ip(self):
        return self._addr(REQUESTED_IP, "requested IP address")

    @property
    def server_id(self):
        return self._addr(SERVER_ID, "server identifier")

    @property
    def subnet_mask(self):
        return self._addr(SUBNET_MASK, "subnet mask")

    @property
    def broadcast_address(self):
        return self._addr(BROADCAST_ADDRESS, "broadcast address")

    @property
    def routers(self):
        return self._addrs(ROUTER, "router")

    @property
    def dns_servers(self):
        return self._addrs(DNS_SERVERS, "domain name servers")

    @property
    def lease_time(self):
        return self._u32(LEASE_TIME, "lease time")

    @property
    def renewal_time(self):
        return self._u32(RENEWAL_TIME, "renewal time")

    @property
    def rebinding_time(self):
        return self._u32(REBINDING_TIME, "rebinding time")

    @property
    def parameter_request_list(self):
        value = self.get(PARAMETER_REQUEST_LIST)
        return None if value is None else tuple(value)

    @property
    def client_id(self):
        value = self.get(CLIENT_ID)
        if value is not None and len(value) < 2:
            raise CodecError("option 61 (client identifier): length must be at least 2, got %d" % len(value))
        return value

    @property
    def hostname(self):
        value = self.get(HOSTNAME)
        return None if value is None else value.rstrip(b"\0").decode("utf-8", "replace")

    @property
    def vendor_class(self):
        value = self.get(VENDOR_CLASS)
        return None if value is None else value.decode("ascii", "replace")

    @property
    def client_arch(self):
        """Option 93 (RFC 4578 2.1): a tuple of 16-bit architecture types."""
        value = self.get(CLIENT_ARCH)
        if value is None:
            return None
        if not value or len(value) % 2:
            raise CodecError(
                "option 93 (client architecture): length must be a non-zero multiple of 2, got %d" % len(value)
            )
        return tuple(struct.unpack("!%dH" % (len(value) // 2), value))

    @property
    def user_classes(self):
        """Option 77 as a tuple of byte strings.

        RFC 3004 encodes length-prefixed instances; iPXE and several PXE ROMs send one
        plain string instead (``iPXE``). A value that does not parse as RFC 3004 is
        returned as one class.
        """
        value = self.get(USER_CLASS)
        if value is None:
            return None
        out, i = [], 0
        while i < len(value):
            n = value[i]
            if n == 0 or i + 1 + n > len(value):
                return (value,)
            out.append(value[i + 1 : i + 1 + n])
            i += 1 + n
        return tuple(out) if out else (value,)

    @property
    def bootfile_name(self):
        value = self.get(BOOTFILE_NAME)
        return None if value is None else value.rstrip(b"\0").decode("utf-8", "replace")

    @property
    def tftp_server_name(self):
        value = self.get(TFTP_SERVER_NAME)
        return None if value is None else value.rstrip(b"\0").decode("utf-8", "replace")


# -- option value encoders ---------------------------------------------------------


_DEFAULTS = tuple((f.name, f.default) for f in dataclasses.fields(Packet))


def enc_ip(addr):
    return _ip(addr, "address").packed


def enc_ips(addrs):
    return b"".join(enc_ip(a) for a in addrs)


def enc_u32(n):
    return struct.pack("!I", _uint(n, 32, "value"))


def enc_u16(n):
    return struct.pack("!H", _uint(n, 16, "value"))


def enc_u8(n):
    return struct.pack("!B", _uint(n, 8, "value"))


def enc_str(text):
    return text.encode("utf-8")


# -- parse / build -------------------------------------------------------------------


def _parse_options(data, where, into, order):
    """Scan one options area (RFC 2132 2); True when an END option was seen."""
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == PAD:
            i += 1
            continue
        if code == END:
            return True
        if i + 1 >= n:
            raise CodecError("%s: option %d at offset %d has no length octet" % (where, code, i))
        length = data[i + 1]
        if i + 2 + length > n:
            raise CodecError(
                "%s: option %d at offset %d claims %d octets, only %d left" % (where, code, i, length, n - i - 2)
            )
        if code not in into:
            into[code] = bytearray()
            order.append(code)
        into[code] += data[i + 2 : i + 2 + length]  # RFC 3396: concatenate repeated instances
        i += 2 + length
    return False


def parse(data):
    """Decode one DHCP message. Raises CodecError for anything malformed.

    Options overloaded into ``file``/``sname`` (option 52) are merged into
    ``options``; the overloaded fields are then returned empty and option 52 dropped.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError("expected bytes, got %s" % type(data).__name__)
    data = bytes(data)
    if len(data) < MIN_LENGTH:
        raise CodecError("message too short: %d octets, a DHCP message has at least %d" % (len(data), MIN_LENGTH))
    fields = HEADER.unpack_from(data)
    if data[HEADER.size : MIN_LENGTH] != MAGIC_COOKIE:
        raise CodecError("no DHCP magic cookie (RFC 2131 3): %s" % data[HEADER.size : MIN_LENGTH].hex())
    op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file = fields
    if hlen > 16:
        raise CodecError("hlen %d is larger than chaddr (16)" % hlen)
    values, order = {}, []
    _parse_options(data[MIN_LENGTH:], "options", values, order)
    overload = values.get(OVERLOAD)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise CodecError("option 52 (overload): must be one octet 1, 2 or 3, got %s" % bytes(overload).hex())
        mode = overload[0]
        del values[OVERLOAD]
        order.remove(OVERLOAD)
        # RFC 2131 4.1: the file field is read before sname.
        if mode in (1, 3):
            _parse_options(file, "file (overloaded)", values, order)
            file = b""
        if mode in (2, 3):
            _parse_options(sname, "sname (overloaded)", values, order)
            sname = b""
    if OVERLOAD in values:
        raise CodecError("option 52 (overload) inside an overloaded field")
    return Packet.trusted(
        op=op, htype=htype, hlen=hlen, hops=hops, xid=xid, secs=secs, flags=flags,
        ciaddr=_addr(ci), yiaddr=_addr(yi), siaddr=_addr(si), giaddr=_addr(gi),
        chaddr=chaddr, sname=sname.rstrip(b"\0"), file=file.rstrip(b"\0"),
        options=tuple((code, bytes(values[code])) for code in order),
    )  # fmt: skip


def _addr(packed, _zero=b"\0\0\0\0"):
    return ZERO if packed == _zero else ipaddress.IPv4Address(packed)


def build(packet):
    """Encode ``packet``; options longer than 255 octets are split (RFC 3396).

    Never overloads ``file``/``sname`` (so option 52 cannot be given), always ends the
    options with END and pads the message to 300 octets (RFC 1542 2.1).
    """
    if not isinstance(packet, Packet):
        raise CodecError("expected a Packet, got %s" % type(packet).__name__)
    out = bytearray(
        HEADER.pack(
            packet.op,
            packet.htype,
            packet.hlen,
            packet.hops,
            packet.xid,
            packet.secs,
            packet.flags,
            packet.ciaddr.packed,
            packet.yiaddr.packed,
            packet.siaddr.packed,
            packet.giaddr.packed,
            packet.chaddr,
            packet.sname,
            packet.file,
        )
    )
    out += MAGIC_COOKIE
    for code, value in packet.options:
        if code == OVERLOAD:
            raise CodecError("option 52 (overload) is not supported by the encoder")
        if not value:
            out += bytes((code, 0))
            continue
        for i in range(0, len(value), 255):
            chunk = value[i : i + 255]
            out += bytes((code, len(chunk))) + chunk
    out.append(END)
    if len(out) < BOOTP_MIN_LENGTH:
        out += b"\0" * (BOOTP_MIN_LENGTH - len(out))
    return bytes(out)


def describe(packet):
    """A one-line summary for logs."""
    try:
        kind = MESSAGE_TYPES.get(packet.message_type, str(packet.message_type))
    except CodecError:
        kind = "?"
    return "%s xid=%08x mac=%s ciaddr=%s yiaddr=%s" % (kind, packet.xid, packet.mac, packet.ciaddr, packet.yiaddr)

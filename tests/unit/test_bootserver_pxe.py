"""PXE/iPXE boot decisions (RFC 4578 option 93, RFC 3004 option 77, RFC 2132 options 66/67)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from cerana_bootserver import boot, dhcp, pxe

IP = ipaddress.IPv4Address
MAC = "52:54:00:12:34:56"
POLICY = pxe.BootPolicy.from_values(server_address="10.98.0.2", http_port=8080)


def client(arches=(), classes=(), vendor=""):
    return pxe.ClientInfo(MAC, tuple(arches), tuple(classes), vendor)


@pytest.mark.parametrize(
    ("arches", "vendor", "kind", "file"),
    [
        ((0,), "PXEClient:Arch:00000:UNDI:002001", "bios", "undionly.kpxe"),
        ((7,), "PXEClient:Arch:00007:UNDI:003016", "efi", "ipxe.efi"),
        ((9,), "PXEClient:Arch:00009:UNDI:003016", "efi", "ipxe.efi"),
        ((), "PXEClient", "bios", "undionly.kpxe"),  # old ROMs without option 93
        ((6, 7), "PXEClient", "efi", "ipxe.efi"),  # first known arch in the client's list
        ((11, 0), "PXEClient", "bios", "undionly.kpxe"),
    ],
)
def test_rfc4578_arch_table(arches, vendor, kind, file):
    offer = pxe.decide(client(arches, vendor=vendor), POLICY)
    assert offer.kind == kind
    assert offer.file == file
    assert offer.siaddr == IP("10.98.0.2")
    assert dict(offer.options) == {dhcp.TFTP_SERVER_NAME: b"10.98.0.2", dhcp.BOOTFILE_NAME: file.encode()}
    assert offer.file_field == file.encode()


@pytest.mark.parametrize("arches", [(6,), (10,), (11,), (2,), (0xFFFF,)])
def test_architectures_without_an_ipxe_binary_get_nothing(arches):
    assert pxe.decide(client(arches, vendor="PXEClient"), POLICY) is None


@pytest.mark.parametrize(("arches", "vendor"), [((), ""), ((), "MSFT 5.0"), ((), "udhcp 1.35.0")])
def test_plain_dhcp_clients_get_no_boot_file(arches, vendor):
    assert pxe.decide(client(arches, vendor=vendor), POLICY) is None


def test_rfc3004_ipxe_gets_its_per_mac_script_url():
    for classes in ((b"iPXE",), (b"iPXE\0",), (b"foo", b"iPXE")):
        offer = pxe.decide(client((0,), classes, "PXEClient"), POLICY)
        assert offer.kind == "ipxe"
        assert offer.file == "http://10.98.0.2:8080/boot/52-54-00-12-34-56.ipxe"
        assert offer.siaddr == IP(0)
        assert dict(offer.options) == {dhcp.BOOTFILE_NAME: offer.file.encode()}
    assert pxe.decide(client((0,), (b"gPXE",), "PXEClient"), POLICY).kind == "bios"


def test_uefi_http_boot_gets_a_url_and_the_httpclient_vendor_class():
    offer = pxe.decide(client((16,), vendor="HTTPClient:Arch:00016:UNDI:003001"), POLICY)
    assert offer.kind == "http"
    assert offer.file == "http://10.98.0.2:8080/ipxe.efi"
    assert dict(offer.options)[dhcp.VENDOR_CLASS] == b"HTTPClient"


def test_policy_next_server_port_80_and_disabled_files():
    p = pxe.BootPolicy.from_values(server_address="10.0.0.1", next_server="10.0.0.9", bios_file="", http_port=80)
    assert p.http_base == "http://10.0.0.1"
    assert pxe.decide(client((0,)), p) is None
    efi = pxe.decide(client((7,)), p)
    assert efi.siaddr == IP("10.0.0.9")
    assert dict(efi.options)[dhcp.TFTP_SERVER_NAME] == b"10.0.0.9"
    with pytest.raises(ValueError, match="boot file"):
        pxe.BootPolicy.from_values(server_address="10.0.0.1", bios_file="../x")


def test_long_urls_leave_the_bootp_file_field_empty():
    p = pxe.BootPolicy.from_values(server_address="10.0.0.1", http_address="a" * 130)
    offer = pxe.decide(client(classes=(b"iPXE",)), p)
    assert offer.file_field == b""
    assert dict(offer.options)[dhcp.BOOTFILE_NAME] == offer.file.encode()


def test_client_info_from_a_parsed_packet():
    pkt = dhcp.Packet(
        op=dhcp.BOOTREQUEST, htype=1, hlen=6, xid=1, chaddr=bytes.fromhex("525400123456"),
        options=((dhcp.MESSAGE_TYPE, bytes((dhcp.DISCOVER,))), (dhcp.CLIENT_ARCH, struct.pack("!H", 7)),
                 (dhcp.USER_CLASS, b"iPXE"), (dhcp.VENDOR_CLASS, b"PXEClient:Arch:00007")),
    )  # fmt: skip
    info = pxe.ClientInfo.from_packet(dhcp.parse(dhcp.build(pkt)))
    assert info == pxe.ClientInfo(MAC, (7,), (b"iPXE",), "PXEClient:Arch:00007")
    bad = pkt.replace(options=((dhcp.MESSAGE_TYPE, b"\x01"), (dhcp.CLIENT_ARCH, b"\x00")))
    assert pxe.ClientInfo.from_packet(bad).arches == ()  # malformed option 93 counts as absent


def test_boot_policy_from_settings_like_objects():
    class S:
        server_address = "10.98.0.2"
        http_port = 8080
        next_server = ""
        bios_boot_file = "undionly.kpxe"
        efi_boot_file = "ipxe.efi"

    assert boot.boot_policy(S()) == POLICY


def test_ipxe_url_template_and_none():
    p = pxe.BootPolicy.from_values(server_address="10.98.0.2", ipxe_url="http://{server}:8080/boot/{mac}.ipxe")
    assert pxe.decide(client(classes=(b"iPXE",)), p).file == "http://10.98.0.2:8080/boot/52-54-00-12-34-56.ipxe"
    off = pxe.BootPolicy.from_values(server_address="10.98.0.2", ipxe_url="")
    assert pxe.decide(client(classes=(b"iPXE",)), off) is None
    assert pxe.decide(client((0,)), off).file == "undionly.kpxe"


def test_the_dhcp_handler_uses_the_decision_through_its_settings():
    from bootserver_fakes import MemoryStore

    from ansible_collections.cerana.platform.plugins.module_utils import _models as m
    from cerana_bootserver.config import ConfigError, Settings
    from cerana_bootserver.leasing import LeaseService
    from cerana_bootserver.server import Handler

    store = MemoryStore()
    store.data[m.DHCP_CONFIG_KEY] = (m.DHCPConfig.from_dict({"net": "10.98.0.0/24"}).to_bytes(), 1)
    flags = {"interface": "lo", "server_address": "10.98.0.2", "http_port": 8080,
             "ipxe_script_url": "http://{server}:8080/boot/{mac}.ipxe"}  # fmt: skip
    settings = Settings.load(environ={}, flags=flags)
    handler = Handler(settings, LeaseService(lambda: store, server_id="10.98.0.2", config_refresh=0))

    def offer(*extra):
        opts = ((dhcp.MESSAGE_TYPE, bytes((dhcp.DISCOVER,))), *extra)
        raw, _ = handler(dhcp.build(dhcp.Packet(xid=1, chaddr=bytes.fromhex("525400123456"), options=opts)))
        return dhcp.parse(raw)

    assert offer((dhcp.USER_CLASS, b"iPXE")).bootfile_name == "http://10.98.0.2:8080/boot/52-54-00-12-34-56.ipxe"
    assert offer((dhcp.CLIENT_ARCH, b"\x00\x09")).file == b"ipxe.efi"
    assert offer((dhcp.CLIENT_ARCH, b"\x00\x06")).file == b""  # 32-bit EFI: no binary for it
    http = offer((dhcp.CLIENT_ARCH, b"\x00\x10"), (dhcp.VENDOR_CLASS, b"HTTPClient:Arch:00016"))
    assert http.bootfile_name == "http://10.98.0.2:8080/ipxe.efi"
    assert http.vendor_class == "HTTPClient"
    for bad in ({"media": "maybe"}, {"tftp_port": "70000"}, {"http_address": "example.org"}):
        with pytest.raises(ConfigError):
            Settings.load(environ={}, flags={"interface": "lo", **bad})

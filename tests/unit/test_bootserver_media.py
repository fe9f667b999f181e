"""The TFTP (RFC 1350/2347/2348/2349) and HTTP (RFC 9110) boot servers on loopback, port 0."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import struct
import time

import pytest
import tftpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cerana_bootserver import ipxe
from cerana_bootserver.boot import BootServices, BootSettings
from cerana_bootserver.tftp import TftpService

KPXE = os.urandom(70_000)
KERNEL = os.urandom(300_000)
KNOWN = "52:54:00:00:00:01"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("media")
    (base / "ipxe").mkdir()
    (base / "ipxe" / "undionly.kpxe").write_bytes(KPXE)
    (base / "ipxe" / "ipxe.efi").write_bytes(b"EFI")
    (base / "secret").write_bytes(b"SECRET")
    img = base / "images"
    (img / "v1").mkdir(parents=True)
    (img / "v1" / "kernel").write_bytes(KERNEL)
    (img / "v1" / "initrd").write_bytes(b"INITRD")
    (img / "v2").mkdir()
    (img / "v2" / "kernel").write_bytes(b"K2")
    (img / "v2" / "initrd").symlink_to(base / "secret")  # escapes: v2 is not servable
    (img / "current").symlink_to("v1")
    return base


def view_for(mac):
    if mac == "52:54:00:00:00:ff":
        raise OSError("Consul is down")
    return ipxe.ClusterView(
        cluster_ips=("10.98.0.2",),
        reservations={KNOWN: "10.98.0.50"},
        nodes=(ipxe.NodeInfo("n1", "n1", ("10.98.0.50",), {"cerana.boot_image": "local"}),),
    )


@pytest.fixture(scope="module")
def services(tree):
    s = BootSettings(
        server_address="127.0.0.1", ipxe_dir=str(tree / "ipxe"), tftp_root=str(tree / "tftp"),
        tftp_address="127.0.0.1", tftp_port=0, tftp_timeout=0.5, http_address="127.0.0.1", http_port=0,
        images_dir=str(tree / "images"),
    )  # fmt: skip
    svc = BootServices(s, view_for).start()
    (tree / "tftp" / "escape").symlink_to(tree / "secret")
    yield svc
    svc.stop()


def get(svc, path, method="GET", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", svc.web.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# -- HTTP -----------------------------------------------------------------------------


def test_script_for_an_unknown_mac(services):
    status, headers, body = get(services, "/boot/52-54-00-AB-CD-EF.ipxe")
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    text = body.decode()
    port = services.web.port
    assert text.startswith("#!ipxe\n")
    assert "kernel http://127.0.0.1:%d/images/current/kernel " % port in text
    assert "cerana.cluster_ips=10.98.0.2" in text
    assert "cerana.mgmt_mac=52:54:00:ab:cd:ef" in text
    assert "cerana.initrd_hash=sha256-%s" % hashlib.sha256(b"INITRD").hexdigest() in text
    assert "initrd --name initrd http://127.0.0.1:%d/images/current/initrd\nboot\n" % port in text


def test_script_for_a_known_node_follows_its_boot_target(services):
    status, _, body = get(services, "/boot/%s.ipxe" % KNOWN)
    assert status == 200
    assert body.decode().endswith("exit\n")
    assert "node n1" in body.decode()


def test_script_when_the_cluster_state_cannot_be_read(services):
    status, _, body = get(services, "/boot/52:54:00:00:00:ff.ipxe")
    assert status == 200
    assert "unknown MAC" in body.decode()


def test_chain_script_and_head(services):
    assert get(services, "/boot.ipxe")[2] == b"#!ipxe\nchain /boot/${netX/mac:hexhyp}.ipxe\n"
    status, headers, body = get(services, "/kernel", method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, str(len(KERNEL)), b"")


def test_rfc9110_ranges(services):
    status, headers, body = get(services, "/images/current/kernel")
    assert (status, body, headers["Accept-Ranges"]) == (200, KERNEL, "bytes")
    status, headers, body = get(services, "/kernel", headers={"Range": "bytes=1000-1999"})
    assert (status, body, headers["Content-Range"]) == (206, KERNEL[1000:2000], "bytes 1000-1999/%d" % len(KERNEL))
    status, _, body = get(services, "/kernel", headers={"Range": "bytes=-10"})
    assert (status, body) == (206, KERNEL[-10:])
    status, headers, _ = get(services, "/kernel", headers={"Range": "bytes=%d-" % len(KERNEL)})
    assert (status, headers["Content-Range"]) == (416, "bytes */%d" % len(KERNEL))
    status, _, body = get(services, "/kernel", headers={"Range": "bytes=0-1,5-6"})
    assert (status, body) == (200, KERNEL)  # multi-range refused: the whole file


@pytest.mark.parametrize(
    "path",
    ["/images/../../secret", "/images/%2e%2e/secret", "/images/%2E%2E/%2e%2e/secret", "/images/v2/initrd",
     "/images/v2/kernel/../initrd", "/../secret", "/%2e%2e/secret", "/escape", "/images/current/secret",
     "/boot/../../secret", "//etc/passwd", "/images/v1%00/kernel"],
)  # fmt: skip
def test_nothing_outside_the_roots(services, path):
    status, _, body = get(services, path)
    assert status == 404
    assert b"SECRET" not in body


def test_ipxe_binaries_over_http_and_methods(services):
    assert get(services, "/undionly.kpxe")[2] == KPXE
    assert get(services, "/ipxe.efi")[2] == b"EFI"
    assert get(services, "/kernel", method="POST")[0] == 405


# -- TFTP -------------------------------------------------------------------------------


def tftp_get(port, name, tmp_path, **options):
    out = tmp_path / "out"
    tftpy.TftpClient("127.0.0.1", port, options=options).download(name, str(out), timeout=2)
    return out.read_bytes()


def test_rfc1350_download(services, tmp_path):
    assert tftp_get(services.tftp.port, "undionly.kpxe", tmp_path) == KPXE


@pytest.mark.parametrize("blksize", [8, 512, 1432, 1468, 8192])
def test_rfc2348_blksize_and_rfc2349_tsize(services, tmp_path, blksize):
    got = []
    out = tmp_path / "out"
    client = tftpy.TftpClient("127.0.0.1", services.tftp.port, options={"blksize": blksize, "tsize": 0})
    client.download("undionly.kpxe", str(out), packethook=lambda pkt: got.append(pkt), timeout=2)
    assert out.read_bytes() == KPXE
    assert client.context.options["tsize"] == str(len(KPXE))
    assert int(client.context.options["blksize"]) == blksize


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "escape", "../../../../etc/passwd", "missing",
                                  str("/" + "x" * 300)])  # fmt: skip
def test_refused_names(services, tmp_path, name):
    with pytest.raises(tftpy.TftpException):
        tftp_get(services.tftp.port, name, tmp_path)


def test_write_requests_are_refused(services, tmp_path):
    src = tmp_path / "up"
    src.write_bytes(b"x" * 100)
    with pytest.raises(tftpy.TftpException):
        tftpy.TftpClient("127.0.0.1", services.tftp.port).upload("uploaded", str(src), timeout=2)
    assert not (services.tftp.root / "uploaded").exists()


def _request(opcode, name, mode, options):
    out = struct.pack("!H", opcode) + name + b"\0" + mode + b"\0"
    for k, v in options:
        out += k + b"\0" + v + b"\0"
    return out


GARBAGE = st.one_of(
    st.binary(max_size=600),
    st.builds(
        _request,
        st.sampled_from([1, 2, 3, 4, 5, 6, 7, 0, 0xFFFF]),
        st.one_of(st.binary(max_size=40), st.sampled_from([b"undionly.kpxe", b"../secret", b"\xff\xfe", b""])),
        st.sampled_from([b"octet", b"netascii", b"mail", b"", b"\xff"]),
        st.lists(
            st.tuples(
                st.sampled_from([b"blksize", b"tsize", b"timeout", b"windowsize", b"\x80", b""]),
                st.one_of(st.sampled_from([b"abc", b"0", b"-1", b"99999999", b"1432", b""]), st.binary(max_size=8)),
            ),
            max_size=3,
        ),
    ),
)


def test_garbage_never_stops_the_tftp_server(tmp_path, tree):
    """Fuzz: any datagram to port 69 is answered or dropped, and the next client still gets its file."""
    tftp_root = tmp_path / "root"
    tftp_root.mkdir()
    (tftp_root / "undionly.kpxe").write_bytes(KPXE)
    svc = TftpService(tftp_root, "127.0.0.1", 0, timeout=0.3, retries=1).start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(GARBAGE)
        def send(datagram):
            sock.sendto(datagram, ("127.0.0.1", svc.port))
            time.sleep(0.001)

        send()
        time.sleep(0.5)
        assert svc.thread.is_alive()
        assert tftp_get(svc.port, "undionly.kpxe", tmp_path, blksize=1432) == KPXE
        assert not (tftp_root / "undionly.kpxe.x").exists()
        assert sorted(p.name for p in tftp_root.iterdir()) == ["undionly.kpxe"]  # nothing was written
    finally:
        sock.close()
        svc.stop()
    assert not svc.thread.is_alive()

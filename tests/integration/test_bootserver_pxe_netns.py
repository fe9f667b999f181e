"""Boot media end to end: TFTP and HTTP from a network namespace, and one real netboot of a TCG VM.

Layout (created here, removed afterwards; nothing leaves the bridge):

    br-cnb 10.98.0.1/24 (root namespace; a Consul dev agent listens there and on 127.0.0.1)
      ├── cnb-srv eth0 10.98.0.2   python -m cerana_bootserver.boot (TFTP :69, HTTP :80)
      │                            and, for the VM, python -m cerana_bootserver (DHCP :67)
      ├── cnb-cli eth0 10.98.0.20  tftp-hpa and curl
      ├── cnb-netboot-uefi (libvirt, TCG, OVMF): UEFI PXE -> DHCP -> TFTP ipxe.efi -> iPXE DHCP ->
      │                            HTTP /boot.ipxe -> /boot/<mac>.ipxe -> kernel + initrd
      └── cnb-netboot-bios (libvirt, TCG, SeaBIOS + QEMU's iPXE ROM): DHCP -> /boot/<mac>.ipxe -> ...

Needs root, ``ip``, ``tftp`` (tftp-hpa), ``curl``; the VM tests also libvirt + QEMU + OVMF + ipxe-qemu,
the ``ipxe`` package, ``cpio`` and a kernel (``/boot/vmlinuz-*``, or Debian's
linux-image package fetched with ``apt-get download`` into a cache directory).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cerana_cli.consul_agent import ConsulAgent
from libvirt_helpers import find_kernel, libvirt_daemons, static_busybox

pytestmark = [pytest.mark.integration]

BRIDGE = "br-cnb"
HOST_IP = "10.98.0.1"
SERVER_NS, SERVER_IP = "cnb-srv", "10.98.0.2"
CLIENT_NS, CLIENT_IP = "cnb-cli", "10.98.0.20"
PREFIX = "cnb"
KNOWN_MAC = "52:54:00:98:00:50"
VM_NAME = "cnb-netboot"
MARKER = "CERANA-NETBOOT-MARKER"
VM_TIMEOUT = float(os.environ.get("CERANA_NETBOOT_TIMEOUT", "240"))
NEEDS = [shutil.which("ip"), shutil.which("tftp"), shutil.which("curl")]


def sh(*args, check=True, timeout=60):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def in_ns(ns, *args, check=True, timeout=60):
    return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)


def teardown_lab():
    for ns in (SERVER_NS, CLIENT_NS):
        # Delete the root end of the veth too: a namespace outlives `ip netns del` while anything
        # still references it, and its veth would then block the next run's `ip link add`.
        sh("ip", "link", "del", ns + "v", check=False)
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


class BridgeConsul(ConsulAgent):
    """A dev agent that also listens on the bridge address, so the namespaces reach it."""

    def command(self, http_port):
        return [
            ("-client=127.0.0.1 %s" % HOST_IP) if a.startswith("-client=") else a for a in super().command(http_port)
        ]


def kv_put(agent, key, value):
    url = "%s/v1/kv/%s/%s" % (agent.http_addr, PREFIX, key)
    urllib.request.urlopen(urllib.request.Request(url, data=value.encode(), method="PUT"), timeout=5).read()


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


# -- boot assets ----------------------------------------------------------------------------


INIT = (
    """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys
/bin/busybox mount -t proc proc /proc
echo "%s args: $(/bin/busybox cat /proc/cmdline)"
/bin/busybox sleep 1
/bin/busybox poweroff -f
"""
    % MARKER
)


def build_initramfs(busybox, out):
    """A newc cpio with busybox and an /init that prints the marker and powers off."""
    root = out.parent / "initramfs-root"
    shutil.rmtree(root, ignore_errors=True)
    (root / "bin").mkdir(parents=True)
    (root / "dev").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    os.mknod(root / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names, stdout=f, check=True)
    shutil.rmtree(root)


# -- the lab ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0 or not all(NEEDS):
        pytest.skip("needs root, ip, tftp (tftp-hpa) and curl")
    if not Path("/usr/lib/ipxe/undionly.kpxe").exists():
        pytest.skip("needs the ipxe package (/usr/lib/ipxe)")
    teardown_lab()
    work = tmp_path_factory.mktemp("cnb")
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", HOST_IP + "/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    try:
        for i, (ns, ip) in enumerate(((SERVER_NS, SERVER_IP), (CLIENT_NS, CLIENT_IP)), start=1):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", ns + "v", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", ns + "v", "master", BRIDGE, "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "address", "52:54:00:98:01:%02x" % i)
            sh("ip", "-n", ns, "addr", "add", ip + "/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        agent = BridgeConsul().start()
        try:
            yield work, agent
        finally:
            agent.stop()
    finally:
        teardown_lab()


@pytest.fixture(scope="module")
def images(lab):
    work, _ = lab
    root = work / "images"
    (root / "v1").mkdir(parents=True)
    kernel = find_kernel() if os.environ.get("CERANA_NETBOOT_FAKE_KERNEL") is None else None
    if kernel is not None:
        shutil.copy(kernel, root / "v1" / "kernel")
    else:
        (root / "v1" / "kernel").write_bytes(os.urandom(1 << 20))
    busybox = static_busybox()
    if busybox is not None and shutil.which("cpio"):
        build_initramfs(busybox, root / "v1" / "initrd")
    else:
        (root / "v1" / "initrd").write_bytes(b"not an initramfs")
    (root / "v2").mkdir()
    for name in ("kernel", "initrd"):
        (root / "v2" / name).symlink_to(root / "v1" / name)
    (root / "current").symlink_to("v1")
    return root, kernel is not None and busybox is not None


@pytest.fixture(scope="module")
def media(lab, images):
    work, agent = lab
    root, _ = images
    kv_put(agent, "dhcp/config", json.dumps({
        "net": "10.98.0.0/24", "gateway": HOST_IP, "lease_duration": 600,
        "excluded": [{"start": "10.98.0.1", "end": "10.98.0.29"}], "reservations": {KNOWN_MAC: "10.98.0.50"},
    }))  # fmt: skip
    kv_put(agent, "nodes/n50", json.dumps({
        "id": "n50", "hostname": "n50", "heartbeat": "2026-01-01T00:00:00Z", "addresses": ["10.98.0.50"],
        "labels": {"cerana.boot_image": "v2"},
    }))  # fmt: skip
    env = dict(os.environ, CONSUL_HTTP_ADDR="http://%s:%d" % (HOST_IP, agent.http_port), CERANA_KV_PREFIX=PREFIX)
    log = open(work / "media.log", "w")  # noqa: SIM115 - closed below
    argv = [sys.executable, "-m", "cerana_bootserver.boot", "--server-address", SERVER_IP,
            "--tftp-root", str(work / "tftp"), "--images-dir", str(root), "--tftp-timeout", "1"]  # fmt: skip
    proc = subprocess.Popen(["ip", "netns", "exec", SERVER_NS, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "HTTP boot server listening" in (work / "media.log").read_text() or proc.poll() is not None,
                 30, "the boot services")  # fmt: skip
        assert proc.poll() is None, (work / "media.log").read_text()
        yield work
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        log.close()
        assert "boot services stopped" in (work / "media.log").read_text()


def curl(*args):
    return in_ns(CLIENT_NS, "curl", "-sS", "--max-time", "10", *args)


def test_tftp_client_gets_undionly_and_is_refused_escapes(media, tmp_path):
    start = time.monotonic()
    out = tmp_path / "undionly.kpxe"
    got = in_ns(CLIENT_NS, "tftp", "-m", "binary", SERVER_IP, "-c", "get", "undionly.kpxe", str(out))
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
    for name in ("../../etc/passwd", "/etc/passwd", "ipxe.efi/../../../etc/passwd"):
        bad = tmp_path / "passwd"
        res = in_ns(CLIENT_NS, "tftp", "-m", "binary", SERVER_IP, "-c", "get", name, str(bad), check=False)
        assert "Error code" in res.stdout + res.stderr, (name, res)
        assert not bad.exists() or bad.stat().st_size == 0
        bad.unlink(missing_ok=True)
    print("\ntftp checks in %.1f s" % (time.monotonic() - start))


def test_curl_scripts_for_unknown_and_known_macs(media):
    unknown = curl("http://%s/boot/52:54:00:98:00:99.ipxe" % SERVER_IP).stdout
    assert "unknown MAC: default image" in unknown
    assert "kernel http://%s/images/current/kernel " % SERVER_IP in unknown
    assert "cerana.cluster_ips=127.0.0.1" in unknown  # the dev agent's Raft peer address
    assert "cerana.mgmt_mac=52:54:00:98:00:99" in unknown
    known = curl("http://%s/boot/%s.ipxe" % (SERVER_IP, KNOWN_MAC.replace(":", "-"))).stdout
    assert "node n50: boot target v2 (known)" in known
    assert "kernel http://%s/images/v2/kernel " % SERVER_IP in known
    chain = curl("http://%s/boot.ipxe" % SERVER_IP).stdout
    assert chain == "#!ipxe\nchain /boot/${netX/mac:hexhyp}.ipxe\n"


def test_curl_range_of_the_kernel_and_no_escapes(media, images):
    root, _ = images
    kernel = (root / "v1" / "kernel").read_bytes()
    head = curl("-D", "-", "-r", "100-1123", "-o", "/dev/null", "http://%s/kernel" % SERVER_IP).stdout
    assert head.startswith("HTTP/1.1 206")
    assert "Content-Range: bytes 100-1123/%d" % len(kernel) in head
    url = "http://%s/images/current/kernel" % SERVER_IP
    argv = ["ip", "netns", "exec", CLIENT_NS, "curl", "-sS", "-r", "100-1123", url]
    ranged = subprocess.run(argv, capture_output=True, check=True).stdout
    assert ranged == kernel[100:1124]
    for path in ("/images/../../../etc/passwd", "/images/%2e%2e/%2e%2e/etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"):
        code = curl("--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", "http://%s%s" % (SERVER_IP, path)).stdout
        assert code == "404", path


# -- one real netboot --------------------------------------------------------------------------

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>{firmware}
    <boot dev='network'/>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>{rom}
    </interface>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
  </devices>
</domain>
"""
OVMF = """
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{nvram}</nvram>"""
# UEFI: no NIC option ROM, so OVMF's own PXE client (option 93 = 7, no user class) has to
# fetch ipxe.efi over TFTP. BIOS: SeaBIOS runs QEMU's iPXE ROM (ipxe-qemu), which identifies
# as iPXE and gets its per-MAC script URL straight from DHCP.
FIRMWARES = {
    "uefi": dict(machine="q35", mac="52:54:00:98:00:77", rom="\n      <rom enabled='no'/>", script_url=None),
    "bios": dict(machine="pc", mac="52:54:00:98:00:78", rom="", script_url="http://{server}/boot/{mac}.ipxe"),
}


@pytest.mark.slow
@pytest.mark.parametrize("firmware", sorted(FIRMWARES, reverse=True))
def test_vm_netboots(lab, images, media, firmware):
    """UEFI: DHCP -> TFTP ipxe.efi -> iPXE DHCP -> /boot.ipxe -> /boot/<mac>.ipxe -> kernel + initrd.
    BIOS (QEMU's iPXE ROM): DHCP -> /boot/<mac>.ipxe -> kernel + initrd."""
    work, agent = lab
    _, real = images
    fw = FIRMWARES[firmware]
    vm_mac, vm_name = fw["mac"], "%s-%s" % (VM_NAME, firmware)
    needs = ["virsh", "libvirtd", "virtlogd", "qemu-system-x86_64"]
    if not real or not all(shutil.which(n) for n in needs) or not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").exists():
        pytest.skip("needs libvirt, QEMU, OVMF, ipxe-qemu, a kernel and a static busybox")
    # DHCP: the project's own server (cerana_bootserver, media off: the `media` fixture serves TFTP
    # and HTTP in the same namespace). UEFI keeps the default script URL http://<server>/boot.ipxe,
    # which chains to the per-MAC script; BIOS is told the per-MAC URL itself.
    env = dict(os.environ, CONSUL_HTTP_ADDR="http://%s:%d" % (HOST_IP, agent.http_port), CERANA_KV_PREFIX=PREFIX,
               CERANA_BOOTSERVER_INTERFACE="eth0", CERANA_BOOTSERVER_LOG_LEVEL="DEBUG",
               CERANA_BOOTSERVER_MEDIA="off")  # fmt: skip
    if fw["script_url"]:
        env["CERANA_BOOTSERVER_IPXE_SCRIPT_URL"] = fw["script_url"]
    media_log_start = len((work / "media.log").read_text())
    dlog = open(work / "dhcp.log", "w")  # noqa: SIM115 - closed below
    dhcp = subprocess.Popen(["ip", "netns", "exec", SERVER_NS, sys.executable, "-m", "cerana_bootserver"], env=env,
                            stdout=dlog, stderr=subprocess.STDOUT)  # fmt: skip
    vmdir = Path(tempfile.mkdtemp(prefix="cnb-vm-", dir="/var/tmp"))  # QEMU runs as libvirt-qemu: not below 0700 dirs
    vmdir.chmod(0o755)
    serial = vmdir / "serial.log"
    nvram = vmdir / "vars.fd"
    xml = work / "domain.xml"
    firmware_xml = OVMF.format(nvram=nvram) if firmware == "uefi" else ""
    xml.write_text(DOMAIN.format(name=vm_name, machine=fw["machine"], firmware=firmware_xml, bridge=BRIDGE, mac=vm_mac,
                                 rom=fw["rom"], serial=serial))  # fmt: skip
    try:
        wait_for(lambda: "listening on" in (work / "dhcp.log").read_text(), 30, "the DHCP server")
        with libvirt_daemons():
            sh("virsh", "-c", "qemu:///system", "destroy", vm_name, check=False)
            # The first domain start after libvirtd starts may probe QEMU's capabilities (up to a
            # minute here: the probe trips over kvm_pvm's /dev/kvm); domcapabilities does it up front.
            warm = time.monotonic()
            sh("virsh", "-c", "qemu:///system", "domcapabilities", "--virttype", "qemu", timeout=300)
            warm = time.monotonic() - warm
            start = time.monotonic()
            created = sh("virsh", "-c", "qemu:///system", "create", str(xml), check=False, timeout=300)
            assert created.returncode == 0, created.stderr
            try:
                wait_for(lambda: serial.exists() and MARKER in serial.read_text(errors="replace"), VM_TIMEOUT,
                         "the marker on the serial console")  # fmt: skip
                took = time.monotonic() - start
                wait_for(lambda: vm_name not in sh("virsh", "-c", "qemu:///system", "list", "--name").stdout, 30,
                         "the VM to power off")  # fmt: skip
            finally:
                sh("virsh", "-c", "qemu:///system", "destroy", vm_name, check=False)
    finally:
        if serial.exists():
            (work / ("serial-%s.log" % firmware)).write_text(serial.read_text(errors="replace"))
        dhcp.terminate()
        dhcp.wait(10)
        dlog.close()
        shutil.rmtree(vmdir, ignore_errors=True)
    text = (work / ("serial-%s.log" % firmware)).read_text()
    line = next(line for line in text.splitlines() if MARKER in line)
    assert "cerana.mgmt_mac=%s" % vm_mac in line
    assert "cerana.boot_server=http://%s/images/current" % SERVER_IP in line
    media_log = (work / "media.log").read_text()[media_log_start:]
    assert "GET /boot/%s.ipxe" % vm_mac.replace(":", "-") in media_log
    assert ("sending ipxe.efi" in media_log) == (firmware == "uefi")
    assert ("GET /boot.ipxe" in media_log) == (firmware == "uefi")
    print("\n%s netboot: libvirt warm-up %.1f s, create + boot to the marker %.1f s" % (firmware, warm, took))

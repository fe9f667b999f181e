"""A ``kind: vm`` service through ``cerana.platform.service_instance``: one real TCG VM.

Real pieces: libvirtd + virtlogd started by the test (``tests/libvirt_helpers.py``), QEMU with
TCG, a Consul dev agent (fixtures ``consul``/``kv_prefix``) holding the declared dataset,
service and bundle, and ansible-playbook on localhost. The dataset is a directory the test
builds: a Debian kernel (``vmlinuz``), a busybox initramfs (``initrd.img``) whose ``/init``
loads the virtio NIC modules, configures ``eth0`` from the kernel's ``ip=`` argument, prints
what it got on the serial console and serves a page with ``busybox httpd``, and a 1 MiB raw
disk (``disk.raw``) behind the qcow2 overlay (only with ``qemu-img``, Debian qemu-utils:
without it the VM boots without a disk). The bundle's network record
(``<run_dir>/networks/<bundle>.json``) is written by the test, for a bridge it creates with
the record's gateway address: that is what ``cerana.platform.bundle_network`` leaves on a node.
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
import uuid
from ipaddress import IPv4Network
from pathlib import Path

import pytest

import libvirt_helpers as lh
from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net, _store
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
CALLBACKS = Path(__file__).parent / "playbooks" / "callback_plugins"
MARKER = "CERANA-VM-BOOTED"
BOOT_TIMEOUT = float(os.environ.get("CERANA_VM_BOOT_TIMEOUT", "120"))
MODULES = (*lh.VIRTIO_NET_MODULES, "virtio_blk")  # in load order
NEEDS = ("ip", "virsh", "libvirtd", "virtlogd", "qemu-system-x86_64", "cpio")
DISK = shutil.which("qemu-img") is not None  # the overlay needs it

INIT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /tmp /www
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in %(modules)s; do $B insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
for a in $($B cat /proc/cmdline); do case "$a" in ip=*) IP="${a#ip=}";; esac; done
ADDR=$(echo "$IP" | $B cut -d: -f1); GW=$(echo "$IP" | $B cut -d: -f3)
MASK=$(echo "$IP" | $B cut -d: -f4); HOST=$(echo "$IP" | $B cut -d: -f5)
$B hostname "$HOST"
$B ip link set lo up
$B ifconfig eth0 "$ADDR" netmask "$MASK" up
$B ip route add default via "$GW"
MAC=$($B cat /sys/class/net/eth0/address)
MTU=$($B cat /sys/class/net/eth0/mtu)
ENV=$($B strings /sys/firmware/dmi/tables/DMI | $B grep '^GREETING=' | $B head -1)
DISK=$($B dd if=/dev/vda bs=32 count=1 2>/dev/null | $B strings | $B head -1)
echo "$ADDR $MAC $ENV" > /www/index.html
echo "%(marker)s addr=$ADDR mask=$MASK gw=$GW host=$HOST mac=$MAC mtu=$MTU env=$ENV disk=$DISK"
$B httpd -p 80 -h /www
while true; do $B sleep 3600; done
"""


def sh(*args, check=True, timeout=60):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def free_subnet():
    used = []
    for cmd in (["ip", "-j", "-4", "addr"], ["ip", "-j", "-4", "route"]):
        for item in json.loads(sh(*cmd).stdout):
            for a in item.get("addr_info", []):
                used.append(IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
            if item.get("dst") not in (None, "default"):
                used.append(IPv4Network(item["dst"], strict=False))
    for third in range(11, 250, 7):
        net = IPv4Network(f"10.237.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free subnet")


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


class VmLab:
    def __init__(self, work, bundle, bridge, net):
        self.work = work
        self.bundle = bundle
        self.bridge = bridge
        self.data_dir = work / "data"
        self.run_dir = work / "run"
        self.dataset = self.data_dir / "datasets" / "vm-boot"
        self.vm_dir = self.data_dir / "vms" / f"{bundle}_guest"
        self.domain = f"cerana-{bundle}_guest"
        self.timings = []
        hosts = list(net.hosts())
        self.gateway, self.address = str(hosts[0]), str(hosts[9])
        self.record = _bundle_net.NetworkRecord(
            bundle=bundle, netns=_bundle_net.netns_name(bundle), address=self.address, prefix_len=net.prefixlen,
            gateway=self.gateway, mac=_bundle_net.bundle_mac(bundle, "vm-test-node"),
            host_veth=_bundle_net.host_veth_name(bundle),  # not created: a VM bundle has no namespace
        )  # fmt: skip

    def virsh(self, *args, check=False):
        return sh("virsh", "-c", "qemu:///system", *args, check=check)

    def serial(self):
        path = self.vm_dir / "serial.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def booted_line(self):
        return next((line for line in self.serial().splitlines() if line.startswith(MARKER)), None)

    def qemu_pid(self):
        path = Path(f"/run/libvirt/qemu/{self.domain}.pid")
        return int(path.read_text()) if path.exists() else None

    def instance_record(self):
        path = self.run_dir / "bundles" / self.bundle / "guest.json"
        return json.loads(path.read_text()) if path.exists() else None

    def playbook(self, env, kv_prefix, tasks):
        """Run ``tasks`` ([(name, bundle, state, extra args)]) in one play; returns {task name: result}."""
        tag = uuid.uuid4().hex[:6]
        lines = ["- hosts: localhost", "  gather_facts: false", "  tasks:"]
        for name, bundle, state, extra in tasks:
            lines += [
                f"    - name: {name}",
                "      ignore_errors: true",
                "      cerana.platform.service_instance:",
                f"        bundle: {bundle}",
                "        service: guest",
                f"        state: {state}",
                f"        kv_prefix: {kv_prefix}",
                f"        data_dir: {self.data_dir}",
                f"        run_dir: {self.run_dir}",
                f"        unit_dir: {self.work / 'units'}",
                f"        bridge: {self.bridge}",
                "        shutdown_timeout: 2",
                *[f"        {k}: {v}" for k, v in extra.items() if not k.startswith("_")],
            ]
        play = self.work / f"play-{tag}.yml"
        play.write_text("\n".join(lines) + "\n")
        record = self.work / f"play-{tag}.jsonl"
        env = dict(env, ANSIBLE_CALLBACKS_ENABLED="record_results", ANSIBLE_CALLBACK_PLUGINS=str(CALLBACKS),
                   CERANA_TEST_RECORD=str(record))  # fmt: skip
        argv = [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(play)]
        if any(extra.get("_check") for *_, extra in tasks):
            argv += ["--check", "--diff"]
        began = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
        self.timings.append(("playbook " + "+".join(t[0] for t in tasks), time.monotonic() - began))
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        results = {}
        for line in record.read_text().splitlines() if record.exists() else []:
            rec = json.loads(line)
            results[rec["task"]] = dict(rec["result"], failed=rec["status"] == "failed")
        assert set(results) == {t[0] for t in tasks}, proc.stdout + proc.stderr
        for res in results.values():
            assert "module_stderr" not in res and "module_stdout" not in res, res
        return results


def build_dataset(root):
    kernel = lh.find_kernel()
    modules = lh.kernel_modules(kernel, MODULES) if kernel else None
    busybox = lh.static_busybox()
    if not (kernel and modules and busybox):
        pytest.skip("needs a kernel with its virtio_net modules and a static busybox (apt-get download)")
    root.mkdir(parents=True)
    shutil.copyfile(kernel, root / "vmlinuz")
    files = {"/init": INIT % {"modules": " ".join(MODULES), "marker": MARKER}, "/bin/busybox": busybox}
    files.update({f"/lib/modules/{name}.ko": path for name, path in modules.items()})
    lh.build_initramfs(root / "initrd.img", files)
    if DISK:
        with open(root / "disk.raw", "wb") as f:
            f.write(b"CERANA-DATASET-DISK\n")
            f.truncate(1 << 20)
    for path in root.iterdir():
        path.chmod(0o444)  # read-only and world-readable, as an imported dataset
    root.chmod(0o555)


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0 or not all(shutil.which(t) for t in NEEDS):
        pytest.skip("needs root, " + ", ".join(NEEDS))
    pytest.importorskip("libvirt")
    net = free_subnet()
    bundle = "vm" + uuid.uuid4().hex[:6]
    bridge = "cvm" + uuid.uuid4().hex[:6]
    # QEMU runs as libvirt's unprivileged user: the overlay's directories must be traversable (not 0700)
    work = Path(tempfile.mkdtemp(prefix="cerana-vmtest-", dir="/var/tmp"))
    work.chmod(0o755)
    the_lab = VmLab(work, bundle, bridge, net)
    try:
        build_dataset(the_lab.dataset)
        (work / "data").chmod(0o755)
        (work / "data" / "datasets").chmod(0o755)
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "link", "set", bridge, "mtu", "1450")
        sh("ip", "addr", "add", f"{the_lab.gateway}/{net.prefixlen}", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
        _bundle_net.write_network(str(the_lab.run_dir), the_lab.record)
        with lh.libvirt_daemons():
            # the first domain start after libvirtd starts may probe QEMU's capabilities: do it up front
            sh("virsh", "-c", "qemu:///system", "domcapabilities", "--virttype", "qemu", timeout=300)
            try:
                yield the_lab
            finally:
                for name in (the_lab.domain, f"cerana-{bundle}-gone_guest", f"cerana-{bundle}-nonet_guest"):
                    the_lab.virsh("destroy", name)
                    the_lab.virsh("undefine", name)
    finally:
        sh("ip", "link", "del", bridge, check=False)
        shutil.rmtree(work, ignore_errors=True)


def declare(consul, kv_prefix, *objs):
    objects = Objects(_store.Store(_store.ConnectionSettings(address=consul.http_addr, prefix=kv_prefix)))
    for obj in objs:
        current = objects.get(obj.KIND, obj.id)
        objects.put(obj, cas=current.mod_index if current else 0)


def http_get(address):
    try:
        return urllib.request.urlopen(f"http://{address}/", timeout=3).read().decode().strip()
    except OSError:
        return None


def test_vm_service_lifecycle(lab, consul, kv_prefix, ansible_env):
    b = lab.bundle
    guest = {
        "id": "guest", "kind": "vm", "dataset": "vm-boot", "cmd": ["quiet", "panic=-1"],
        "env": {"GREETING": "hello"}, "limits": {"cpu": 1, "memory": 192 << 20},
    }  # fmt: skip
    declare(
        consul, kv_prefix,
        m.Dataset.from_dict({"id": "vm-boot", "read_only": True}),
        m.Dataset.from_dict({"id": "not-here", "read_only": True}),
        m.Service.from_dict(guest),
        m.Bundle.from_dict({"id": b, "services": {"guest": {}}}),
        m.Bundle.from_dict({"id": b + "-gone", "services": {"guest": {"dataset": "not-here"}}}),
        m.Bundle.from_dict({"id": b + "-nonet", "services": {"guest": {}}}),
    )  # fmt: skip
    before = {p.name: (p.stat().st_uid, p.stat().st_mode, p.read_bytes()) for p in lab.dataset.iterdir()}
    run = lambda *tasks: lab.playbook(ansible_env, kv_prefix, list(tasks))  # noqa: E731

    # check mode predicts and touches nothing
    res = run(("check", b, "started", {"_check": True}))["check"]
    assert not res["failed"] and res["changed"] and res["kind"] == "vm" and res["domain"] == lab.domain, res
    assert "<cmdline>console=ttyS0 quiet panic=-1 ip=" in res["diff"]["after"] and res["diff"]["before"] == ""
    assert lab.virsh("dominfo", lab.domain).returncode != 0 and not lab.vm_dir.exists()

    # started: the domain runs the dataset's kernel on the bridge with the bundle's MAC and address
    start = time.monotonic()
    res = run(("start", b, "started", {}), ("again", b, "started", {}))
    again, res = res["again"], res["start"]
    assert not res["failed"] and res["changed"] and res["active"] and not res["restarted"], res
    # a second run changes nothing
    assert not again["failed"] and not again["changed"] and again["main_pid"] == res["main_pid"], again
    assert res["main_pid"] == lab.qemu_pid() and res["overlay"] == (str(lab.vm_dir / "disk.qcow2") if DISK else None)
    assert lab.instance_record()["pid"] == res["main_pid"] and lab.instance_record()["datasets"] == ["vm-boot"]
    info = lab.virsh("dominfo", lab.domain, check=True).stdout
    assert "running" in info and "Autostart:      enable" in info
    assert lab.record.mac in lab.virsh("domiflist", lab.domain, check=True).stdout
    line = wait_for(lab.booted_line, BOOT_TIMEOUT, "the guest's marker on the serial console")
    lab.timings.append(("start to the guest's marker", time.monotonic() - start))
    assert f"addr={lab.address} mask=255.255.255.0 gw={lab.gateway} host=guest" in line, line
    disk = "CERANA-DATASET-DISK" if DISK else ""
    assert f"mac={lab.record.mac} mtu=1450 env=GREETING=hello disk={disk}" in line, lab.serial()
    page = wait_for(lambda: http_get(lab.address), 30, "the guest's web page on the bundle address")
    assert page == f"{lab.address} {lab.record.mac} GREETING=hello"
    ps = sh("ps", "-o", "user=", "-p", str(res["main_pid"])).stdout.strip()
    assert ps not in ("", "root"), "QEMU must run unprivileged"
    assert {p.name: (p.stat().st_uid, p.stat().st_mode, p.read_bytes()) for p in lab.dataset.iterdir()} == before

    # a changed env restarts only this domain; failures (dataset not on the node, no network
    # record) define nothing
    old_pid = res["main_pid"]
    declare(consul, kv_prefix, m.Bundle.from_dict({"id": b, "services": {"guest": {"env": {"GREETING": "bye"}}}}))
    res = run(("change", b, "started", {}), ("gone", b + "-gone", "started", {}),
              ("nonet", b + "-nonet", "started", {}))  # fmt: skip
    change = res["change"]
    assert not change["failed"] and change["changed"] and change["restarted"], change
    assert change["main_pid"] == lab.qemu_pid() != old_pid
    start = time.monotonic()
    line = wait_for(lab.booted_line, BOOT_TIMEOUT, "the restarted guest's marker")
    lab.timings.append(("then to the restarted guest's marker", time.monotonic() - start))
    assert "env=GREETING=bye" in line, line
    assert res["gone"]["failed"] and "dataset not-here of service guest is not on this node" in res["gone"]["msg"]
    assert res["nonet"]["failed"] and f"bundle {b}-nonet has no network on this node" in res["nonet"]["msg"]
    for name in (b + "-gone", b + "-nonet"):
        assert lab.virsh("dominfo", f"cerana-{name}_guest").returncode != 0
        assert not (lab.data_dir / "vms" / f"{name}_guest").exists()

    # stopped: defined, shut down, autostart off, record removed; then absent removes everything
    res = run(("stop", b, "stopped", {}), ("stop again", b, "stopped", {}))
    assert not res["stop"]["failed"] and res["stop"]["changed"] and not res["stop"]["active"], res
    assert not res["stop again"]["changed"], res
    info = lab.virsh("dominfo", lab.domain, check=True).stdout
    assert "shut off" in info and "Autostart:      disable" in info
    assert lab.instance_record() is None
    res = run(("absent", b, "absent", {}), ("absent again", b, "absent", {}))
    assert not res["absent"]["failed"] and res["absent"]["changed"], res
    assert not res["absent again"]["changed"], res
    assert lab.virsh("dominfo", lab.domain).returncode != 0
    assert not lab.vm_dir.exists() and lab.instance_record() is None
    assert {p.name: (p.stat().st_uid, p.stat().st_mode, p.read_bytes()) for p in lab.dataset.iterdir()} == before
    print("\n" + "\n".join(f"{what}: {took:.1f} s" for what, took in lab.timings))

"""VM services: the domain XML (pure) and the lifecycle against libvirt's test driver.

The lifecycle tests share one ``test:///default`` connection (the driver keeps its state per
connection) and use a name per test. The driver runs no QEMU, so the instance's pid comes
from a stand-in ``pid_of`` (this test process, which exists).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net, _instances
from ansible_collections.cerana.platform.plugins.module_utils import _vm as vm
from ansible_collections.cerana.platform.plugins.module_utils._service_units import SpecError
from ansible_collections.cerana.platform.plugins.module_utils._systemd import InstanceError

libvirt = pytest.importorskip("libvirt")

NET = _bundle_net.NetworkRecord(
    bundle="shop", netns="cerana-shop", address="10.240.3.7", prefix_len=16, gateway="10.240.0.1",
    mac="02:aa:bb:cc:dd:ee", host_veth="cbn000000000000",
)  # fmt: skip
KERNEL_FILES = {"vmlinuz", "initrd.img"}


def overlay(bundle="shop", service="vm", **svc):
    base = {"id": service, "kind": "vm", "dataset": "img", "cmd": ["quiet"], "env": {}, "limits": {}, "datasets": {}}
    base.update(svc)
    return {"id": bundle, "services": {service: base}, "datasets": {}}


def spec_for(tmp_path, bundle="shop", files=KERNEL_FILES, network=NET, label=None, **svc):
    return vm.build_vm_spec(
        overlay(bundle, **svc), "vm", str(tmp_path / "data"), str(tmp_path / "run"), network, files,
        bridge="br-test", mtu=1450, qemu_label=label,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# The spec and the XML


def test_spec_direct_kernel_boot(tmp_path):
    spec = spec_for(tmp_path, limits={"cpu": 1.5, "memory": (300 << 20) + 1}, env={"B": "2", "A": "1"})
    root = str(tmp_path / "data" / "datasets" / "img")
    assert (spec.kernel, spec.initrd, spec.disk) == (root + "/vmlinuz", root + "/initrd.img", None)
    assert spec.name == "cerana-shop_vm"
    assert spec.vcpus == 2  # ceil(1.5)
    assert spec.memory_kib == (300 << 10) + 1  # bytes rounded up to KiB
    assert spec.env == (("A", "1"), ("B", "2"))
    assert spec.cmdline == "console=ttyS0 quiet ip=10.240.3.7::10.240.0.1:255.255.0.0:vm::off"


def test_spec_defaults_and_own_console_and_ip(tmp_path):
    spec = spec_for(tmp_path, cmd=["console=hvc0", "ip=dhcp"], files={"vmlinuz"})
    assert spec.cmdline == "console=hvc0 ip=dhcp"
    assert spec.initrd is None
    assert spec.memory_kib == vm.DEFAULT_MEMORY // 1024 and spec.vcpus == 1


def test_spec_disk_boot(tmp_path):
    spec = spec_for(tmp_path, cmd=[], files={"disk.qcow2"})
    assert spec.kernel is None and spec.cmdline is None
    assert (spec.disk.endswith("/img/disk.qcow2"), spec.disk_format) == (True, "qcow2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(files=set()), "has no VM boot material"),
        (dict(files={"disk.raw", "disk.qcow2"}), "keep one disk image"),
        (dict(files={"disk.raw"}), "cmd is a kernel command line, but dataset img has no vmlinuz"),
        (dict(files={"initrd.img", "disk.raw"}, cmd=[]), "has initrd.img but no vmlinuz"),
        (dict(network=None), "bundle shop has no network on this node"),
        (dict(datasets={"data": {"mount_point": "/data"}}), "bundle datasets (data) are not supported"),
        (dict(kind="container"), "is not a vm"),
    ],
)
def test_spec_errors(tmp_path, kwargs, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        spec_for(tmp_path, **kwargs)


def test_spec_unknown_service(tmp_path):
    with pytest.raises(SpecError, match="bundle shop has no service web"):
        vm.build_vm_spec(overlay(), "web", "/d", "/r", NET, KERNEL_FILES)


def test_render_domain(tmp_path):
    spec = spec_for(tmp_path, env={"GREETING": "a<b&c"}, label="+64055:+64055")
    xml, digest = vm.render_domain(spec)
    assert vm.render_domain(spec) == (xml, digest)  # deterministic
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"  # TCG, never kvm
    assert root.findtext("name") == "cerana-shop_vm"
    assert root.findtext("uuid") == str(uuid.uuid5(vm.UUID_NAMESPACE, "cerana-shop_vm"))
    meta = root.find("metadata/{%s}instance" % vm.METADATA_NS)
    assert (meta.get("bundle"), meta.get("service"), meta.get("dataset"), meta.get("hash")) == (
        "shop", "vm", "img", digest)  # fmt: skip
    assert vm.metadata_hash(xml) == digest
    assert root.find("features/acpi") is not None
    assert root.findtext("os/kernel").endswith("/datasets/img/vmlinuz")
    assert root.findtext("os/cmdline") == spec.cmdline
    assert root.find("os/smbios").get("mode") == "sysinfo"
    assert [e.text for e in root.findall("sysinfo/oemStrings/entry")] == ["GREETING=a<b&c"]
    nic = root.find("devices/interface")
    assert nic.get("type") == "bridge"
    assert nic.find("source").get("bridge") == "br-test"
    assert nic.find("mac").get("address") == NET.mac
    assert nic.find("model").get("type") == "virtio"
    assert nic.find("mtu").get("size") == "1450"
    serial = root.find("devices/serial")
    assert serial.find("source").get("path") == str(tmp_path / "data" / "vms" / "shop_vm" / "serial.log")
    sec = root.find("seclabel")
    assert (sec.get("model"), sec.get("relabel"), sec.findtext("label")) == ("dac", "no", "+64055:+64055")
    assert root.find("devices/disk") is None
    # any change of the spec changes the hash
    assert vm.render_domain(spec_for(tmp_path, env={"GREETING": "x"}, label="+64055:+64055"))[1] != digest


def test_render_disk_overlay(tmp_path):
    spec = spec_for(tmp_path, cmd=[], files={"disk.raw"})
    xml, _digest = vm.render_domain(spec)
    disk = ET.fromstring(xml).find("devices/disk")
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("source").get("file") == str(tmp_path / "data" / "vms" / "shop_vm" / "disk.qcow2")
    assert disk.find("backingStore/source").get("file") == spec.disk
    assert disk.find("backingStore/format").get("type") == "raw"
    assert vm.overlay_backing(xml) == (spec.disk, "raw")
    assert ET.fromstring(xml).find("os/boot").get("dev") == "hd"


def test_bridge_mtu_and_netns_conflict(tmp_path):
    (tmp_path / "br0" / "bridge").mkdir(parents=True)
    (tmp_path / "br0" / "mtu").write_text("1450\n")
    (tmp_path / "eth9").mkdir()
    assert vm.bridge_mtu("br0", str(tmp_path)) == 1450
    assert vm.bridge_mtu("eth9", str(tmp_path)) is None  # not a bridge
    assert vm.bridge_mtu("nope", str(tmp_path)) is None
    assert not vm.address_taken_by_netns(NET, str(tmp_path))
    (tmp_path / NET.host_veth).mkdir()
    assert vm.address_taken_by_netns(NET, str(tmp_path))


# ---------------------------------------------------------------------------
# The lifecycle on the test driver


@pytest.fixture(scope="module")
def conn():
    c = vm.open_connection("test:///default")
    yield c
    c.close()


@pytest.fixture
def bundle(conn):
    """A bundle id per test; its domain is removed afterwards whatever happened."""
    bid = "t" + uuid.uuid4().hex[:8]
    yield bid
    try:
        dom = conn.lookupByName(vm.domain_name(bid, "vm"))
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    if dom.isPersistent():
        dom.undefine()


def pid_of(_dom):
    return os.getpid()


def ensure(conn, spec, state, check_mode=False):
    return vm.ensure_vm(conn, spec, state, check_mode, shutdown_timeout=1, settle=0, pid_of=pid_of)


def record(spec):
    path = _instances.instance_path(spec.place.run_dir, spec.place.bundle, spec.place.service)
    return json.loads(open(path).read()) if os.path.exists(path) else None


def test_lifecycle(conn, bundle, tmp_path):
    spec = spec_for(tmp_path, bundle=bundle, env={"A": "1"})
    name = spec.name

    predicted = ensure(conn, spec, "started", check_mode=True)
    assert predicted["changed"] and predicted["active"]
    assert name not in conn.listDefinedDomains() and record(spec) is None  # check mode did nothing

    first = ensure(conn, spec, "started")
    assert first["changed"] and first["active"] and not first["restarted"]
    assert first["main_pid"] == os.getpid()
    dom = conn.lookupByName(name)
    assert dom.isActive() and dom.isPersistent() and dom.autostart()
    assert vm.metadata_hash(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == first["domain_hash"]
    assert record(spec)["pid"] == os.getpid() and record(spec)["datasets"] == ["img"]
    assert os.path.isdir(spec.place.vm_dir)
    dom_id = dom.ID()

    again = ensure(conn, spec, "started")
    assert not again["changed"] and again["active"] and again["main_pid"] == os.getpid()
    assert conn.lookupByName(name).ID() == dom_id  # not restarted
    assert not ensure(conn, spec, "started", check_mode=True)["changed"]

    # the record is put back when it is missing (e.g. /run was emptied) without a restart
    _instances.remove_instance(spec.place.run_dir, bundle, "vm")
    repaired = ensure(conn, spec, "started")
    assert repaired["changed"] and not repaired["restarted"] and record(spec)["pid"] == os.getpid()
    assert conn.lookupByName(name).ID() == dom_id

    changed = spec_for(tmp_path, bundle=bundle, env={"A": "2"})
    assert ensure(conn, changed, "started", check_mode=True)["changed"]
    assert conn.lookupByName(name).ID() == dom_id
    restarted = ensure(conn, changed, "started")
    assert restarted["changed"] and restarted["restarted"] and restarted["active"]
    dom = conn.lookupByName(name)
    assert dom.isActive() and dom.ID() != dom_id
    assert vm.metadata_hash(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == restarted["domain_hash"]
    assert "<entry>A=2</entry>" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    stopped = ensure(conn, changed, "stopped")
    assert stopped["changed"] and not stopped["active"] and stopped["main_pid"] is None
    dom = conn.lookupByName(name)
    assert not dom.isActive() and dom.isPersistent() and not dom.autostart()
    assert record(spec) is None
    assert not ensure(conn, changed, "stopped")["changed"]

    started = ensure(conn, changed, "started")
    assert started["changed"] and not started["restarted"] and conn.lookupByName(name).isActive()

    gone = ensure(conn, spec.place, "absent")
    assert gone["changed"] and not gone["active"]
    assert name not in conn.listDefinedDomains() + [d.name() for d in conn.listAllDomains()]
    assert record(spec) is None and not os.path.exists(spec.place.vm_dir)
    assert not ensure(conn, spec.place, "absent")["changed"]


def test_stopped_from_nothing_defines_only(conn, bundle, tmp_path):
    spec = spec_for(tmp_path, bundle=bundle)
    res = ensure(conn, spec, "stopped")
    assert res["changed"] and not res["active"]
    dom = conn.lookupByName(spec.name)
    assert dom.isPersistent() and not dom.isActive() and not dom.autostart()
    # a spec change while stopped redefines without starting
    res = ensure(conn, spec_for(tmp_path, bundle=bundle, limits={"memory": 512 << 20}), "stopped")
    assert res["changed"] and not conn.lookupByName(spec.name).isActive()
    assert conn.lookupByName(spec.name).maxMemory() == 512 << 10


def test_transient_domain_with_the_name_is_replaced(conn, bundle, tmp_path):
    spec = spec_for(tmp_path, bundle=bundle)
    xml, _ = vm.render_domain(spec_for(tmp_path, bundle=bundle, env={"OLD": "1"}))
    conn.createXML(xml, 0)  # running, not persistent
    res = ensure(conn, spec, "started")
    assert res["changed"] and res["restarted"]
    dom = conn.lookupByName(spec.name)
    assert dom.isPersistent() and dom.isActive() and "OLD=1" not in dom.XMLDesc(0)


def test_failed_start_of_a_new_domain_leaves_nothing(conn, bundle, tmp_path):
    spec = spec_for(tmp_path, bundle=bundle)

    def gone(_dom):  # the domain dies right after starting
        _dom.destroy()
        return None

    with pytest.raises(InstanceError, match="did not stay running after starting; the domain was removed"):
        vm.ensure_vm(conn, spec, "started", False, settle=0, pid_of=gone)
    assert spec.name not in conn.listDefinedDomains()
    assert record(spec) is None and not os.path.exists(spec.place.vm_dir)


def test_failed_restart_puts_the_previous_definition_back(conn, bundle, tmp_path):
    spec = spec_for(tmp_path, bundle=bundle, env={"V": "1"})
    first = ensure(conn, spec, "started")

    def gone(_dom):
        _dom.destroy()
        return None

    with pytest.raises(InstanceError, match="the previous definition was put back and started"):
        vm.ensure_vm(conn, spec_for(tmp_path, bundle=bundle, env={"V": "2"}), "started", False, settle=0,
                     pid_of=gone)  # fmt: skip
    dom = conn.lookupByName(spec.name)
    assert dom.isActive()
    assert vm.metadata_hash(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == first["domain_hash"]


def test_open_connection_error():
    with pytest.raises(InstanceError, match=re.escape("cannot connect to libvirt at test:///nonexistent-file.xml")):
        vm.open_connection("test:///nonexistent-file.xml")


def test_open_connection_without_libvirt_python(monkeypatch):
    monkeypatch.setattr(vm, "libvirt", None)
    with pytest.raises(InstanceError, match=re.escape("the libvirt Python binding (libvirt-python) is not installed")):
        vm.open_connection("qemu:///system")


def test_qemu_label_of_the_test_driver_is_none(conn):
    assert vm.qemu_label(conn) is None


# ---------------------------------------------------------------------------
# The overlay (needs qemu-img)


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img (qemu-utils)")
def test_overlay_is_fresh_and_backed_by_the_dataset_image(conn, bundle, tmp_path):
    spec = spec_for(tmp_path, bundle=bundle, cmd=[], files={"disk.raw"})
    os.makedirs(spec.root)
    with open(spec.disk, "wb") as f:
        f.truncate(1 << 20)
    os.chmod(spec.disk, 0o444)
    res = ensure(conn, spec, "started")
    assert res["overlay"] == spec.place.overlay
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", spec.place.overlay], capture_output=True,
                                     check=True, text=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == spec.disk and info["backing-filename-format"] == "raw"
    assert oct(os.stat(spec.place.overlay).st_mode & 0o777) == "0o600"
    with open(spec.place.overlay, "ab") as f:
        f.write(b"guest writes")
    size = os.path.getsize(spec.place.overlay)
    assert not ensure(conn, spec, "started")["changed"]
    assert os.path.getsize(spec.place.overlay) == size  # a running domain's overlay is left alone
    ensure(conn, spec, "stopped")
    ensure(conn, spec, "started")
    assert os.path.getsize(spec.place.overlay) < size  # made afresh at the start
    ensure(conn, spec.place, "absent")
    assert not os.path.exists(spec.place.vm_dir)
    assert os.path.getsize(spec.disk) == 1 << 20


def test_disk_without_qemu_img_fails_before_anything(conn, bundle, tmp_path, monkeypatch):
    spec = spec_for(tmp_path, bundle=bundle, cmd=[], files={"disk.raw"})
    monkeypatch.setattr(vm.shutil, "which", lambda _name: None)
    with pytest.raises(InstanceError, match=re.escape("qemu-img (Debian qemu-utils) is not installed")):
        ensure(conn, spec, "started")
    assert spec.name not in conn.listDefinedDomains() and not os.path.exists(spec.place.vm_dir)
    assert not ensure(conn, spec, "absent")["changed"]

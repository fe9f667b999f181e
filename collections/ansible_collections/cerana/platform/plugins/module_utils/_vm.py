# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""VM services (``kind: vm``): one libvirt domain per instance. docs/services.md, "VM services".

Pure parts: ``build_vm_spec`` (the bundle overlay + what is on the node -> ``VmSpec``) and
``render_domain`` (``VmSpec`` -> domain XML, same spec -> same bytes). Lifecycle:
``ensure_vm(conn, spec, state, check_mode)`` defines, starts, stops and undefines the domain
through a libvirt connection object, so it runs unchanged against ``test:///default``.

One instance = one domain ``cerana-<bundle>_<service>`` (``_`` cannot occur in either id),
always ``type='qemu'`` (TCG; never KVM). The dataset ``<data_dir>/datasets/<id>`` holds the
boot material, read-only:

- ``vmlinuz`` (+ optional ``initrd.img``): direct kernel boot, ``cmd`` joined by spaces is
  the kernel command line (``console=ttyS0`` and the bundle address as ``ip=`` are added
  unless ``cmd`` has them);
- ``disk.qcow2`` or ``disk.raw``: the first virtio disk (``vda``), through a qcow2 overlay
  ``<data_dir>/vms/<bundle>_<service>/disk.qcow2`` backed by the dataset image. Without a
  kernel the VM boots from that disk (SeaBIOS) and ``cmd`` must be empty. The overlay is
  made afresh whenever ``ensure_vm`` starts the domain: the disk is scratch, as a
  container's root is read-only and its ``/tmp`` new at every start.

The serial console goes to ``<data_dir>/vms/<bundle>_<service>/serial.log`` (truncated at
each start); the NIC joins the node's bridge with the bundle's MAC (``_bundle_net`` record).

QEMU runs as libvirt's unprivileged DAC user with ``relabel='no'``: libvirt would otherwise
chown the kernel, initrd and backing image inside the dataset (and does not always give the
backing image back). The module creates the overlay and hands it to that user itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
import os
import re
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET

try:
    import libvirt
except ImportError:  # reported by open_connection(); the rest of this file works without it
    libvirt = None

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net, _instances
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._files import read_text, remove_file
from ansible_collections.cerana.platform.plugins.module_utils._service_units import DATASETS_DIR, SpecError
from ansible_collections.cerana.platform.plugins.module_utils._systemd import InstanceError

DOMAIN_PREFIX = "cerana-"
METADATA_NS = "urn:cerana:platform:vm:1"
# Domain UUIDs are derived from the domain name, so a redefinition keeps its UUID.
UUID_NAMESPACE = uuid.UUID("6f3c1d2e-8a4b-5c6d-9e0f-c3e7a0a1b2d4")
KERNEL = "vmlinuz"
INITRD = "initrd.img"
DISK_IMAGES = (("disk.qcow2", "qcow2"), ("disk.raw", "raw"))
# <data_dir>/vms/<bundle>_<service>/: the overlay and the serial log. Not below run_dir (a tmpfs): libvirt
# autostarts the domain after a reboot and cannot open a serial log in a directory that is gone.
VMS_DIR = "vms"
OVERLAY = "disk.qcow2"
SERIAL_LOG = "serial.log"
DEFAULT_MEMORY = 256 << 20  # bytes, when the service sets no memory limit
DEFAULT_BRIDGE = _bundle_net.BRIDGE


def domain_name(bundle, service):
    return "%s%s_%s" % (DOMAIN_PREFIX, bundle, service)


@dataclasses.dataclass(frozen=True)
class VmPlace:
    """Where one VM instance lives on the node: enough to remove it without reading Consul."""

    bundle: str
    service: str
    data_dir: str
    run_dir: str

    @property
    def name(self):
        return domain_name(self.bundle, self.service)

    @property
    def vm_dir(self):
        return os.path.join(self.data_dir, VMS_DIR, "%s_%s" % (self.bundle, self.service))

    @property
    def overlay(self):
        return os.path.join(self.vm_dir, OVERLAY)

    @property
    def serial_log(self):
        return os.path.join(self.vm_dir, SERIAL_LOG)


@dataclasses.dataclass(frozen=True)
class VmSpec:
    """Everything the domain of one instance is rendered from."""

    place: VmPlace
    dataset: str
    root: str  # <data_dir>/datasets/<dataset>
    kernel: str | None  # host paths inside root
    initrd: str | None
    cmdline: str | None
    disk: str | None
    disk_format: str | None
    memory_kib: int
    vcpus: int
    env: tuple  # ((name, value), ...) sorted
    network: _bundle_net.NetworkRecord | None  # address, prefix_len, gateway, mac
    bridge: str
    mtu: int | None  # of the bridge; None: libvirt's default
    qemu_label: str | None  # "+uid:+gid" QEMU runs as; None: leave it to libvirt (test driver)

    @property
    def name(self):
        return self.place.name


# ---------------------------------------------------------------------------
# The spec


def boot_files(root):
    """The names of the boot material found at the top of a dataset directory."""
    names = {KERNEL, INITRD} | {name for name, _fmt in DISK_IMAGES}
    return {n for n in names if os.path.isfile(os.path.join(root, n))}


def bridge_mtu(bridge, sys_class_net="/sys/class/net"):
    """The MTU of the node's bridge, or None when there is no such bridge."""
    if not os.path.isdir(os.path.join(sys_class_net, bridge, "bridge")):
        return None
    text = read_text(os.path.join(sys_class_net, bridge, "mtu"))
    return int(text) if text and text.strip().isdigit() else None


def address_taken_by_netns(network, sys_class_net="/sys/class/net"):
    """Whether the bundle's network namespace holds the address too (its veth exists on the node).

    The VM answers for the bundle's address and MAC itself, on the bridge; a namespace
    ``eth0`` with the same address and MAC on the same bridge would make both unreachable.
    """
    veth = getattr(network, "host_veth", None)
    return bool(veth) and os.path.exists(os.path.join(sys_class_net, veth))


def kernel_cmdline(cmd, service, network):
    """``cmd`` as a kernel command line, with ``console=ttyS0`` and the bundle address as ``ip=``
    (``ip=<address>::<gateway>:<netmask>:<service>::off``) unless ``cmd`` sets them."""
    args = list(cmd)
    if not any(a.startswith("console=") for a in args):
        args.insert(0, "console=ttyS0")
    if network is not None and not any(a.startswith("ip=") for a in args):
        netmask = ipaddress.IPv4Network("0.0.0.0/%d" % network.prefix_len).netmask
        args.append("ip=%s::%s:%s:%s::off" % (network.address, network.gateway or "", netmask, service))
    return " ".join(args)


def build_vm_spec(
    overlay, service_id, data_dir, run_dir, network, files, bridge=DEFAULT_BRIDGE, mtu=None, qemu_label=None
):
    """A VmSpec from ``Objects.overlay(bundle)`` (a dict) for one of its services.

    ``files``: ``boot_files(root)`` of the service's dataset directory; ``network``: the
    bundle's ``_bundle_net.NetworkRecord`` on this node (required); ``mtu``: the bridge's MTU
    (None: unknown). Raises SpecError saying what is wrong.
    """
    bundle_id = overlay["id"]
    svc = overlay["services"].get(service_id)
    if svc is None:
        raise SpecError(
            "bundle %s has no service %s (it has: %s)"
            % (bundle_id, service_id, ", ".join(sorted(overlay["services"])) or "none")
        )
    if svc.get("kind", "container") != "vm":
        raise SpecError("service %s of bundle %s is not a vm" % (service_id, bundle_id))
    if svc.get("datasets"):
        raise SpecError(
            "service %s of bundle %s: bundle datasets (%s) are not supported for VM services yet"
            % (service_id, bundle_id, ", ".join(sorted(svc["datasets"])))
        )
    if network is None:
        raise SpecError(
            "bundle %s has no network on this node (no %s); set it up first (cerana.platform.bundle_network)"
            % (bundle_id, _bundle_net.network_record_path(run_dir, bundle_id))
        )
    dataset = svc["dataset"]
    root = os.path.join(data_dir, DATASETS_DIR, dataset)
    disks = [(name, fmt) for name, fmt in DISK_IMAGES if name in files]
    if len(disks) > 1:
        raise SpecError("dataset %s has both %s; keep one disk image" % (dataset, " and ".join(d[0] for d in disks)))
    kernel = KERNEL in files
    if not kernel and not disks:
        raise SpecError(
            "dataset %s of service %s has no VM boot material (%s, or %s)"
            % (dataset, service_id, KERNEL, " or ".join(d[0] for d in DISK_IMAGES))
        )
    cmd = tuple(svc.get("cmd") or ())
    if not kernel and cmd:
        raise SpecError(
            "service %s of bundle %s: cmd is a kernel command line, but dataset %s has no %s"
            % (service_id, bundle_id, dataset, KERNEL)
        )
    if INITRD in files and not kernel:
        raise SpecError("dataset %s has %s but no %s" % (dataset, INITRD, KERNEL))
    limits = svc.get("limits") or {}
    memory = limits.get("memory") or DEFAULT_MEMORY
    cpu = limits.get("cpu")
    return VmSpec(
        place=VmPlace(bundle_id, service_id, data_dir, run_dir),
        dataset=dataset,
        root=root,
        kernel=os.path.join(root, KERNEL) if kernel else None,
        initrd=os.path.join(root, INITRD) if kernel and INITRD in files else None,
        cmdline=kernel_cmdline(cmd, service_id, network) if kernel else None,
        disk=os.path.join(root, disks[0][0]) if disks else None,
        disk_format=disks[0][1] if disks else None,
        memory_kib=-(-int(memory) // 1024),
        vcpus=max(1, math.ceil(cpu)) if cpu else 1,
        env=tuple(sorted((svc.get("env") or {}).items())),
        network=network,
        bridge=bridge,
        mtu=mtu,
        qemu_label=qemu_label,
    )


def node_spec(conn, overlay, service_id, data_dir, run_dir, bridge, state):
    """build_vm_spec with what this node has: the dataset directory, the bundle's network record,
    the bridge's MTU and libvirt's QEMU user. Raises InstanceError or SpecError before anything
    is changed: dataset not here, record unreadable, the bundle's namespace holding the address,
    no bridge (for ``started``)."""
    bundle_id = overlay["id"]
    svc = overlay["services"].get(service_id) or {}
    dataset = svc.get("dataset")
    root = os.path.join(data_dir, DATASETS_DIR, dataset or "")
    if dataset and not os.path.isdir(root):
        raise InstanceError(
            "dataset %s of service %s is not on this node (no directory %s)" % (dataset, service_id, root),
            dataset=dataset,
        )
    try:
        network = _bundle_net.read_network(run_dir, bundle_id)
    except m.ValidationError as e:
        raise InstanceError("the network record of bundle %s cannot be read: %s" % (bundle_id, e)) from None
    if network is not None and address_taken_by_netns(network):
        raise InstanceError(
            "bundle %s has a network namespace on this node (veth %s) holding its address %s; a VM answers for "
            "that address on the bridge itself: set up a VM bundle with cerana.platform.bundle_network namespace=false"
            % (bundle_id, network.host_veth, network.address)
        )
    mtu = bridge_mtu(bridge)
    if mtu is None and state == "started":
        raise InstanceError(
            "the bridge %s does not exist on this node (cerana.platform.bundle_network creates it)" % bridge
        )
    files = boot_files(root) if dataset else set()
    return build_vm_spec(
        overlay, service_id, data_dir, run_dir, network, files, bridge=bridge, mtu=mtu, qemu_label=qemu_label(conn)
    )


# ---------------------------------------------------------------------------
# The domain XML


def _sub(parent, tag, text=None, **attrs):
    el = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def _render(spec, digest):
    dom = ET.Element("domain", {"type": "qemu"})
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", uuid.uuid5(UUID_NAMESPACE, spec.name))
    _sub(dom, "title", "cerana bundle %s service %s" % (spec.place.bundle, spec.place.service))
    meta = _sub(dom, "metadata")
    ET.register_namespace("cerana", METADATA_NS)
    _sub(
        meta,
        "{%s}instance" % METADATA_NS,
        bundle=spec.place.bundle,
        service=spec.place.service,
        dataset=spec.dataset,
        hash=digest,
    )
    _sub(dom, "memory", spec.memory_kib, unit="KiB")
    _sub(dom, "vcpu", spec.vcpus)
    if spec.env:
        sysinfo = _sub(dom, "sysinfo", type="smbios")
        oem = _sub(sysinfo, "oemStrings")
        for key, value in spec.env:
            _sub(oem, "entry", "%s=%s" % (key, value))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if spec.kernel:
        _sub(os_el, "kernel", spec.kernel)
        if spec.initrd:
            _sub(os_el, "initrd", spec.initrd)
        _sub(os_el, "cmdline", spec.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    if spec.env:
        _sub(os_el, "smbios", mode="sysinfo")
    _sub(_sub(dom, "features"), "acpi")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "restart")
    devices = _sub(dom, "devices")
    if spec.disk:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="qcow2")
        _sub(disk, "source", file=spec.place.overlay)
        backing = _sub(disk, "backingStore", type="file")
        _sub(backing, "format", type=spec.disk_format)
        _sub(backing, "source", file=spec.disk)
        _sub(backing, "backingStore")
        _sub(disk, "target", dev="vda", bus="virtio")
    if spec.network is not None:
        nic = _sub(devices, "interface", type="bridge")
        _sub(nic, "source", bridge=spec.bridge)
        _sub(nic, "mac", address=spec.network.mac)
        _sub(nic, "model", type="virtio")
        if spec.mtu:
            _sub(nic, "mtu", size=spec.mtu)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=spec.place.serial_log, append="off")
    _sub(serial, "target", port=0)
    if spec.qemu_label:
        seclabel = _sub(dom, "seclabel", type="static", model="dac", relabel="no")
        _sub(seclabel, "label", spec.qemu_label)
    ET.indent(dom, "  ")
    return ET.tostring(dom, encoding="unicode") + "\n"


def render_domain(spec):
    """(domain XML, its hash). The hash is of the XML with an empty hash attribute and is stored in
    the domain's metadata, so a later run can tell whether the defined domain is this spec."""
    digest = "sha256:" + hashlib.sha256(_render(spec, "").encode("utf-8")).hexdigest()
    return _render(spec, digest), digest


def metadata_hash(xml):
    """The hash recorded in a domain's XML by render_domain, or None."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    el = root.find("metadata/{%s}instance" % METADATA_NS)
    return None if el is None else el.get("hash")


def overlay_backing(xml):
    """(backing file, format) of the first disk of a domain XML, or None."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for disk in root.findall("devices/disk"):
        src, fmt = disk.find("backingStore/source"), disk.find("backingStore/format")
        if src is not None and src.get("file") and fmt is not None:
            return src.get("file"), fmt.get("type")
    return None


def qemu_label(conn):
    """The ``+uid:+gid`` libvirt runs QEMU as (its DAC security model), or None (e.g. the test driver)."""
    try:
        caps = ET.fromstring(conn.getCapabilities())
    except ET.ParseError:
        return None
    for sec in caps.findall("host/secmodel"):
        if (sec.findtext("model") or "") == "dac":
            for base in sec.findall("baselabel"):
                if base.get("type") == "qemu" and base.text:
                    return base.text.strip()
    return None


def _label_ids(label):
    """(uid, gid) from ``+uid:+gid``, or None."""
    found = re.match(r"^\+?(\d+):\+?(\d+)$", label or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


# ---------------------------------------------------------------------------
# Files on the node


def make_overlay(place, backing, fmt, label, qemu_img=None):
    """A fresh qcow2 overlay ``place.overlay`` over ``backing`` (read-only, never written),
    owned by the QEMU user. Replaces an existing one."""
    qemu_img = qemu_img or shutil.which("qemu-img")
    if not qemu_img:
        raise InstanceError("qemu-img (Debian qemu-utils) is not installed on this node; the VM's disk needs it")
    os.makedirs(place.vm_dir, mode=0o755, exist_ok=True)
    tmp = os.path.join(place.vm_dir, ".tmp-" + OVERLAY)
    remove_file(tmp)
    proc = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, tmp],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        remove_file(tmp)
        raise InstanceError("cannot create the overlay of %s: %s" % (backing, (proc.stderr or proc.stdout).strip()))
    os.chmod(tmp, 0o600)
    ids = _label_ids(label)
    if ids:
        os.chown(tmp, *ids)
    os.replace(tmp, place.overlay)


def remove_vm_files(place):
    """The instance's directory: overlay and serial log (no error when missing)."""
    shutil.rmtree(place.vm_dir, ignore_errors=True)


def serial_tail(place, lines=20):
    text = read_text(place.serial_log) or ""
    return "\n".join(text.splitlines()[-lines:])


def qemu_pid(dom):
    """The QEMU process of a running domain: libvirt's pid file for qemu:///system, else a /proc
    scan for ``-name guest=<name>,``; None when not found (e.g. the test driver)."""
    name = dom.name()
    text = read_text("/run/libvirt/qemu/%s.pid" % name)
    if text and text.strip().isdigit() and _instances.pid_running(int(text.strip())):
        return int(text.strip())
    needle = ("guest=%s," % name).encode()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"-name" in args and any(a.startswith(needle) for a in args) and b"qemu" in args[0]:
            return pid
    return None


# ---------------------------------------------------------------------------
# Lifecycle


def open_connection(uri):
    """A libvirt connection; InstanceError when libvirt-python is missing or libvirtd is not reachable."""
    if libvirt is None:
        raise InstanceError(
            "the libvirt Python binding (libvirt-python) is not installed for the interpreter running this "
            "module; VM services need it (and libvirtd) on the node"
        )
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise InstanceError("cannot connect to libvirt at %s: %s" % (uri, e), libvirt_uri=uri) from None


def _lookup(conn, name):
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _is_active(dom):
    """Whether the domain runs; False once it is gone (a transient domain vanishes when it stops)."""
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise


def stop_domain(dom, timeout):
    """ACPI shutdown, then destroy after ``timeout`` seconds (at once when timeout <= 0)."""
    if not _is_active(dom):
        return
    if timeout > 0:
        try:
            dom.shutdown()
        except libvirt.libvirtError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _is_active(dom):
            time.sleep(0.2)
    if _is_active(dom):
        try:
            dom.destroy()
        except libvirt.libvirtError:
            if _is_active(dom):
                raise


def _record_pid(place):
    text = read_text(_instances.instance_path(place.run_dir, place.bundle, place.service))
    if not text:
        return None
    try:
        return _instances.parse_instance(place.bundle, place.service, text).pid
    except m.ValidationError:
        return None


def _write_record(spec, pid):
    place = spec.place
    if pid is None:
        _instances.remove_instance(place.run_dir, place.bundle, place.service)
        return
    instance = _instances.Instance(
        bundle=place.bundle,
        service=place.service,
        pid=pid,
        started=m.format_time(m.utc_now()),
        datasets=(spec.dataset,),
    )
    _instances.write_instance(place.run_dir, instance)


def _wait_started(dom, settle, pid_of):
    """(True, pid) when the domain stayed running with the same QEMU process for ``settle`` s."""
    first = None
    deadline = time.monotonic() + max(5.0, settle * 3)
    while time.monotonic() < deadline:
        state = dom.state()[0] if dom.isActive() else None
        if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
            pid = pid_of(dom)
            now = time.monotonic()
            if first is None:
                first = (now, pid)
            elif pid != first[1]:
                return False, None
            elif now - first[0] >= settle:
                return True, pid
        elif first is not None or state is None:
            return False, None
        time.sleep(0.1)
    return False, None


def ensure_vm(conn, spec, state, check_mode, shutdown_timeout=30.0, settle=1.0, pid_of=qemu_pid):
    """Bring the domain of ``spec`` (a VmSpec; a VmPlace is enough for ``absent``) to ``state``.

    ``started``: defined with the rendered XML, autostart on, running, instance recorded.
    ``stopped``: defined with the rendered XML, autostart off, shut down, record removed.
    ``absent``: destroyed, undefined, overlay and serial log removed, record removed.
    Only a changed XML (its hash in the metadata) or state does anything; a changed XML of a
    running domain shuts it down, redefines it and starts it again (with a fresh overlay).
    Returns the result dict (``changed``, ``active``, ``main_pid``, ``restarted``, ...).
    """
    place = spec if isinstance(spec, VmPlace) else spec.place
    dom = _lookup(conn, place.name)
    active = bool(dom and dom.isActive())
    persistent = bool(dom and dom.isPersistent())
    before = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if dom else ""
    record = _record_pid(place)
    result = {"domain": place.name, "restarted": False, "overlay": None, "serial_log": place.serial_log}

    if state == "absent":
        leftovers = os.path.exists(place.vm_dir) or record is not None
        result.update(changed=dom is not None or leftovers, domain_hash=None, active=False, main_pid=None)
        result["diff"] = {"before": before, "after": ""}
        if check_mode or not result["changed"]:
            return result
        if dom is not None:
            stop_domain(dom, 0)
            if persistent:
                try:
                    dom.undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    )
                except libvirt.libvirtError:
                    dom.undefine()
        remove_vm_files(place)
        _instances.remove_instance(place.run_dir, place.bundle, place.service)
        return result

    xml, digest = render_domain(spec)
    want_active = state == "started"
    redefine = not persistent or metadata_hash(before) != digest
    autostart = bool(persistent and dom.autostart())
    pid = pid_of(dom) if active else None
    record_ok = record == pid if want_active else record is None
    changed = redefine or active != want_active or autostart != want_active or not record_ok
    result.update(
        changed=changed,
        domain_hash=digest,
        overlay=place.overlay if spec.disk else None,
        diff={"before": before, "after": xml},
    )
    if check_mode or not changed:
        result.update(active=want_active if changed else active, main_pid=None if changed else pid)
        return result
    if want_active and spec.disk and (redefine or not active) and not shutil.which("qemu-img"):
        raise InstanceError("qemu-img (Debian qemu-utils) is not installed on this node; the VM's disk needs it")
    os.makedirs(place.vm_dir, mode=0o755, exist_ok=True)  # the serial log's directory, the overlay's

    if not want_active:
        if redefine and dom is not None and not persistent:
            stop_domain(dom, shutdown_timeout)  # a transient domain with our name
        dom = conn.defineXML(xml) if redefine else dom
        stop_domain(dom, shutdown_timeout)
        if dom.autostart():
            dom.setAutostart(0)
        _instances.remove_instance(place.run_dir, place.bundle, place.service)
        result.update(active=False, main_pid=None)
        return result

    was_active = active
    if redefine and active:
        stop_domain(dom, shutdown_timeout)
        result["restarted"] = True
    if redefine:
        dom = conn.defineXML(xml)
    if not dom.isActive():
        try:
            if spec.disk:
                make_overlay(place, spec.disk, spec.disk_format, spec.qemu_label)
            dom.create()
            ok, pid = _wait_started(dom, settle, pid_of)
            error = None
        except (libvirt.libvirtError, InstanceError) as e:
            ok, error = False, str(e)
        if not ok:
            tail = serial_tail(place)
            how = _rollback(conn, dom, place, before if persistent else None, was_active, spec.qemu_label)
            raise InstanceError(
                "%s did not stay running after starting%s; %s. Last serial console lines:\n%s"
                % (place.name, ": %s" % error if error else "", how, tail),
                serial=tail.splitlines(),
            )
    else:
        pid = pid_of(dom)
    if not dom.autostart():
        dom.setAutostart(1)
    _write_record(spec, pid)
    result.update(active=True, main_pid=pid)
    return result


def _rollback(conn, dom, place, before, was_active, label):
    """Put the previous definition back (restarting it when it was running), or remove the new domain."""
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    _instances.remove_instance(place.run_dir, place.bundle, place.service)
    if not before:
        try:
            dom.undefine()
        except libvirt.libvirtError:
            pass
        remove_vm_files(place)
        return "the domain was removed"
    try:
        old = conn.defineXML(before)
        if was_active:
            backing = overlay_backing(before)
            if backing:
                make_overlay(place, backing[0], backing[1], label)
            old.create()
            return "the previous definition was put back and started"
    except (libvirt.libvirtError, InstanceError) as e:
        return "putting the previous definition back failed: %s" % e
    return "the previous definition was put back"

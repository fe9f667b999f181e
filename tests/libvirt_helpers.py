"""Shared by the tests that boot real TCG VMs: libvirtd for the test, a guest kernel, busybox.

- ``libvirt_daemons()``: virtlogd + libvirtd started by hand (CI has no systemd), stopped
  afterwards only if this started them.
- ``find_kernel()``: a bootable x86-64 kernel, the host's or Debian's linux-image package's,
  unpacked into ``CACHE`` (``CERANA_NETBOOT_CACHE``, default ``/var/tmp/cerana-netboot-cache``).
- ``kernel_modules(kernel, names)``: those modules of that kernel (for an initramfs).
- ``static_busybox()``: Debian's busybox-static, unpacked (not installed) into the cache.
- ``build_initramfs(out, files)``: a newc cpio with /dev/console and the given files.

Packages are fetched with ``apt-get download`` (no installation); the .deb files are removed
after unpacking. Everything that can be missing returns None, so a test can skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("CERANA_NETBOOT_CACHE", "/var/tmp/cerana-netboot-cache"))
# What a Debian guest kernel needs for a virtio NIC, in load order (all modules in Debian's kernel).
VIRTIO_NET_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net",
)  # fmt: skip


def _sh(*args, check=True, timeout=60):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


@contextlib.contextmanager
def _cache_lock():
    """Tests running side by side unpack into the cache one at a time."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def libvirt_daemons():
    """virtlogd + libvirtd started by hand (no systemd); stopped afterwards if this started them."""
    started = []
    for name in ("virtlogd", "libvirtd"):
        if _sh("pgrep", "-x", name, check=False).returncode == 0:
            continue
        pidfile = Path("/run/%s.pid" % name)
        _sh(name, "-d")
        _wait_for(lambda p=pidfile: p.exists() and p.read_text().strip(), 15, name)
        started.append((name, int(pidfile.read_text())))
    try:
        _wait_for(lambda: _sh("virsh", "-c", "qemu:///system", "version", check=False).returncode == 0, 30, "libvirtd")
        yield
    finally:
        for _name, pid in reversed(started):
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and os.path.exists("/proc/%d" % pid):
                    time.sleep(0.1)
                if not os.path.exists("/proc/%d" % pid):
                    break


def _unpack_linux_image(package, members):
    """Download ``package`` and unpack the tar ``members`` (wildcards) into CACHE; False if it cannot."""
    got = subprocess.run(["apt-get", "download", package], cwd=CACHE, capture_output=True, timeout=300)
    debs = sorted(CACHE.glob(package + "_*.deb"))
    if got.returncode != 0 or not debs:
        return False
    try:
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE)
        subprocess.run(
            ["tar", "-x", "-C", str(CACHE), "--no-recursion", "--wildcards", *members],
            stdin=tar.stdout, capture_output=True, check=False,
        )  # fmt: skip
        tar.wait()
    finally:
        for deb in debs:
            deb.unlink()
    return True


def find_kernel():
    """A bootable x86-64 kernel: the host's, or Debian's linux-image package's (cached)."""
    for path in sorted(glob.glob("/boot/vmlinuz-*")) + sorted(glob.glob(str(CACHE / "boot" / "vmlinuz-*"))):
        return Path(path)
    with _cache_lock():
        found = sorted((CACHE / "boot").glob("vmlinuz-*"))
        if found:
            return found[0]
        deps = _sh("apt-cache", "depends", "linux-image-amd64", check=False).stdout.split()
        pkgs = [d for d in deps if d.startswith("linux-image-") and d[12:13].isdigit()]
        if not pkgs or not _unpack_linux_image(pkgs[0], ["./boot/vmlinuz-*"]):
            return None
        return next(iter(sorted((CACHE / "boot").glob("vmlinuz-*"))), None)


def kernel_modules(kernel, names=VIRTIO_NET_MODULES):
    """{name: .ko path} of ``kernel``'s modules ``names``, or None when they cannot be had.

    A host kernel's come from /lib/modules; a cached kernel's from its linux-image package
    (unpacked once into the cache).
    """
    version = Path(kernel).name.removeprefix("vmlinuz-")

    def lookup(base):
        found = {}
        for path in Path(base).rglob("*.ko*"):
            name = path.name.split(".ko")[0].replace("-", "_")
            if name in names:
                found[name] = path
        return found if len(found) == len(names) else None

    host = Path("/lib/modules") / version / "kernel"
    if not str(kernel).startswith(str(CACHE)) and host.is_dir():
        return lookup(host)
    cached = CACHE / "lib" / "modules" / version / "kernel"
    with _cache_lock():
        if not (cached.is_dir() and lookup(cached)):
            members = ["./lib/modules/%s/kernel/*/%s.ko*" % (version, name) for name in names]
            if not _unpack_linux_image("linux-image-" + version, members):
                return None
        return lookup(cached) if cached.is_dir() else None


def static_busybox():
    """Debian's busybox-static, unpacked into the cache (not installed: it would replace the host's busybox)."""
    path = CACHE / "bbs" / "bin" / "busybox"
    if path.exists():
        return path
    with _cache_lock():
        if path.exists():
            return path
        if subprocess.run(["apt-get", "download", "busybox-static"], cwd=CACHE, capture_output=True).returncode != 0:
            return None
        deb = sorted(CACHE.glob("busybox-static_*.deb"))[0]
        _sh("dpkg", "-x", str(deb), str(CACHE / "bbs"))
        deb.unlink()
    return path


def build_initramfs(out, files):
    """A newc cpio at ``out`` with ``/dev/console`` and ``files`` ({path in the image: bytes or a host Path}).

    ``/init`` (if given) is made executable, as is ``/bin/busybox``; ``.ko.xz`` modules are
    given as they are (the guest kernel decides whether it can load them).
    """
    out = Path(out)
    root = out.parent / (out.name + ".root")
    shutil.rmtree(root, ignore_errors=True)
    (root / "dev").mkdir(parents=True)
    os.mknod(root / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    for name, content in files.items():
        dest = root / name.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dest)
        else:
            dest.write_bytes(content.encode() if isinstance(content, str) else content)
        if name in ("/init", "/bin/busybox"):
            dest.chmod(0o755)
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names, stdout=f, check=True)
    shutil.rmtree(root)
    return out

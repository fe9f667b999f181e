"""The cached Debian root filesystem that nspawn nodes boot from.

``debootstrap`` runs once into ``<cache>/<suite>``; nodes never write to it (they boot with
``--volatile=overlay``). The mirror comes from the host's own apt configuration, so no
registry host name lives in this repository. Parsing is pure; :func:`ensure_rootfs` is the
executor.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cerana_lab.plan import RESOLV_CONF, LabError

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("/var/cache/cerana/rootfs")
DEFAULT_SUITE = "bookworm"

#: Packages in every node image. systemd/dbus make it boot; python3 (+python3-apt) is what
#: Ansible needs; iproute2/iputils-ping/procps are what tests and roles poke at.
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libnss-myhostname",
    "iproute2",
    "iputils-ping",
    "procps",
    "python3",
    "python3-apt",
    "bubblewrap",  # service instances run under bwrap
    "nftables",  # published ports of bundles
    "openssh-server",  # the cluster tick reaches the nodes with ansible over ssh
    "ca-certificates",
)

STAMP = ".cerana-rootfs.json"


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_sources_list(text: str) -> list[AptSource]:
    """One-line style (``deb [opts] URI SUITE COMPONENT...``); only ``deb`` entries."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        words = line.split()
        if len(words) < 3 or words[0] != "deb":
            continue
        words = words[1:]
        if words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            out.append(AptSource(words[0], (words[1],), tuple(words[2:])))
    return out


def parse_deb822_sources(text: str) -> list[AptSource]:
    """deb822 style (``*.sources``); only stanzas of type ``deb`` that are not disabled."""
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(
                AptSource(uri, tuple(fields.get("suites", "").split()), tuple(fields.get("components", "").split()))
            )
    return out


def pick_mirror(sources: Iterable[AptSource], suite: str) -> str | None:
    """The URI of a plain Debian archive for ``suite`` with ``main`` (not security/updates)."""
    candidates = [s for s in sources if "main" in s.components and not s.uri.startswith(("cdrom:", "file:"))]
    for want in (suite, None):
        for source in candidates:
            if "security" in source.uri:
                continue
            if want is None or want in source.suites:
                return source.uri
    return None


def system_mirror(suite: str, etc_apt: Path = Path("/etc/apt")) -> str:
    sources: list[AptSource] = []
    main_list = etc_apt / "sources.list"
    if main_list.is_file():
        sources += parse_sources_list(main_list.read_text())
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += parse_sources_list(path.read_text())
            elif path.suffix == ".sources":
                sources += parse_deb822_sources(path.read_text())
    mirror = pick_mirror(sources, suite)
    if mirror is None:
        raise LabError(f"no Debian mirror for {suite!r} with component 'main' found in {etc_apt}/sources.list*")
    return mirror


def stamp_for(suite: str, packages: Sequence[str]) -> dict[str, object]:
    return {"suite": suite, "packages": sorted(packages), "format": 1}


def rootfs_ready(path: Path, suite: str, packages: Sequence[str] = PACKAGES) -> bool:
    try:
        return json.loads((path / STAMP).read_text()) == stamp_for(suite, packages)
    except (OSError, ValueError):
        return False


def ensure_rootfs(cache: Path = DEFAULT_CACHE, suite: str = DEFAULT_SUITE, packages: Sequence[str] = PACKAGES) -> Path:
    """Return ``cache/suite``, building it with debootstrap first if it is missing or stale.

    A lock file serialises concurrent builders; the tree is built next to its final place
    and renamed into it, so a half-built tree is never used.
    """
    target = cache / suite
    if rootfs_ready(target, suite, packages):
        return target
    if shutil.which("debootstrap") is None:
        raise LabError("debootstrap is not installed (apt-get install debootstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{suite}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rootfs_ready(target, suite, packages):
            return target
        mirror = system_mirror(suite)
        build = cache / f".{suite}.build"
        shutil.rmtree(build, ignore_errors=True)
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            suite,
            str(build),
            mirror,
        ]
        log.info("building the node image: %s (about a minute, once)", " ".join(cmd))
        started = time.monotonic()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            shutil.rmtree(build, ignore_errors=True)
            raise LabError(f"debootstrap failed (exit {proc.returncode}):\n{tail}")
        finish_image(build)
        (build / STAMP).write_text(json.dumps(stamp_for(suite, packages)) + "\n")
        old = cache / f".{suite}.old"
        if target.exists():
            target.rename(old)
        build.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        log.info("node image ready in %s (%.0f s)", target, time.monotonic() - started)
    return target


def finish_image(root: Path) -> None:
    """Make a debootstrap tree bootable many times at once, as different machines."""
    # /etc/hostname would override --hostname; an empty machine-id makes systemd use the
    # per-node --uuid without "first boot" semantics.
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    resolv.write_text(RESOLV_CONF)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # Every machine boots from this tree: no shared ssh host keys; each node makes its own.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    dropin = root / "etc/systemd/system/ssh.service.d"
    if (root / "usr/sbin/sshd").exists():
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "host-keys.conf").write_text(
            "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n"
        )

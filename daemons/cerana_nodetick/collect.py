"""What the node looks like right now: pure parsers over text, fed by one thin reader.

The parsers (``parse_meminfo``, ``parse_loadavg``, ``parse_machine_id``) take the text of
a ``/proc`` file and return values; :func:`read_sample` is the only function here that
touches the system (``/proc``, ``statvfs``, `ip`, the data and run directories).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import socket
from pathlib import Path

from ansible_collections.cerana.platform.plugins.module_utils import _instances, _models

log = logging.getLogger(__name__)

_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")


class CollectError(Exception):
    """The node's state could not be read (a /proc file is missing or malformed)."""


@dataclasses.dataclass(frozen=True)
class MemInfo:
    total: int  # bytes
    available: int  # bytes


@dataclasses.dataclass(frozen=True)
class Sample:
    """One reading of the node, the input of :func:`cerana_nodetick.core.build_node`."""

    hostname: str
    addresses: tuple[str, ...]
    cpu_count: int
    load: tuple[float, float, float]
    memory: MemInfo
    disk_total: int
    disk_free: int


@dataclasses.dataclass(frozen=True)
class Running:
    """A recorded instance and whether its process is alive."""

    instance: _instances.Instance
    running: bool


def parse_meminfo(text: str) -> MemInfo:
    """Total and available memory in bytes from ``/proc/meminfo``.

    ``MemAvailable`` (Linux >= 3.14) is what can be used without swapping; older kernels
    get MemFree + Buffers + Cached instead.
    """
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        unit = parts[1].lower() if len(parts) > 1 else ""
        fields[name.strip()] = value * 1024 if unit == "kb" else value
    if "MemTotal" not in fields:
        raise CollectError("/proc/meminfo has no MemTotal line")
    if "MemAvailable" in fields:
        available = fields["MemAvailable"]
    else:
        available = fields.get("MemFree", 0) + fields.get("Buffers", 0) + fields.get("Cached", 0)
    return MemInfo(total=fields["MemTotal"], available=min(available, fields["MemTotal"]))


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages from ``/proc/loadavg``."""
    parts = text.split()
    try:
        return float(parts[0]), float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise CollectError(f"/proc/loadavg: cannot parse {text.strip()!r}") from None


def parse_machine_id(text: str) -> str:
    """The machine id (32 lowercase hex digits, see machine-id(5)); it is also a valid node id."""
    value = text.strip().lower()
    if not _MACHINE_ID.match(value):
        raise ValueError(f"must hold 32 hexadecimal digits (see machine-id(5)), got {text.strip()[:40]!r}")
    return value


def order_addresses(found: list[tuple[int, str]]) -> tuple[str, ...]:
    """Global addresses in a stable order: IPv4 before IPv6, then interface index, then address.

    ``found`` holds ``(interface index, address)``; loopback, link-local and duplicate
    addresses are dropped. The first address is what ``ansible_host`` becomes.
    """
    keep: dict[str, tuple[int, int, int]] = {}
    for index, text in found:
        try:
            addr = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified:
            continue
        key = (addr.version, index, int(addr))
        if str(addr) not in keep or key < keep[str(addr)]:
            keep[str(addr)] = key
    return tuple(sorted(keep, key=lambda a: keep[a]))


def dataset_dirs(names: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(dataset ids, ignored names) from the entries of ``<data_dir>/datasets``."""
    ids, ignored = [], []
    for name in sorted(names):
        try:
            ids.append(_models._label(name, "dataset"))
        except _models.ValidationError:
            ignored.append(name)
    return tuple(ids), tuple(ignored)


# -- the thin reader ------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise CollectError(f"cannot read {path}: {e.strerror or e}") from None


def read_machine_id(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_machine_id(text)


def read_addresses(interfaces: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The node's global addresses (``ip -json addr show``); only ``interfaces`` if given."""
    from ansible_collections.cerana.platform.plugins.module_utils._iproute2 import IpRoute2

    found: list[tuple[int, str]] = []
    for name, link in IpRoute2().links().items():
        if interfaces and name not in interfaces:
            continue
        for a in link.get("addr_info", ()):
            addr = a.get("address") or a.get("local")  # the peer's on a point-to-point link, as netlink says
            if addr:
                found.append((link.get("ifindex", 0), addr))
    return order_addresses(found)


def read_sample(data_dir: Path, interfaces: tuple[str, ...] = ()) -> Sample:
    """Read everything a node heartbeat reports. Disk figures are those of ``data_dir``'s file system."""
    memory = parse_meminfo(_read("/proc/meminfo"))
    load = parse_loadavg(_read("/proc/loadavg"))
    try:
        st = os.statvfs(data_dir)
    except OSError as e:
        raise CollectError(f"cannot stat the data directory {data_dir}: {e.strerror or e}") from None
    try:
        addresses = read_addresses(interfaces)
    except Exception as e:  # ip can fail in odd containers; the heartbeat matters more
        log.debug("cannot list addresses: %s", e)
        addresses = ()
    return Sample(
        hostname=socket.gethostname(),
        addresses=addresses,
        cpu_count=os.cpu_count() or 0,
        load=load,
        memory=memory,
        disk_total=st.f_blocks * st.f_frsize,
        disk_free=st.f_bavail * st.f_frsize,
    )


def read_datasets(data_dir: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(dataset ids present, ignored names) from ``<data_dir>/datasets/<id>/``."""
    root = data_dir / "datasets"
    try:
        names = [e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return (), ()
    except OSError as e:
        raise CollectError(f"cannot list {root}: {e.strerror or e}") from None
    return dataset_dirs(names)


def read_instances(run_dir: Path) -> tuple[tuple[Running, ...], list[tuple[str, str]]]:
    """The recorded instances with their liveness, and the records that did not parse."""
    instances, errors = _instances.read_instances(os.fspath(run_dir))
    return tuple(Running(i, _instances.pid_running(i.pid)) for i in instances), errors


def records_signature(run_dir: Path) -> tuple[tuple[str, int], ...]:
    """What changes when an instance record is written, replaced or removed: the modification
    times of the records' directory and of each bundle's directory in it (records are renamed
    into place, which touches the directory). A few stat calls: cheap enough to poll."""
    root = os.path.join(run_dir, _instances.BUNDLES_DIR)
    out = []
    try:
        out.append(("", os.stat(root).st_mtime_ns))
        with os.scandir(root) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        out.append((entry.name, entry.stat(follow_symlinks=False).st_mtime_ns))
                except OSError:
                    continue
    except OSError:
        pass
    return tuple(sorted(out))

# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Typed declared objects, their validation, canonical JSON and the KV key layout.

Standard library only: modules, plugins and daemons share these definitions.

Every object is a frozen dataclass with ``from_dict(data)`` (strict: unknown
fields, wrong types and out-of-range values raise :class:`ValidationError`
naming the field path) and ``to_dict()``; ``to_json()`` is canonical (sorted
keys, compact, every field present), so two objects are equal exactly when
their JSON bytes are, and ``from_dict(x.to_dict()) == x`` for every object.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import math
import re
import uuid

# ---------------------------------------------------------------------------
# Key layout (relative to the store prefix, ``cerana`` by default).
# docs/kv-layout.md describes every key; keep the two in step.

KINDS = ("dataset", "service", "bundle")
CLUSTER_CONFIG_KEY = "cluster/config"
DHCP_CONFIG_KEY = "dhcp/config"
NODES_PREFIX = "nodes/"
HISTORY_PREFIX = "history/nodes/"
DATASET_HEARTBEATS_PREFIX = "heartbeats/datasets/"
BUNDLE_HEARTBEATS_PREFIX = "heartbeats/bundles/"


def object_root(kind, object_id):
    """The subtree owned by one declared object: ``datasets/<id>`` etc."""
    return "%ss/%s" % (kind, object_id)


def object_key(kind, object_id):
    return object_root(kind, object_id) + "/config"


def dataset_content_key(dataset_id):
    """The content record of an imported dataset (digest and size), beside its config."""
    return object_root("dataset", dataset_id) + "/content"


def node_key(node_id):
    return NODES_PREFIX + node_id


def history_key(node_id, when):
    return "%s%s/%s" % (HISTORY_PREFIX, node_id, when)


def dataset_heartbeat_key(dataset_id, node_id):
    return "%s%s/%s" % (DATASET_HEARTBEATS_PREFIX, dataset_id, node_id)


def bundle_heartbeat_key(bundle_id, node_id):
    return "%s%s/%s" % (BUNDLE_HEARTBEATS_PREFIX, bundle_id, node_id)


# ---------------------------------------------------------------------------
# Validation helpers


class ValidationError(ValueError):
    """An invalid value; ``path`` names the field (``bundle.ports.80.external_port``)."""

    def __init__(self, path, reason):
        self.path = path
        self.reason = reason
        super().__init__("%s: %s" % (path, reason))


_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
UNSET = object()


def _show(value):
    return json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)


def _fields(data, path, allowed, required=()):
    if not isinstance(data, dict):
        raise ValidationError(path, "must be a mapping, got %s" % type(data).__name__)
    unknown = sorted(set(data) - set(allowed), key=str)  # YAML keys need not be strings
    if unknown:
        raise ValidationError("%s.%s" % (path, unknown[0]), "unknown field (allowed: %s)" % ", ".join(sorted(allowed)))
    for name in required:
        if data.get(name) is None:
            raise ValidationError("%s.%s" % (path, name), "is required")
    return data


def _int(value, path, lo=None, hi=None, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(path, "must be an integer, got %s" % _show(value))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            raise ValidationError(path, "must be >= %d, got %d" % (lo, value))
        raise ValidationError(path, "must be %d-%d, got %d" % (lo, hi, value))
    return value


def _number(value, path, lo_exclusive=None, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(path, "must be a number, got %s" % _show(value))
    if isinstance(value, float) and not math.isfinite(value):
        # NaN and infinities are not JSON, and NaN != NaN breaks from_dict(to_dict(x)) == x.
        raise ValidationError(path, "must be a finite number, got %s" % value)
    if lo_exclusive is not None and value <= lo_exclusive:
        raise ValidationError(path, "must be > %s, got %s" % (lo_exclusive, value))
    return int(value) if float(value).is_integer() else float(value)


def _bool(value, path):
    if not isinstance(value, bool):
        raise ValidationError(path, "must be true or false, got %s" % _show(value))
    return value


def _str(value, path, optional=False, nonempty=True):
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValidationError(path, "must be a string, got %s" % _show(value))
    if nonempty and not value:
        raise ValidationError(path, "must not be empty")
    return value


def _label(value, path, optional=False):
    if value is None and optional:
        return None
    _str(value, path)
    if not _LABEL.match(value):
        raise ValidationError(
            path,
            "must be a lowercase DNS label (a-z, 0-9 and '-', 1-63 characters, "
            "no leading or trailing '-'), got %s" % _show(value),
        )
    return value


def _str_list(value, path, nonempty=False):
    if not isinstance(value, (list, tuple)):
        raise ValidationError(path, "must be a list of strings, got %s" % _show(value))
    if nonempty and not value:
        raise ValidationError(path, "must not be empty")
    return tuple(_str(v, "%s[%d]" % (path, i), nonempty=False) for i, v in enumerate(value))


def _env(value, path):
    if not isinstance(value, dict):
        raise ValidationError(path, "must be a mapping of NAME: value, got %s" % _show(value))
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise ValidationError("%s.%s" % (path, k), "not a valid environment variable name")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValidationError("%s.%s" % (path, k), "must be a string, got %s" % _show(v))
        out[k] = v if isinstance(v, str) else str(v)
    return out


def _abs_path(value, path):
    _str(value, path)
    if not value.startswith("/") or "\x00" in value or any(p == ".." for p in value.split("/")):
        raise ValidationError(path, "must be an absolute path without '..', got %s" % _show(value))
    return value


def _ipv4(value, path, optional=False):
    if value is None and optional:
        return None
    _str(value, path)
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ValidationError(path, "must be an IPv4 address, got %s" % _show(value)) from None


def parse_duration(value, path):
    """Seconds from an int or a string such as ``90``, ``30s``, ``5m``, ``1h``, ``1d``."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValidationError(path, "must be a duration such as 30, 30s, 5m, 1h or 1d, got %s" % _show(value))
        return int(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return _int(value, path)


def new_id():
    """A generated object id: a UUID4, which is also a valid DNS label."""
    return str(uuid.uuid4())


def canonical_json(data):
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def utc_now():
    return datetime.datetime.now(datetime.UTC)


def format_time(when):
    """RFC 3339, UTC, microseconds: ``2026-11-30T03:04:05.123456Z``."""
    # isoformat, not strftime("%Y"): glibc does not zero-pad years before 1000, and the
    # result would not parse back.
    return when.astimezone(datetime.UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(value, path):
    _str(value, path)
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is not None:
            when.astimezone(datetime.UTC)  # OverflowError near year 1 or 9999
    except (ValueError, OverflowError):
        raise ValidationError(path, "must be an RFC 3339 time, got %s" % _show(value)) from None
    if when.tzinfo is None:
        raise ValidationError(path, "must carry a time zone, got %s" % _show(value))
    return format_time(when)


class _Model:
    """Shared behaviour: canonical JSON and equality through it."""

    def to_json(self):
        return canonical_json(self.to_dict())

    def to_bytes(self):
        return self.to_json().encode("utf-8")

    @classmethod
    def from_json(cls, text, path=None):
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ValidationError(path or cls.KIND, "stored value is not JSON: %s" % e) from None
        return cls.from_dict(data, path or cls.KIND)


def _ordered(mapping):
    return dict(sorted(mapping.items()))


# ---------------------------------------------------------------------------
# Dataset


@dataclasses.dataclass(frozen=True)
class Dataset(_Model):
    """A read-only or read-write file tree, replicated to ``redundancy`` nodes."""

    KIND = "dataset"
    id: str
    parent: str | None = None
    parent_same_node: bool = False
    read_only: bool = False
    redundancy: int = 1
    quota: int | None = None
    nfs: bool = False

    @classmethod
    def from_dict(cls, data, path="dataset"):
        _fields(data, path, {f.name for f in dataclasses.fields(cls)}, required=("id",))
        obj = cls(
            id=_label(data["id"], path + ".id"),
            parent=_label(data.get("parent"), path + ".parent", optional=True),
            parent_same_node=_bool(data.get("parent_same_node", False), path + ".parent_same_node"),
            read_only=_bool(data.get("read_only", False), path + ".read_only"),
            redundancy=_int(data.get("redundancy", 1), path + ".redundancy", 1, 1000),
            quota=_int(data.get("quota"), path + ".quota", 1, optional=True),
            nfs=_bool(data.get("nfs", False), path + ".nfs"),
        )
        if obj.parent == obj.id:
            raise ValidationError(path + ".parent", "a dataset cannot be its own parent")
        if obj.parent_same_node and obj.parent is None:
            raise ValidationError(path + ".parent_same_node", "needs a parent")
        return obj

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DatasetContent(_Model):
    """What an import recorded about a dataset's data, at ``datasets/<id>/content``.

    Kept apart from the declared ``config`` so that declaring a dataset never touches
    it; written with the config, in one transaction, only once a complete copy exists.
    ``digest`` is defined in ``_datasets.py``; ``size`` is the total of the file sizes.
    """

    KIND = "dataset_content"
    digest: str
    size: int
    files: int = 0

    @classmethod
    def from_dict(cls, data, path="dataset_content"):
        _fields(data, path, {"digest", "size", "files"}, required=("digest", "size"))
        return cls(
            digest=_digest(data["digest"], path + ".digest"),
            size=_int(data["size"], path + ".size", 0),
            files=_int(data.get("files", 0), path + ".files", 0),
        )

    def to_dict(self):
        return dataclasses.asdict(self)


_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _digest(value, path):
    if value is None:
        return None
    _str(value, path)
    if not _DIGEST.match(value):
        raise ValidationError(path, "must be sha256: and 64 lowercase hex digits, got %s" % _show(value))
    return value


# ---------------------------------------------------------------------------
# Service


@dataclasses.dataclass(frozen=True)
class Limits(_Model):
    """Resource limits; None means no limit (or, in a bundle override, inherit)."""

    KIND = "limits"
    cpu: float | None = None  # cores, e.g. 0.5
    memory: int | None = None  # bytes
    processes: int | None = None

    @classmethod
    def from_dict(cls, data, path="limits"):
        data = {} if data is None else data
        _fields(data, path, {"cpu", "memory", "processes"})
        return cls(
            cpu=_number(data.get("cpu"), path + ".cpu", lo_exclusive=0, optional=True),
            memory=_int(data.get("memory"), path + ".memory", 1 << 20, optional=True),
            processes=_int(data.get("processes"), path + ".processes", 1, 4194304, optional=True),
        )

    def to_dict(self):
        return dataclasses.asdict(self)

    def merged_over(self, base):
        """These limits where set, ``base``'s elsewhere."""
        return Limits(
            cpu=self.cpu if self.cpu is not None else base.cpu,
            memory=self.memory if self.memory is not None else base.memory,
            processes=self.processes if self.processes is not None else base.processes,
        )


def _port(value, path):
    return _int(value, path, 1, 65535)


def _port_key(value, path):
    """A port number used as a mapping key: JSON object keys are decimal strings."""
    if isinstance(value, str) and value.isdigit() and value == str(int(value)):
        value = int(value)
    return _port(value, path)


def _regex(value, path):
    _str(value, path)
    try:
        re.compile(value)
    except re.error as e:
        raise ValidationError(path, "not a valid regular expression: %s" % e) from None
    return value


def _file_mode(value, path):
    if not isinstance(value, str) or not re.match(r"^0?[0-7]{3,4}$", value):
        raise ValidationError(path, 'must be an octal mode string such as "0644", got %s' % _show(value))
    return "%04o" % int(value, 8)


# kind -> {arg: (validator, default)}; a default of UNSET means required.
HEALTH_CHECK_ARGS = {
    "http": {
        "port": (_port, UNSET),
        "path": (lambda v, p: _abs_path(v, p) if isinstance(v, str) and "?" not in v else _str(v, p), "/"),
        "scheme": (lambda v, p: _choice(v, p, ("http", "https")), "http"),
        "host": (_str, "127.0.0.1"),
        "expect_status": (lambda v, p: _int(v, p, 100, 599), 200),
        "body_regex": (_regex, None),
    },
    "tcp": {
        "port": (_port, UNSET),
        "host": (_str, "127.0.0.1"),
        "send": (lambda v, p: _str(v, p, nonempty=False), None),
        "expect_regex": (_regex, None),
    },
    "command": {
        "cmd": (lambda v, p: list(_str_list(v, p, nonempty=True)), UNSET),
    },
    "file": {
        "path": (_abs_path, UNSET),
        "exists": (_bool, True),
        "mode": (_file_mode, None),
        "min_size": (lambda v, p: _int(v, p, 0), None),
        "max_size": (lambda v, p: _int(v, p, 0), None),
    },
    "uptime": {
        "min_uptime": (parse_duration, UNSET),
    },
}


def _choice(value, path, choices):
    if value not in choices:
        raise ValidationError(path, "must be one of %s, got %s" % (", ".join(choices), _show(value)))
    return value


@dataclasses.dataclass(frozen=True)
class HealthCheck(_Model):
    """One health check of a service: ``kind`` and its ``args``; run every ``interval`` seconds."""

    KIND = "health_check"
    id: str
    kind: str
    args: dict
    interval: int = 10
    timeout: int = 5

    @classmethod
    def from_dict(cls, data, path="health_check"):
        _fields(data, path, {"id", "kind", "args", "interval", "timeout"}, required=("id", "kind"))
        kind = _choice(data["kind"], path + ".kind", tuple(HEALTH_CHECK_ARGS))
        spec = HEALTH_CHECK_ARGS[kind]
        raw = data.get("args") or {}
        _fields(raw, path + ".args", set(spec))
        args = {}
        for name, (check, default) in spec.items():
            value = raw.get(name)
            if value is None:
                if default is UNSET:
                    raise ValidationError("%s.args.%s" % (path, name), "is required for a %s check" % kind)
                args[name] = default
            else:
                args[name] = check(value, "%s.args.%s" % (path, name))
        sizes = (args.get("min_size"), args.get("max_size"))
        if kind == "file" and None not in sizes and sizes[0] > sizes[1]:
            raise ValidationError(path + ".args.min_size", "is larger than max_size")
        interval = parse_duration(data.get("interval", 10), path + ".interval")
        timeout = parse_duration(data.get("timeout", 5), path + ".timeout")
        _int(interval, path + ".interval", 1, 86400)
        _int(timeout, path + ".timeout", 1, 3600)
        if timeout > interval:
            raise ValidationError(path + ".timeout", "must not exceed the interval (%ds), got %d" % (interval, timeout))
        return cls(id=_label(data["id"], path + ".id"), kind=kind, args=args, interval=interval, timeout=timeout)

    def to_dict(self):
        return {
            "id": self.id,
            "kind": self.kind,
            "args": _ordered(self.args),
            "interval": self.interval,
            "timeout": self.timeout,
        }

    def __hash__(self):
        return hash(self.to_json())


def _health_checks(value, path):
    """Health checks from a mapping {id: check} or a list of checks with ``id``."""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = []
        for key, check in value.items():
            if isinstance(check, dict) and check.get("id", key) != key:
                raise ValidationError("%s.%s.id" % (path, key), "must equal its key %s" % _show(key))
            items.append((key, dict(check, id=key) if isinstance(check, dict) else check))
    elif isinstance(value, (list, tuple)):
        items = []
        for i, check in enumerate(value):
            key = check.get("id") if isinstance(check, dict) else None
            if not isinstance(key, str):
                raise ValidationError("%s[%d].id" % (path, i), "is required")
            items.append((key, check))
    else:
        raise ValidationError(path, "must be a mapping or a list of checks, got %s" % _show(value))
    out = {}
    for key, check in items:
        if key in out:
            raise ValidationError("%s.%s" % (path, key), "is declared twice")
        out[key] = HealthCheck.from_dict(check, "%s.%s" % (path, key))
    return _ordered(out)


@dataclasses.dataclass(frozen=True)
class Service(_Model):
    """A command run from a dataset, as a container or a VM."""

    KIND = "service"
    id: str
    dataset: str
    cmd: tuple = ()
    env: dict = dataclasses.field(default_factory=dict)
    limits: Limits = dataclasses.field(default_factory=Limits)
    health_checks: dict = dataclasses.field(default_factory=dict)
    kind: str = "container"

    @classmethod
    def from_dict(cls, data, path="service"):
        _fields(data, path, {f.name for f in dataclasses.fields(cls)}, required=("id", "dataset"))
        kind = _choice(data.get("kind", "container"), path + ".kind", ("container", "vm"))
        cmd = _str_list(data.get("cmd") or [], path + ".cmd")
        if kind == "container" and not cmd:
            raise ValidationError(path + ".cmd", "is required for a container service")
        if cmd and not cmd[0]:
            raise ValidationError(path + ".cmd[0]", "the program must not be empty")
        return cls(
            id=_label(data["id"], path + ".id"),
            dataset=_label(data["dataset"], path + ".dataset"),
            cmd=cmd,
            env=_ordered(_env(data.get("env") or {}, path + ".env")),
            limits=Limits.from_dict(data.get("limits"), path + ".limits"),
            health_checks=_health_checks(data.get("health_checks"), path + ".health_checks"),
            kind=kind,
        )

    def to_dict(self):
        return {
            "id": self.id,
            "dataset": self.dataset,
            "cmd": list(self.cmd),
            "env": _ordered(self.env),
            "limits": self.limits.to_dict(),
            "health_checks": {k: v.to_dict() for k, v in sorted(self.health_checks.items())},
            "kind": self.kind,
        }

    def __hash__(self):
        return hash(self.to_json())


# ---------------------------------------------------------------------------
# Bundle


BUNDLE_DATASET_TYPES = ("rw", "temp", "ramdisk")


@dataclasses.dataclass(frozen=True)
class BundleDataset(_Model):
    """A dataset a bundle's instances get: ``rw`` (persistent), ``temp`` (a scratch copy), ``ramdisk``."""

    KIND = "bundle_dataset"
    name: str
    id: str | None = None
    type: str = "rw"
    quota: int | None = None

    @classmethod
    def from_dict(cls, data, path="bundle_dataset"):
        _fields(data, path, {"name", "id", "type", "quota"}, required=("name",))
        obj = cls(
            name=_label(data["name"], path + ".name"),
            id=_label(data.get("id"), path + ".id", optional=True),
            type=_choice(data.get("type", "rw"), path + ".type", BUNDLE_DATASET_TYPES),
            quota=_int(data.get("quota"), path + ".quota", 1, optional=True),
        )
        if obj.type == "ramdisk" and obj.id is not None:
            raise ValidationError(path + ".id", "a ramdisk starts empty and takes no dataset id")
        if obj.type == "ramdisk" and obj.quota is None:
            raise ValidationError(path + ".quota", "is required for a ramdisk (its size in bytes)")
        return obj

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Mount(_Model):
    KIND = "mount"
    name: str
    mount_point: str
    read_only: bool = False

    @classmethod
    def from_dict(cls, data, path="mount"):
        _fields(data, path, {"name", "mount_point", "read_only"}, required=("name", "mount_point"))
        mp = _abs_path(data["mount_point"], path + ".mount_point")
        if mp.rstrip("/") == "":
            raise ValidationError(path + ".mount_point", "cannot be the root directory")
        return cls(
            name=_label(data["name"], path + ".name"),
            mount_point=mp.rstrip("/"),
            read_only=_bool(data.get("read_only", False), path + ".read_only"),
        )

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BundleService(_Model):
    """A service in a bundle, with per-bundle overrides (None/empty = inherit) and dataset mounts."""

    KIND = "bundle_service"
    id: str
    dataset: str | None = None
    cmd: tuple | None = None
    env: dict = dataclasses.field(default_factory=dict)
    limits: Limits = dataclasses.field(default_factory=Limits)
    health_checks: dict = dataclasses.field(default_factory=dict)
    datasets: dict = dataclasses.field(default_factory=dict)  # name -> Mount

    @classmethod
    def from_dict(cls, data, path="bundle_service"):
        _fields(data, path, {f.name for f in dataclasses.fields(cls)}, required=("id",))
        cmd = data.get("cmd")
        mounts = {}
        raw_mounts = data.get("datasets") or {}
        if isinstance(raw_mounts, list):
            pairs = [((m or {}).get("name") if isinstance(m, dict) else None, m) for m in raw_mounts]
        elif isinstance(raw_mounts, dict):
            pairs = [(k, dict(v, name=v.get("name", k)) if isinstance(v, dict) else v) for k, v in raw_mounts.items()]
            for k, v in pairs:
                if isinstance(v, dict) and v["name"] != k:
                    raise ValidationError("%s.datasets.%s.name" % (path, k), "must equal its key %s" % _show(k))
        else:
            raise ValidationError(path + ".datasets", "must be a mapping or a list of mounts")
        points = {}
        for i, (name, mount) in enumerate(pairs):
            where = "%s.datasets.%s" % (path, name if isinstance(name, str) else "[%d]" % i)
            m = Mount.from_dict(mount, where)
            if m.name in mounts:
                raise ValidationError(where, "is mounted twice")
            if m.mount_point in points:
                raise ValidationError(
                    where + ".mount_point", "%s is also used by %s" % (m.mount_point, points[m.mount_point])
                )
            points[m.mount_point] = m.name
            mounts[m.name] = m
        return cls(
            id=_label(data["id"], path + ".id"),
            dataset=_label(data.get("dataset"), path + ".dataset", optional=True),
            cmd=None if cmd is None else _str_list(cmd, path + ".cmd", nonempty=True),
            env=_ordered(_env(data.get("env") or {}, path + ".env")),
            limits=Limits.from_dict(data.get("limits"), path + ".limits"),
            health_checks=_health_checks(data.get("health_checks"), path + ".health_checks"),
            datasets=_ordered(mounts),
        )

    def to_dict(self):
        return {
            "id": self.id,
            "dataset": self.dataset,
            "cmd": None if self.cmd is None else list(self.cmd),
            "env": _ordered(self.env),
            "limits": self.limits.to_dict(),
            "health_checks": {k: v.to_dict() for k, v in sorted(self.health_checks.items())},
            "datasets": {k: v.to_dict() for k, v in sorted(self.datasets.items())},
        }

    def __hash__(self):
        return hash(self.to_json())


@dataclasses.dataclass(frozen=True)
class BundlePort(_Model):
    """A port a bundle listens on; ``public`` ports are published on ``external_port`` of the nodes."""

    KIND = "bundle_port"
    port: int
    public: bool = False
    external_port: int | None = None
    connected_bundles: tuple = ()

    @classmethod
    def from_dict(cls, data, path="bundle_port"):
        _fields(data, path, {"port", "public", "external_port", "connected_bundles"}, required=("port",))
        obj = cls(
            port=_port(data["port"], path + ".port"),
            public=_bool(data.get("public", False), path + ".public"),
            external_port=_int(data.get("external_port"), path + ".external_port", 1, 65535, optional=True),
            connected_bundles=tuple(
                sorted(
                    {
                        _label(b, "%s.connected_bundles[%d]" % (path, i))
                        for i, b in enumerate(
                            _str_list(data.get("connected_bundles") or [], path + ".connected_bundles")
                        )
                    }
                )
            ),
        )
        if obj.external_port is not None and not obj.public:
            raise ValidationError(path + ".external_port", "needs public: true")
        return obj

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["connected_bundles"] = list(self.connected_bundles)
        return d


def _keyed(value, path, what, key_field, parse_key=None):
    """A {key: item} mapping from either a mapping or a list of items carrying ``key_field``."""
    if value is None:
        return []
    pairs = []
    if isinstance(value, dict):
        for k, item in value.items():
            key = parse_key(k, "%s.%s" % (path, k)) if parse_key else k
            if isinstance(item, dict):
                given = item.get(key_field, key)
                if parse_key and given is not None:
                    given = parse_key(given, "%s.%s.%s" % (path, k, key_field))
                if given != key:
                    raise ValidationError("%s.%s.%s" % (path, k, key_field), "must equal its key %s" % _show(k))
                item = dict(item, **{key_field: key})
            pairs.append((key, "%s.%s" % (path, k), item))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            key = item.get(key_field) if isinstance(item, dict) else None
            if key is None:
                raise ValidationError("%s[%d].%s" % (path, i, key_field), "is required")
            if parse_key:
                key = parse_key(key, "%s[%d].%s" % (path, i, key_field))
            pairs.append((key, "%s.%s" % (path, key), item))
    else:
        raise ValidationError(path, "must be a mapping or a list of %s, got %s" % (what, _show(value)))
    seen = set()
    for key, where, _item in pairs:
        if key in seen:
            raise ValidationError(where, "is declared twice")
        seen.add(key)
    return pairs


@dataclasses.dataclass(frozen=True)
class Bundle(_Model):
    """Services, datasets and ports run together on ``redundancy`` nodes."""

    KIND = "bundle"
    id: str
    redundancy: int = 1
    services: dict = dataclasses.field(default_factory=dict)  # id -> BundleService
    datasets: dict = dataclasses.field(default_factory=dict)  # name -> BundleDataset
    ports: dict = dataclasses.field(default_factory=dict)  # int -> BundlePort

    @classmethod
    def from_dict(cls, data, path="bundle"):
        _fields(data, path, {f.name for f in dataclasses.fields(cls)}, required=("id",))
        datasets = {
            k: BundleDataset.from_dict(item, where)
            for k, where, item in _keyed(data.get("datasets"), path + ".datasets", "datasets", "name")
        }
        services = {
            k: BundleService.from_dict(item, where)
            for k, where, item in _keyed(data.get("services"), path + ".services", "services", "id")
        }
        ports = {
            k: BundlePort.from_dict(item, where)
            for k, where, item in _keyed(data.get("ports"), path + ".ports", "ports", "port", parse_key=_port_key)
        }
        for sid, svc in services.items():
            for name in svc.datasets:
                if name not in datasets:
                    raise ValidationError(
                        "%s.services.%s.datasets.%s" % (path, sid, name), "no bundle dataset named %s" % _show(name)
                    )
        external = {}
        for number, port in ports.items():
            if port.external_port is not None:
                if port.external_port in external:
                    raise ValidationError(
                        "%s.ports.%d.external_port" % (path, number),
                        "%d is already published for port %d" % (port.external_port, external[port.external_port]),
                    )
                external[port.external_port] = number
        return cls(
            id=_label(data["id"], path + ".id"),
            redundancy=_int(data.get("redundancy", 1), path + ".redundancy", 1, 1000),
            services=_ordered(services),
            datasets=_ordered(datasets),
            ports=_ordered(ports),
        )

    def to_dict(self):
        return {
            "id": self.id,
            "redundancy": self.redundancy,
            "services": {k: v.to_dict() for k, v in sorted(self.services.items())},
            "datasets": {k: v.to_dict() for k, v in sorted(self.datasets.items())},
            "ports": {str(k): v.to_dict() for k, v in sorted(self.ports.items())},
        }

    def __hash__(self):
        return hash(self.to_json())


MODELS = {"dataset": Dataset, "service": Service, "bundle": Bundle}


def overlay_bundle(bundle, services, datasets):
    """The bundle merged with its services' and datasets' definitions (a read-only view).

    ``services`` and ``datasets`` map ids to the declared objects. Bundle values
    win where set: ``cmd``, ``dataset``, each limit; env and health checks are the
    base's with the bundle's added or replacing by key. A bundle dataset with an
    id gets the declared dataset's fields, its quota unless the bundle sets one.
    Raises ValidationError naming what is missing.
    """
    out = bundle.to_dict()
    for sid, bsvc in bundle.services.items():
        base = services.get(sid)
        if base is None:
            raise ValidationError("bundle.services.%s" % sid, "service %s is not declared" % _show(sid))
        merged = base.to_dict()
        if bsvc.dataset is not None:
            merged["dataset"] = bsvc.dataset
        if bsvc.cmd is not None:
            merged["cmd"] = list(bsvc.cmd)
        merged["env"] = _ordered(dict(base.env, **bsvc.env))
        merged["limits"] = bsvc.limits.merged_over(base.limits).to_dict()
        checks = dict(base.health_checks, **bsvc.health_checks)
        merged["health_checks"] = {k: v.to_dict() for k, v in sorted(checks.items())}
        merged["datasets"] = {k: v.to_dict() for k, v in sorted(bsvc.datasets.items())}
        if merged["dataset"] not in datasets:
            raise ValidationError(
                "bundle.services.%s.dataset" % sid, "dataset %s is not declared" % _show(merged["dataset"])
            )
        out["services"][sid] = merged
    for name, bds in bundle.datasets.items():
        if bds.id is None:
            continue
        base = datasets.get(bds.id)
        if base is None:
            raise ValidationError("bundle.datasets.%s.id" % name, "dataset %s is not declared" % _show(bds.id))
        merged = dict(
            base.to_dict(), name=name, type=bds.type, quota=bds.quota if bds.quota is not None else base.quota
        )
        out["datasets"][name] = merged
    return out


# ---------------------------------------------------------------------------
# Cluster-wide configuration


@dataclasses.dataclass(frozen=True)
class ClusterConfig(_Model):
    """Cluster-wide settings at ``cluster/config``; a missing key means these defaults."""

    KIND = "cluster_config"
    node_ttl: int = 30
    dataset_ttl: int = 60
    bundle_ttl: int = 60
    service_network: str = "10.240.0.0/16"
    history_retention: int = 86400

    @classmethod
    def from_dict(cls, data, path="cluster_config"):
        _fields(data, path, {f.name for f in dataclasses.fields(cls)})
        values = {}
        for name in ("node_ttl", "dataset_ttl", "bundle_ttl"):
            values[name] = _int(
                parse_duration(data.get(name, getattr(cls, name)), path + "." + name), path + "." + name, 1, 86400
            )
        values["history_retention"] = _int(
            parse_duration(data.get("history_retention", cls.history_retention), path + ".history_retention"),
            path + ".history_retention",
            0,
        )
        values["service_network"] = str(
            _network(data.get("service_network", cls.service_network), path + ".service_network", max_prefix=28)
        )
        return cls(**values)

    def to_dict(self):
        return dataclasses.asdict(self)


def _network(value, path, max_prefix=30):
    _str(value, path)
    if "/" not in value:
        raise ValidationError(path, "needs a prefix length, such as %s/24" % value)
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError as e:
        raise ValidationError(path, "must be an IPv4 network in CIDR form such as 10.0.0.0/24 (%s)" % e) from None
    net = iface.network
    if iface.ip != net.network_address:
        raise ValidationError(path, "has host bits set; did you mean %s?" % net)
    if int(net.network_address) == 0:
        raise ValidationError(path, "must not be 0.0.0.0/%d" % net.prefixlen)
    if net.prefixlen > max_prefix:
        raise ValidationError(path, "prefix /%d is too small; at most /%d" % (net.prefixlen, max_prefix))
    return net


@dataclasses.dataclass(frozen=True)
class AddressRange(_Model):
    KIND = "range"
    start: str
    end: str

    def to_dict(self):
        return {"start": self.start, "end": self.end}


@dataclasses.dataclass(frozen=True)
class DHCPConfig(_Model):
    """The boot network served by every bootserver, at ``dhcp/config``."""

    KIND = "dhcp_config"
    net: str
    gateway: str | None = None
    dns: tuple = ()
    lease_duration: int = 3600
    excluded: tuple = ()  # AddressRange, sorted
    reservations: dict = dataclasses.field(default_factory=dict)  # mac -> ip

    @classmethod
    def from_dict(cls, data, path="dhcp_config"):
        _fields(data, path, {f.name for f in dataclasses.fields(cls)}, required=("net",))
        net = _network(data["net"], path + ".net")

        def inside(value, where, what="address"):
            ip = _ipv4(value, where)
            if ip not in net:
                raise ValidationError(where, "%s %s is outside %s" % (what, ip, net))
            if ip in (net.network_address, net.broadcast_address):
                raise ValidationError(where, "%s is the network or broadcast address of %s" % (ip, net))
            return ip

        gateway = None
        if data.get("gateway") is not None:
            gateway = inside(data["gateway"], path + ".gateway", "gateway")
        dns = tuple(
            str(_ipv4(v, "%s.dns[%d]" % (path, i)))
            for i, v in enumerate(_str_list(data.get("dns") or [], path + ".dns"))
        )
        lease = _int(
            parse_duration(data.get("lease_duration", 3600), path + ".lease_duration"),
            path + ".lease_duration",
            60,
            7 * 86400,
        )
        ranges = []
        raw_ranges = data.get("excluded") or []
        if not isinstance(raw_ranges, (list, tuple)):
            raise ValidationError(path + ".excluded", "must be a list of {start, end}")
        for i, r in enumerate(raw_ranges):
            where = "%s.excluded[%d]" % (path, i)
            _fields(r, where, {"start", "end"}, required=("start",))
            start = _ipv4(r["start"], where + ".start")
            end = _ipv4(r.get("end", r["start"]), where + ".end")
            for ip, w in ((start, ".start"), (end, ".end")):
                if ip not in net:
                    raise ValidationError(where + w, "address %s is outside %s" % (ip, net))
            if end < start:
                raise ValidationError(where, "end %s is before start %s" % (end, start))
            ranges.append((start, end))
        ranges.sort()
        reservations = {}
        raw_res = data.get("reservations") or {}
        if not isinstance(raw_res, dict):
            raise ValidationError(path + ".reservations", "must be a mapping of MAC address to IPv4 address")
        used = {}
        for mac, ip in raw_res.items():
            norm = normalize_mac(mac, "%s.reservations.%s" % (path, mac))
            where = "%s.reservations.%s" % (path, norm)
            if norm in reservations:
                raise ValidationError(where, "is declared twice")
            addr = inside(ip, where)
            if gateway is not None and addr == gateway:
                raise ValidationError(where, "%s is the gateway" % addr)
            if str(addr) in used:
                raise ValidationError(where, "%s is already reserved for %s" % (addr, used[str(addr)]))
            used[str(addr)] = norm
            reservations[norm] = str(addr)
        return cls(
            net=str(net),
            gateway=None if gateway is None else str(gateway),
            dns=dns,
            lease_duration=lease,
            excluded=tuple(AddressRange(str(s), str(e)) for s, e in ranges),
            reservations=_ordered(reservations),
        )

    def to_dict(self):
        return {
            "net": self.net,
            "gateway": self.gateway,
            "dns": list(self.dns),
            "lease_duration": self.lease_duration,
            "excluded": [r.to_dict() for r in self.excluded],
            "reservations": _ordered(self.reservations),
        }

    def __hash__(self):
        return hash(self.to_json())


def normalize_mac(value, path):
    _str(value, path)
    mac = value.strip().lower().replace("-", ":")
    if re.match(r"^[0-9a-f]{12}$", mac):
        mac = ":".join(mac[i : i + 2] for i in range(0, 12, 2))
    if not _MAC.match(mac):
        raise ValidationError(path, "must be a MAC address such as 52:54:00:12:34:56, got %s" % _show(value))
    return mac


# ---------------------------------------------------------------------------
# Nodes and heartbeats (written by the node tick daemon)


@dataclasses.dataclass(frozen=True)
class Node(_Model):
    """A live node, at ``nodes/<id>`` (ephemeral, ``node_ttl``). ``id`` is the machine id, never an IP."""

    KIND = "node"
    id: str
    hostname: str
    heartbeat: str
    addresses: tuple = ()
    cpu_count: int = 0
    load: tuple = (0.0, 0.0, 0.0)
    memory_total: int = 0
    memory_free: int = 0
    disk_total: int = 0
    disk_free: int = 0
    labels: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data, path="node"):
        _fields(data, path, {f.name for f in dataclasses.fields(cls)}, required=("id", "hostname", "heartbeat"))
        addresses = []
        for i, a in enumerate(_str_list(data.get("addresses") or [], path + ".addresses")):
            try:
                addresses.append(str(ipaddress.ip_address(a)))
            except ValueError:
                raise ValidationError(
                    "%s.addresses[%d]" % (path, i), "must be an IP address, got %s" % _show(a)
                ) from None
        load = data.get("load", [0.0, 0.0, 0.0])
        if not isinstance(load, (list, tuple)) or len(load) != 3:
            raise ValidationError(path + ".load", "must be [load1, load5, load15]")
        labels = data.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ValidationError(path + ".labels", "must be a mapping of strings")
        return cls(
            id=_label(data["id"], path + ".id"),
            hostname=_str(data["hostname"], path + ".hostname"),
            heartbeat=parse_time(data["heartbeat"], path + ".heartbeat"),
            addresses=tuple(addresses),
            cpu_count=_int(data.get("cpu_count", 0), path + ".cpu_count", 0),
            load=tuple(float(_number(v, "%s.load[%d]" % (path, i))) for i, v in enumerate(load)),
            memory_total=_int(data.get("memory_total", 0), path + ".memory_total", 0),
            memory_free=_int(data.get("memory_free", 0), path + ".memory_free", 0),
            disk_total=_int(data.get("disk_total", 0), path + ".disk_total", 0),
            disk_free=_int(data.get("disk_free", 0), path + ".disk_free", 0),
            labels=_ordered(labels),
        )

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["addresses"] = list(self.addresses)
        d["load"] = list(self.load)
        return d

    def __hash__(self):
        return hash(self.to_json())


@dataclasses.dataclass(frozen=True)
class DatasetHeartbeat(_Model):
    """A dataset present on a node, at ``heartbeats/datasets/<dataset>/<node>`` (ephemeral)."""

    KIND = "dataset_heartbeat"
    dataset: str
    node: str
    in_use: bool
    time: str

    @classmethod
    def from_dict(cls, data, path="dataset_heartbeat"):
        _fields(data, path, {"dataset", "node", "in_use", "time"}, required=("dataset", "node", "time"))
        return cls(
            dataset=_label(data["dataset"], path + ".dataset"),
            node=_label(data["node"], path + ".node"),
            in_use=_bool(data.get("in_use", False), path + ".in_use"),
            time=parse_time(data["time"], path + ".time"),
        )

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BundleHeartbeat(_Model):
    """The instances of a bundle on a node, at ``heartbeats/bundles/<bundle>/<node>`` (ephemeral).

    ``services`` maps a service id to ``{"state": ..., "health": {check id: error text or null}}``.
    ``address`` is the bundle network's address of this instance on the node (``eth0`` of
    its namespace), or null when the bundle has no network there.
    """

    KIND = "bundle_heartbeat"
    bundle: str
    node: str
    time: str
    services: dict = dataclasses.field(default_factory=dict)
    address: str | None = None

    @classmethod
    def from_dict(cls, data, path="bundle_heartbeat"):
        _fields(data, path, {"bundle", "node", "time", "services", "address"}, required=("bundle", "node", "time"))
        address = _ipv4(data.get("address"), path + ".address", optional=True)
        services = {}
        raw = data.get("services") or {}
        if not isinstance(raw, dict):
            raise ValidationError(path + ".services", "must be a mapping")
        for sid, status in raw.items():
            where = "%s.services.%s" % (path, sid)
            _label(sid, where)
            _fields(status, where, {"state", "health"}, required=("state",))
            health = status.get("health") or {}
            if not isinstance(health, dict) or not all(v is None or isinstance(v, str) for v in health.values()):
                raise ValidationError(where + ".health", "must map check ids to an error text or null")
            services[sid] = {"state": _str(status["state"], where + ".state"), "health": _ordered(health)}
        return cls(
            bundle=_label(data["bundle"], path + ".bundle"),
            node=_label(data["node"], path + ".node"),
            time=parse_time(data["time"], path + ".time"),
            services=_ordered(services),
            address=None if address is None else str(address),
        )

    def to_dict(self):
        return dataclasses.asdict(self)

    def healthy(self):
        return all(s["state"] == "running" and not any(s["health"].values()) for s in self.services.values())

    def __hash__(self):
        return hash(self.to_json())

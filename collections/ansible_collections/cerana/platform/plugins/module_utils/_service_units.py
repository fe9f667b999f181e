# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""The pure parts of running a bundle's service on a node: the systemd unit and its checks.

Standard library only, no I/O except the read-only helpers that take a path
(``root_entries``, ``resolve_in_root``, ``find_command``) and the /proc parsers,
which take text. docs/services.md describes the unit this renders.

One instance = one unit ``cerana-<bundle>_<service>.service``. Bundle and service
ids are DNS labels (``a-z0-9-``), so ``_`` cannot occur in either and the name is
unambiguous (with ``-`` as the separator, bundle ``a-b`` + service ``c`` and bundle
``a`` + service ``b-c`` would share a unit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex

from ansible_collections.cerana.platform.plugins.module_utils import _instances
from ansible_collections.cerana.platform.plugins.module_utils import _models as m

UNIT_PREFIX = "cerana-"
SERVICE_USER = "cerana-svc"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INSTANCES_DIR = "instances"
TEMP_DIR = ".temp"  # <data_dir>/instances/<bundle>/.temp/<service>/<name>: per-start copies of temp datasets
DATASETS_DIR = "datasets"
# Paths every sandbox gets from bwrap itself; a bundle dataset cannot be mounted there.
RESERVED = ("/proc", "/dev", "/tmp")


class SpecError(ValueError):
    """The instance cannot be run as declared (or not on this node); the message says why."""


def unit_name(bundle, service):
    return "%s%s_%s.service" % (UNIT_PREFIX, bundle, service)


@dataclasses.dataclass(frozen=True)
class MountSpec:
    """One bundle dataset inside the sandbox."""

    name: str
    mount_point: str
    type: str  # rw | ramdisk | temp
    read_only: bool = False
    source: str | None = None  # host directory (rw; temp: the dataset copied at each start, None for an empty one)
    size: int | None = None  # bytes (ramdisk; temp without a dataset)
    dataset: str | None = None  # the declared dataset id (temp)
    scratch: str | None = None  # temp with a dataset: the per-start copy, bound rw into the sandbox


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """Everything the unit of one instance is rendered from."""

    bundle: str
    service: str
    dataset: str
    root: str  # <data_dir>/datasets/<dataset>
    cmd: tuple
    env: tuple  # ((name, value), ...) sorted
    cpu: float | None
    memory: int | None
    processes: int | None
    mounts: tuple  # MountSpec, sorted by mount point
    ports: tuple  # bundle ports (ints), sorted
    run_dir: str
    netns_path: str | None = None  # the bundle network's namespace file (_bundle_net), None: the node's network

    @property
    def unit(self):
        return unit_name(self.bundle, self.service)

    @property
    def record_datasets(self):
        """Dataset ids the instance mounts (its record's ``datasets``)."""
        return tuple(sorted({self.dataset} | {mt.dataset for mt in self.mounts if mt.dataset}))

    def node_datasets(self):
        """(dataset id, directory) of every dataset that must be on the node: the root and temp sources."""
        return [(self.dataset, self.root)] + [
            (mt.dataset, mt.source) for mt in self.mounts if mt.type == "temp" and mt.source
        ]

    def instance_dirs(self):
        """Host directories of the rw mounts, which must exist (owned by the service user)."""
        return [mt.source for mt in self.mounts if mt.type == "rw"]


def build_spec(overlay, service_id, data_dir, run_dir, netns_path=None):
    """An InstanceSpec from ``Objects.overlay(bundle)`` (a dict) for one of its services.

    ``netns_path``: the bundle's network namespace on this node (from its network record), if it has one.

    Raises SpecError for what this path cannot run (a VM).
    """
    bundle_id = overlay["id"]
    svc = overlay["services"].get(service_id)
    if svc is None:
        raise SpecError(
            "bundle %s has no service %s (it has: %s)"
            % (bundle_id, service_id, ", ".join(sorted(overlay["services"])) or "none")
        )
    if svc.get("kind", "container") != "container":
        raise SpecError(
            "service %s of bundle %s is a %s; only containers are supported" % (service_id, bundle_id, svc["kind"])
        )
    mounts = []
    for name, mount in sorted(svc.get("datasets", {}).items()):
        bds = overlay["datasets"][name]
        mp = mount["mount_point"]
        if mp in RESERVED or any(mp.startswith(r + "/") for r in RESERVED):
            raise SpecError("bundle dataset %s: mount point %s is reserved (%s)" % (name, mp, ", ".join(RESERVED)))
        if bds["type"] == "rw":
            source = os.path.join(data_dir, INSTANCES_DIR, bundle_id, name)
            mounts.append(MountSpec(name, mp, "rw", bool(mount.get("read_only")), source=source))
        elif bds["type"] == "ramdisk":
            mounts.append(MountSpec(name, mp, "ramdisk", bool(mount.get("read_only")), size=bds["quota"]))
        else:  # temp: a fresh copy of the declared dataset at each start, or an empty scratch tmpfs
            ds_id = bds.get("id")
            source = os.path.join(data_dir, DATASETS_DIR, ds_id) if ds_id else None
            scratch = os.path.join(data_dir, INSTANCES_DIR, bundle_id, TEMP_DIR, service_id, name) if ds_id else None
            mounts.append(
                MountSpec(name, mp, "temp", bool(mount.get("read_only")), source=source, size=bds.get("quota"),
                          dataset=ds_id, scratch=scratch)
            )  # fmt: skip
    limits = svc.get("limits") or {}
    return InstanceSpec(
        bundle=bundle_id,
        service=service_id,
        dataset=svc["dataset"],
        root=os.path.join(data_dir, DATASETS_DIR, svc["dataset"]),
        cmd=tuple(svc["cmd"]),
        env=tuple(sorted((svc.get("env") or {}).items())),
        cpu=limits.get("cpu"),
        memory=limits.get("memory"),
        processes=limits.get("processes"),
        mounts=tuple(sorted(mounts, key=lambda x: x.mount_point)),
        ports=tuple(sorted(int(p) for p in (overlay.get("ports") or {}))),
        run_dir=run_dir,
        netns_path=netns_path,
    )


# ---------------------------------------------------------------------------
# The dataset as root


def root_entries(root):
    """[(name, kind, link target)] of the dataset's top level; kind is dir, file or link."""
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.islink(path):
            out.append((name, "link", os.readlink(path)))
        elif os.path.isdir(path):
            out.append((name, "dir", None))
        else:
            out.append((name, "file", None))
    return out


def resolve_in_root(root, path, _hops=40):
    """The host path of ``path`` as seen inside a sandbox whose / is ``root``, or None.

    Symbolic links are followed as they would be inside the sandbox (absolute
    targets start at ``root``; ``..`` never leaves it).
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        host = os.path.join(root, *done, part)
        if os.path.islink(host):
            hops += 1
            if hops > _hops:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        if not os.path.lexists(host):
            return None
        done.append(part)
    return os.path.join(root, *done) if done else root


def find_command(root, program, path_env):
    """The host path of the executable ``program`` would run inside the sandbox, or None."""
    if "/" in program:
        candidates = [program if program.startswith("/") else "/" + program]
    else:
        candidates = [d.rstrip("/") + "/" + program for d in path_env.split(":") if d.startswith("/")]
    for cand in candidates:
        host = resolve_in_root(root, cand)
        if host and os.path.isfile(host) and os.stat(host).st_mode & 0o111:
            return host
    return None


def missing_mount_points(spec, entries):
    """Mount points that cannot be created: below a top-level directory of the (read-only) dataset
    but not present in it. Top-level ones are created on the sandbox's tmpfs root."""
    top = {name: kind for name, kind, _target in entries}
    missing = []
    for mt in spec.mounts:
        first = mt.mount_point.strip("/").split("/")[0]
        if first not in top:
            continue
        host = resolve_in_root(spec.root, mt.mount_point)
        if host is None or not os.path.isdir(host):
            missing.append(mt.mount_point)
    return missing


# ---------------------------------------------------------------------------
# The unit


def systemd_quote(arg):
    """One argument of an Exec*= line: double-quoted, C-escaped, ``%`` and ``$`` made literal."""
    out = []
    for ch in arg:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "%":
            out.append("%%")
        elif ch == "$":
            out.append("$$")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append("\\x%02x" % ord(ch))
        else:
            out.append(ch)
    return '"%s"' % "".join(out)


def bwrap_argv(spec, entries, bwrap="/usr/bin/bwrap", uid=None, gid=None):
    """The ExecStart command: bwrap with the dataset as read-only root and the command."""
    argv = [bwrap, "--tmpfs", "/"]
    for name, kind, target in entries:
        if name in ("proc", "dev", "tmp"):
            continue
        if kind == "link":
            argv += ["--symlink", target, "/" + name]
        else:
            argv += ["--ro-bind", os.path.join(spec.root, name), "/" + name]
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
    for mt in spec.mounts:
        if mt.type == "rw":
            argv += ["--ro-bind" if mt.read_only else "--bind", mt.source, mt.mount_point]
        elif mt.type == "temp" and mt.scratch:
            argv += ["--ro-bind" if mt.read_only else "--bind", mt.scratch, mt.mount_point]
        else:  # ramdisk, or a temp dataset with nothing under it
            argv += ["--perms", "0755"]
            if mt.size:
                argv += ["--size", str(mt.size)]
            argv += ["--tmpfs", mt.mount_point]
            if mt.read_only:
                argv += ["--remount-ro", mt.mount_point]
    argv += ["--remount-ro", "/"]
    argv += ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", spec.service]
    if uid is not None:
        argv += ["--uid", str(uid), "--gid", str(gid)]
    argv += ["--die-with-parent", "--new-session", "--chdir", "/", "--clearenv"]
    env = dict(spec.env)
    env.setdefault("PATH", DEFAULT_PATH)
    for key, value in sorted(env.items()):
        argv += ["--setenv", key, value]
    argv += ["--", *list(spec.cmd)]
    return argv


def record_script(spec):
    """ExecStartPost shell script: record the instance with the main pid (docs/node-tick.md layout).

    Runs after every (re)start, so a restart by systemd updates the pid the node tick checks.
    """
    path = _instances.instance_path(spec.run_dir, spec.bundle, spec.service)
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, ".tmp-%s%s" % (spec.service, _instances.SUFFIX))
    datasets = m.canonical_json(sorted(spec.record_datasets))
    fmt = '{"datasets":%s,"pid":%%s,"started":"%%s"}' % datasets
    return 'set -e; mkdir -p %s; printf %s "$MAINPID" "$(date -u +%%Y-%%m-%%dT%%H:%%M:%%S.%%6NZ)" > %s; mv -f %s %s' % (
        shlex.quote(directory),
        shlex.quote(fmt),
        shlex.quote(tmp),
        shlex.quote(tmp),
        shlex.quote(path),
    )


def temp_copy_script(mount, user):
    """Shell script (run as root) making ``mount.scratch`` a fresh, writable copy of ``mount.source``
    owned by ``user``: copy next to it, then rename, so a half-made copy is never mounted."""
    new = mount.scratch + ".new"
    q = shlex.quote
    return (
        "set -e; rm -rf {new} {dst}; mkdir -p {parent}; cp -a --reflink=auto {src} {new}; "
        "chown -R {user}:{user} {new}; chmod -R u+w {new}; mv {new} {dst}"
    ).format(new=q(new), dst=q(mount.scratch), parent=q(os.path.dirname(mount.scratch)), src=q(mount.source),
             user=q(user))  # fmt: skip


def render_unit(spec, entries, bwrap="/usr/bin/bwrap", user=SERVICE_USER, restart_sec=1):
    """The unit file text. Same spec and dataset layout -> the same bytes."""
    lines = [
        "# Managed by cerana.platform.service_instance; changes are overwritten.",
        "[Unit]",
        "Description=cerana bundle %s service %s" % (spec.bundle, spec.service),
        "X-Cerana-Bundle=%s" % spec.bundle,
        "X-Cerana-Service=%s" % spec.service,
        "X-Cerana-Dataset=%s" % spec.dataset,
        "After=network.target",
        "StartLimitIntervalSec=60",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=exec",
        "User=%s" % user,
        "Group=%s" % user,
    ]
    for mt in spec.mounts:  # temp datasets: a fresh copy before each start, removed after each stop
        if mt.type == "temp" and mt.scratch:
            lines.append("ExecStartPre=+/bin/sh -c %s" % systemd_quote(temp_copy_script(mt, user)))
            lines.append("ExecStopPost=+/bin/rm -rf %s" % systemd_quote(mt.scratch))
    lines += [
        "ExecStart=%s" % " ".join(systemd_quote(a) for a in bwrap_argv(spec, entries, bwrap)),
        "ExecStartPost=+/bin/sh -c %s" % systemd_quote(record_script(spec)),
        "Restart=on-failure",
        "RestartSec=%d" % restart_sec,
        "KillMode=control-group",
        "TimeoutStopSec=10",
    ]
    if spec.netns_path is not None:
        lines.append("NetworkNamespacePath=%s" % spec.netns_path)  # systemd >= 242; bwrap keeps it (no --unshare-net)
    if spec.cpu is not None:
        lines.append("CPUQuota=%d%%" % max(1, round(spec.cpu * 100)))
    if spec.memory is not None:
        lines.append("MemoryMax=%d" % spec.memory)
    if spec.processes is not None:
        lines.append("TasksMax=%d" % spec.processes)
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def content_hash(text):
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# Ports


def parse_proc_net_tcp(text):
    """{port: {socket inode, ...}} of the listening sockets in /proc/net/tcp or tcp6 text."""
    out = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":  # 0A = TCP_LISTEN
            continue
        port = int(fields[1].rsplit(":", 1)[1], 16)
        out.setdefault(port, set()).add(fields[9])
    return out


def cgroup_unit(text):
    """The systemd unit a process belongs to, from /proc/<pid>/cgroup text (v1, v2 or hybrid), or None."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1] in ("", "name=systemd"):
            for comp in reversed(parts[2].split("/")):
                if comp.endswith(".service"):
                    return comp
    return None


def taken_ports(ports, listening, own_inodes):
    """The ports of ``ports`` that a socket not in ``own_inodes`` listens on, sorted."""
    return sorted(p for p in ports if listening.get(p, set()) - own_inodes)

# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""The on-disk record of the service instances running on a node.

Whoever starts a bundle's service on a node (today: by hand or a test; later the
services issue's runner) records it here, and the node tick reads it to send bundle
and dataset heartbeats. One JSON file per instance::

    <run_dir>/bundles/<bundle id>/<service id>.json
    {"pid": 1234, "started": "2026-11-30T03:04:05.123456Z", "datasets": ["web-data"]}

``run_dir`` is ``/run/cerana`` by default (a tmpfs: records vanish with a reboot, as the
processes do). ``pid`` is the instance's main process; the instance counts as running
while that process exists and is not a zombie. ``started`` is when it was started
(RFC 3339, UTC). ``datasets`` lists the ids of the datasets the instance mounts
(its service dataset and the bundle's datasets), which makes them "in use" on the node.
Writers replace a record atomically (write a temporary file, then rename) and remove
it when the instance stops. Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import os

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._files import atomic_write

BUNDLES_DIR = "bundles"
SUFFIX = ".json"


@dataclasses.dataclass(frozen=True)
class Instance(m._Model):
    """One running (or crashed) service instance of a bundle on this node."""

    KIND = "instance"
    bundle: str
    service: str
    pid: int
    started: str
    datasets: tuple = ()

    @classmethod
    def from_dict(cls, data, path="instance"):
        m._fields(
            data,
            path,
            {"bundle", "service", "pid", "started", "datasets"},
            required=("bundle", "service", "pid", "started"),
        )
        datasets = m._str_list(data.get("datasets") or [], path + ".datasets")
        return cls(
            bundle=m._label(data["bundle"], path + ".bundle"),
            service=m._label(data["service"], path + ".service"),
            pid=m._int(data["pid"], path + ".pid", 1),
            started=m.parse_time(data["started"], path + ".started"),
            datasets=tuple(sorted({m._label(d, "%s.datasets[%d]" % (path, i)) for i, d in enumerate(datasets)})),
        )

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["datasets"] = list(self.datasets)
        return d

    def record(self):
        """The file content: the fields not already given by the file's path."""
        return {"pid": self.pid, "started": self.started, "datasets": list(self.datasets)}


def instance_path(run_dir, bundle, service):
    return os.path.join(run_dir, BUNDLES_DIR, bundle, service + SUFFIX)


def write_instance(run_dir, instance):
    """Record ``instance`` atomically (creating the directories)."""
    path = instance_path(run_dir, instance.bundle, instance.service)
    with atomic_write(path) as f:
        f.write(m.canonical_json(instance.record()))
    return path


def remove_instance(run_dir, bundle, service):
    """Forget an instance (no error when it is not recorded); removes an emptied bundle directory."""
    path = instance_path(run_dir, bundle, service)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


def parse_instance(bundle, service, text):
    """An Instance from a record's text; raises ValidationError naming the field."""
    path = "%s/%s" % (bundle, service)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise m.ValidationError(path, "not JSON: %s" % e) from None
    if not isinstance(data, dict):
        raise m.ValidationError(path, "must be a JSON object")
    return Instance.from_dict(dict(data, bundle=bundle, service=service), path)


def read_instances(run_dir):
    """(instances sorted by bundle and service, [(path, error text)]) for every record under ``run_dir``.

    A missing ``run_dir`` means no instances. Records that do not parse are returned as
    errors, not raised, so one bad file does not hide the others.
    """
    root = os.path.join(run_dir, BUNDLES_DIR)
    instances, errors = [], []
    try:
        bundles = sorted(os.listdir(root))
    except FileNotFoundError:
        return [], []
    for bundle in bundles:
        bdir = os.path.join(root, bundle)
        if not os.path.isdir(bdir):
            continue
        try:
            names = sorted(os.listdir(bdir))
        except OSError as e:
            errors.append((bdir, str(e)))
            continue
        for name in names:
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue
            path = os.path.join(bdir, name)
            try:
                with open(path) as f:
                    text = f.read()
                instances.append(parse_instance(bundle, name[: -len(SUFFIX)], text))
            except (OSError, m.ValidationError) as e:
                errors.append((path, str(e)))
    return instances, errors


def pid_running(pid):
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")

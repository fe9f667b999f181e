# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""One service instance of a bundle on this node, to a state: what the service_instance and
bundle_instance modules do.

Every function takes the module (or a :class:`Task`: the module with other parameters) for its
parameters (``bundle``, ``service``, ``state``, ``data_dir``, ``run_dir``, ``unit_dir``,
``settle``, ``libvirt_uri``, ``bridge``, ``shutdown_timeout`` and the Consul connection),
``run_command``, ``get_bin_path``, ``check_mode`` and ``_diff``. :func:`dispatch` is the entry
point; it raises ``InstanceError``, ``SpecError``, ``ValidationError`` or ``StoreError``.
"""

from __future__ import annotations

import os
import pwd
import time

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net, _instances
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _service_units as su
from ansible_collections.cerana.platform.plugins.module_utils import _vm as vmu
from ansible_collections.cerana.platform.plugins.module_utils._ansible import store_from_module
from ansible_collections.cerana.platform.plugins.module_utils._files import atomic_write, read_text, remove_file
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError
from ansible_collections.cerana.platform.plugins.module_utils._systemd import (
    InstanceError,
    Systemd,
    bundle_socket_inodes,
    listening,
    listening_in,
)


class Task:
    """The module with some parameters replaced (one service of a bundle, a state): everything
    else (``run_command``, ``check_mode``, ...) is the module's."""

    def __init__(self, module, **params):
        self._module = module
        self.params = dict(module.params, **params)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _write_unit(path, text):
    with atomic_write(path) as f:
        f.write(text)


def ensure_user(module):
    """The fixed unprivileged user the sandboxes run as: (uid, gid, changed)."""
    try:
        pw = pwd.getpwnam(su.SERVICE_USER)
        return pw.pw_uid, pw.pw_gid, False
    except KeyError:
        pass
    useradd = module.get_bin_path("useradd", required=True)
    rc, out, err = module.run_command(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            su.SERVICE_USER,
        ]
    )
    if rc != 0:
        raise InstanceError("cannot create the user %s: %s" % (su.SERVICE_USER, (err or out).strip()))
    pw = pwd.getpwnam(su.SERVICE_USER)
    return pw.pw_uid, pw.pw_gid, True


def bundle_overlay(module):
    """The overlay of bundle ``module.params["bundle"]`` (the bundle merged with its services and
    datasets), read from Consul once per module run: every service of a bundle handled in one
    run sees the same declaration."""
    bundle_id = m._label(module.params["bundle"], "bundle")
    root = getattr(module, "_module", module)  # a Task shares its module's cache
    cache = root.__dict__.setdefault("_cerana_overlays", {})
    if bundle_id not in cache:
        objects = Objects(store_from_module(module))
        stored = objects.get("bundle", bundle_id)
        if stored is None:
            raise InstanceError("bundle %s is not declared" % bundle_id)
        cache[bundle_id] = objects.overlay(stored.obj)
    return cache[bundle_id]


def load_spec(module):
    p = module.params
    m._label(p["service"], "service")
    overlay = bundle_overlay(module)
    netns_path = bundle_netns(p["run_dir"], p["bundle"])
    return su.build_spec(overlay, p["service"], p["data_dir"], p["run_dir"], netns_path=netns_path)


def bundle_netns(run_dir, bundle_id):
    """The bundle's network namespace file on this node (from its network record), or None."""
    try:
        network = _bundle_net.read_network(run_dir, bundle_id)
    except m.ValidationError as e:
        raise InstanceError("the network record of bundle %s cannot be read: %s" % (bundle_id, e)) from None
    if network is None:
        return None
    if not os.path.exists(network.netns_path):
        raise InstanceError(
            "the network namespace %s of bundle %s is missing; run cerana.platform.bundle_network for it first"
            % (network.netns_path, bundle_id)
        )
    return network.netns_path


def preflight(module, spec):
    """Everything that can be checked before writing anything: returns (entries, bwrap path)."""
    for dataset, directory in spec.node_datasets():
        if not os.path.isdir(directory):
            raise InstanceError(
                "dataset %s of service %s is not on this node (no directory %s)" % (dataset, spec.service, directory),
                dataset=dataset,
            )
    entries = su.root_entries(spec.root)
    path_env = dict(spec.env).get("PATH", su.DEFAULT_PATH)
    if su.find_command(spec.root, spec.cmd[0], path_env) is None:
        raise InstanceError(
            "command %s of service %s is not an executable file in dataset %s%s"
            % (spec.cmd[0], spec.service, spec.dataset, "" if "/" in spec.cmd[0] else " (PATH %s)" % path_env),
            command=spec.cmd[0],
        )
    missing = su.missing_mount_points(spec, entries)
    if missing:
        raise InstanceError(
            "mount points %s are below read-only directories of dataset %s that do not contain them"
            % (", ".join(missing), spec.dataset)
        )
    bwrap = module.get_bin_path("bwrap")
    if not bwrap:
        raise InstanceError("bwrap (bubblewrap) is not installed on this node")
    return entries, bwrap


def wait_started(sd, specs, settle):
    """{unit: main pid, or None when it did not start} for the instances of ``specs``, started
    together: each once its unit is active with its record written (by ExecStartPost, with the
    main pid) and it stayed up ``settle`` s (no restart, same pid); all watched at once, with
    one ``systemctl show`` a poll."""
    deadline = time.monotonic() + max(5.0, settle * 3)
    pending = {spec.unit: spec for spec in specs}
    first, out = {}, {}
    while pending and time.monotonic() < deadline:
        states = sd.show_many(list(pending))
        now = time.monotonic()
        for unit, spec in list(pending.items()):
            st = states[unit]
            record = _instances.instance_path(spec.run_dir, spec.bundle, spec.service)
            text = read_text(record) if st["active_state"] == "active" and st["main_pid"] else None
            if text and _instances.parse_instance(spec.bundle, spec.service, text).pid == st["main_pid"]:
                seen = first.setdefault(unit, (now, st["main_pid"], st["restarts"]))
                if (st["main_pid"], st["restarts"]) != seen[1:]:
                    out[unit] = None
                elif now - seen[0] >= settle:
                    out[unit] = st["main_pid"]
                else:
                    continue
            elif unit in first or st["active_state"] == "failed":
                out[unit] = None
            else:
                continue
            del pending[unit]
        if pending:
            time.sleep(0.1)
    out.update(dict.fromkeys(pending))
    return out


class ServiceFailed(Exception):
    """``error`` (InstanceError, SpecError, ValidationError) while handling ``service``."""

    def __init__(self, service, error):
        super().__init__("service %s: %s" % (service, error))
        self.service = service
        self.error = error


class _Instance:
    """One container instance on its way to its state (see :func:`run_many`)."""

    def __init__(self, task):
        p = task.params
        self.task = task
        self.p = p
        self.service = p["service"]
        self.unit = su.unit_name(m._label(p["bundle"], "bundle"), m._label(p["service"], "service"))
        self.unit_path = os.path.join(p["unit_dir"], self.unit)
        self.before = read_text(self.unit_path)
        self.status = None  # set by run_many (one systemctl show for all)
        self.result = {"unit": self.unit, "unit_path": self.unit_path, "restarted": False}
        self.spec = self.after = None
        self.enabled_now = False
        self.changed = False

    def check(self, ports):
        """Everything that can be checked before writing anything; sets ``after`` and ``changed``.
        ``ports(spec)``: {port: socket inodes} listening where the instance would listen."""
        p, status = self.p, self.status
        if p["state"] == "absent":
            self.changed = self.before is not None or status["active"]
        else:
            self.spec = spec = load_spec(self.task)
            entries, bwrap = preflight(self.task, spec)
            self.after = su.render_unit(spec, entries, bwrap=bwrap)
            want_active = p["state"] == "started"
            self.changed = (
                self.before != self.after or status["active"] != want_active or status["enabled"] != want_active
            )
            if want_active and (self.before != self.after or not status["active"]):
                taken = su.taken_ports(spec.ports, *ports(spec))
                if taken:
                    raise InstanceError(
                        "port%s %s of bundle %s already in use on this node" % (
                            "s" if len(taken) > 1 else "", ", ".join(map(str, taken)), spec.bundle),
                        ports=taken,
                    )  # fmt: skip
        if self.task._diff:
            self.result["diff"] = {
                "before": self.before or "",
                "after": self.after or "",
                "before_header": self.unit_path,
                "after_header": self.unit_path,
            }
        self.result["unit_hash"] = su.content_hash(self.after) if self.after is not None else None
        self.result["changed"] = self.changed
        if self.task.check_mode or not self.changed:
            self.result["active"] = p["state"] == "started" if self.changed else status["active"]
            self.result["main_pid"] = status["main_pid"] if not self.changed else None
            return False
        return True

    def write(self, sd, uid, gid):
        """Instance directories and the unit file; True when the unit changed (a reload is due)."""
        for d in self.spec.instance_dirs():
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o750)
                os.chown(d, uid, gid)
        if self.before == self.after:
            return False
        _write_unit(self.unit_path, self.after)
        # enabled by run_many after every write: the reload of that `systemctl enable` loads it
        self.enabled_now = self.p["state"] == "started" and not self.status["enabled"]
        return True

    def forget(self):
        """After its unit is stopped (and gone, for absent): its record removed."""
        p = self.p
        _instances.remove_instance(p["run_dir"], p["bundle"], p["service"])
        self.result.update(active=False, main_pid=None)

    def settled(self, sd, pid):
        """After the start (``pid``: its main pid if it stayed up, else None): put back as it
        was and fail, or enabled."""
        if pid is None:
            journal = sd.journal(self.unit)
            rollback(sd, self.unit, self.unit_path, self.before, self.status["active"], self.p, self.enabled_now)
            raise InstanceError(
                "%s did not stay up after starting; %s. Last journal lines:\n%s"
                % (
                    self.unit,
                    "the previous unit was put back" if self.before is not None else "the unit was removed",
                    journal,
                ),
                journal=journal.splitlines(),
            )
        if not self.status["enabled"] and not self.enabled_now:
            sd.run("enable", self.unit)
        self.result.update(active=True, main_pid=pid)


EXPECTED = (ServiceFailed, InstanceError, su.SpecError, m.ValidationError, StoreError)


def failure(e):
    """``fail_json`` arguments for an expected error: its message, ``field`` for a
    ValidationError, ``service`` for a ServiceFailed, and the error's ``extra`` values."""
    if isinstance(e, ServiceFailed):
        out = failure(e.error)
        out.update(msg=str(e), service=e.service)
        return out
    if isinstance(e, m.ValidationError):
        return {"msg": str(e), "field": e.path}
    return dict(getattr(e, "extra", None) or {}, msg=str(e))


def _each(instances, fn):
    for inst in instances:
        try:
            fn(inst)
        except (InstanceError, su.SpecError, m.ValidationError) as e:
            raise ServiceFailed(inst.service, e) from None


class _Ports:
    """Who listens where, read once per place (the node, or a bundle's network namespace)
    and per bundle (the sockets of its own units, which do not count as taken)."""

    def __init__(self):
        self.places = {}
        self.own = {}

    def __call__(self, spec):
        """(listening {port: inodes}, the inodes of the bundle's own sockets) for ``spec``."""
        place = spec.netns_path
        if place not in self.places:
            self.places[place] = listening() if place is None else listening_in(place)
        if spec.bundle not in self.own:
            self.own[spec.bundle] = bundle_socket_inodes(spec.bundle)
        return self.places[place], self.own[spec.bundle]


def remove(sd, instances):
    """The instances' units stopped, disabled and removed with one ``systemctl`` call each and
    one reload (not a ``disable --now`` and a reload per unit), then their records."""
    if not instances:
        return
    stop = [i.unit for i in instances if i.status["active"]]
    if stop:
        sd.run("stop", *stop, check=False)
    enabled = [i.unit for i in instances if i.status["enabled"]]
    if enabled:
        sd.run("disable", "--no-reload", *enabled, check=False)
    for inst in instances:
        remove_file(inst.unit_path)
    sd.run("daemon-reload")
    sd.run("reset-failed", *[i.unit for i in instances], check=False)
    _each(instances, lambda inst: inst.forget())


def start_units(sd, units, unreloaded):
    """``systemctl start`` of ``units`` (its failures are seen by :func:`wait_started`). When new
    unit files were written without a reload (``unreloaded``), those a systemd older than 246
    did not find (it does not look again) are started again after one."""
    rc, _out = sd.run("start", *units, check=False)
    if rc != 0 and unreloaded:
        lost = [unit for unit, st in sd.show_many(units).items() if st["load_state"] == "not-found"]
        if lost:
            sd.run("daemon-reload")
            sd.run("start", *lost, check=False)


def run_many(tasks):
    """Container instances (one Task each, any state) to their states; their results, in order.

    Everything is checked before anything is written (a bad service fails the call before any
    instance changed). Then the unit files of all of them are written, and systemd reloaded once
    if a unit it had loaded changed (by the ``systemctl enable`` of the new ones, which reloads
    after it, or a ``daemon-reload``; new units alone need none);
    the instances to start are started by one ``systemctl start`` and those to restart by one
    ``systemctl restart``, then each must stay up ``settle`` seconds
    (watched together; one that does not is put back as it was). Raises :class:`ServiceFailed`.
    """
    if not tasks:
        return []
    sd = Systemd(tasks[0])
    instances = []
    for task in tasks:
        try:
            instances.append(_Instance(task))
        except (InstanceError, su.SpecError, m.ValidationError) as e:
            raise ServiceFailed(task.params["service"], e) from None
    states = sd.show_many([inst.unit for inst in instances])
    for inst in instances:
        inst.status = states[inst.unit]
    pending = []
    ports = _Ports()
    _each(instances, lambda inst: inst.check(ports) and pending.append(inst))
    remove(sd, [i for i in pending if i.p["state"] == "absent"])
    live = [i for i in pending if i.p["state"] != "absent"]
    if live:
        uid, gid, _created = ensure_user(tasks[0])
        written = []
        _each(live, lambda inst: inst.write(sd, uid, gid) and written.append(inst))
        enable = [i.unit for i in written if i.enabled_now]
        # systemd reads a unit file it already has in memory again on a daemon-reload (which
        # `enable` does after it); a unit it had not found it loads by itself once its unit
        # directories changed (systemd 246 and later), so new units alone need no reload
        # (about 0.2 s of systemd's time on a lab node)
        reload = any(i.before is not None or i.status["load_state"] != "not-found" for i in written)
        if enable:
            sd.run("enable", *([] if reload else ["--no-reload"]), *enable)
        elif reload:
            sd.run("daemon-reload")
        stop = [i for i in live if i.p["state"] == "stopped"]
        if stop:
            units = [i.unit for i in stop]
            sd.run("stop", *units)
            sd.run("disable", *units)  # with its reload: systemd reports the state it keeps
            _each(stop, lambda inst: inst.forget())
        started = [i for i in live if i.p["state"] == "started"]
        restart = [i for i in started if i.status["active"] and i.before != i.after]
        start = [i for i in started if not i.status["active"]]
        if restart:
            sd.run("restart", *[i.unit for i in restart])
            for inst in restart:
                inst.result["restarted"] = True
        if start:
            failed = [i.unit for i in start if i.status["active_state"] == "failed"]
            if failed:  # also clears the start rate limit
                sd.run("reset-failed", *failed, check=False)
            start_units(sd, [i.unit for i in start], unreloaded=bool(written) and not reload)
        pids = wait_started(sd, [i.spec for i in started], max(i.p["settle"] for i in started)) if started else {}
        _each(started, lambda inst: inst.settled(sd, pids[inst.unit]))
    return [inst.result for inst in instances]


def run(module):
    """The container instance of ``module.params["service"]`` to its state."""
    try:
        return run_many([module])[0]
    except ServiceFailed as e:
        raise e.error from None


def rollback(sd, unit, unit_path, before, was_active, p, enabled_now=False):
    sd.run("stop", unit, check=False)
    if enabled_now:
        sd.run("disable", "--no-reload", unit, check=False)
    if before is None:
        remove_file(unit_path)
    else:
        _write_unit(unit_path, before)
    sd.run("daemon-reload", check=False)
    sd.run("reset-failed", unit, check=False)
    _instances.remove_instance(p["run_dir"], p["bundle"], p["service"])
    if before is not None and was_active:
        sd.run("start", unit, check=False)


# ---------------------------------------------------------------------------
# kind: vm (plugins/module_utils/_vm.py; docs/services.md "VM services")


def service_overlay(module):
    """(the bundle overlay, the service's kind) from Consul."""
    m._label(module.params["service"], "service")
    overlay = bundle_overlay(module)
    return overlay, (overlay["services"].get(module.params["service"]) or {}).get("kind", "container")


def as_absent(module, fn, *args):
    """``fn(module, *args)`` with state absent: removes what an earlier kind of the instance left."""
    state = module.params["state"]
    module.params["state"] = "absent"
    try:
        return fn(module, *args)
    finally:
        module.params["state"] = state


def run_vm(module, overlay, place):
    """The VM instance at ``place`` to the task's state; ``overlay`` is None for absent (Consul is not read)."""
    p = module.params
    conn = vmu.open_connection(p["libvirt_uri"])
    try:
        spec = place
        if overlay is not None:
            spec = vmu.node_spec(conn, overlay, place.service, p["data_dir"], p["run_dir"], p["bridge"], p["state"])
        result = vmu.ensure_vm(
            conn, spec, p["state"], module.check_mode, shutdown_timeout=p["shutdown_timeout"], settle=p["settle"]
        )
    except vmu.libvirt.libvirtError as e:
        raise InstanceError("libvirt (%s): %s" % (p["libvirt_uri"], e)) from None
    finally:
        conn.close()
    diff = result.pop("diff")
    if module._diff:
        result["diff"] = dict(diff, before_header=place.name, after_header=place.name)
    result.update(kind="vm", unit=None, unit_path=None, unit_hash=None)
    return result


def dispatch(module):
    """Containers: run(); VMs: run_vm(). What an earlier kind of the same instance left is removed first.

    A VM instance is known by its directory ``<data_dir>/vms/<bundle>_<service>``, so nodes
    without VMs need no libvirt, even for absent.
    """
    p = module.params
    place = vmu.VmPlace(m._label(p["bundle"], "bundle"), m._label(p["service"], "service"), p["data_dir"], p["run_dir"])
    had_vm = os.path.isdir(place.vm_dir)
    if p["state"] == "absent":
        result = run(module)
        result["kind"] = None
        if had_vm:
            vm = run_vm(module, None, place)
            result.update({k: vm[k] for k in ("domain", "domain_hash", "overlay", "serial_log")})
            result["changed"] = result["changed"] or vm["changed"]
        return result
    overlay, kind = service_overlay(module)
    if kind == "vm":
        unit_path = os.path.join(p["unit_dir"], su.unit_name(place.bundle, place.service))
        old = as_absent(module, run) if os.path.exists(unit_path) else None
        result = run_vm(module, overlay, place)
    else:
        old = as_absent(module, run_vm, None, place) if had_vm else None
        result = run(module)
        result["kind"] = "container"
    result["changed"] = result["changed"] or bool(old and old["changed"])
    return result


def dispatch_many(tasks):
    """:func:`dispatch` for several services (Tasks): VMs one by one, container instances
    together through :func:`run_many` (one reload, starts and stops issued together: a bundle's
    services stop in parallel, each within its own stop timeout). Results in the order of
    ``tasks``; raises :class:`ServiceFailed`."""
    results, containers = {}, []
    for i, task in enumerate(tasks):
        p = task.params
        try:
            place = vmu.VmPlace(m._label(p["bundle"], "bundle"), m._label(p["service"], "service"),
                                p["data_dir"], p["run_dir"])  # fmt: skip
            if p["state"] == "absent":
                if os.path.isdir(place.vm_dir):
                    results[i] = dispatch(task)
                else:  # no VM: only a container instance to remove (kind None, as dispatch says)
                    containers.append((i, task, None))
                continue
            _overlay, kind = service_overlay(task)
            if kind == "vm":
                results[i] = dispatch(task)
                continue
            old = as_absent(task, run_vm, None, place) if os.path.isdir(place.vm_dir) else None
        except (InstanceError, su.SpecError, m.ValidationError) as e:
            raise ServiceFailed(p["service"], e) from None
        containers.append((i, task, old))
    for (i, task, old), result in zip(containers, run_many([entry[1] for entry in containers]), strict=True):
        result["kind"] = None if task.params["state"] == "absent" else "container"
        result["changed"] = result["changed"] or bool(old and old["changed"])
        results[i] = result
    return [results[i] for i in range(len(tasks))]


# ---------------------------------------------------------------------------
# a whole bundle (the bundle_instance module)


def declared_services(module):
    """The service ids of the bundle ``module.params["bundle"]`` as declared in Consul (sorted)."""
    return sorted(bundle_overlay(module)["services"])


def services_on_node(bundle, unit_dir, run_dir, data_dir):
    """Service ids of the instances of ``bundle`` found on this node: unit files, instance
    records and VM directories (Consul is not read). Bundle and service ids are labels (no
    ``_``), so ``cerana-<bundle>_<service>.service`` parses one way only."""
    found = set()
    prefix = su.unit_name(bundle, "")[: -len(".service")]
    for directory, head, tail in (
        (unit_dir, prefix, ".service"),
        (os.path.join(run_dir, _instances.BUNDLES_DIR, bundle), "", _instances.SUFFIX),
        (os.path.join(data_dir, vmu.VMS_DIR), bundle + "_", ""),
    ):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(head) and name.endswith(tail):
                service = name[len(head) : len(name) - len(tail)]
                try:
                    found.add(m._label(service, "service"))
                except m.ValidationError:
                    continue  # not ours
    return sorted(found)

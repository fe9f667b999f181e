# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""The node's side of service instances: systemctl, the journal, and who listens on which port."""

from __future__ import annotations

import ctypes
import os
import threading

from ansible_collections.cerana.platform.plugins.module_utils import _service_units as su
from ansible_collections.cerana.platform.plugins.module_utils._files import read_text


class InstanceError(Exception):
    """A failure with a message for the user (and optional extra result keys)."""

    def __init__(self, msg, **extra):
        super().__init__(msg)
        self.extra = extra


SHOW_PROPERTIES = "ActiveState,SubState,MainPID,NRestarts,UnitFileState,LoadState"


def _state(props):
    return {
        "active": props.get("ActiveState") in ("active", "activating", "reloading"),
        "active_state": props.get("ActiveState", ""),
        "main_pid": int(props.get("MainPID") or 0) or None,
        "restarts": int(props.get("NRestarts") or 0),
        "enabled": props.get("UnitFileState") == "enabled",
        "load_state": props.get("LoadState", ""),
    }


class Systemd:
    def __init__(self, module):
        self.module = module
        self.systemctl = module.get_bin_path("systemctl", required=True)

    def run(self, *args, check=True):
        rc, out, err = self.module.run_command([self.systemctl, *list(args)])
        if check and rc != 0:
            raise InstanceError("systemctl %s failed (rc %d): %s" % (" ".join(args), rc, (err or out).strip()))
        return rc, out

    def show(self, unit):
        return self.show_many([unit])[unit]

    def show_many(self, units):
        """{unit: its state} for ``units``, from one ``systemctl show`` (blocks in the order asked)."""
        _rc, out = self.run("show", "-p", SHOW_PROPERTIES, *units, check=False)
        blocks = [dict(line.split("=", 1) for line in block.splitlines() if "=" in line) for block in out.split("\n\n")]
        blocks += [{}] * (len(units) - len(blocks))
        return {unit: _state(props) for unit, props in zip(units, blocks, strict=False)}

    def journal(self, unit):
        journalctl = self.module.get_bin_path("journalctl")
        if not journalctl:
            return ""
        _rc, out, _err = self.module.run_command([journalctl, "-u", unit, "-n", "15", "--no-pager", "-o", "cat"])
        return out.strip()


def bundle_socket_inodes(bundle):
    """Socket inodes held by processes of this bundle's units (their ports are not 'taken')."""
    prefix = "%s%s_" % (su.UNIT_PREFIX, bundle)
    inodes = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cgroup" % pid) as f:
                unit = su.cgroup_unit(f.read())
            if not unit or not unit.startswith(prefix):
                continue
            for fd in os.listdir("/proc/%s/fd" % pid):
                target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


def listening(proc_net="/proc/net"):
    """{port: {socket inode, ...}} of the TCP sockets listening in ``proc_net`` (IPv4 and IPv6)."""
    out = {}
    for name in ("tcp", "tcp6"):
        text = read_text(os.path.join(proc_net, name))
        for port, inodes in su.parse_proc_net_tcp(text or "").items():
            out.setdefault(port, set()).update(inodes)
    return out


CLONE_NEWNET = 0x40000000


def listening_in(netns_path):
    """:func:`listening` in the network namespace ``netns_path`` (a bind-mounted namespace file).

    Read by a short-lived thread that joins the namespace: a network namespace belongs to a
    thread, so the module's other threads stay where they are, and no process is started.
    """
    box = {}

    def work():
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, os.strerror(errno), netns_path)
            finally:
                os.close(fd)
            box["ports"] = listening("/proc/thread-self/net")
        except (OSError, AttributeError) as e:  # AttributeError: a libc without setns()
            box["error"] = e

    thread = threading.Thread(target=work, name="cerana-netns-ports")
    thread.start()
    thread.join()
    if "error" in box:
        raise InstanceError("cannot read the ports in %s: %s" % (netns_path, box["error"]))
    return box["ports"]

# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: nspawn
short_description: Run tasks inside a systemd-nspawn machine on the controller
version_added: 0.1.0
description:
  - Runs every command inside a running systemd-nspawn machine with
    C(nsenter --target <leader> --all), where the leader is the machine's PID 1 as seen from the
    controller. Commands see the machine's own filesystem, processes, hostname and network.
  - Files are streamed into and out of the machine through C(nsenter ... cat), so they land in
    the machine's own filesystem (its overlay for C(--volatile=overlay) machines), never on the
    controller's paths, and symlinks inside the machine resolve inside the machine.
  - Commands start with a clean environment (C(PATH), C(HOME=/root), C(LANG=C.UTF-8)), as a login
    over SSH would; task C(environment) still applies.
  - The machine is found either by its leader pid (O(nspawn_pid)), or by its name (O(nspawn_machine))
    in the C(state.json) of a lab started with C(cerana lab up --kind nspawn); C(cerana lab inventory)
    sets these variables.
  - Needs root on the controller and C(nsenter) from util-linux; the machine needs C(/bin/sh) and C(cat).
    There is no privilege escalation inside the machine; tasks already run as its root.
author:
  - Cerana contributors (@cerana)
extends_documentation_fragment:
  - connection_pipelining
options:
  nspawn_pid:
    description:
      - Controller pid of the machine's leader (its PID 1). Takes precedence over O(nspawn_machine).
    type: int
    vars:
      - name: ansible_nspawn_pid
  nspawn_machine:
    description:
      - Name of the machine (C(systemd-nspawn --machine)) as recorded in the lab state file in
        O(nspawn_state_dir). Used when O(nspawn_pid) is not set.
    type: str
    vars:
      - name: ansible_nspawn_machine
  nspawn_state_dir:
    description:
      - Directory with the lab's C(state.json), written by C(cerana lab up).
    type: path
    default: /run/cerana-lab/cerana
    vars:
      - name: ansible_nspawn_state_dir
  nsenter_executable:
    description: The C(nsenter) command.
    type: str
    default: nsenter
    vars:
      - name: ansible_nspawn_nsenter_executable
  machine_path:
    description: C(PATH) for commands inside the machine.
    type: str
    default: /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    vars:
      - name: ansible_nspawn_path
notes:
  - The state file lists, per node, C(machine), C(pid) (systemd-nspawn), C(start_time) (field 22 of
    C(/proc/<pid>/stat), to detect pid reuse) and C(leader_pid).
"""

EXAMPLES = r"""
# inventory.yml, as printed by `cerana lab inventory` for an nspawn lab
# all:
#   hosts:
#     node1:
#       ansible_connection: cerana.platform.nspawn
#       ansible_nspawn_machine: cerana-node1
#       ansible_nspawn_state_dir: /run/cerana-lab/cerana
#       ansible_python_interpreter: /usr/bin/python3

- name: Gather facts inside the machines
  hosts: cerana
  tasks:
    - name: Show the service manager
      ansible.builtin.debug:
        var: ansible_facts['service_mgr']
"""

import json
import os
import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_native
from ansible.plugins.connection.local import Connection as LocalConnection
from ansible.utils.display import Display

display = Display()


def _start_time(pid):
    """Field 22 of /proc/<pid>/stat, or None when the process does not exist."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def leader_from_state(state_dir, machine):
    """The leader pid of ``machine`` from ``<state_dir>/state.json``; raises AnsibleConnectionFailure."""
    path = os.path.join(state_dir, "state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise AnsibleConnectionFailure("cannot read the lab state %s: %s" % (path, to_native(e))) from e
    for node in state.get("nodes", []):
        if node.get("machine") != machine:
            continue
        try:
            pid, start, leader = int(node["pid"]), int(node["start_time"]), int(node["leader_pid"])
        except (KeyError, TypeError, ValueError):
            break
        if _start_time(pid) != start or _start_time(leader) is None:
            raise AnsibleConnectionFailure("machine %s is not running (see `cerana lab status`)" % machine)
        return leader
    raise AnsibleConnectionFailure("machine %s is not in the lab state %s" % (machine, path))


class Connection(LocalConnection):
    """Commands through ``nsenter -t <leader> -a``; files streamed through ``cat`` in the machine."""

    transport = "cerana.platform.nspawn"
    has_pipelining = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._leader = None

    def _connect(self):
        super()._connect()
        if self._leader is None:
            pid = self.get_option("nspawn_pid")
            if pid:
                if _start_time(pid) is None:
                    raise AnsibleConnectionFailure("no process with pid %d (ansible_nspawn_pid)" % pid)
                self._leader = pid
            else:
                machine = self.get_option("nspawn_machine")
                if not machine:
                    raise AnsibleConnectionFailure("set ansible_nspawn_pid or ansible_nspawn_machine for this host")
                self._leader = leader_from_state(self.get_option("nspawn_state_dir"), machine)
            self._play_context.remote_user = "root"
            display.vvv("NSPAWN leader pid %d" % self._leader, host=self._play_context.remote_addr)
        return self

    def _enter(self, argv):
        """argv that runs ``argv`` inside the machine with a clean environment."""
        return [
            self.get_option("nsenter_executable"),
            "--target",
            str(self._leader),
            "--all",
            "/usr/bin/env",
            "-i",
            "PATH=%s" % self.get_option("machine_path"),
            "HOME=/root",
            "USER=root",
            "LOGNAME=root",
            "LANG=C.UTF-8",
            *argv,
        ]

    def exec_command(self, cmd, in_data=None, sudoable=True):
        self._connect()
        return super().exec_command(shlex.join(self._enter(["/bin/sh", "-c", cmd])), in_data=in_data, sudoable=sudoable)

    def _stream(self, argv, stdin, stdout, what):
        proc = subprocess.Popen(self._enter(argv), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
        stderr = proc.communicate()[1]
        if proc.returncode != 0:
            raise AnsibleError("%s failed (rc=%d): %s" % (what, proc.returncode, to_native(stderr).strip()))

    def put_file(self, in_path, out_path):
        self._connect()
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        if not os.path.exists(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound("file or module does not exist: %s" % to_native(in_path))
        with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as src:
            self._stream(
                ["/bin/sh", "-c", "cat > %s" % shlex.quote(out_path)],
                src,
                subprocess.DEVNULL,
                "copying %s into the machine as %s" % (in_path, out_path),
            )

    def fetch_file(self, in_path, out_path):
        self._connect()
        display.vvv("FETCH %s TO %s" % (in_path, out_path), host=self._play_context.remote_addr)
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as dst:
            self._stream(["cat", "--", in_path], subprocess.DEVNULL, dst, "fetching %s from the machine" % in_path)

    def reset(self):
        self._leader = None

    def close(self):
        self._connected = False

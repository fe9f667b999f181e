# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: netns
short_description: Run tasks on the controller inside a Linux network namespace
version_added: 0.1.0
description:
  - Like P(ansible.builtin.local#connection), but every command runs through
    C(ip netns exec <namespace> /bin/sh -c <command>), so modules, C(raw) and C(script) all run
    inside the named network namespace.
  - The namespace shares the controller's filesystem, users and processes; only the network
    (and C(/etc/netns/<namespace>/) files bind-mounted by C(ip netns exec)) differ.
    Files are therefore copied exactly as with P(ansible.builtin.local#connection).
  - The nodes of a C(cerana lab up --kind netns) lab use this connection; C(cerana lab inventory) sets it up.
  - Needs root on the controller and C(ip) from iproute2.
author:
  - Cerana contributors (@cerana)
extends_documentation_fragment:
  - connection_pipelining
options:
  netns:
    description:
      - Name of the network namespace (as listed by C(ip netns list)).
      - When empty, commands run in the controller's own namespace, as with P(ansible.builtin.local#connection).
    type: str
    default: ''
    vars:
      - name: ansible_netns
  ip_executable:
    description: The C(ip) command used to enter the namespace.
    type: str
    default: ip
    vars:
      - name: ansible_netns_ip_executable
notes:
  - Modules run with the controller's Python unless C(ansible_python_interpreter) says otherwise;
    C(cerana lab inventory) sets it to the Python that ran it.
"""

EXAMPLES = r"""
# inventory.yml
# all:
#   hosts:
#     node1:
#       ansible_connection: cerana.platform.netns
#       ansible_netns: cerana-node1
#       ansible_python_interpreter: /opt/cerana/venv/bin/python

- name: Show the addresses of the node's namespace
  hosts: node1
  gather_facts: false
  tasks:
    - name: List addresses
      ansible.builtin.raw: ip -o addr
"""

import shlex

from ansible.plugins.connection.local import Connection as LocalConnection
from ansible.utils.display import Display

display = Display()


class Connection(LocalConnection):
    """``local``, with every command wrapped in ``ip netns exec``."""

    transport = "cerana.platform.netns"
    has_pipelining = True

    def exec_command(self, cmd, in_data=None, sudoable=True):
        netns = self.get_option("netns")
        if netns:
            cmd = shlex.join([self.get_option("ip_executable"), "netns", "exec", netns, "/bin/sh", "-c", cmd])
            display.vvv("NETNS %s" % netns, host=self._play_context.remote_addr)
        return super().exec_command(cmd, in_data=in_data, sudoable=sudoable)

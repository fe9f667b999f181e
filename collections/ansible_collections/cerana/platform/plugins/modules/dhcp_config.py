#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: dhcp_config
short_description: Set the boot network every bootserver serves
version_added: 0.1.0
description:
  - Sets the DHCP configuration kept at C(<kv_prefix>/dhcp/config), shared by the bootservers of all nodes.
  - The configuration is declared in full, each option left out takes its default.
  - Unlike the original platform, the configuration can be changed later (with compare-and-swap);
    leases already handed out are not touched by this module.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.attributes
options:
  net:
    description:
      - The IPv4 network served, in CIDR form with no host bits (V(10.77.0.0/24)), at most a /30.
      - Required with O(state=present).
    type: str
  gateway:
    description: Router handed to clients; must lie inside O(net) and is never offered as a lease.
    type: str
  dns:
    description: DNS servers handed to clients (IPv4 addresses).
    type: list
    elements: str
  lease_duration:
    description: Lease time, in seconds or as a duration (V(1h)); 60 s to 7 d.
    type: raw
    default: 3600
  excluded:
    description: Address ranges inside O(net) that are never offered.
    type: list
    elements: dict
    suboptions:
      start:
        description: First address of the range.
        type: str
        required: true
      end:
        description: Last address of the range (the same as O(excluded[].start) when left out).
        type: str
  reservations:
    description: Static leases, as a mapping of MAC address to IPv4 address inside O(net).
    type: dict
  state:
    description: Whether the configuration key is set.
    type: str
    choices: [present, absent]
    default: present
  mod_index:
    description: Explicit compare-and-swap, as in M(cerana.platform.dataset).
    type: int
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Serve the lab network
  cerana.platform.dhcp_config:
    net: 10.77.0.0/24
    gateway: 10.77.0.1
    dns: [10.77.0.1]
    lease_duration: 1h
    excluded:
      - {start: 10.77.0.1, end: 10.77.0.99}
    reservations:
      "52:54:00:00:00:01": 10.77.0.200
"""

RETURN = r"""
dhcp_config:
  description: The configuration as declared (predicted in check mode); null when absent.
  returned: success
  type: dict
  sample:
    net: 10.77.0.0/24
    gateway: 10.77.0.1
    dns: [10.77.0.1]
    lease_duration: 3600
    excluded: [{start: 10.77.0.1, end: 10.77.0.99}]
    reservations: {"52:54:00:00:00:01": 10.77.0.200}
mod_index:
  description: Modify index of the key after the task; null when absent or in check mode with a change.
  returned: success
  type: int
  sample: 42
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, declare_config
from ansible_collections.cerana.platform.plugins.module_utils._models import DHCP_CONFIG_KEY, DHCPConfig

FIELDS = ("net", "gateway", "dns", "lease_duration", "excluded", "reservations")

ARGUMENT_SPEC = dict(
    net=dict(type="str"),
    gateway=dict(type="str"),
    dns=dict(type="list", elements="str"),
    lease_duration=dict(type="raw", default=3600),
    excluded=dict(
        type="list", elements="dict", options=dict(start=dict(type="str", required=True), end=dict(type="str"))
    ),
    reservations=dict(type="dict"),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    mod_index=dict(type="int"),
    **CONNECTION_ARGSPEC,
)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC, required_if=[("state", "present", ["net"])], supports_check_mode=True
    )
    declare_config(module, DHCPConfig, DHCP_CONFIG_KEY, FIELDS)


if __name__ == "__main__":
    main()

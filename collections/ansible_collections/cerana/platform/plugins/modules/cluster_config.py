#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: cluster_config
short_description: Set the cluster-wide configuration
version_added: 0.1.0
description:
  - Sets the cluster configuration kept at C(<kv_prefix>/cluster/config), that is the heartbeat TTLs,
    the service network and how long node history is kept.
  - The configuration is declared in full, each option left out takes its default.
    O(state=absent) removes the key, which means every default applies.
  - Durations are seconds, or strings such as V(30s), V(5m), V(1h), V(1d).
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.attributes
options:
  node_ttl:
    description:
      - How long a node stays in the live node list without a heartbeat (1 s to 1 d).
      - Consul reaps an expired session between one and two TTLs, and refuses TTLs below its
        C(session_ttl_min) (10 s unless lowered).
    type: raw
    default: 30
  dataset_ttl:
    description: TTL of dataset heartbeats (1 s to 1 d).
    type: raw
    default: 60
  bundle_ttl:
    description: TTL of bundle heartbeats (1 s to 1 d).
    type: raw
    default: 60
  service_network:
    description: IPv4 network (CIDR, at most /28) from which bundle networks are allocated.
    type: str
    default: 10.240.0.0/16
  history_retention:
    description: How long historical node samples are kept; V(0) keeps none.
    type: raw
    default: 86400
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
- name: Shorter node TTL for a lab
  cerana.platform.cluster_config:
    node_ttl: 15s
    dataset_ttl: 1m
    bundle_ttl: 1m
"""

RETURN = r"""
cluster_config:
  description: The configuration as declared (predicted in check mode); null when absent.
  returned: success
  type: dict
  sample: {node_ttl: 15, dataset_ttl: 60, bundle_ttl: 60, service_network: 10.240.0.0/16, history_retention: 86400}
mod_index:
  description: Modify index of the key after the task; null when absent or in check mode with a change.
  returned: success
  type: int
  sample: 42
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, declare_config
from ansible_collections.cerana.platform.plugins.module_utils._models import CLUSTER_CONFIG_KEY, ClusterConfig

FIELDS = ("node_ttl", "dataset_ttl", "bundle_ttl", "service_network", "history_retention")

ARGUMENT_SPEC = dict(
    node_ttl=dict(type="raw", default=30),
    dataset_ttl=dict(type="raw", default=60),
    bundle_ttl=dict(type="raw", default=60),
    service_network=dict(type="str", default="10.240.0.0/16"),
    history_retention=dict(type="raw", default=86400),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    mod_index=dict(type="int"),
    **CONNECTION_ARGSPEC,
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    declare_config(module, ClusterConfig, CLUSTER_CONFIG_KEY, FIELDS)


if __name__ == "__main__":
    main()

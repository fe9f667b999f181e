#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: node_info
short_description: List the live nodes of the cluster and what they report
version_added: 0.1.0
description:
  - Returns the nodes whose heartbeat is live (a node that stops ticking leaves the list when its
    TTL runs out), with the datasets and bundles their heartbeats report.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.info_attributes
options:
  id:
    description: Only this node (its machine id). Without it, every live node.
    type: str
    aliases: [name]
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Live nodes
  cerana.platform.node_info:
  register: cluster

- name: Their names
  ansible.builtin.debug:
    msg: "{{ cluster.nodes | map(attribute='hostname') }}"
"""

RETURN = r"""
nodes:
  description: The live nodes, sorted by id.
  returned: success
  type: list
  elements: dict
  sample:
    - {id: 3f2a9c, hostname: node1, heartbeat: "2026-11-30T03:04:05.000000Z", addresses: [10.77.0.11],
       cpu_count: 2, load: [0.1, 0.2, 0.3], memory_total: 25000000000, memory_free: 20000000000,
       disk_total: 100000000000, disk_free: 50000000000, labels: {}, datasets: [web-data], bundles: [shop]}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, run
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects

ARGUMENT_SPEC = dict(id=dict(type="str", aliases=["name"]), **CONNECTION_ARGSPEC)


def work(module, store):
    objects = Objects(store)
    wanted = module.params["id"]
    datasets = objects.dataset_heartbeats()
    bundles = objects.bundle_heartbeats()
    out = []
    for node in objects.nodes():
        if wanted and node.id != wanted:
            continue
        item = node.to_dict()
        item["datasets"] = sorted(d for d, beats in datasets.items() if any(b.node == node.id for b in beats))
        item["bundles"] = sorted(b for b, beats in bundles.items() if any(h.node == node.id for h in beats))
        out.append(item)
    return {"changed": False, "nodes": out}


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run(module, lambda store: work(module, store))


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: plan
short_description: Show what the cluster tick would change, without changing anything
version_added: 0.1.0
description:
  - Reads the declared objects, the live nodes, their heartbeats and what the cluster tick last applied (two Consul
    requests), and computes the cluster's plan - where every bundle and dataset copy should be and what each node must
    start, update, stop, add or remove to get there - with the same planner the cluster tick and the converge
    playbook use.
  - Read-only; always returns C(changed=false). Runs where Consul can be reached (usually the controller).
  - Bad declarations (a bundle naming a service or dataset that is not declared, a redundancy above the number of
    live nodes) do not fail the task; they are returned in RV(problems).
  - The rules (placement, datasets, rolling updates) are described in C(docs/cluster-tick.md) of the project.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.info_attributes
options:
  max_unavailable:
    description: How many replicas of one bundle may be down for an update at once; the other updates are deferred.
    type: int
    default: 1
  grace:
    description:
      - Seconds after an apply before a bundle that its node does not heartbeat is applied again.
    type: float
    default: 10
  node:
    description:
      - Only this node's part of the plan (its id or hostname); it must be live. Problems are still all returned.
    type: str
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: What would change
  cerana.platform.plan:
  register: cluster_plan

- name: Show it
  ansible.builtin.debug:
    msg: "{{ cluster_plan.text }}"

- name: Fail on bad declarations
  ansible.builtin.assert:
    that: cluster_plan.problems | length == 0
    fail_msg: "{{ cluster_plan.problems }}"

- name: One node's desired state
  cerana.platform.plan:
    node: node1
  register: node1_plan
"""

RETURN = r"""
plan:
  description:
    - The plan. C(placements) maps each valid bundle to its nodes, C(dataset_nodes) each dataset to the nodes that
      should hold a copy; C(nodes) has one entry per live node (only O(node) when given) with its desired C(datasets)
      and C(bundles) (id to digest), its C(changes), the C(deferred) updates, the C(held) bundles (invalid
      declarations left as they are) and C(notes) explaining them.
  returned: success
  type: dict
  sample:
    index: 1234
    placements: {shop: [3f2a9c, 7b1d44]}
    dataset_nodes: {web-root: [3f2a9c, 7b1d44]}
    nodes:
      3f2a9c:
        node: 3f2a9c
        hostname: node1
        datasets: [web-root]
        bundles: {shop: "sha256:9c1f..."}
        changes: {add_datasets: [], remove_datasets: [], start_bundles: [shop], update_bundles: [], stop_bundles: []}
        deferred: []
        held: []
        notes: {bundle/shop: new placement}
    problems: []
    changed_nodes: [3f2a9c]
    summary: {start_bundles: 1, update_bundles: 0, stop_bundles: 0, add_datasets: 0, remove_datasets: 0,
              deferred: 0, nodes: 3, changed_nodes: 1, bundles: 1, datasets: 1, problems: 0}
text:
  description: The plan as a human-readable diff (C(+) start/add, C(~) update, C(.) deferred, C(-) stop/remove).
  returned: success
  type: str
  sample: |
    node 3f2a9c (node1):
      + bundle  shop  sha256:9c1f2a3b4c5d (new placement)

    Plan: 1 bundle to start, 0 to update, 0 to stop, 0 deferred; ...
changed_nodes:
  description: The nodes (ids) that have changes to apply now, sorted.
  returned: success
  type: list
  elements: str
pending:
  description: Whether anything differs from the declared state (changes, or updates deferred by the rolling rule).
  returned: success
  type: bool
problems:
  description: What the planner could not honour, each with the C(object), C(field) and C(reason).
  returned: success
  type: list
  elements: dict
  sample:
    - {object: bundle/shop, field: services.web.dataset, reason: 'dataset "web-root" is not declared'}
index:
  description: The Consul index the state was read at (taken before reading it).
  returned: success
  type: int
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils import _planner
from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, run
from ansible_collections.cerana.platform.plugins.module_utils._clusterstate import read_state
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects

ARGUMENT_SPEC = dict(
    max_unavailable=dict(type="int", default=1),
    grace=dict(type="float", default=10.0),
    node=dict(type="str"),
    **CONNECTION_ARGSPEC,
)


def work(module, store):
    p = module.params
    state = read_state(Objects(store), time.time())
    plan = _planner.plan(state, max_unavailable=p["max_unavailable"], grace=p["grace"])
    if p["node"]:
        found = [n for n, o in sorted(state.nodes.items()) if p["node"] in (n, o.hostname)]
        if not found:
            live = ", ".join("%s (%s)" % (n, o.hostname) for n, o in sorted(state.nodes.items())) or "none"
            module.fail_json(msg="node: %r is not a live node (live nodes: %s)" % (p["node"], live), field="node")
        plan = plan.only_node(found[0])
    return {
        "changed": False,
        "plan": plan.to_dict(),
        "text": _planner.render_text(plan),
        "changed_nodes": list(plan.changed_nodes()),
        "pending": plan.pending(),
        "problems": [pr.to_dict() for pr in plan.problems],
        "index": plan.index,
    }


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    if module.params["max_unavailable"] < 1:
        module.fail_json(
            msg="max_unavailable: must be >= 1, got %d" % module.params["max_unavailable"], field="max_unavailable"
        )
    if module.params["grace"] < 0:
        module.fail_json(msg="grace: must be >= 0, got %s" % module.params["grace"], field="grace")
    run(module, lambda store: work(module, store))


if __name__ == "__main__":
    main()

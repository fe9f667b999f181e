#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: dataset
short_description: Declare a dataset of the cluster
version_added: 0.1.0
description:
  - Declares a dataset (a read-only or read-write file tree replicated to O(redundancy) nodes)
    in the cluster state, or removes its declaration.
  - The object is declared in full, each option left out takes its default, so a task
    describes the whole dataset. Removing deletes the object's whole subtree in Consul.
  - This declares the dataset; moving data is the job of the dataset import and replica modules.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.attributes
options:
  id:
    description:
      - The dataset id, a lowercase DNS label such as V(web-data).
      - When left out with O(state=present), a UUID is generated, so every run creates a new dataset;
        give an id to stay idempotent. Required with O(state=absent).
    type: str
    aliases: [name]
  parent:
    description: Id of the read-only dataset this one is created from.
    type: str
  parent_same_node:
    description: Whether copies must be made on a node that holds the parent.
    type: bool
    default: false
  read_only:
    description: Whether the dataset is immutable once imported.
    type: bool
    default: false
  redundancy:
    description: Number of nodes that must hold a copy, at least 1.
    type: int
    default: 1
  quota:
    description: Largest size in bytes; unlimited when left out.
    type: int
  nfs:
    description: Whether the dataset is exported over NFS.
    type: bool
    default: false
  state:
    description: Whether the dataset is declared.
    type: str
    choices: [present, absent]
    default: present
  mod_index:
    description:
      - Explicit compare-and-swap. The change is made only if the stored object still has this
        modify index (V(0) means it must not exist yet); otherwise the task fails naming both indexes.
      - Without it, a concurrent change between the read and the write is retried.
      - When the stored object already matches, nothing is written and the index is not checked.
    type: int
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Declare the web content dataset, kept on two nodes
  cerana.platform.dataset:
    id: web-data
    read_only: true
    redundancy: 2
    quota: 1073741824

- name: Remove it
  cerana.platform.dataset:
    id: web-data
    state: absent
"""

RETURN = r"""
dataset:
  description: The dataset as declared (predicted in check mode); null when absent.
  returned: success
  type: dict
  sample: {id: web-data, parent: null, parent_same_node: false, read_only: true, redundancy: 2, quota: 1073741824, nfs: false}
mod_index:
  description: Modify index of the stored object after the task; null when absent or in check mode with a change.
  returned: success
  type: int
  sample: 42
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, declare_object

FIELDS = ("id", "parent", "parent_same_node", "read_only", "redundancy", "quota", "nfs")

ARGUMENT_SPEC = dict(
    id=dict(type="str", aliases=["name"]),
    parent=dict(type="str"),
    parent_same_node=dict(type="bool", default=False),
    read_only=dict(type="bool", default=False),
    redundancy=dict(type="int", default=1),
    quota=dict(type="int"),
    nfs=dict(type="bool", default=False),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    mod_index=dict(type="int"),
    **CONNECTION_ARGSPEC,
)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC, required_if=[("state", "absent", ["id"])], supports_check_mode=True
    )
    declare_object(module, "dataset", FIELDS)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: dataset_info
short_description: List declared datasets and where their copies live
version_added: 0.1.0
description:
  - Returns the declared datasets, with the nodes whose dataset heartbeats report a copy, whether
    the declared redundancy is met, and what M(cerana.platform.dataset_import) recorded about the content
    (digest, size in bytes, number of files).
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.info_attributes
options:
  id:
    description: Only this dataset. Without it, every dataset.
    type: str
    aliases: [name]
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Which datasets lack copies?
  cerana.platform.dataset_info:
  register: found

- name: Show them
  ansible.builtin.debug:
    msg: "{{ found.datasets | rejectattr('redundancy_met') | map(attribute='id') }}"
"""

RETURN = r"""
datasets:
  description: The datasets, sorted by id (empty when O(id) is not declared).
  returned: success
  type: list
  elements: dict
  sample:
    - {id: web-data, parent: null, parent_same_node: false, read_only: true, redundancy: 2, quota: null, nfs: false,
       mod_index: 42, nodes: [3f2a9c], in_use_on: [], redundancy_met: false,
       content: {digest: "sha256:6349106624c74201332c52a97ff9ef33e33e0a858d1cd5fc93802633bc97cfa6", size: 104857600, files: 12}}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, run
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects

ARGUMENT_SPEC = dict(id=dict(type="str", aliases=["name"]), **CONNECTION_ARGSPEC)


def work(module, store):
    objects = Objects(store)
    wanted = module.params["id"]
    found = [objects.get("dataset", wanted)] if wanted else objects.list("dataset")
    heartbeats = objects.dataset_heartbeats(wanted)
    if wanted:
        found_content = objects.dataset_content(wanted)
        contents = {wanted: found_content} if found_content else {}
    else:
        contents = objects.dataset_contents()
    out = []
    for stored in filter(None, found):
        beats = heartbeats.get(stored.obj.id, [])
        item = dict(stored.obj.to_dict(), mod_index=stored.mod_index)
        item["nodes"] = sorted(hb.node for hb in beats)
        item["in_use_on"] = sorted(hb.node for hb in beats if hb.in_use)
        item["redundancy_met"] = len(item["nodes"]) >= stored.obj.redundancy
        content = contents.get(stored.obj.id)
        item["content"] = content.to_dict() if content else None
        out.append(item)
    return {"changed": False, "datasets": out}


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run(module, lambda store: work(module, store))


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: bundle_info
short_description: List declared bundles, optionally merged with their services and datasets
version_added: 0.1.0
description:
  - Returns the declared bundles and the instances that bundle heartbeats report.
  - With O(overlay=true), each bundle is merged with the definitions of the services and datasets it
    names (bundle values win where set; environment and health checks are merged by key). The task
    fails, naming the missing object, when a bundle references a service or dataset that is not declared.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.info_attributes
options:
  id:
    description: Only this bundle. Without it, every bundle.
    type: str
    aliases: [name]
  overlay:
    description: Merge each bundle with its services' and datasets' definitions.
    type: bool
    default: false
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Show what the shop bundle will really run
  cerana.platform.bundle_info:
    id: shop
    overlay: true
  register: found
"""

RETURN = r"""
bundles:
  description: The bundles, sorted by id (empty when O(id) is not declared).
  returned: success
  type: list
  elements: dict
  sample:
    - id: shop
      redundancy: 2
      services: {web: {id: web, dataset: web-root, cmd: [/bin/httpd, -f], env: {MODE: production}}}
      datasets: {}
      ports: {"8080": {port: 8080, public: true, external_port: 8080, connected_bundles: []}}
      mod_index: 44
      instances: [{node: 3f2a9c, time: "2026-11-30T03:04:05.000000Z", healthy: true, services: {}}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, run
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects

ARGUMENT_SPEC = dict(
    id=dict(type="str", aliases=["name"]),
    overlay=dict(type="bool", default=False),
    **CONNECTION_ARGSPEC,
)


def work(module, store):
    objects = Objects(store)
    wanted = module.params["id"]
    found = [objects.get("bundle", wanted)] if wanted else objects.list("bundle")
    heartbeats = objects.bundle_heartbeats(wanted)
    out = []
    for stored in filter(None, found):
        body = objects.overlay(stored.obj) if module.params["overlay"] else stored.obj.to_dict()
        item = dict(body, mod_index=stored.mod_index)
        item["instances"] = [
            dict(hb.to_dict(), healthy=hb.healthy())
            for hb in sorted(heartbeats.get(stored.obj.id, []), key=lambda h: h.node)
        ]
        out.append(item)
    return {"changed": False, "bundles": out}


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run(module, lambda store: work(module, store))


if __name__ == "__main__":
    main()

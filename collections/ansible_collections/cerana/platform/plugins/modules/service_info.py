#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: service_info
short_description: List declared services
version_added: 0.1.0
description:
  - Returns the declared services.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.info_attributes
options:
  id:
    description: Only this service. Without it, every service.
    type: str
    aliases: [name]
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Read the web service
  cerana.platform.service_info:
    id: web
  register: found
"""

RETURN = r"""
services:
  description: The services, sorted by id (empty when O(id) is not declared).
  returned: success
  type: list
  elements: dict
  sample:
    - {id: web, dataset: web-root, cmd: [/bin/httpd, -f], env: {}, kind: container,
       limits: {cpu: null, memory: null, processes: null}, health_checks: {}, mod_index: 43}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, run
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects

ARGUMENT_SPEC = dict(id=dict(type="str", aliases=["name"]), **CONNECTION_ARGSPEC)


def work(module, store):
    objects = Objects(store)
    wanted = module.params["id"]
    found = [objects.get("service", wanted)] if wanted else objects.list("service")
    return {"changed": False, "services": [dict(s.obj.to_dict(), mod_index=s.mod_index) for s in found if s]}


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run(module, lambda store: work(module, store))


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: kv
short_description: Set or remove a key in the platform's Consul KV space
version_added: 0.1.0
description:
  - Sets a key to a text value, or removes a key (and, with O(recurse), everything below it).
  - Keys are relative to O(kv_prefix) (V(cerana) by default); set O(kv_prefix) to an empty string for the KV root.
  - For the platform's declared objects use the object modules (M(cerana.platform.dataset) and friends),
    which validate what they write.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.attributes
options:
  key:
    description: The key, relative to O(kv_prefix), without a leading V(/).
    type: str
    required: true
  value:
    description: UTF-8 text to store. Required with O(state=present).
    type: str
  state:
    description: Whether the key exists.
    type: str
    choices: [present, absent]
    default: present
  cas:
    description:
      - Compare-and-swap on the key's modify index; V(0) means the key must not exist yet.
      - The task fails naming the expected and current index when the key changed in between.
      - When the key already holds O(value), nothing is written and the index is not checked.
    type: int
  recurse:
    description:
      - With O(state=absent), remove O(key) and every key below C(<key>/) in one transaction.
    type: bool
    default: false
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Pin a note for operators
  cerana.platform.kv:
    key: notes/maintenance
    value: "rack 3 is being recabled"

- name: Create a key only if nobody else did
  cerana.platform.kv:
    key: locks/bootstrap
    value: "{{ inventory_hostname }}"
    cas: 0

- name: Remove a whole subtree
  cerana.platform.kv:
    key: scratch
    state: absent
    recurse: true
"""

RETURN = r"""
key:
  description: The key, relative to the prefix.
  returned: success
  type: str
  sample: notes/maintenance
value:
  description: The value after the task; null when absent.
  returned: success
  type: str
  sample: rack 3 is being recabled
mod_index:
  description: Modify index after the task; null when absent or predicted in check mode.
  returned: success
  type: int
  sample: 1234
deleted:
  description: Keys removed (or that would be, in check mode) with O(state=absent).
  returned: when O(state=absent)
  type: list
  elements: str
  sample: [scratch/a, scratch/b]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, run
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects, RawValue
from ansible_collections.cerana.platform.plugins.module_utils._store import CasConflict

ARGUMENT_SPEC = dict(
    key=dict(type="str", required=True, no_log=False),
    value=dict(type="str"),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    cas=dict(type="int"),
    recurse=dict(type="bool", default=False),
    **CONNECTION_ARGSPEC,
)


def _diff(module, result, before, after):
    if module._diff:
        result["diff"] = {
            "before": before,
            "after": after,
            "before_header": result["key"],
            "after_header": result["key"],
        }
    return result


def present(module, store):
    p = module.params
    objects = Objects(store)
    outcome = objects.apply(
        p["key"],
        RawValue(p["value"].encode("utf-8")),
        current=objects.get_raw(p["key"]),
        mod_index=p["cas"],
        check_mode=module.check_mode,
        reread=lambda: objects.get_raw(p["key"]),
    )
    before = "" if outcome.before is None else outcome.before.to_dict() + "\n"
    result = {"changed": outcome.changed, "key": p["key"], "value": p["value"], "mod_index": outcome.mod_index}
    return _diff(module, result, before, p["value"] + "\n")


def absent(module, store):
    p = module.params
    key = p["key"]
    current = store.get(key, consistent=True)
    doomed = [current.key] if current else []
    if p["recurse"]:
        doomed += [k for k in store.keys(key.rstrip("/") + "/") if k != key]
    if current is not None and p["cas"] is not None and current.modify_index != p["cas"]:
        raise CasConflict(key, p["cas"], current.modify_index)
    result = {"changed": bool(doomed), "key": key, "value": None, "mod_index": None, "deleted": doomed}
    if doomed and not module.check_mode:
        if p["recurse"]:
            store.delete_tree(key, cas_key=key if current else None, cas=p["cas"] if current else None)
        else:
            store.delete(key, cas=current.modify_index)
    return _diff(module, result, "".join(k + "\n" for k in doomed), "")


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC, required_if=[("state", "present", ["value"])], supports_check_mode=True
    )
    if module.params["recurse"] and module.params["state"] == "present":
        module.fail_json(msg="recurse: only applies to state=absent")
    run(module, lambda store: (present if module.params["state"] == "present" else absent)(module, store))


if __name__ == "__main__":
    main()

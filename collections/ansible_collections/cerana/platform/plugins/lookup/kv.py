# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: kv
short_description: Read keys of the platform's Consul KV space
version_added: 0.1.0
description:
  - Returns the value of each key, relative to O(kv_prefix).
  - With O(recurse), returns for each term a mapping of every key below C(<term>/) to its value.
extends_documentation_fragment:
  - cerana.platform._plugin_connection
options:
  _terms:
    description: Keys to read.
    required: true
    type: list
    elements: str
  recurse:
    description: Return every key below each term, as a mapping.
    type: bool
    default: false
  default:
    description:
      - Value returned for a key that does not exist. Without it, a missing key is an error.
    type: raw
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Read the raw cluster configuration
  ansible.builtin.debug:
    msg: "{{ lookup('cerana.platform.kv', 'cluster/config') | from_json }}"

- name: A key that may be missing
  ansible.builtin.debug:
    msg: "{{ lookup('cerana.platform.kv', 'notes/maintenance', default='none') }}"

- name: Everything below datasets/
  ansible.builtin.debug:
    msg: "{{ lookup('cerana.platform.kv', 'datasets', recurse=true) }}"
"""

RETURN = r"""
_raw:
  description: One value per term (text), or with O(recurse) one mapping of key to value per term.
  type: list
  elements: raw
"""

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError
from ansible_collections.cerana.platform.plugins.plugin_utils._store import store_from_plugin

_MISSING = object()


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        store = store_from_plugin(self)
        default = self.get_option("default") if "default" in kwargs else _MISSING
        out = []
        try:
            for term in terms:
                if self.get_option("recurse"):
                    base = term.rstrip("/") + "/"
                    out.append({e.key: e.value.decode("utf-8", "replace") for e in store.list(base)})
                    continue
                entry = store.get(term)
                if entry is None:
                    if default is _MISSING:
                        raise AnsibleLookupError("key %r not found in Consul (under prefix %r)" % (term, store.prefix))
                    out.append(default)
                else:
                    out.append(entry.value.decode("utf-8", "replace"))
        except StoreError as e:
            raise AnsibleLookupError(str(e)) from e
        return out

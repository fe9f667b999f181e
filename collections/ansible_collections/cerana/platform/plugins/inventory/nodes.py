# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
name: nodes
short_description: The platform's live nodes, read from Consul
version_added: 0.1.0
description:
  - Hosts are the nodes whose heartbeat key C(nodes/<id>) is live in Consul (written by C(cerana-node-tick));
    a node that stops heartbeating leaves within about two node TTLs.
  - Groups are C(cerana_nodes) (every node), C(consul_servers) (nodes carrying every label of
    O(consul_server_labels)) and one group per label, C(label_<key>_<value>), with every character other
    than letters, digits and C(_) replaced by C(_).
  - "Host variables: C(ansible_host) (the node's first address), C(cerana_node_id), C(cerana_hostname),
    C(cerana_addresses), C(cerana_labels), C(cerana_heartbeat) and C(cerana_resources) (C(cpu_count), C(load),
    C(memory_total), C(memory_free), C(disk_total), C(disk_free); bytes)."
  - The inventory file name must end with C(cerana_nodes.yml) or C(cerana_nodes.yaml).
extends_documentation_fragment:
  - cerana.platform._plugin_connection
  - ansible.builtin.constructed
  - ansible.builtin.inventory_cache
options:
  plugin:
    description: The name of this plugin; it makes the file an inventory source for it.
    required: true
    type: str
    choices: [cerana.platform.nodes]
  host_name:
    description:
      - What names a host in the inventory. V(hostname) is the node's host name; when two live nodes share
        one, the second and later ones are named by their node id instead (with a warning).
      - V(id) is the node id (the machine id), stable across renames.
    type: str
    choices: [hostname, id]
    default: hostname
  consul_server_labels:
    description: Labels that put a node into the C(consul_servers) group (it must carry all of them).
    type: dict
    default: {consul_role: server}
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
# inventory/prod.cerana_nodes.yml
plugin: cerana.platform.nodes
consul_url: http://consul.example.internal:8500

# With caching, extra groups and variables
plugin: cerana.platform.nodes
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/cerana-inventory
cache_timeout: 60
keyed_groups:
  - key: cerana_resources.cpu_count
    prefix: cpus
compose:
  free_disk_gib: cerana_resources.disk_free // (1024 ** 3)
groups:
  low_memory: cerana_resources.memory_free < 1073741824
"""

import re

from ansible.errors import AnsibleError, AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable

from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError
from ansible_collections.cerana.platform.plugins.plugin_utils._store import store_from_plugin

ALL_GROUP = "cerana_nodes"
SERVERS_GROUP = "consul_servers"
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def label_group(key, value):
    """``label_<key>_<value>`` with every character other than letters, digits and ``_`` made ``_``."""
    return _UNSAFE.sub("_", "label_%s_%s" % (key, value))


def host_vars(node):
    """The host variables of one node (a ``Node.to_dict()``)."""
    addresses = list(node.get("addresses") or [])
    hostvars = {
        "cerana_node_id": node["id"],
        "cerana_hostname": node["hostname"],
        "cerana_addresses": addresses,
        "cerana_labels": dict(node.get("labels") or {}),
        "cerana_heartbeat": node["heartbeat"],
        "cerana_resources": {
            k: node.get(k) for k in ("cpu_count", "load", "memory_total", "memory_free", "disk_total", "disk_free")
        },
    }
    if addresses:
        hostvars["ansible_host"] = addresses[0]
    return hostvars


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "cerana.platform.nodes"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("cerana_nodes.yml", "cerana_nodes.yaml"))

    def _fetch(self):
        """The live nodes as plain dicts (what the cache holds)."""
        try:
            store = store_from_plugin(self)
            return [node.to_dict() for node in Objects(store).nodes()]
        except AnsibleError as e:
            raise AnsibleParserError("cerana.platform.nodes: %s" % e.message) from e
        except StoreError as e:
            raise AnsibleParserError("cerana.platform.nodes: cannot read the live nodes: %s" % e) from e

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)

        cache_key = self.get_cache_key(path)
        use_cache = self.get_option("cache")
        read_cache = use_cache and cache
        update_cache = use_cache and not cache
        nodes = None
        if read_cache:
            try:
                nodes = self._cache[cache_key]
            except KeyError:
                update_cache = True
        if nodes is None:
            nodes = self._fetch()
        if update_cache:
            self._cache[cache_key] = nodes
        self._populate(nodes)

    def _populate(self, nodes):
        strict = self.get_option("strict")
        by_id = self.get_option("host_name") == "id"
        server_labels = {str(k): str(v) for k, v in (self.get_option("consul_server_labels") or {}).items()}
        self.inventory.add_group(ALL_GROUP)
        self.inventory.add_group(SERVERS_GROUP)
        taken = {}
        for node in sorted(nodes, key=lambda n: n["id"]):
            name = node["id"] if by_id else node["hostname"]
            if name in taken:
                self.display.warning(
                    "cerana.platform.nodes: nodes %s and %s are both named %r; using the node id for the second"
                    % (taken[name], node["id"], name)
                )
                name = node["id"]
            taken[name] = node["id"]
            self.inventory.add_host(name, group=ALL_GROUP)
            hostvars = host_vars(node)
            for var, value in hostvars.items():
                self.inventory.set_variable(name, var, value)
            labels = hostvars["cerana_labels"]
            if server_labels and all(labels.get(k) == v for k, v in server_labels.items()):
                self.inventory.add_child(SERVERS_GROUP, name)
            for key, value in sorted(labels.items()):
                group = self.inventory.add_group(label_group(key, value))
                self.inventory.add_child(group, name)
            self._set_composite_vars(self.get_option("compose"), hostvars, name, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), hostvars, name, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hostvars, name, strict=strict)

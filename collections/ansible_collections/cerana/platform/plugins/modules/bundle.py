#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: bundle
short_description: Declare a bundle of services, datasets and ports
version_added: 0.1.0
description:
  - Declares a bundle, the unit the cluster runs on O(redundancy) nodes, or removes its declaration.
  - A bundle names its services (with per-bundle overrides), the datasets its instances get, and
    the ports it listens on. Services and datasets are referenced by id; M(cerana.platform.bundle_info)
    with C(overlay=true) shows the bundle merged with their definitions.
  - The object is declared in full, each option left out takes its default.
    Removing deletes the object's whole subtree in Consul.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.attributes
options:
  id:
    description:
      - The bundle id, a lowercase DNS label such as V(shop).
      - Generated (a UUID) when left out with O(state=present); required with O(state=absent).
    type: str
    aliases: [name]
  redundancy:
    description: Number of nodes that run an instance of the bundle, at least 1.
    type: int
    default: 1
  services:
    description: The services of the bundle, with optional overrides of their declared values.
    type: list
    elements: dict
    suboptions:
      id:
        description: Id of a declared service.
        type: str
        required: true
      dataset:
        description: Dataset to run from instead of the service's own.
        type: str
      cmd:
        description: Command instead of the service's own.
        type: list
        elements: str
      env:
        description: Environment variables added to (or replacing) the service's own.
        type: dict
      limits:
        description: Limits replacing the service's own where set.
        type: dict
        suboptions:
          cpu:
            description: CPU cores.
            type: float
          memory:
            description: Memory in bytes.
            type: int
          processes:
            description: Largest number of processes.
            type: int
      health_checks:
        description: Health checks added to (or replacing, by id) the service's own; same form as in M(cerana.platform.service).
        type: list
        elements: dict
      datasets:
        description: Bundle datasets (by O(datasets[].name)) mounted into this service.
        type: list
        elements: dict
        suboptions:
          name:
            description: Name of a dataset of the bundle.
            type: str
            required: true
          mount_point:
            description: Absolute path inside the service.
            type: str
            required: true
          read_only:
            description: Mount read-only.
            type: bool
            default: false
  datasets:
    description: Datasets the bundle's instances get, by name.
    type: list
    elements: dict
    suboptions:
      name:
        description: Name of the dataset within the bundle, a lowercase DNS label.
        type: str
        required: true
      id:
        description:
          - Id of a declared dataset the instance's copy is made from.
          - Left out, the instance starts with an empty dataset (always so for V(ramdisk)).
        type: str
      type:
        description:
          - V(rw) a persistent read-write dataset per instance; V(temp) a scratch copy discarded when the
            instance stops; V(ramdisk) a tmpfs of O(datasets[].quota) bytes.
        type: str
        choices: [rw, temp, ramdisk]
        default: rw
      quota:
        description: Largest size in bytes (required for V(ramdisk)); the declared dataset's quota when left out.
        type: int
  ports:
    description: Ports the bundle's services listen on.
    type: list
    elements: dict
    suboptions:
      port:
        description: The port inside the bundle's network.
        type: int
        required: true
      public:
        description: Publish the port on the nodes running the bundle.
        type: bool
        default: false
      external_port:
        description: Port on the nodes (needs O(ports[].public)); the same as O(ports[].port) when left out.
        type: int
      connected_bundles:
        description: Ids of other bundles allowed to reach this port.
        type: list
        elements: str
  state:
    description: Whether the bundle is declared.
    type: str
    choices: [present, absent]
    default: present
  mod_index:
    description:
      - Explicit compare-and-swap, as in M(cerana.platform.dataset).
    type: int
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Run the web service twice, with a scratch ramdisk, published on port 8080
  cerana.platform.bundle:
    id: shop
    redundancy: 2
    datasets:
      - name: scratch
        type: ramdisk
        quota: 67108864
    services:
      - id: web
        env: {MODE: production}
        datasets:
          - name: scratch
            mount_point: /tmp
    ports:
      - port: 8080
        public: true
        external_port: 8080
"""

RETURN = r"""
bundle:
  description: The bundle as declared (predicted in check mode); null when absent.
  returned: success
  type: dict
  sample:
    id: shop
    redundancy: 2
    datasets: {scratch: {name: scratch, id: null, type: ramdisk, quota: 67108864}}
    services:
      web: {id: web, dataset: null, cmd: null, env: {MODE: production},
            limits: {cpu: null, memory: null, processes: null}, health_checks: {},
            datasets: {scratch: {name: scratch, mount_point: /tmp, read_only: false}}}
    ports: {"8080": {port: 8080, public: true, external_port: 8080, connected_bundles: []}}
mod_index:
  description: Modify index of the stored object after the task; null when absent or in check mode with a change.
  returned: success
  type: int
  sample: 42
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import (
    CONNECTION_ARGSPEC,
    LIMITS_SPEC,
    declare_object,
)

FIELDS = ("id", "redundancy", "services", "datasets", "ports")

MOUNT_SPEC = dict(
    name=dict(type="str", required=True),
    mount_point=dict(type="str", required=True),
    read_only=dict(type="bool", default=False),
)
SERVICE_SPEC = dict(
    id=dict(type="str", required=True),
    dataset=dict(type="str"),
    cmd=dict(type="list", elements="str"),
    env=dict(type="dict"),
    limits=dict(type="dict", options=LIMITS_SPEC),
    health_checks=dict(type="list", elements="dict"),
    datasets=dict(type="list", elements="dict", options=MOUNT_SPEC),
)
DATASET_SPEC = dict(
    name=dict(type="str", required=True),
    id=dict(type="str"),
    type=dict(type="str", default="rw", choices=["rw", "temp", "ramdisk"]),
    quota=dict(type="int"),
)
PORT_SPEC = dict(
    port=dict(type="int", required=True),
    public=dict(type="bool", default=False),
    external_port=dict(type="int"),
    connected_bundles=dict(type="list", elements="str"),
)

ARGUMENT_SPEC = dict(
    id=dict(type="str", aliases=["name"]),
    redundancy=dict(type="int", default=1),
    services=dict(type="list", elements="dict", options=SERVICE_SPEC),
    datasets=dict(type="list", elements="dict", options=DATASET_SPEC),
    ports=dict(type="list", elements="dict", options=PORT_SPEC),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    mod_index=dict(type="int"),
    **CONNECTION_ARGSPEC,
)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC, required_if=[("state", "absent", ["id"])], supports_check_mode=True
    )
    declare_object(module, "bundle", FIELDS)


if __name__ == "__main__":
    main()

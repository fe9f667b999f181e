#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: service
short_description: Declare a service of the cluster
version_added: 0.1.0
description:
  - Declares a service (a command run from a dataset, as a container or a VM) in the cluster
    state, or removes its declaration.
  - The object is declared in full, each option left out takes its default.
    Removing deletes the object's whole subtree in Consul.
  - Bundles say where and how many times a service runs; see M(cerana.platform.bundle).
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
  - cerana.platform._connection.attributes
options:
  id:
    description:
      - The service id, a lowercase DNS label such as V(web).
      - Generated (a UUID) when left out with O(state=present); required with O(state=absent).
    type: str
    aliases: [name]
  dataset:
    description: Id of the dataset the service runs from (its root file tree or VM disk). Required with O(state=present).
    type: str
  cmd:
    description: The command and its arguments. Required for O(kind=container).
    type: list
    elements: str
  env:
    description: Environment variables of the command.
    type: dict
  kind:
    description: Run as a container or as a VM.
    type: str
    choices: [container, vm]
    default: container
  limits:
    description: Resource limits; a limit left out means none.
    type: dict
    suboptions:
      cpu:
        description: CPU cores, for example V(0.5).
        type: float
      memory:
        description: Memory in bytes (at least 1 MiB).
        type: int
      processes:
        description: Largest number of processes.
        type: int
  health_checks:
    description: Health checks run on every instance of the service.
    type: list
    elements: dict
    suboptions:
      id:
        description: The check id, a lowercase DNS label.
        type: str
        required: true
      kind:
        description: What the check does.
        type: str
        required: true
        choices: [http, tcp, command, file, uptime]
      args:
        description:
          - Arguments of the check.
          - V(http) takes C(port) (required), C(path) (V(/)), C(scheme) (V(http)), C(host) (V(127.0.0.1)),
            C(expect_status) (V(200)), C(body_regex).
          - V(tcp) takes C(port) (required), C(host), C(send), C(expect_regex).
          - V(command) takes C(cmd), a list (required). V(file) takes C(path) (required), C(exists) (V(true)),
            C(mode), C(min_size), C(max_size). V(uptime) takes C(min_uptime) (required, a duration).
        type: dict
      interval:
        description: Seconds between runs, or a duration such as V(30s) or V(1m).
        type: raw
        default: 10
      timeout:
        description: Seconds a run may take, at most the interval.
        type: raw
        default: 5
  state:
    description: Whether the service is declared.
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
- name: Declare a web server run from the web-root dataset
  cerana.platform.service:
    id: web
    dataset: web-root
    cmd: [/bin/busybox, httpd, -f, -p, "8080"]
    env:
      LANG: C.UTF-8
    limits:
      cpu: 0.5
      memory: 134217728
    health_checks:
      - id: http
        kind: http
        args: {port: 8080, path: /}
        interval: 10s
"""

RETURN = r"""
service:
  description: The service as declared (predicted in check mode); null when absent.
  returned: success
  type: dict
  sample:
    id: web
    dataset: web-root
    cmd: [/bin/busybox, httpd, -f, -p, "8080"]
    env: {LANG: C.UTF-8}
    kind: container
    limits: {cpu: 0.5, memory: 134217728, processes: null}
    health_checks:
      http: {id: http, kind: http, interval: 10, timeout: 5,
             args: {port: 8080, path: /, scheme: http, host: 127.0.0.1, expect_status: 200, body_regex: null}}
mod_index:
  description: Modify index of the stored object after the task; null when absent or in check mode with a change.
  returned: success
  type: int
  sample: 42
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import (
    CONNECTION_ARGSPEC,
    HEALTH_CHECK_SPEC,
    LIMITS_SPEC,
    declare_object,
)

FIELDS = ("id", "dataset", "cmd", "env", "kind", "limits", "health_checks")


ARGUMENT_SPEC = dict(
    id=dict(type="str", aliases=["name"]),
    dataset=dict(type="str"),
    cmd=dict(type="list", elements="str"),
    env=dict(type="dict"),
    kind=dict(type="str", default="container", choices=["container", "vm"]),
    limits=dict(type="dict", options=LIMITS_SPEC),
    health_checks=dict(type="list", elements="dict", options=HEALTH_CHECK_SPEC),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    mod_index=dict(type="int"),
    **CONNECTION_ARGSPEC,
)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        required_if=[("state", "absent", ["id"]), ("state", "present", ["dataset"])],
        supports_check_mode=True,
    )
    declare_object(module, "service", FIELDS)


if __name__ == "__main__":
    main()

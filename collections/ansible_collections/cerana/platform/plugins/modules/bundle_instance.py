#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: bundle_instance
short_description: Run a whole bundle on this node (its network and every service) in one task
version_added: 0.1.0
description:
  - Runs on the node (not the controller). What M(cerana.platform.bundle_network) and
    M(cerana.platform.service_instance) do for one bundle, in one module call - one process, one Consul
    connection - which is what the C(cerana.platform.converge) playbook runs for every bundle it starts, updates
    or stops on a node.
  - V(started) - the bundle's network namespace and address on this node (as M(cerana.platform.bundle_network)
    with O(state=present)), then each service declared in the bundle started (as M(cerana.platform.service_instance)
    with O(state=started), so only changed instances restart), and the instances of services no longer declared in
    the bundle removed.
  - V(absent) - every instance of the bundle found on this node (its unit files, instance records and VM
    directories; Consul is not read for them) removed, then its network.
  - Every service is checked (dataset on the node, command in the dataset, ports) before any unit is written; then
    the changed units are written, systemd is reloaded once, and the instances to start are started together. A
    service that does not stay up is put back as it was (see M(cerana.platform.service_instance)) and the task
    fails naming it; the other services keep their new state, and a second run continues from there.
  - Needs what both modules need on the node - iproute2 (C(ip), C(bridge)), C(bwrap), systemd, and libvirt-python for
    VM services.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
attributes:
  check_mode:
    description: Predicts the network and every instance without changing anything.
    support: full
  diff_mode:
    description: One diff per part - the network record, then each unit file (or VM domain).
    support: full
  idempotent:
    description: >-
      A second run with the same declarations reports C(changed=false) (the network's lease renewal aside, see
      M(cerana.platform.bundle_network)).
    support: partial
options:
  bundle:
    description: The bundle id. With O(state=started) it must be declared.
    type: str
    required: true
  state:
    description:
      - V(started) - the network exists, the declared services run their current definition, nothing else of the
        bundle runs here.
      - V(absent) - nothing of the bundle is left on the node (data of C(rw) bundle datasets is kept).
    type: str
    choices: [started, absent]
    default: started
  node_id:
    description: This node's id (for its leases); default C(/etc/machine-id).
    type: str
  data_dir:
    description: The node's data directory (datasets, rw bundle data, VM overlays).
    type: path
    default: /var/lib/cerana
  run_dir:
    description: Where network and instance records are kept (as the node tick's C(run_dir)).
    type: path
    default: /run/cerana
  unit_dir:
    description: Where unit files are written.
    type: path
    default: /etc/systemd/system
  bridge:
    description: The node's bridge (bundle veths and VM NICs join it).
    type: str
    default: cerana0
  settle:
    description: Seconds a started instance must stay up for the task to succeed.
    type: float
    default: 1.0
  libvirt_uri:
    description: The libvirt connection for VM services.
    type: str
    default: qemu:///system
  shutdown_timeout:
    description: Seconds a VM gets to power off after an ACPI shutdown request before it is destroyed.
    type: float
    default: 30.0
seealso:
  - module: cerana.platform.bundle_network
  - module: cerana.platform.service_instance
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Run bundle shop on the node
  cerana.platform.bundle_instance:
    bundle: shop
    consul_url: http://10.77.0.11:8500

- name: Remove it from the node
  cerana.platform.bundle_instance:
    bundle: shop
    state: absent
"""

RETURN = r"""
network:
  description: The bundle_network result (its C(record) is null when absent).
  returned: always
  type: dict
  sample: {"changed": false, "record": {"bundle": "shop", "address": "10.240.17.3"}}
services:
  description: The service_instance result of each service handled, by service id.
  returned: always
  type: dict
  sample: {"web": {"changed": true, "active": true, "main_pid": 1234, "restarted": false}}
removed:
  description: Services whose instances were removed (no longer declared, or all with O(state=absent)).
  returned: always
  type: list
  elements: str
  sample: [old-worker]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net as bn
from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio as bnio
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _service_instance as si
from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, store_from_module

ARGUMENT_SPEC = dict(
    bundle=dict(type="str", required=True),
    state=dict(type="str", default="started", choices=["started", "absent"]),
    node_id=dict(type="str"),
    data_dir=dict(type="path", default="/var/lib/cerana"),
    run_dir=dict(type="path", default="/run/cerana"),
    unit_dir=dict(type="path", default="/etc/systemd/system"),
    bridge=dict(type="str", default=bn.BRIDGE),
    settle=dict(type="float", default=1.0),
    libvirt_uri=dict(type="str", default="qemu:///system"),
    shutdown_timeout=dict(type="float", default=30.0),
    **CONNECTION_ARGSPEC,
)


def network(module, state):
    p = module.params
    params = dict(
        bundle=p["bundle"], state=state, node_id=p["node_id"], run_dir=p["run_dir"], bridge=p["bridge"],
        vxlan=bn.VXLAN, vni=bn.VNI, vxlan_port=bn.VXLAN_PORT, mtu=bn.MTU,
        lease_duration=bnio.DEFAULT_LEASE_DURATION, namespace=True,
    )  # fmt: skip
    opts = bnio.options_from_params(params)
    return bnio.run(store_from_module(module), opts, state, module.check_mode, module._diff)


def instances(module, services, state, out, diffs):
    """The services' instances to ``state`` (containers together); the ids of those that changed."""
    tasks = [si.Task(module, service=s, state=state) for s in services]
    changed = []
    for service, result in zip(services, si.dispatch_many(tasks), strict=True):
        diff = result.pop("diff", None)
        if diff:
            diffs.append(diff)
        out[service] = result
        if result["changed"]:
            changed.append(service)
    return changed


def converge(module):
    p = module.params
    bundle = m._label(p["bundle"], "bundle")
    result = {"changed": False, "network": {}, "services": {}, "removed": []}
    diffs = []
    found = si.services_on_node(bundle, p["unit_dir"], p["run_dir"], p["data_dir"])
    if p["state"] == "started":
        declared = si.declared_services(module)
        net = network(module, "present")
        if net.get("diff"):
            diffs.append(net.pop("diff"))
        result["network"] = net
        result["changed"] = net["changed"]
        result["removed"] = instances(
            module, [s for s in found if s not in declared], "absent", result["services"], diffs
        )
        started = instances(module, declared, "started", result["services"], diffs)
        result["changed"] = bool(result["changed"] or result["removed"] or started)
    else:
        result["removed"] = instances(module, found, "absent", result["services"], diffs)
        result["changed"] = bool(result["removed"])
        net = network(module, "absent")
        if net.get("diff"):
            diffs.append(net.pop("diff"))
        result["network"] = net
        result["changed"] = result["changed"] or net["changed"]
    if module._diff:
        result["diff"] = diffs
    return result


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    try:
        result = converge(module)
    except (*si.EXPECTED, bnio.NetError) as e:
        module.fail_json(**si.failure(e))
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: bundle_network
short_description: Give a bundle its network namespace and service address on this node
version_added: 0.1.0
description:
  - Runs on the node (not the controller). Gives the bundle O(bundle) a network namespace
    C(/run/netns/cerana-<bundle>) on this node, joined to the node's bridge by a veth pair (C(eth0) inside),
    with an address from the cluster's service network (C(service_network) of M(cerana.platform.cluster_config),
    default V(10.240.0.0/16)) and a default route through the node's own address on the bridge.
  - Addresses come from the same lease table as DHCP (pool C(service) - C(<kv_prefix>/service/leases/<ip>) and
    C(<kv_prefix>/service/macs/<mac>)); the MAC of the bundle's C(eth0) is derived from the bundle and node ids,
    so the bundle gets the same address back on this node. A lease with less than half of O(lease_duration)
    left is renewed.
  - On first use the node itself gets the bridge O(bridge) with its own address from the same pool,
    C(net.ipv4.ip_forward=1), and a vxlan device O(vxlan) on the bridge that floods to every other live node
    (head-end replication to the first IPv4 address of each C(nodes/<id>) entry outside the service network),
    so bundle instances on different nodes reach each other on one layer-2 network.
  - Records the result in C(<run_dir>/networks/<bundle>.json), which M(cerana.platform.service_instance) and the
    node tick read.
  - If any step fails, the changes of this run (namespace, links, addresses, leases, record) are undone.
  - Needs iproute2 (C(ip), C(bridge)) on the node; py-consul only where a proxy or CA bundle in the environment calls for it.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
attributes:
  check_mode:
    description: Reads only and lists the actions it would take; a new address is not known until it is allocated.
    support: full
  diff_mode:
    description: Returns the network record before and after.
    support: full
  idempotent:
    description: >-
      A second run changes nothing (C(changed=false)) unless a lease needs renewing (less than half of
      O(lease_duration) left) or another node joined or left (the flood list of the vxlan device follows).
    support: partial
options:
  bundle:
    description:
      - The bundle id. With O(state=present) the bundle must be declared.
      - Left out with O(state=present), only the node's side is made (the bridge with the node's service address,
        the vxlan overlay to the live nodes, forwarding), which every node needs to publish ports and reach the
        bundles of other nodes; the C(cerana.platform.node_tick) role does this on every node.
      - Required with O(state=absent).
    type: str
  state:
    description:
      - V(present) - the namespace, veth pair, address, routes and record exist (and the node's bridge and vxlan).
      - V(absent) - the bundle's namespace, veth pair and record are removed and its lease is released; the node's
        bridge and vxlan device stay. Fails while service instances of the bundle run on the node.
    type: str
    choices: [present, absent]
    default: present
  node_id:
    description: This node's id; default the machine id in C(/etc/machine-id) (what the node tick uses).
    type: str
  run_dir:
    description: Where network records are kept (as the node tick's C(run_dir)).
    type: path
    default: /run/cerana
  bridge:
    description: The node's bridge for bundle networks.
    type: str
    default: cerana0
  vxlan:
    description: The node's vxlan device (a port of O(bridge)).
    type: str
    default: cerana-vx
  vni:
    description: The VXLAN network identifier; the same on every node.
    type: int
    default: 10240
  vxlan_port:
    description: The UDP port of the VXLAN tunnel; the same on every node.
    type: int
    default: 4789
  mtu:
    description: MTU of the bridge, the vxlan device and the bundle's veth pair (the underlay MTU minus 50).
    type: int
    default: 1450
  lease_duration:
    description: Lease time of the addresses, in seconds or as a duration (V(1d)).
    type: raw
    default: 86400
  namespace:
    description:
      - With V(false), only the node's side, the bundle's lease and its record are made; no namespace and no veth
        pair (a namespace and veth pair left from an earlier run are removed). For a bundle whose endpoint on the
        node is a VM (M(cerana.platform.service_instance) with C(kind=vm) puts a NIC with the record's MAC on the
        bridge). The record still names the namespace and veth, which then do not exist.
    type: bool
    default: true
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Give bundle shop its network on the nodes that run it
  cerana.platform.bundle_network:
    bundle: shop
    consul_url: http://10.77.0.11:8500

- name: Remove it (after its service instances)
  cerana.platform.bundle_network:
    bundle: shop
    state: absent

- name: Only join this node to the service network (bridge, overlay, the node's address)
  cerana.platform.bundle_network:
    state: present
"""

RETURN = r"""
address:
  description: The bundle's address on this node; null when absent, or in check mode before it is allocated.
  returned: always
  type: str
  sample: 10.240.17.3
prefix_len:
  description: Prefix length of the service network; null when absent.
  returned: always
  type: int
  sample: 16
gateway:
  description: The node's own address on the bridge (the bundle's default route); null when absent or not known yet.
  returned: always
  type: str
  sample: 10.240.0.9
netns:
  description: The network namespace's name; null with O(namespace=false).
  returned: always
  type: str
  sample: cerana-shop
netns_path:
  description: The namespace file (for C(NetworkNamespacePath=) or C(nsenter --net=)); null with O(namespace=false).
  returned: always
  type: str
  sample: /run/netns/cerana-shop
mac:
  description: The MAC address of the bundle's C(eth0) (and of its lease).
  returned: always
  type: str
  sample: 02:5e:01:9a:33:c0
host_veth:
  description: The node's end of the veth pair; null with O(namespace=false).
  returned: always
  type: str
  sample: cbn1a2b3c4d5e6f
peers:
  description: Underlay addresses of the other live nodes the vxlan device floods to (empty for V(absent)).
  returned: always
  type: list
  elements: str
  sample: [10.77.0.12, 10.77.0.13]
actions:
  description: What the task did (or would do in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: ["allocate an address in 10.240.0.0/16 (bundle shop)", "create network namespace cerana-shop"]
record:
  description: The network record after the task (null when absent, or in check mode before allocation).
  returned: always
  type: dict
  sample: {"bundle": "shop", "netns": "cerana-shop", "address": "10.240.17.3", "prefix_len": 16,
           "gateway": "10.240.0.9", "mac": "02:5e:01:9a:33:c0", "host_veth": "cbn1a2b3c4d5e6f"}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net as bn
from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio as bnio
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, store_from_module
from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError

ARGUMENT_SPEC = dict(
    bundle=dict(type="str"),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    node_id=dict(type="str"),
    run_dir=dict(type="path", default="/run/cerana"),
    bridge=dict(type="str", default=bn.BRIDGE),
    vxlan=dict(type="str", default=bn.VXLAN),
    vni=dict(type="int", default=bn.VNI),
    vxlan_port=dict(type="int", default=bn.VXLAN_PORT),
    mtu=dict(type="int", default=bn.MTU),
    lease_duration=dict(type="raw", default=bnio.DEFAULT_LEASE_DURATION),
    namespace=dict(type="bool", default=True),
    **CONNECTION_ARGSPEC,
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    try:
        opts = bnio.options_from_params(module.params)
        result = bnio.run(store_from_module(module), opts, module.params["state"], module.check_mode, module._diff)
    except bnio.NetError as e:
        module.fail_json(msg=str(e), **e.extra)
    except m.ValidationError as e:
        module.fail_json(msg=str(e), field=e.path)
    except StoreError as e:
        module.fail_json(msg=str(e))
    module.exit_json(**result)


if __name__ == "__main__":
    main()

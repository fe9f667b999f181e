#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: service_instance
short_description: Run one service of a bundle on this node as a sandboxed systemd unit
version_added: 0.1.0
description:
  - Runs on the node (not the controller). Reads the bundle overlay (the bundle merged with its services and
    datasets) from Consul and runs the service O(service) of O(bundle) as the systemd unit
    C(cerana-<bundle>_<service>.service).
  - The unit runs the service's C(cmd) under bubblewrap as the unprivileged user C(cerana-svc) in new user, PID,
    IPC and UTS namespaces, with the service dataset C(<data_dir>/datasets/<id>) as the read-only root, C(/proc),
    C(/dev), a private C(/tmp), the bundle datasets at their mount points (C(rw) as a bind mount of
    C(<data_dir>/instances/<bundle>/<name>), C(ramdisk) as a size-limited tmpfs) and only the merged environment.
  - The service's limits become C(CPUQuota=) (cores x 100%), C(MemoryMax=) and C(TasksMax=). The unit restarts on
    failure; output goes to the journal. After every (re)start the unit records the instance (main pid) in
    C(<run_dir>/bundles/<bundle>/<service>.json), which the node tick reads for heartbeats and health checks.
  - Network - when the bundle has a network on this node (the record C(<run_dir>/networks/<bundle>.json) written by
    M(cerana.platform.bundle_network)), the unit joins the bundle's namespace (C(NetworkNamespacePath=)) and the
    port check looks at the ports inside it; otherwise the instance shares the node's network namespace.
  - Nothing restarts when nothing changed; a changed unit restarts only this instance.
  - Before anything is written it fails when the dataset is not on the node, when the command is not an
    executable file in the dataset, or (when it would start the instance) when a port of the bundle is already
    listened on by anything but this bundle. If the instance does not stay up after a start, the previous unit
    (or none) is put back and the task fails with the journal's last lines.
  - Needs C(bwrap) (bubblewrap >= 0.8), systemd and, for O(state=started) and O(state=stopped), the C(py-consul)
    library for the interpreter that runs the module on the node.
  - A service with C(kind=vm) runs as the libvirt domain C(cerana-<bundle>_<service>) (QEMU with TCG, never KVM)
    instead of a unit, booted from its dataset (C(vmlinuz) and C(initrd.img) with C(cmd) as the kernel command
    line, or C(disk.qcow2)/C(disk.raw) through a fresh qcow2 overlay in C(<data_dir>/vms/<bundle>_<service>/)),
    with one NIC on O(bridge) carrying the bundle's MAC and address from its network record, and the serial
    console in C(serial.log) next to the overlay. V(started) also turns autostart on, V(stopped) keeps the domain
    defined but shut down, V(absent) undefines it and removes its directory. For a VM C(unit), C(unit_path) and
    C(unit_hash) are null and the diff shows the domain XML. Needs libvirt-python for the module's interpreter,
    libvirtd and, for disk images, C(qemu-img). Whatever an earlier kind of the same instance left (unit or
    domain) is removed.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
attributes:
  check_mode:
    description: Predicts the change and the unit without writing or starting anything.
    support: full
  diff_mode:
    description: Returns the unit file text before and after.
    support: full
  idempotent:
    description: A second run with the same bundle definition reports C(changed=false) and restarts nothing.
    support: full
options:
  bundle:
    description: The bundle id.
    type: str
    required: true
  service:
    description: The id of a service of the bundle.
    type: str
    required: true
  state:
    description:
      - V(started) - the unit is installed, enabled and running the current definition.
      - V(stopped) - the unit is installed with the current definition but stopped and disabled; the instance
        record is removed.
      - V(absent) - the unit and the instance record are removed (Consul is not read). Data of C(rw) bundle
        datasets in C(<data_dir>/instances) is kept.
    type: str
    choices: [started, stopped, absent]
    default: started
  data_dir:
    description: The node's data directory (datasets in C(datasets/), rw bundle data in C(instances/)).
    type: path
    default: /var/lib/cerana
  run_dir:
    description: Where instance records are kept (as the node tick's C(run_dir)).
    type: path
    default: /run/cerana
  unit_dir:
    description: Where the unit file is written.
    type: path
    default: /etc/systemd/system
  settle:
    description: Seconds the instance must stay up (same main pid, no restart) after a start for the task to succeed.
    type: float
    default: 1.0
  libvirt_uri:
    description: The libvirt connection for VM services (C(kind=vm)).
    type: str
    default: qemu:///system
  bridge:
    description: The node's bridge a VM's NIC joins (the bridge of M(cerana.platform.bundle_network)).
    type: str
    default: cerana0
  shutdown_timeout:
    description:
      - Seconds a VM gets to power off after an ACPI shutdown request (O(state=stopped), restart after a change)
        before it is destroyed.
    type: float
    default: 30.0
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Run the web service of bundle shop on the nodes
  cerana.platform.service_instance:
    bundle: shop
    service: web
    consul_url: http://10.77.0.11:8500

- name: Remove it again
  cerana.platform.service_instance:
    bundle: shop
    service: web
    state: absent
"""

RETURN = r"""
unit:
  description: The unit's name.
  returned: always
  type: str
  sample: cerana-shop_web.service
unit_path:
  description: The unit file.
  returned: always
  type: str
  sample: /etc/systemd/system/cerana-shop_web.service
unit_hash:
  description: SHA-256 of the unit text after the task; null when absent.
  returned: always
  type: str
  sample: sha256:0f3c...
active:
  description: Whether the unit is active after the task (predicted in check mode).
  returned: always
  type: bool
  sample: true
main_pid:
  description: The unit's main process (bwrap) after the task; null when not running or in check mode with a change.
  returned: always
  type: int
  sample: 1234
restarted:
  description: Whether a running instance was restarted because its unit changed.
  returned: always
  type: bool
  sample: false
kind:
  description: The service's kind (V(container) or V(vm)); null for O(state=absent).
  returned: always
  type: str
  sample: vm
domain:
  description: The libvirt domain's name.
  returned: for a VM
  type: str
  sample: cerana-shop_vm
domain_hash:
  description: SHA-256 of the domain XML the module rendered (kept in the domain's metadata); null when absent.
  returned: for a VM
  type: str
  sample: sha256:9b1e...
overlay:
  description: The qcow2 overlay over the dataset's disk image; null without a disk image or when absent.
  returned: for a VM
  type: str
  sample: /var/lib/cerana/vms/shop_vm/disk.qcow2
serial_log:
  description: The file the VM's serial console is written to.
  returned: for a VM
  type: str
  sample: /var/lib/cerana/vms/shop_vm/serial.log
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils import _service_instance as si
from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC

ARGUMENT_SPEC = dict(
    bundle=dict(type="str", required=True),
    service=dict(type="str", required=True),
    state=dict(type="str", default="started", choices=["started", "stopped", "absent"]),
    data_dir=dict(type="path", default="/var/lib/cerana"),
    run_dir=dict(type="path", default="/run/cerana"),
    unit_dir=dict(type="path", default="/etc/systemd/system"),
    settle=dict(type="float", default=1.0),
    libvirt_uri=dict(type="str", default="qemu:///system"),
    bridge=dict(type="str", default="cerana0"),
    shutdown_timeout=dict(type="float", default=30.0),
    **CONNECTION_ARGSPEC,
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    try:
        result = si.dispatch(module)
    except si.EXPECTED as e:
        module.fail_json(**si.failure(e))
    module.exit_json(**result)


if __name__ == "__main__":
    main()

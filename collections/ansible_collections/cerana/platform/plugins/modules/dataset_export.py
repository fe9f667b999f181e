#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: dataset_export
short_description: Write a dataset out as a tar archive
version_added: 0.1.0
description:
  - Streams a dataset from the data server of a node that holds it into O(dest), a tar archive (plain, gzip or zstd)
    on the host the task runs on. The archive is deterministic (sorted entries, times 0, owner root) and is checked
    against the digest of the copy while it is written; O(dest) appears only complete (written aside, then renamed).
  - Idempotent - when O(dest) already holds the dataset's content (same digest), nothing is written.
  - For standard output, use the C(cerana-dataset-export) command, which shares this code.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
attributes:
  check_mode:
    description: Can run in check mode and predict the change without making it.
    support: full
  diff_mode:
    description: Returns the state before and after in diff mode.
    support: none
  idempotent:
    description: A second run with the same options reports C(changed=false).
    support: full
options:
  id:
    description: The dataset id.
    type: str
    required: true
    aliases: [name]
  dest:
    description: The archive to write.
    type: path
    required: true
  compression:
    description: How to compress the archive.
    type: str
    choices: [none, gzip, zstd]
    default: none
  node:
    description: Read from this node (id or hostname) instead of any node that holds the dataset.
    type: str
  data_port:
    description: Port of the data servers, unless a node's C(cerana_data_url) label gives its URL.
    type: int
    default: 7811
  timeout:
    description: Seconds the transfer may stall before it fails. Not a limit on the whole export.
    type: float
    default: 300
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Save web-root as a zstd tarball
  cerana.platform.dataset_export:
    id: web-root
    dest: /backup/web-root.tar.zst
    compression: zstd
"""

RETURN = r"""
digest:
  description: The digest of the exported content.
  returned: success
  type: str
  sample: "sha256:6349106624c74201332c52a97ff9ef33e33e0a858d1cd5fc93802633bc97cfa6"
node:
  description: The node the dataset was read from; null when nothing was written.
  returned: success
  type: str
  sample: 3f2a9c0d5e6b4f718293a4b5c6d7e8f9
transfer:
  description: Bytes of tar read, seconds, rate and progress samples; null when nothing was written.
  returned: success
  type: dict
  sample: {bytes: 104867840, seconds: 1.2, rate: 87389866, progress: []}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, run
from ansible_collections.cerana.platform.plugins.module_utils._dataexport import export_dataset

ARGUMENT_SPEC = dict(
    id=dict(type="str", required=True, aliases=["name"]),
    dest=dict(type="path", required=True),
    compression=dict(type="str", default="none", choices=["none", "gzip", "zstd"]),
    node=dict(type="str"),
    data_port=dict(type="int", default=7811),
    timeout=dict(type="float", default=300.0),
    **CONNECTION_ARGSPEC,
)


def work(module, store):
    p = module.params
    return export_dataset(
        store, p["id"], p["dest"], compression=p["compression"], node=p["node"], port=p["data_port"],
        timeout=p["timeout"], check_mode=module.check_mode,
    )  # fmt: skip


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run(module, lambda store: work(module, store))


if __name__ == "__main__":
    main()

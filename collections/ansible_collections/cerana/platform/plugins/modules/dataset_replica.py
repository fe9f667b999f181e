#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: dataset_replica
short_description: Make a node hold a copy of a dataset, or not
version_added: 0.1.0
description:
  - With O(state=present), asks the data server of O(node) to copy the dataset from the data servers of nodes that
    have it (those whose dataset heartbeats report it first, then every other live node, asked directly). The node
    fetches the files in parallel segments with HTTP Range requests, resumes an interrupted segment from where it
    stopped (from the same source or another one), checks every file's hash and the whole digest recorded by the
    import, and only then renames the copy into C(<data_dir>/datasets/<id>) (atomic). A failed copy leaves nothing.
  - A read-write dataset declared with a C(parent) and held by no node yet is created from the parent - a copy
    (C(cp --reflink=auto), so copy-on-write where the file system can) of the node's own copy of the parent, or of
    one fetched from another node (not allowed with C(parent_same_node)). Hard links are never used, as writing to a
    hard-linked file would change the read-only parent too.
  - With O(state=absent), removes the node's copy, unless a running service instance on the node uses it (from its
    instance records); then the task fails naming the services, unless O(force).
  - Runs wherever Consul and the data servers can be reached (usually the controller); the data moves between the
    nodes directly.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
attributes:
  check_mode:
    description: Can run in check mode and predict the change without making it.
    support: full
  diff_mode:
    description: Returns the state before and after in diff mode.
    support: full
  idempotent:
    description: A second run with the same options reports C(changed=false).
    support: full
options:
  id:
    description: The dataset id.
    type: str
    required: true
    aliases: [name]
  node:
    description: The node (id or hostname) that should or should not hold a copy. It must be live.
    type: str
    required: true
  state:
    description: Whether O(node) holds a copy.
    type: str
    choices: [present, absent]
    default: present
  force:
    description: With O(state=absent), remove the copy even while services on the node use it.
    type: bool
    default: false
  data_port:
    description: Port of the data servers, unless a node's C(cerana_data_url) label gives its URL.
    type: int
    default: 7811
  timeout:
    description: Seconds the copy may go without news from the node before the task fails. Not a limit on the copy.
    type: float
    default: 300
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Keep web-root on node2 as well
  cerana.platform.dataset_replica:
    id: web-root
    node: "{{ hostvars['node2'].node_id }}"

- name: Drop the copy on node3
  cerana.platform.dataset_replica:
    id: web-root
    node: 5c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f
    state: absent
"""

RETURN = r"""
replica:
  description: The copy on the node after the task (predicted in check mode); null when absent.
  returned: success
  type: dict
  sample: {id: web-root, node: 5c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f, digest: "sha256:6349...", size: 104857600, files: 12,
           read_only: true, in_use_by: []}
transfer:
  description: What the copy moved - bytes, seconds, rate (bytes/s), resumed segments, how, and progress samples.
  returned: when a copy was made
  type: dict
  sample: {bytes: 104857600, seconds: 0.4, rate: 262144000, resumed: 0, how: pulled from 2 source(s), progress: []}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, run
from ansible_collections.cerana.platform.plugins.module_utils._dataclient import (
    DataClient,
    DataServerError,
    candidate_sources,
    find_node,
    node_url,
)
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError

ARGUMENT_SPEC = dict(
    id=dict(type="str", required=True, aliases=["name"]),
    node=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    force=dict(type="bool", default=False),
    data_port=dict(type="int", default=7811),
    timeout=dict(type="float", default=300.0),
    **CONNECTION_ARGSPEC,
)


class ReplicaError(StoreError):
    pass


def _replica(info, node_id):
    if info is None:
        return None
    keep = ("id", "digest", "size", "files", "read_only", "in_use_by")
    return dict({k: info.get(k) for k in keep}, node=node_id)


def sources_for(objects, nodes, source_id, digest, port, exclude, timeout):
    """Data server URLs that hold ``source_id`` (with ``digest`` when given)."""
    urls = []
    for n in candidate_sources(nodes, objects.dataset_heartbeats(source_id), source_id, exclude=exclude):
        url = node_url(n, port)
        if not url:
            continue
        client = DataClient(url, timeout=min(timeout, 10.0))
        try:
            info = client.info(source_id)
        except DataServerError:
            continue
        finally:
            client.close()
        if info and (digest is None or info.get("digest") == digest):
            urls.append(url)
    return urls


def work(module, store):
    p = module.params
    objects = Objects(store)
    dataset_id = m._label(p["id"], "id")
    stored = objects.get("dataset", dataset_id)
    nodes = objects.nodes()
    node = find_node(nodes, p["node"])
    if node is None:
        raise ReplicaError("node %s is not live (no nodes/ record)" % p["node"])
    url = node_url(node, p["data_port"])
    client = DataClient(url, timeout=p["timeout"])
    try:
        before = client.info(dataset_id)
    except DataServerError as e:
        raise ReplicaError(str(e)) from None
    result = {"changed": False, "replica": _replica(before, node.id)}

    if p["state"] == "absent":
        if before is None:
            return _with_diff(module, result, before, None, node.id)
        users = before.get("in_use_by") or []
        if users and not p["force"]:
            raise ReplicaError(
                "dataset %s is in use on node %s by %s; stop them first or use force"
                % (dataset_id, node.id, ", ".join(users))
            )
        if not module.check_mode:
            try:
                client.delete(dataset_id, force=p["force"])
            except DataServerError as e:
                raise ReplicaError(str(e)) from None
        return _with_diff(module, dict(result, changed=True, replica=None), before, None, node.id)

    if stored is None:
        raise ReplicaError("dataset %s is not declared" % dataset_id)
    ds = stored.obj
    content = objects.dataset_content(dataset_id)
    recorded = content.digest if content else None
    if before is not None:
        if ds.read_only and recorded and before.get("digest") != recorded:
            raise ReplicaError(
                "node %s holds %s with digest %s, not the recorded %s; remove that copy first (state=absent)"
                % (node.id, dataset_id, before.get("digest"), recorded)
            )
        return _with_diff(module, result, before, _replica(before, node.id), node.id)

    # Where from: copies of the dataset itself, else (a new read-write child) its parent.
    source_id, digest = dataset_id, (recorded if ds.read_only else None)
    urls = sources_for(objects, nodes, dataset_id, digest, p["data_port"], {node.id}, p["timeout"])
    if not urls and ds.parent:
        parent = objects.get("dataset", ds.parent)
        if parent is None:
            raise ReplicaError("dataset %s: its parent %s is not declared" % (dataset_id, ds.parent))
        parent_content = objects.dataset_content(ds.parent)
        source_id, digest = ds.parent, parent_content.digest if parent_content else None
        if ds.parent_same_node:
            if not _has(client, ds.parent):
                raise ReplicaError(
                    "dataset %s must be made on a node holding its parent %s (parent_same_node), and node %s does not"
                    % (dataset_id, ds.parent, node.id)
                )
            urls = []
        else:
            urls = sources_for(objects, nodes, ds.parent, digest, p["data_port"], {node.id}, p["timeout"])
            if not urls and not _has(client, ds.parent):
                raise ReplicaError("no live node holds %s or its parent %s" % (dataset_id, ds.parent))
    elif not urls:
        raise ReplicaError(
            "no live node holds dataset %s%s to copy from" % (dataset_id, " with digest %s" % digest if digest else "")
        )
    predicted = {"id": dataset_id, "digest": digest, "size": content.size if content else None, "files": None, "read_only": ds.read_only,
                 "in_use_by": [], "node": node.id}  # fmt: skip
    if module.check_mode:
        return _with_diff(module, dict(result, changed=True, replica=predicted), None, predicted, node.id)
    samples = []
    request = {"sources": urls, "digest": digest, "read_only": ds.read_only, "quota": ds.quota, "source_id": source_id}
    try:
        done = client.replicate(dataset_id, request, on_progress=samples.append)
    except DataServerError as e:
        raise ReplicaError("copying %s to node %s failed: %s" % (dataset_id, node.id, e)) from None
    transfer = {k: done.get(k) for k in ("bytes", "seconds", "rate", "resumed", "retries", "how")}
    transfer["progress"] = samples
    after = _replica(done, node.id)
    return _with_diff(
        module, dict(result, changed=not done.get("existing"), replica=after, transfer=transfer), None, after, node.id
    )


def _has(client, dataset_id):
    try:
        return client.info(dataset_id) is not None
    except DataServerError:
        return False


def _with_diff(module, result, before, after, node_id):
    if module._diff:
        result["diff"] = {
            "before": _replica(before, node_id) or {},
            "after": after or {},
            "before_header": "replica on %s (before)" % node_id,
            "after_header": "replica on %s (after)" % node_id,
        }
    return result


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run(module, lambda store: work(module, store))


if __name__ == "__main__":
    main()

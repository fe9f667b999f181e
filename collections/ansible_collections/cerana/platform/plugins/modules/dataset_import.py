#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: dataset_import
short_description: Import a tar archive or a directory as a dataset of the cluster
version_added: 0.1.0
description:
  - Reads O(src) on the host the task runs on (the controller, or a node with C(delegate_to)), checks it and
    computes its content digest, then streams it over HTTP to the data server (C(cerana-dataserver)) of the live
    node with the most free disk (from the C(nodes/) records; ties go to the lowest node id), or to O(node).
  - The node extracts the stream into C(<data_dir>/.staging/<id>.<random>), verifies the digest, and only then
    renames it to C(<data_dir>/datasets/<id>) (atomic). Only then is the dataset declared in Consul, its
    C(datasets/<id>/config) and C(datasets/<id>/content) (digest, size) in one transaction; a failed import leaves
    nothing behind on the node and nothing in Consul. M(cerana.platform.dataset) never touches C(content).
  - Idempotent by content. With O(id), importing the content the dataset already has changes nothing (a different
    O(redundancy) or O(quota) only updates the declaration); other content is refused. Without O(id), a dataset with
    the same digest and O(read_only) is returned as it is.
  - Why a module and not an action plugin - the source is read where the task runs, so the same module imports from
    the controller or, delegated, from a node; the data never passes through Ansible's connection, and the node's
    data server is the only writer of its datasets.
  - There is no overall time limit; O(timeout) only bounds how long the transfer may stall.
    The result lists progress samples (bytes, seconds, rate), shown with C(-v).
  - Archives may be plain, gzip, zstd (needs the C(zstandard) Python package), bzip2 or xz tar. Entries that would
    leave the dataset (absolute paths, C(..), links pointing outside), device nodes and FIFOs are refused.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
attributes:
  check_mode:
    description: Can run in check mode and predict the change without making it.
    support: full
    details: The source is read and digested; nothing is sent or declared.
  diff_mode:
    description: Returns the state before and after in diff mode.
    support: full
  idempotent:
    description: A second run with the same options reports C(changed=false).
    support: full
options:
  src:
    description: A tar archive (any of the compressions above) or a directory, on the host the task runs on.
    type: path
    required: true
  id:
    description:
      - The dataset id, a lowercase DNS label. When left out, a dataset with the same content is reused, else a UUID
        is generated.
    type: str
    aliases: [name]
  read_only:
    description: Whether the dataset is immutable (files 0444/0555, directories 0555 on every node).
    type: bool
    default: true
  redundancy:
    description: Number of nodes that must hold a copy (the first copy is made here; replicas by M(cerana.platform.dataset_replica)).
    type: int
    default: 1
  quota:
    description: Largest size in bytes of the dataset's files; a bigger source is refused before anything is sent.
    type: int
  nfs:
    description: Whether the dataset is exported over NFS (declared only).
    type: bool
    default: false
  node:
    description: Put the first copy on this node (id or hostname) instead of the one with the most free disk.
    type: str
  data_port:
    description: Port of the data servers, unless a node's C(cerana_data_url) label gives its URL.
    type: int
    default: 7811
  timeout:
    description: Seconds the transfer may stall (no byte moving) before it fails. Not a limit on the whole import.
    type: float
    default: 300
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Import the web content from the controller
  cerana.platform.dataset_import:
    src: /srv/build/web-root.tar.zst
    id: web-root
    redundancy: 2

- name: Import a directory that is on node1
  cerana.platform.dataset_import:
    src: /var/tmp/models
    id: models
  delegate_to: node1
"""

RETURN = r"""
dataset:
  description: The declared dataset (predicted in check mode).
  returned: success
  type: dict
  sample: {id: web-root, parent: null, parent_same_node: false, read_only: true, redundancy: 2, quota: null, nfs: false}
content:
  description: What is recorded at C(datasets/<id>/content) - the digest, the size in bytes and the number of files.
  returned: success
  type: dict
  sample: {digest: "sha256:6349106624c74201332c52a97ff9ef33e33e0a858d1cd5fc93802633bc97cfa6", size: 104857600, files: 12}
mod_index:
  description: Modify index of the declaration; null in check mode with a change.
  returned: success
  type: int
  sample: 42
node:
  description: Id of the node that received the first copy; null when nothing was sent.
  returned: success
  type: str
  sample: 3f2a9c0d5e6b4f718293a4b5c6d7e8f9
transfer:
  description: Bytes sent, seconds, bytes per second and progress samples; null when nothing was sent.
  returned: success
  type: dict
  sample: {bytes: 104857600, seconds: 1.9, rate: 55187158, total: 104857600, progress: []}
"""

import dataclasses
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils import _datasets as ds
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, object_result, run
from ansible_collections.cerana.platform.plugins.module_utils._dataclient import (
    DataClient,
    DataServerError,
    Progress,
    choose_node,
    node_url,
)
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects, Outcome
from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError

ARGUMENT_SPEC = dict(
    src=dict(type="path", required=True),
    id=dict(type="str", aliases=["name"]),
    read_only=dict(type="bool", default=True),
    redundancy=dict(type="int", default=1),
    quota=dict(type="int"),
    nfs=dict(type="bool", default=False),
    node=dict(type="str"),
    data_port=dict(type="int", default=7811),
    timeout=dict(type="float", default=300.0),
    **CONNECTION_ARGSPEC,
)


class ImportError_(StoreError):
    """A failed import, reported as the module's message."""


def source_manifest(src, quota):
    if os.path.isdir(src):
        return ds.scan_tree(src, quota=quota)
    if not os.path.isfile(src):
        raise ImportError_("src %s: no such file or directory" % src)
    with open(src, "rb") as f:
        return ds.scan_tar(f, quota=quota)


def source_chunks(src, manifest):
    """(chunks, length): the archive as it is, or a tar made from the directory on the fly."""
    if not os.path.isdir(src):
        f = open(src, "rb")  # closed by the generator  # noqa: SIM115

        def gen():
            with f:
                yield from ds.stream_chunks(f)

        return gen(), os.path.getsize(src)

    def tar_gen():
        import queue
        import threading

        q = queue.Queue(maxsize=8)

        class Sink:
            def write(self, data):
                q.put(bytes(data))
                return len(data)

        err = []

        def produce():
            try:
                ds.write_tar(src, manifest, Sink())
            except BaseException as e:  # reported below
                err.append(e)
            q.put(None)

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        while True:
            item = q.get()
            if item is None:
                break
            yield item
        if err:
            raise err[0]

    return tar_gen(), None


def work(module, store):
    p = module.params
    objects = Objects(store)
    try:
        man = source_manifest(p["src"], p["quota"])
    except ds.DatasetError as e:
        raise ImportError_("src %s is refused: %s" % (p["src"], e)) from None
    base = dict(read_only=p["read_only"], redundancy=p["redundancy"], quota=p["quota"], nfs=p["nfs"])
    current = None
    if p["id"]:
        dataset_id = m._label(p["id"], "dataset.id")
        current = objects.get("dataset", dataset_id)
        recorded = objects.dataset_content(dataset_id) if current else None
        if recorded and recorded.digest != man.digest:
            raise ImportError_(
                "dataset %s already holds other content (digest %s; the source has %s); remove it or choose another id"
                % (dataset_id, recorded.digest, man.digest)
            )
    else:
        contents = objects.dataset_contents()
        for stored in objects.list("dataset"):
            have = contents.get(stored.obj.id)
            if have and have.digest == man.digest and stored.obj.read_only == p["read_only"]:
                outcome = objects.apply(m.object_key("dataset", stored.obj.id), stored.obj, current=stored)
                return _result(module, outcome, have, None, None)
        dataset_id, recorded = m.new_id(), None
    desired = m.Dataset.from_dict(dict(base, id=dataset_id), "dataset")
    content = m.DatasetContent(digest=man.digest, size=man.size, files=man.files)
    key = m.object_key("dataset", dataset_id)
    if recorded is not None:
        # The content is there: at most the declaration changes.
        outcome = objects.apply(key, desired, current=current, check_mode=module.check_mode)
        return _result(module, outcome, recorded, None, None)
    if module.check_mode:
        outcome = objects.apply(key, desired, current=current, check_mode=True)
        return _result(module, dataclasses.replace(outcome, changed=True), content, None, None)

    try:
        node = choose_node(objects.nodes(), wanted=p["node"], need=man.size)
    except ValueError as e:
        raise ImportError_(str(e)) from None
    url = node_url(node, p["data_port"])
    client = DataClient(url, timeout=p["timeout"])
    progress = Progress(every=2.0, log=lambda line: module.log("dataset_import %s: %s" % (dataset_id, line)))
    chunks, length = source_chunks(p["src"], man)
    progress.total = length
    try:
        client.put_tar(
            dataset_id, chunks, length=length, progress=progress.update,
            digest=man.digest, read_only=p["read_only"], quota=p["quota"],
        )  # fmt: skip
    except DataServerError as e:
        raise ImportError_("import of %s to node %s failed: %s" % (dataset_id, node.id, e)) from None
    transfer = progress.result()
    try:
        index = objects.register_import(desired, content, current.mod_index if current else 0)
    except StoreError as e:
        # Never leave an unregistered copy behind.
        try:
            client.delete(dataset_id, force=True)
        except DataServerError:
            pass
        raise ImportError_(
            "the data reached node %s but declaring %s failed (copy removed): %s" % (node.id, dataset_id, e)
        ) from None
    outcome = Outcome(True, current.obj if current else None, desired, index)
    return _result(module, outcome, content, node.id, transfer)


def _result(module, outcome, content, node, transfer):
    return dict(object_result("dataset", outcome, module), content=content.to_dict(), node=node, transfer=transfer)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run(module, lambda store: work(module, store))


if __name__ == "__main__":
    main()

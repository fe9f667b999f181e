# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Exporting a dataset from a node's data server to a file or a stream (module and CLI share it).

No Ansible import here.
"""

from __future__ import annotations

import os

from ansible_collections.cerana.platform.plugins.module_utils import _datasets as ds
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._dataclient import (
    DataClient,
    DataServerError,
    Progress,
    candidate_sources,
    find_node,
    node_url,
)
from ansible_collections.cerana.platform.plugins.module_utils._files import atomic_write
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from ansible_collections.cerana.platform.plugins.module_utils._store import StoreError


class ExportError(StoreError):
    pass


def locate(store, dataset_id, *, node=None, port=7811, timeout=30.0):
    """(Dataset, node id, DataClient, info) of a node that holds the dataset."""
    objects = Objects(store)
    m._label(dataset_id, "id")
    stored = objects.get("dataset", dataset_id)
    if stored is None:
        raise ExportError("dataset %s is not declared" % dataset_id)
    recorded = objects.dataset_content(dataset_id)
    nodes = objects.nodes()
    if node:
        found = find_node(nodes, node)
        if found is None:
            raise ExportError("node %s is not live" % node)
        candidates = [found]
    else:
        candidates = candidate_sources(nodes, objects.dataset_heartbeats(dataset_id), dataset_id)
    reasons = []
    for n in candidates:
        url = node_url(n, port)
        if not url:
            continue
        client = DataClient(url, timeout=timeout)
        try:
            info = client.info(dataset_id)
        except DataServerError as e:
            reasons.append(str(e))
            continue
        if info is None:
            continue
        if stored.obj.read_only and recorded and info.get("digest") != recorded.digest:
            reasons.append("node %s holds another content (digest %s)" % (n.id, info.get("digest")))
            continue
        return stored.obj, n.id, client, info
    raise ExportError(
        "no live node can export dataset %s%s" % (dataset_id, ": " + "; ".join(reasons) if reasons else "")
    )


def stream_export(client, dataset_id, out, *, compression="none", progress=None):
    """Write the dataset's tar (compressed) to the writable ``out``; returns the Manifest of what was written."""
    try:
        resp = client.open_tar(dataset_id)
    except DataServerError as e:
        raise ExportError(str(e)) from None
    comp = ds.Compressor(out, compression)
    tee = ds.Tee(resp, comp)
    try:
        man = ds.scan_tar(tee, progress=progress)
        tee.drain()  # the padding after the end-of-archive marker
        comp.close()
    except ds.DatasetError as e:
        raise ExportError("export of %s from %s failed: %s" % (dataset_id, client.url, e)) from None
    except OSError as e:
        raise ExportError("export of %s from %s failed: %s" % (dataset_id, client.url, e)) from None
    finally:
        client.close()
    return man


def file_digest(path):
    try:
        with open(path, "rb") as f:
            return ds.scan_tar(f).digest
    except (OSError, ds.DatasetError):
        return None


def export_dataset(
    store, dataset_id, dest, *, compression="none", node=None, port=7811, timeout=300.0, check_mode=False
):
    """The dataset_export module's work; returns its result dict."""
    _dataset, node_id, client, info = locate(store, dataset_id, node=node, port=port, timeout=timeout)
    want = info["digest"]
    if os.path.exists(dest) and file_digest(dest) == want:
        client.close()
        return {"changed": False, "digest": want, "node": None, "transfer": None}
    if check_mode:
        client.close()
        return {"changed": True, "digest": want, "node": node_id, "transfer": None}
    progress = Progress(total=info.get("size"))
    with atomic_write(dest, "wb", fsync=True) as out:
        man = stream_export(client, dataset_id, out, compression=compression, progress=progress.update)
        if man.digest != want:
            raise ExportError("the exported content has digest %s, the node's copy %s" % (man.digest, want))
    return {"changed": True, "digest": man.digest, "node": node_id, "transfer": progress.result()}

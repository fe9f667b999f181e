# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Declared objects in the store: typed reads, CAS writes, subtree deletes, and the
declarative apply step every object module shares. No Ansible import here."""

from __future__ import annotations

import dataclasses

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._store import CasConflict, StoreError


class StoredValueError(StoreError):
    """A value in Consul does not decode as the object it should be (written by hand?)."""


@dataclasses.dataclass(frozen=True)
class Stored:
    """A declared object with the modify index of its ``config`` key."""

    obj: object
    mod_index: int


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What an apply did (or would do, in check mode)."""

    changed: bool
    before: object | None  # model or None
    after: object | None
    mod_index: int | None  # index after the change; None when absent or predicted


@dataclasses.dataclass(frozen=True)
class RawValue:
    """A plain KV value (UTF-8 text) that :meth:`Objects.apply` can declare like an object."""

    value: bytes

    def to_bytes(self):
        return self.value

    def to_dict(self):
        return self.value.decode("utf-8", "replace")


def _decode(model, entry, path):
    try:
        return model.from_json(entry.value.decode("utf-8", "replace"), path)
    except m.ValidationError as e:
        raise StoredValueError("the stored value at %r is invalid: %s" % (entry.key, e)) from None


class Objects:
    """Typed access to declared objects over a :class:`_store.Store`."""

    def __init__(self, store):
        self.store = store

    # -- datasets, services, bundles -----------------------------------------

    def get(self, kind, object_id):
        entry = self.store.get(m.object_key(kind, object_id), consistent=True)
        if entry is None:
            return None
        return Stored(_decode(m.MODELS[kind], entry, kind), entry.modify_index)

    def list(self, kind):
        """Every declared object of ``kind``, sorted by id: one recursive read, not one per object."""
        out = []
        for entry in self.store.list(kind + "s/"):
            parts = entry.key.split("/")
            if len(parts) == 3 and parts[2] == "config":
                out.append(Stored(_decode(m.MODELS[kind], entry, "%s %s" % (kind, parts[1])), entry.modify_index))
        return sorted(out, key=lambda s: s.obj.id)

    def put(self, obj, cas):
        entry = self.store.put(m.object_key(obj.KIND, obj.id), obj.to_bytes(), cas=cas)
        return entry.modify_index

    def delete(self, kind, object_id, cas=None):
        """Delete the object's whole subtree (``<kind>s/<id>/``), optionally only if unchanged since ``cas``."""
        self.store.delete_tree(
            m.object_root(kind, object_id), cas_key=m.object_key(kind, object_id) if cas is not None else None, cas=cas
        )

    def overlay(self, bundle):
        """The bundle merged with the services and datasets it names (spec 3.6)."""
        services = {}
        for sid in bundle.services:
            found = self.get("service", sid)
            if found is not None:
                services[sid] = found.obj
        dataset_ids = {d.id for d in bundle.datasets.values() if d.id}
        for sid, bsvc in bundle.services.items():
            if bsvc.dataset:
                dataset_ids.add(bsvc.dataset)
            elif sid in services:
                dataset_ids.add(services[sid].dataset)
        datasets = {}
        for did in sorted(dataset_ids):
            found = self.get("dataset", did)
            if found is not None:
                datasets[did] = found.obj
        return m.overlay_bundle(bundle, services, datasets)

    # -- imported dataset content (datasets/<id>/content) ----------------------

    def dataset_content(self, dataset_id):
        """The DatasetContent an import recorded, or None."""
        entry = self.store.get(m.dataset_content_key(dataset_id), consistent=True)
        return None if entry is None else _decode(m.DatasetContent, entry, "dataset %s content" % dataset_id)

    def dataset_contents(self):
        """{dataset id: DatasetContent} of every imported dataset (one recursive read)."""
        out = {}
        for entry in self.store.list("datasets/"):
            parts = entry.key.split("/")
            if len(parts) == 3 and parts[2] == "content":
                out[parts[1]] = _decode(m.DatasetContent, entry, "dataset %s content" % parts[1])
        return out

    def register_import(self, dataset, content, cas):
        """Declare ``dataset`` (compare-and-swap on ``cas``; 0: must be new) and record its
        content, in one transaction. Returns the config key's new modify index."""
        results = self.store.txn(
            [
                {
                    "KV": {
                        "Verb": "cas",
                        "Key": m.object_key("dataset", dataset.id),
                        "Value": dataset.to_bytes(),
                        "Index": int(cas),
                    }
                },
                {"KV": {"Verb": "set", "Key": m.dataset_content_key(dataset.id), "Value": content.to_bytes()}},
            ]
        )
        return results[0].modify_index

    # -- live state written by the node ticks ----------------------------------

    def nodes(self):
        """The live nodes (``nodes/<id>``), sorted by id. A value that does not decode is skipped."""
        out = []
        for entry in self.store.list(m.NODES_PREFIX):
            try:
                out.append(m.Node.from_json(entry.value.decode("utf-8", "replace")))
            except m.ValidationError:
                continue
        return sorted(out, key=lambda n: n.id)

    def _heartbeats(self, prefix, model, object_id=None):
        found = {}
        for entry in self.store.list(prefix + (object_id + "/" if object_id else "")):
            try:
                hb = model.from_json(entry.value.decode("utf-8", "replace"))
            except m.ValidationError:
                continue
            found.setdefault(entry.key[len(prefix) :].split("/", 1)[0], []).append(hb)
        return found

    def dataset_heartbeats(self, dataset_id=None):
        """{dataset id: [DatasetHeartbeat, ...]} from ``heartbeats/datasets/``."""
        return self._heartbeats(m.DATASET_HEARTBEATS_PREFIX, m.DatasetHeartbeat, dataset_id)

    def bundle_heartbeats(self, bundle_id=None):
        """{bundle id: [BundleHeartbeat, ...]} from ``heartbeats/bundles/``."""
        return self._heartbeats(m.BUNDLE_HEARTBEATS_PREFIX, m.BundleHeartbeat, bundle_id)

    # -- single-key configuration --------------------------------------------

    def get_raw(self, key):
        entry = self.store.get(key, consistent=True)
        return None if entry is None else Stored(RawValue(entry.value), entry.modify_index)

    def get_config(self, model, key):
        """The Stored configuration at ``key``, or None when it was never set."""
        entry = self.store.get(key, consistent=True)
        if entry is None:
            return None
        return Stored(_decode(model, entry, model.KIND), entry.modify_index)

    # -- the declarative step --------------------------------------------------

    def _remove_leftovers(self, subtree, check_mode):
        """An object without its config key may still have keys below it (written by a daemon
        after a delete, or by hand): removing the object removes them too."""
        leftovers = self.store.keys(subtree.rstrip("/") + "/")
        if leftovers and not check_mode:
            self.store.delete_tree(subtree)
        return Outcome(bool(leftovers), None, None, None)

    def apply(self, key, desired, *, current=None, mod_index=None, check_mode=False, subtree=None, reread=None):
        """Make ``key`` hold ``desired`` (a model) or be absent (``desired`` None).

        Removing deletes ``subtree`` (the object's whole tree) when given, else the key alone.
        ``current`` is the Stored already read (or None). With ``mod_index`` the
        write is an explicit compare-and-swap: it fails with CasConflict unless the
        object is unchanged since that index (0: must not exist). Without it, a
        concurrent change between our read and our write is retried with a fresh
        read (``reread()``), since the desired state does not depend on it.
        Nothing is written when the stored object already equals ``desired``.
        """
        for _attempt in range(10):
            before = current.obj if current else None
            if desired is None and current is None and subtree is not None:
                return self._remove_leftovers(subtree, check_mode)
            if before == desired:
                return Outcome(False, before, desired, current.mod_index if current else None)
            if mod_index is not None:
                have = current.mod_index if current else 0
                if have != mod_index:
                    raise CasConflict(key, mod_index, have or None)
            if check_mode:
                return Outcome(True, before, desired, None)
            cas = current.mod_index if current else 0
            try:
                if desired is None:
                    if subtree is not None:
                        self.store.delete_tree(subtree, cas_key=key, cas=cas)
                    else:
                        self.store.delete(key, cas=cas)
                    return Outcome(True, before, None, None)
                index = self.store.put(key, desired.to_bytes(), cas=cas).modify_index
                return Outcome(True, before, desired, index)
            except CasConflict:
                if mod_index is not None or reread is None:
                    raise
                current = reread()
        raise CasConflict(key, None, None)

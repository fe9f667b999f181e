# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Reading the planner's input (:class:`_planner.ClusterState`) from the store, and the
``cluster/applied/<node>`` records the cluster tick keeps.

:func:`read_state` costs two Consul requests, whatever the size of the cluster (plus
one per tree that comes back empty, to tell an empty tree from one an ACL hides):

1. ``GET <prefix>/?keys&separator=/`` (a few top-level names): its ``X-Consul-Index`` is
   the index of everything under the prefix, deletions included. It is taken *before*
   the data, so the state read is at least that new: a later index above it means
   something changed since (possibly already seen), never the reverse. That is the
   conservative direction for fencing.
2. One read-only transaction of ``get-tree`` operations over the keys the planner needs
   (declared objects, nodes, heartbeats, ``cluster/config``, ``cluster/applied/``): an
   atomic snapshot, without ``history/`` (one key per node per minute, the bulk of the
   store) that a recursive read of the whole prefix would drag along.

Values that do not decode are left out of their mapping and reported in
``ClusterState.invalid`` (``"bundle/<id>": reason``): the planner holds such objects as
they are instead of taking them for deleted. Decoded models are kept between calls for
byte-identical values, so a second read of an unchanged store returns the very same
objects and the planner's per-bundle memo applies (see ``_planner._bundle_info``).
"""

from __future__ import annotations

import json
import math
import threading

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._planner import Applied, ClusterState

APPLIED_PREFIX = "cluster/applied/"

# What one read fetches (relative to the store prefix); "cluster/config" is an exact key.
_TREES = (
    "bundles/",
    "services/",
    "datasets/",
    m.NODES_PREFIX,
    "heartbeats/",
    m.CLUSTER_CONFIG_KEY,
    APPLIED_PREFIX,
)


def applied_key(node_id):
    """``cluster/applied/<node id>``: what the cluster tick last applied on that node."""
    return APPLIED_PREFIX + node_id


def encode_applied(applied):
    """{bundle id: Applied} -> canonical JSON bytes ``{"<bundle>": {"digest": ..., "time": ...}}``."""
    return m.canonical_json({b: {"digest": a.digest, "time": a.time} for b, a in sorted(applied.items())}).encode(
        "utf-8"
    )


def decode_applied(value, path="applied"):
    """The inverse of :func:`encode_applied` (bytes or str); raises ``m.ValidationError``."""
    try:
        data = json.loads(value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value)
    except (UnicodeDecodeError, ValueError) as e:
        raise m.ValidationError(path, "stored value is not JSON: %s" % e) from None
    if not isinstance(data, dict):
        raise m.ValidationError(path, "must be a mapping of bundle id to {digest, time}")
    out = {}
    for bid, rec in sorted(data.items()):
        where = "%s.%s" % (path, bid)
        m._label(bid, where)
        if not isinstance(rec, dict) or set(rec) != {"digest", "time"}:
            raise m.ValidationError(where, "must be {digest, time}")
        if not isinstance(rec["digest"], str) or not rec["digest"]:
            raise m.ValidationError(where + ".digest", "must be a non-empty string")
        t = rec["time"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise m.ValidationError(where + ".time", "must be a number of seconds since the epoch")
        out[bid] = Applied(digest=rec["digest"], time=float(t))
    return out


class _DecodeCache:
    """Decoded values by (decoder, bytes), kept for the values seen by the last read only."""

    def __init__(self):
        self._lock = threading.Lock()
        self._old = {}
        self._new = {}

    def start(self):
        with self._lock:
            self._new = {}
            return dict(self._old)

    def finish(self, new):
        with self._lock:
            self._old = new

    @staticmethod
    def decode(old, new, kind, decoder, value, path):
        key = (kind, value)
        hit = old.get(key)
        if hit is None:
            try:
                hit = (decoder(value, path), None)
            except m.ValidationError as e:
                hit = (None, str(e))
            except Exception as e:  # a value written by hand: never let it crash a read
                hit = (None, "%s: cannot decode: %s" % (path, e))
        new[key] = hit
        return hit


_CACHE = _DecodeCache()


def _model_decoder(model):
    def decode(value, path):
        return model.from_json(value.decode("utf-8", "replace"), path)

    return decode


_DECODERS = {
    "bundle": _model_decoder(m.Bundle),
    "service": _model_decoder(m.Service),
    "dataset": _model_decoder(m.Dataset),
    "node": _model_decoder(m.Node),
    "dataset_heartbeat": _model_decoder(m.DatasetHeartbeat),
    "bundle_heartbeat": _model_decoder(m.BundleHeartbeat),
    "cluster_config": _model_decoder(m.ClusterConfig),
    "applied": decode_applied,
}


def read_index(store):
    """The Consul index of everything under the store prefix: ``X-Consul-Index`` of a
    top-level key listing (a few names, whatever the size of the store). ``_store.Store``
    has no public call returning the index of a plain read, hence ``_call``."""
    resp = store._call("get", "/v1/kv/" + store.prefix, [("keys", ""), ("separator", "/")])
    if resp.code == 404:
        store._check_read(store.prefix)  # an empty store, or an ACL hiding everything (403)
    return int(resp.headers.get("X-Consul-Index", 0) or 0)


def read_entries(store):
    """Every entry :func:`read_state` needs, in one read-only transaction.

    ACLs filter a transaction's ``get-tree`` results silently: a tree the token may not
    read looks empty, and a planner shown no bundles would stop them all. So every tree
    that comes back empty is checked with a plain read of its key, which Consul refuses
    with 403 when it is hidden (one more request per empty tree, none in a busy cluster).
    """
    entries = store.txn([{"KV": {"Verb": "get-tree", "Key": key}} for key in _TREES])
    found = set()
    for e in entries:
        top = e.key.partition("/")[0] + "/"
        found.add(top)
        if top == "cluster/":
            found.add(APPLIED_PREFIX if e.key.startswith(APPLIED_PREFIX) else e.key)
    for tree in _TREES:
        if tree not in found:
            store._check_read(store.prefix + tree)
    return entries


def build_state(entries, now, index=0):
    """A ClusterState from store entries (keys relative to the prefix). Pure."""
    old = _CACHE.start()
    new = {}
    decode = _DecodeCache.decode
    bundles, services, datasets, nodes = {}, {}, {}, {}
    dataset_hbs, bundle_hbs, applied = {}, {}, {}
    invalid = {}
    config = m.ClusterConfig()
    kinds = {"bundles": ("bundle", bundles), "services": ("service", services), "datasets": ("dataset", datasets)}
    for entry in entries:
        key = entry.key
        parts = key.split("/")
        top = parts[0]
        if top in kinds and len(parts) == 3 and parts[2] == "config":
            kind, into = kinds[top]
            obj, err = decode(old, new, kind, _DECODERS[kind], entry.value, "%s %s" % (kind, parts[1]))
            if obj is not None and obj.id == parts[1]:
                into[parts[1]] = obj
            else:
                invalid["%s/%s" % (kind, parts[1])] = err or "%s %s: stored id is %r" % (kind, parts[1], obj.id)
        elif top == "nodes" and len(parts) == 2:
            obj, _err = decode(old, new, "node", _DECODERS["node"], entry.value, "node " + parts[1])
            if obj is not None and obj.id == parts[1]:
                nodes[parts[1]] = obj
        elif top == "heartbeats" and len(parts) == 4 and parts[1] in ("datasets", "bundles"):
            kind = parts[1][:-1] + "_heartbeat"
            obj, _err = decode(old, new, kind, _DECODERS[kind], entry.value, "%s %s/%s" % (kind, parts[2], parts[3]))
            if obj is not None:
                (dataset_hbs if parts[1] == "datasets" else bundle_hbs).setdefault(parts[2], {})[parts[3]] = obj
        elif key == m.CLUSTER_CONFIG_KEY:
            obj, err = decode(old, new, "cluster_config", _DECODERS["cluster_config"], entry.value, "cluster_config")
            if obj is not None:
                config = obj
            else:
                invalid["cluster/config"] = err
        elif key.startswith(APPLIED_PREFIX) and len(parts) == 3:
            obj, err = decode(old, new, "applied", decode_applied, entry.value, "applied " + parts[2])
            if obj is not None:
                applied[parts[2]] = obj
            else:
                invalid["applied/" + parts[2]] = err
    _CACHE.finish(new)
    return ClusterState(
        bundles=bundles,
        services=services,
        datasets=datasets,
        nodes=nodes,
        dataset_heartbeats=dataset_hbs,
        bundle_heartbeats=bundle_hbs,
        applied=applied,
        config=config,
        now=float(now),
        index=int(index),
        invalid=invalid,
    )


def read_state(objects, now, with_index=True):
    """Everything the planner needs, read from ``objects.store`` in two requests (see the
    module docstring); ``index`` is the Consul index taken before the data. Without
    ``with_index``, one request and ``index`` 0: for a look that acts on nothing it reads
    (the cluster tick's idle passes), never for fencing."""
    store = objects.store
    index = read_index(store) if with_index else 0
    return build_state(read_entries(store), now, index)

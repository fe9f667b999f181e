# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Reading the planner's input (:class:`_planner.ClusterState`) from the store, and the
``cluster/applied/<node>`` records the cluster tick keeps. SKELETON: body comes next."""

from __future__ import annotations

import json

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._planner import Applied, ClusterState  # noqa: F401 (read_state returns one)

APPLIED_PREFIX = "cluster/applied/"


def applied_key(node_id):
    """``cluster/applied/<node id>``: what the cluster tick last applied on that node."""
    return APPLIED_PREFIX + node_id


def encode_applied(applied):
    """{bundle id: Applied} -> canonical JSON bytes ``{bundle: {"digest", "time"}}``."""
    return m.canonical_json({b: {"digest": a.digest, "time": a.time} for b, a in sorted(applied.items())}).encode("utf-8")


def decode_applied(value):
    """The inverse of :func:`encode_applied`; raises ``m.ValidationError`` on a bad value."""
    data = json.loads(value)
    return {b: Applied(digest=v["digest"], time=float(v["time"])) for b, v in data.items()}


def read_state(objects, now):
    """Everything the planner needs, read from ``objects.store``."""
    raise NotImplementedError

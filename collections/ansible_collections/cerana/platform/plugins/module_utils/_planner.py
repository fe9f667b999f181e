# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""The cluster planner: from declared objects, live nodes and heartbeats, where every
bundle and dataset should be and what each node must change to get there.

Pure: no I/O, no clock (``ClusterState.now`` is an input), no randomness. The same
state always gives the same plan. ``docs/cluster-tick.md`` ("Planner") states the rules.
SKELETON: interface only, the body comes next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing

from ansible_collections.cerana.platform.plugins.module_utils import _models as m


@dataclasses.dataclass(frozen=True)
class Applied:
    """What the cluster tick last applied for one bundle on one node."""

    digest: str
    time: float


@dataclasses.dataclass(frozen=True)
class ClusterState:
    """Everything the planner reads, as read at Consul index ``index`` and time ``now``."""

    bundles: typing.Mapping[str, m.Bundle]
    services: typing.Mapping[str, m.Service]
    datasets: typing.Mapping[str, m.Dataset]
    nodes: typing.Mapping[str, m.Node]
    dataset_heartbeats: typing.Mapping[str, typing.Mapping[str, m.DatasetHeartbeat]]
    bundle_heartbeats: typing.Mapping[str, typing.Mapping[str, m.BundleHeartbeat]]
    applied: typing.Mapping[str, typing.Mapping[str, Applied]]
    config: m.ClusterConfig
    now: float = 0.0
    index: int = 0


@dataclasses.dataclass(frozen=True)
class NodeChanges:
    add_datasets: tuple = ()
    remove_datasets: tuple = ()
    start_bundles: tuple = ()
    update_bundles: tuple = ()
    stop_bundles: tuple = ()

    @property
    def empty(self):
        return not (self.add_datasets or self.remove_datasets or self.start_bundles or self.update_bundles or self.stop_bundles)


@dataclasses.dataclass(frozen=True)
class NodePlan:
    node: str
    datasets: tuple  # desired dataset ids, sorted
    bundles: typing.Mapping[str, str]  # desired bundle id -> digest
    changes: NodeChanges
    deferred: tuple = ()  # bundle updates held back by the rolling rule


@dataclasses.dataclass(frozen=True)
class Problem:
    object: str  # "bundle/shop"
    field: str  # "services.web.dataset"
    reason: str


@dataclasses.dataclass(frozen=True)
class Plan:
    placements: typing.Mapping[str, tuple]
    dataset_nodes: typing.Mapping[str, tuple]
    nodes: typing.Mapping[str, NodePlan]
    problems: tuple
    index: int

    def changed_nodes(self):
        return tuple(sorted(n for n, p in self.nodes.items() if not p.changes.empty))

    def to_dict(self):
        return {}


def bundle_digest(overlaid):
    """sha256 of the canonical JSON of an overlaid bundle (``m.overlay_bundle`` output)."""
    return "sha256:" + hashlib.sha256(m.canonical_json(overlaid).encode("utf-8")).hexdigest()


def plan(state, *, max_unavailable=1, grace=10.0):
    return Plan(placements={}, dataset_nodes={}, nodes={}, problems=(), index=state.index)


def render_text(plan):
    return "No changes.\n"

"""The cluster planner (module_utils/_planner.py) and the pure half of _clusterstate.py.

States are built from the real models; "applying" a plan in the property tests means
writing the applied records and healthy heartbeats a successful converge run would
leave behind, so the tests can check what a second plan does with the first one's result.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.cerana.platform.plugins.module_utils import _clusterstate as cs
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _planner as P
from ansible_collections.cerana.platform.plugins.module_utils._store import Entry

MIB = 1 << 20
GIB = 1 << 30
NOW = 1_800_000_000.0


def iso(epoch: float) -> str:
    return m.format_time(datetime.datetime.fromtimestamp(epoch, datetime.UTC))


def node(nid: str, mem: int = 8 * GIB, disk: int = 100 * GIB) -> m.Node:
    return m.Node(id=nid, hostname="host-" + nid, heartbeat=iso(NOW), memory_total=mem, memory_free=mem, disk_free=disk)


def service(sid: str, dataset: str = "root", memory: int | None = None) -> m.Service:
    return m.Service.from_dict({"id": sid, "dataset": dataset, "cmd": ["/bin/run"], "limits": {"memory": memory}})


def dataset(did: str, *, read_only: bool = True, redundancy: int = 1, **kw) -> m.Dataset:
    return m.Dataset.from_dict({"id": did, "read_only": read_only, "redundancy": redundancy, **kw})


def bundle(bid: str, services=("web",), redundancy: int = 1, env=None, **kw) -> m.Bundle:
    svcs = {s: {"env": env or {}} for s in services}
    return m.Bundle.from_dict({"id": bid, "redundancy": redundancy, "services": svcs, **kw})


def dhb(did: str, nid: str, in_use: bool = False) -> m.DatasetHeartbeat:
    return m.DatasetHeartbeat(dataset=did, node=nid, in_use=in_use, time=iso(NOW))


def bhb(bid: str, nid: str, services=("web",), healthy: bool = True, at: float = NOW) -> m.BundleHeartbeat:
    status = {"state": "running", "health": {"up": None if healthy else "connection refused"}}
    return m.BundleHeartbeat(bundle=bid, node=nid, time=iso(at), services={s: dict(status) for s in services})


def state(
    *,
    nodes=("a", "b", "c"),
    bundles=(),
    services=(),
    datasets=None,
    dataset_heartbeats=None,
    bundle_heartbeats=None,
    applied=None,
    now=NOW,
    invalid=None,
    node_objs=None,
) -> P.ClusterState:
    if datasets is None:
        datasets = [dataset("root", redundancy=1)]
    if dataset_heartbeats is None:
        dataset_heartbeats = {d.id: {nodes[0]: dhb(d.id, nodes[0])} for d in datasets} if nodes else {}
    return P.ClusterState(
        bundles={b.id: b for b in bundles},
        services={s.id: s for s in (services or [service("web")])},
        datasets={d.id: d for d in datasets},
        nodes=node_objs or {n: node(n) for n in nodes},
        dataset_heartbeats=dataset_heartbeats,
        bundle_heartbeats=bundle_heartbeats or {},
        applied=applied or {},
        config=m.ClusterConfig(),
        now=now,
        index=42,
        invalid=invalid or {},
    )


def everywhere(did="root", nodes="abc"):
    return {did: {n: dhb(did, n) for n in nodes}}


def digest_of(st_: P.ClusterState, bid: str) -> str:
    return P.bundle_digest(m.overlay_bundle(st_.bundles[bid], st_.services, st_.datasets))


def applied_state(
    st_: P.ClusterState, plan: P.Plan, *, at: float | None = None, healthy: bool = True
) -> P.ClusterState:
    """What a fully successful converge of ``plan`` leaves: applied records, heartbeats and dataset copies."""
    at = st_.now if at is None else at
    applied, bhbs, dhbs = {}, {}, {}
    for n, p in plan.nodes.items():
        applied[n] = {b: P.Applied(d, at) for b, d in p.bundles.items() if b not in p.held}
        for b in p.bundles:
            svcs = tuple(st_.bundles[b].services) if b in st_.bundles else ("web",)
            bhbs.setdefault(b, {})[n] = bhb(b, n, services=svcs, healthy=healthy, at=at + 1)
        for d in p.datasets:
            dhbs.setdefault(d, {})[n] = dhb(d, n)
    return dataclasses.replace(st_, applied=applied, bundle_heartbeats=bhbs, dataset_heartbeats=dhbs, now=at + 5)


# ---------------------------------------------------------------------------
# Placement


def test_empty_state_plans_nothing():
    p = P.plan(state(datasets=[], services=[]))
    assert p.changed_nodes() == ()
    assert not p.pending()
    assert p.problems == ()
    assert p.index == 42
    assert set(p.nodes) == {"a", "b", "c"}
    assert P.render_text(p).startswith("No changes: the cluster matches the declared state (3 live nodes")


def test_new_bundle_goes_to_redundancy_distinct_nodes_with_its_datasets():
    st_ = state(bundles=[bundle("shop", redundancy=2)])
    p = P.plan(st_)
    nodes = p.placements["shop"]
    assert len(nodes) == 2 and len(set(nodes)) == 2
    d = digest_of(st_, "shop")
    for n in nodes:
        assert p.nodes[n].bundles == {"shop": d}
        assert p.nodes[n].changes.start_bundles == ("shop",)
        assert "root" in p.nodes[n].datasets
        if n != "a":  # "a" holds the only copy already
            assert p.nodes[n].changes.add_datasets == ("root",)
    assert p.dataset_nodes["root"] == tuple(sorted({"a", *nodes}))
    assert p.changed_nodes() == tuple(sorted(set(nodes) | ({"a"} & set(nodes))))
    assert p.problems == ()


def test_new_replicas_prefer_the_least_loaded_nodes_that_hold_their_datasets():
    # "b" and "c" hold the dataset; "a" does not: no copy needed
    st_ = state(bundles=[bundle("shop", redundancy=2)], dataset_heartbeats=everywhere("root", "bc"))
    p = P.plan(st_)
    assert p.placements["shop"] == ("b", "c")
    assert all(not p.nodes[n].changes.add_datasets for n in "abc")
    assert p.nodes["b"].notes["bundle/shop"] == "new placement, where its datasets are"
    # spreading comes first: a holder already running more bundles than another node is passed over
    st_ = state(
        bundles=[bundle("old"), bundle("shop")],
        dataset_heartbeats=everywhere("root", "b"),
        applied={"b": {"old": P.Applied(digest_of(state(bundles=[bundle("old")]), "old"), NOW)}},
        bundle_heartbeats={"old": {"b": bhb("old", "b")}},
    )
    p = P.plan(st_)
    assert p.placements["old"] == ("b",) and p.placements["shop"] != ("b",)
    assert p.nodes[p.placements["shop"][0]].changes.add_datasets == ("root",)


def test_digest_is_sha256_of_the_canonical_overlay():
    st_ = state(bundles=[bundle("shop")])
    overlaid = m.overlay_bundle(st_.bundles["shop"], st_.services, st_.datasets)
    import hashlib

    expect = (
        "sha256:" + hashlib.sha256(json.dumps(overlaid, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    )
    assert P.bundle_digest(overlaid) == expect
    p = P.plan(st_)
    (n,) = p.placements["shop"]
    assert p.nodes[n].bundles["shop"] == expect


def test_existing_placement_stays_and_only_the_missing_replica_is_added():
    st_ = state(
        bundles=[bundle("shop", redundancy=2)],
        applied={"c": {"shop": P.Applied("sha256:old", NOW - 100)}},
        bundle_heartbeats={"shop": {"c": bhb("shop", "c")}},
    )
    p = P.plan(st_)
    assert "c" in p.placements["shop"] and len(p.placements["shop"]) == 2
    other = next(n for n in p.placements["shop"] if n != "c")
    assert p.nodes[other].changes.start_bundles == ("shop",)
    # c runs an old digest and is the only healthy replica: the update waits for the new one.
    assert p.nodes["c"].changes.update_bundles == ()
    assert p.nodes["c"].deferred == ("shop",)
    assert "update deferred" in p.nodes["c"].notes["bundle/shop"]


def test_heartbeat_alone_counts_as_having_the_bundle():
    st_ = state(bundles=[bundle("shop")], bundle_heartbeats={"shop": {"b": bhb("shop", "b")}})
    p = P.plan(st_)
    assert p.placements["shop"] == ("b",)
    # running but never applied by the tick: applied now (an idempotent update)
    assert p.nodes["b"].changes.update_bundles == ("shop",)
    assert p.nodes["b"].notes["bundle/shop"] == "running but never applied"


def test_least_loaded_node_gets_the_new_bundle():
    st_ = state(
        bundles=[bundle("one"), bundle("two"), bundle("new")],
        applied={"a": {"one": P.Applied("x", NOW)}, "b": {"two": P.Applied("x", NOW)}},
    )
    p = P.plan(st_)
    assert p.placements["new"] == ("c",)


def test_most_free_memory_breaks_ties_and_nodes_that_cannot_fit_are_skipped():
    objs = {"a": node("a", mem=1 * GIB), "b": node("b", mem=4 * GIB), "c": node("c", mem=2 * GIB)}
    st_ = state(
        bundles=[bundle("small"), bundle("big", services=("fat",), redundancy=2)],
        services=[service("web", memory=64 * MIB), service("fat", memory=int(1.5 * GIB))],
        node_objs=objs,
    )
    p = P.plan(st_)
    assert p.placements["big"] == ("b", "c")  # a cannot fit 1.5 GiB
    assert p.placements["small"] == ("a",)  # fewest bundles first
    assert p.problems == ()


def test_fewer_fitting_nodes_than_redundancy_places_what_fits_and_reports():
    objs = {"a": node("a", mem=1 * GIB), "b": node("b", mem=4 * GIB), "c": node("c", mem=1 * GIB)}
    st_ = state(
        bundles=[bundle("big", services=("fat",), redundancy=2)],
        services=[service("fat", memory=2 * GIB)],
        node_objs=objs,
    )
    p = P.plan(st_)
    assert p.placements["big"] == ("b",)
    assert (
        P.Problem(
            "bundle/big", "redundancy", "only 1 of 2 replicas placed: no other live node has 2048 MiB of memory free"
        )
        in p.problems
    )


def test_memory_is_reserved_by_new_placements_in_the_same_plan():
    objs = {"a": node("a", mem=5 * GIB // 2), "b": node("b", mem=5 * GIB // 2)}
    st_ = state(
        nodes=("a", "b"),
        bundles=[bundle(f"b{i}", services=("fat",)) for i in range(5)],
        services=[service("fat", memory=1 * GIB)],
        node_objs=objs,
    )
    p = P.plan(st_)
    placed = [b for b, ns in p.placements.items() if ns]
    assert len(placed) == 4  # 2 per node of 2.5 GiB; the fifth fits nowhere
    assert sum(1 for pr in p.problems if pr.field == "redundancy") == 1


def test_redundancy_above_the_live_node_count_places_on_all_and_reports():
    st_ = state(nodes=("a", "b"), bundles=[bundle("shop", redundancy=3)])
    p = P.plan(st_)
    assert p.placements["shop"] == ("a", "b")
    assert P.Problem("bundle/shop", "redundancy", "redundancy 3 > 2 live nodes") in p.problems
    assert "! bundle/shop redundancy: redundancy 3 > 2 live nodes" in P.render_text(p)


def test_no_live_nodes_is_a_problem_not_a_crash():
    st_ = state(nodes=(), bundles=[bundle("shop")])
    p = P.plan(st_)
    assert p.nodes == {}
    assert p.placements == {"shop": ()}
    assert P.Problem("cluster", "nodes", "no live nodes: nothing can be placed") in p.problems


def test_a_lost_node_is_replaced_and_its_records_ignored():
    st_ = state(
        nodes=("a", "b", "c"),
        bundles=[bundle("shop", redundancy=2)],
        applied={"a": {"shop": P.Applied("x", NOW)}, "dead": {"shop": P.Applied("x", NOW)}},
        bundle_heartbeats={"shop": {"a": bhb("shop", "a"), "dead": bhb("shop", "dead")}},
    )
    p = P.plan(st_)
    assert "a" in p.placements["shop"] and len(p.placements["shop"]) == 2
    assert "dead" not in p.nodes


def test_excess_after_a_node_returns_keeps_healthy_up_to_date_replicas():
    st_ = state(
        bundles=[bundle("shop", redundancy=2)],
        datasets=[dataset("root", redundancy=3)],
        dataset_heartbeats=everywhere(),
    )
    d = digest_of(st_, "shop")
    st_ = dataclasses.replace(
        st_,
        applied={
            "a": {"shop": P.Applied(d, NOW - 500)},  # came back, instance gone (rebooted)
            "b": {"shop": P.Applied(d, NOW - 100)},
            "c": {"shop": P.Applied(d, NOW - 50)},
        },
        bundle_heartbeats={"shop": {"b": bhb("shop", "b", at=NOW), "c": bhb("shop", "c", at=NOW)}},
    )
    p = P.plan(st_)
    assert p.placements["shop"] == ("b", "c")
    assert p.nodes["a"].changes.stop_bundles == ("shop",)
    assert p.nodes["a"].notes["bundle/shop"] == "excess replica (redundancy 2)"
    assert p.changed_nodes() == ("a",)


def test_excess_among_healthy_replicas_keeps_the_longest_applied():
    st_ = state(bundles=[bundle("shop", redundancy=2)])
    d = digest_of(st_, "shop")
    st_ = dataclasses.replace(
        st_,
        applied={n: {"shop": P.Applied(d, NOW - t)} for n, t in (("a", 10), ("b", 300), ("c", 200))},
        bundle_heartbeats={"shop": {n: bhb("shop", n) for n in "abc"}},
    )
    p = P.plan(st_)
    assert p.placements["shop"] == ("b", "c")
    assert p.nodes["a"].changes.stop_bundles == ("shop",)


def test_bundles_no_longer_declared_are_stopped_wherever_they_are():
    st_ = state(
        bundles=[],
        applied={"a": {"gone": P.Applied("x", NOW)}},
        bundle_heartbeats={"gone": {"b": bhb("gone", "b")}},
    )
    p = P.plan(st_)
    assert p.nodes["a"].changes.stop_bundles == ("gone",)
    assert p.nodes["b"].changes.stop_bundles == ("gone",)
    assert p.nodes["a"].notes["bundle/gone"] == "no longer declared"
    text = P.render_text(p)
    assert "  - bundle  gone  (no longer declared)" in text
    assert "0 bundles to start, 0 to update, 2 to stop" in text


# ---------------------------------------------------------------------------
# Bad declarations


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        (
            lambda: state(bundles=[bundle("shop", services=("nope",))]),
            "services.nope",
            'service "nope" is not declared',
        ),
        (
            lambda: state(bundles=[bundle("shop")], services=[service("web", dataset="missing")]),
            "services.web.dataset",
            'dataset "missing" is not declared',
        ),
        (
            lambda: state(bundles=[bundle("shop", datasets={"data": {"id": "ghost"}})]),
            "datasets.data.id",
            'dataset "ghost" is not declared',
        ),
        (lambda: state(bundles=[m.Bundle(id="shop")]), "services", "a bundle needs at least one service"),
    ],
)
def test_bad_bundle_is_reported_held_and_not_stopped(bad, field, reason):
    st_ = bad()
    st_ = dataclasses.replace(
        st_,
        dataset_heartbeats={"root": {"b": dhb("root", "b", in_use=True)}},  # the held instance's
        applied={"b": {"shop": P.Applied("sha256:before", NOW - 1000)}},
        bundle_heartbeats={"shop": {"b": bhb("shop", "b")}},
    )
    p = P.plan(st_)
    assert P.Problem("bundle/shop", field, reason) in p.problems
    assert "shop" not in p.placements
    nb = p.nodes["b"]
    assert nb.held == ("shop",)
    assert nb.bundles == {"shop": "sha256:before"}
    assert nb.changes.empty
    assert p.changed_nodes() == ()
    assert nb.notes["bundle/shop"] == "held as it is: its declaration is invalid"


def test_undecodable_stored_values_are_held_and_reported():
    st_ = state(
        bundles=[],
        datasets=[],
        dataset_heartbeats={"blob": {"a": dhb("blob", "a")}},
        applied={"a": {"shop": P.Applied("sha256:x", NOW)}},
        invalid={"bundle/shop": "the stored value is not JSON", "dataset/blob": "bad", "cluster/config": "bad ttl"},
    )
    p = P.plan(st_)
    assert p.nodes["a"].held == ("shop",)
    assert p.nodes["a"].changes.empty  # neither the bundle stopped nor the dataset removed
    assert "blob" in p.nodes["a"].datasets
    assert {pr.object for pr in p.problems} == {"bundle/shop", "dataset/blob", "cluster/config"}


def test_never_raises_for_odd_heartbeats_and_applied_records():
    st_ = state(
        bundles=[bundle("shop", redundancy=2)],
        applied={"a": {"shop": P.Applied("", float("nan"))}, "zz": {}},
        bundle_heartbeats={"shop": {"a": m.BundleHeartbeat("shop", "a", "2026-01-01T00:00:00.000000Z", {})}},
    )
    p = P.plan(st_)
    assert len(p.placements["shop"]) == 2


# ---------------------------------------------------------------------------
# Re-apply and rolling updates


def test_applied_without_heartbeat_is_applied_again_after_grace():
    st_ = state(bundles=[bundle("shop")])
    d = digest_of(st_, "shop")
    within = dataclasses.replace(st_, applied={"a": {"shop": P.Applied(d, NOW - 5)}})
    assert P.plan(within, grace=10).nodes["a"].changes.empty
    late = dataclasses.replace(st_, applied={"a": {"shop": P.Applied(d, NOW - 30)}})
    p = P.plan(late, grace=10)
    assert p.nodes["a"].changes.start_bundles == ("shop",)
    assert p.nodes["a"].notes["bundle/shop"] == "applied 30s ago but no heartbeat: apply again"
    assert P.plan(late, grace=60).nodes["a"].changes.empty


def two_replicas(env_before="1", env_after="2", **hb_kw):
    """shop on a and b, applied with env X=before; declared now with X=after."""
    before = state(bundles=[bundle("shop", redundancy=2, env={"X": env_before})])
    d_before = digest_of(before, "shop")
    after = state(
        bundles=[bundle("shop", redundancy=2, env={"X": env_after})],
        datasets=[dataset("root", redundancy=3)],
        dataset_heartbeats=everywhere(),
    )
    return dataclasses.replace(
        after,
        applied={n: {"shop": P.Applied(d_before, NOW - 100)} for n in "ab"},
        bundle_heartbeats={"shop": {n: bhb("shop", n, **hb_kw) for n in "ab"}},
    ), d_before


def test_rolling_update_one_replica_at_a_time():
    st_, _old = two_replicas()
    new = digest_of(st_, "shop")
    p = P.plan(st_)
    assert p.nodes["a"].changes.update_bundles == ("shop",)
    assert p.nodes["b"].deferred == ("shop",) and p.nodes["b"].changes.empty
    assert p.changed_nodes() == ("a",)
    assert p.pending()
    assert "  . bundle  shop  (update deferred: 1 replica already down (a), max_unavailable 1)" in P.render_text(p)
    # a is applied; its heartbeat is still the one from before the restart: b waits
    st2 = dataclasses.replace(st_, applied={"a": {"shop": P.Applied(new, NOW + 1)}, "b": st_.applied["b"]}, now=NOW + 2)
    p2 = P.plan(st2)
    assert p2.nodes["b"].deferred == ("shop",) and p2.changed_nodes() == ()
    # a heartbeats after the apply but is not healthy yet: b still waits
    hbs = {"a": bhb("shop", "a", healthy=False, at=NOW + 3), "b": bhb("shop", "b")}
    p3 = P.plan(dataclasses.replace(st2, bundle_heartbeats={"shop": hbs}, now=NOW + 4))
    assert p3.nodes["b"].deferred == ("shop",)
    # a healthy after the apply: b goes
    hbs = {"a": bhb("shop", "a", at=NOW + 5), "b": bhb("shop", "b")}
    p4 = P.plan(dataclasses.replace(st2, bundle_heartbeats={"shop": hbs}, now=NOW + 6))
    assert p4.nodes["b"].changes.update_bundles == ("shop",)
    assert p4.nodes["b"].deferred == ()


def test_max_unavailable_two_updates_both():
    st_, _ = two_replicas()
    p = P.plan(st_, max_unavailable=2)
    assert p.nodes["a"].changes.update_bundles == ("shop",)
    assert p.nodes["b"].changes.update_bundles == ("shop",)


def test_broken_replicas_always_get_the_fix():
    st_, _ = two_replicas(healthy=False)
    p = P.plan(st_)
    assert p.nodes["a"].changes.update_bundles == ("shop",)
    assert p.nodes["b"].changes.update_bundles == ("shop",)


def test_a_replica_missing_a_service_is_not_healthy():
    st_, _ = two_replicas()
    st_ = dataclasses.replace(
        st_,
        bundles={"shop": bundle("shop", services=("web", "db"), redundancy=2, env={"X": "2"})},
        services={"web": service("web"), "db": service("db")},
    )
    # heartbeats report only "web": both replicas are down, both updated
    p = P.plan(st_)
    assert p.nodes["a"].changes.update_bundles == ("shop",)
    assert p.nodes["b"].changes.update_bundles == ("shop",)


def test_starting_missing_replicas_is_never_deferred():
    st_, _ = two_replicas()
    st_ = dataclasses.replace(st_, bundles={"shop": bundle("shop", redundancy=3, env={"X": "2"})})
    p = P.plan(st_)
    assert p.nodes["c"].changes.start_bundles == ("shop",)
    # c is starting (down): both updates wait
    assert p.nodes["a"].deferred == ("shop",) and p.nodes["b"].deferred == ("shop",)


def test_service_change_changes_the_digest_of_every_bundle_using_it():
    st_ = state(bundles=[bundle("one"), bundle("two")])
    p1 = P.plan(st_)
    st2 = dataclasses.replace(
        st_, services={"web": m.Service.from_dict({"id": "web", "dataset": "root", "cmd": ["/bin/other"]})}
    )
    p2 = P.plan(st2)
    for b in ("one", "two"):
        (n,) = p1.placements[b]
        assert p1.nodes[n].bundles[b] != p2.nodes[p2.placements[b][0]].bundles[b]
        assert p2.nodes[p2.placements[b][0]].bundles[b] == digest_of(st2, b)


def test_digests_of_bundles_sharing_services_equal_the_plain_overlay():
    """The planner computes overlays with shared to_dict() results; they must equal m.overlay_bundle's."""
    web = m.Service.from_dict(
        {
            "id": "web",
            "dataset": "root",
            "cmd": ["/bin/httpd"],
            "env": {"A": "1"},
            "limits": {"memory": 64 * MIB},
            "health_checks": {"up": {"kind": "tcp", "args": {"port": 80}}},
        }
    )
    one = m.Bundle.from_dict(
        {
            "id": "one",
            "services": {
                "web": {
                    "env": {"B": "2"},
                    "cmd": ["/bin/other"],
                    "dataset": "alt",
                    "limits": {"cpu": 0.5},
                    "health_checks": {"up": {"kind": "http", "args": {"port": 8080}}},
                    "datasets": {"data": {"mount_point": "/data"}},
                }
            },
            "datasets": {"data": {"id": "root", "type": "rw", "quota": 1 << 30}},
        }
    )
    two = m.Bundle.from_dict({"id": "two", "services": {"web": {}}, "datasets": {"data": {"id": "root"}}})
    three = m.Bundle.from_dict({"id": "three", "services": {"web": {"env": {"A": "9"}}}})
    st_ = state(bundles=[one, two, three], services=[web], datasets=[dataset("root"), dataset("alt")])
    for _ in range(2):  # cold, then memoized
        p = P.plan(st_)
        for b in ("one", "two", "three"):
            (n,) = p.placements[b]
            assert p.nodes[n].bundles[b] == digest_of(st_, b), b
    assert web.to_dict()["env"] == {"A": "1"}  # the shared objects were not changed


def test_memo_does_not_leak_between_states_with_equal_ids():
    st_ = state(bundles=[bundle("one", env={"A": "1"})])
    st2 = state(bundles=[bundle("one", env={"A": "2"})])
    for _ in range(2):
        assert P.plan(st_).nodes[P.plan(st_).placements["one"][0]].bundles["one"] == digest_of(st_, "one")
        assert P.plan(st2).nodes[P.plan(st2).placements["one"][0]].bundles["one"] == digest_of(st2, "one")


# ---------------------------------------------------------------------------
# Datasets


def test_read_only_dataset_reaches_its_redundancy_from_an_existing_copy():
    st_ = state(datasets=[dataset("root", redundancy=2)], dataset_heartbeats={"root": {"b": dhb("root", "b")}})
    p = P.plan(st_)
    assert len(p.dataset_nodes["root"]) == 2 and "b" in p.dataset_nodes["root"]
    added = [n for n in p.nodes if p.nodes[n].changes.add_datasets == ("root",)]
    assert len(added) == 1


def test_read_only_dataset_without_any_copy_is_reported():
    st_ = state(bundles=[bundle("shop")], datasets=[dataset("root", redundancy=2)], dataset_heartbeats={})
    p = P.plan(st_)
    assert P.Problem("dataset/root", "", "no live node holds a copy (bundles using it cannot start)") in p.problems
    assert p.dataset_nodes["root"] == p.placements["shop"]  # only where needed: nothing to replicate from


def test_excess_copies_are_removed_only_beyond_redundancy_and_never_in_use():
    hbs = {"root": {"a": dhb("root", "a"), "b": dhb("root", "b", in_use=True), "c": dhb("root", "c")}}
    p = P.plan(state(datasets=[dataset("root", redundancy=2)], dataset_heartbeats=hbs))
    removed = [n for n in p.nodes if p.nodes[n].changes.remove_datasets == ("root",)]
    assert len(removed) == 1 and removed != ["b"]
    assert len(p.dataset_nodes["root"]) == 2
    # at exactly redundancy, nothing goes
    hbs2 = {"root": {"a": dhb("root", "a"), "c": dhb("root", "c")}}
    assert P.plan(state(datasets=[dataset("root", redundancy=2)], dataset_heartbeats=hbs2)).changed_nodes() == ()


def test_copy_needed_by_a_bundle_is_kept_over_the_others():
    st_ = state(
        bundles=[bundle("shop")],
        datasets=[dataset("root", redundancy=1)],
        dataset_heartbeats={"root": {n: dhb("root", n) for n in "abc"}},
        applied={"c": {"shop": P.Applied("x", NOW)}},
    )
    p = P.plan(st_)
    assert p.dataset_nodes["root"] == ("c",)
    assert p.nodes["a"].changes.remove_datasets == ("root",)
    assert p.nodes["b"].changes.remove_datasets == ("root",)


def test_moving_bundle_keeps_the_old_copy_until_redundancy_exists_elsewhere():
    # redundancy 1, the only copy on a; the bundle is placed on c (a full)
    objs = {"a": node("a", mem=0), "b": node("b", mem=0), "c": node("c")}
    st_ = state(
        bundles=[bundle("shop", services=("fat",))],
        services=[service("fat", memory=GIB)],
        datasets=[dataset("root", redundancy=1)],
        dataset_heartbeats={"root": {"a": dhb("root", "a")}},
        node_objs=objs,
    )
    p = P.plan(st_)
    assert p.placements["shop"] == ("c",)
    assert p.dataset_nodes["root"] == ("a", "c")  # a keeps the only existing copy
    assert p.nodes["c"].changes.add_datasets == ("root",)
    assert p.nodes["a"].changes.remove_datasets == ()


def test_undeclared_dataset_copies_go_unless_in_use():
    hbs = {"old": {"a": dhb("old", "a"), "b": dhb("old", "b", in_use=True)}}
    p = P.plan(state(datasets=[], dataset_heartbeats=hbs))
    assert p.nodes["a"].changes.remove_datasets == ("old",)
    assert p.nodes["b"].changes.empty
    assert "old" not in p.dataset_nodes


def test_read_write_copies_go_where_needed_and_stay():
    st_ = state(
        bundles=[bundle("shop", datasets={"data": {"id": "state", "type": "rw"}})],
        datasets=[dataset("root"), dataset("state", read_only=False, parent="root")],
        dataset_heartbeats={"root": {"a": dhb("root", "a")}, "state": {"b": dhb("state", "b")}},
        applied={"c": {"shop": P.Applied("x", NOW)}},
    )
    p = P.plan(st_)
    assert p.placements["shop"] == ("c",)
    assert p.nodes["c"].changes.add_datasets == ("root", "state")
    assert p.dataset_nodes["state"] == ("b", "c")  # b's copy is data: kept
    assert p.nodes["b"].changes.remove_datasets == ()


def test_parent_same_node_follows_the_child():
    st_ = state(
        bundles=[bundle("shop", datasets={"data": {"id": "child", "type": "rw"}})],
        datasets=[
            dataset("root"),
            dataset("base"),
            dataset("child", read_only=False, parent="base", parent_same_node=True),
        ],
        dataset_heartbeats={"root": {"a": dhb("root", "a")}, "base": {"a": dhb("base", "a")}},
        nodes=("a", "b"),
        applied={"b": {"shop": P.Applied("x", NOW)}},
    )
    p = P.plan(st_)
    assert p.nodes["b"].changes.add_datasets == ("base", "child", "root")


def test_undeclared_parent_is_reported():
    st_ = state(datasets=[dataset("root"), dataset("kid", read_only=False, parent="ghost")])
    assert P.Problem("dataset/kid", "parent", "dataset 'ghost' is not declared") in P.plan(st_).problems


def test_heartbeats_of_nodes_that_are_not_live_are_ignored():
    st_ = state(datasets=[dataset("root", redundancy=1)], dataset_heartbeats={"root": {"gone": dhb("root", "gone")}})
    p = P.plan(st_)
    assert "gone" not in p.nodes
    assert P.Problem("dataset/root", "", "no live node holds a copy") in p.problems


# ---------------------------------------------------------------------------
# Output


def test_to_dict_is_json_and_complete():
    st_ = state(bundles=[bundle("shop", redundancy=2), bundle("bad", services=("nope",))])
    p = P.plan(st_)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["index"] == 42
    assert set(d) == {"index", "placements", "dataset_nodes", "nodes", "problems", "changed_nodes", "summary"}
    assert d["placements"]["shop"] == list(p.placements["shop"])
    assert d["problems"] == [
        {"object": "bundle/bad", "field": "services.nope", "reason": 'service "nope" is not declared'}
    ]
    assert d["summary"]["start_bundles"] == 2
    n = p.placements["shop"][0]
    assert d["nodes"][n]["changes"]["start_bundles"] == ["shop"]
    assert d["nodes"][n]["hostname"] == "host-" + n


def test_render_text_lines_and_summary():
    st_ = state(
        bundles=[bundle("shop")],
        applied={"b": {"old": P.Applied("x", NOW)}},
        dataset_heartbeats={"root": {"a": dhb("root", "a")}, "junk": {"b": dhb("junk", "b")}},
    )
    p = P.plan(st_)
    text = P.render_text(p)
    n = p.placements["shop"][0]
    assert n == "a"  # the node holding its dataset
    assert f"  + bundle  shop  {p.nodes[n].bundles['shop'][:19]} (new placement, where its datasets are)" in text
    assert "  - dataset junk" in text
    assert "  - bundle  old  (no longer declared)" in text
    assert text.rstrip().splitlines()[-1].startswith("Plan: 1 bundle to start, 0 to update, 1 to stop, 0 deferred;")


# ---------------------------------------------------------------------------
# Properties


@st.composite
def clusters(draw):
    n_nodes = draw(st.integers(1, 7))
    nodes = tuple("n%d" % i for i in range(n_nodes))
    mems = draw(st.lists(st.sampled_from([0, GIB, 2 * GIB, 8 * GIB]), min_size=n_nodes, max_size=n_nodes))
    svc_mem = draw(st.lists(st.sampled_from([None, 256 * MIB, GIB, 3 * GIB]), min_size=3, max_size=3))
    services = [service("s%d" % i, dataset="d%d" % (i % 2), memory=svc_mem[i]) for i in range(3)]
    datasets = [dataset("d0", redundancy=draw(st.integers(1, 3))), dataset("d1", redundancy=1)]
    bundles = []
    for i in range(draw(st.integers(0, 12))):
        svcs = draw(st.lists(st.sampled_from(["s0", "s1", "s2", "s9"]), min_size=1, max_size=2, unique=True))
        bundles.append(bundle("b%d" % i, services=svcs, redundancy=draw(st.integers(1, 4))))
    objs = {n: node(n, mem=mem) for n, mem in zip(nodes, mems, strict=True)}
    holders = draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=n_nodes, unique=True))
    return state(
        nodes=nodes,
        node_objs=objs,
        bundles=bundles,
        services=services,
        datasets=datasets,
        dataset_heartbeats={"d0": {h: dhb("d0", h) for h in holders}, "d1": {holders[0]: dhb("d1", holders[0])}},
    )


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_property_every_valid_bundle_gets_min_redundancy_fitting_distinct_live_nodes(st_):
    p = P.plan(st_)
    for bid, b in st_.bundles.items():
        valid = all(s in st_.services for s in b.services)
        if not valid:
            assert bid not in p.placements
            assert any(pr.object == "bundle/" + bid for pr in p.problems)
            continue
        nodes = p.placements[bid]
        assert len(nodes) == len(set(nodes)) <= b.redundancy
        assert set(nodes) <= set(st_.nodes)
        need = sum(
            s["limits"]["memory"] or 0 for s in m.overlay_bundle(b, st_.services, st_.datasets)["services"].values()
        )
        fits = [n for n in st_.nodes if st_.nodes[n].memory_free >= need]
        if len(nodes) < b.redundancy:
            assert any(pr.object == "bundle/" + bid and pr.field == "redundancy" for pr in p.problems)
            if need == 0:
                assert len(nodes) == len(st_.nodes)  # nothing to fit: every live node
        assert len(nodes) <= max(len(fits), 0) or need == 0
        for n in nodes:
            assert p.nodes[n].bundles[bid] == digest_of(st_, bid)
    # memory never oversubscribed by new placements
    for n, np_ in p.nodes.items():
        used = 0
        for bid in np_.bundles:
            used += sum(
                s["limits"]["memory"] or 0
                for s in m.overlay_bundle(st_.bundles[bid], st_.services, st_.datasets)["services"].values()
            )
        assert used <= st_.nodes[n].memory_free


@settings(max_examples=80, deadline=None)
@given(clusters(), st.randoms(use_true_random=False))
def test_property_deterministic_whatever_the_input_order(st_, rnd):
    def shuffled(mapping):
        items = list(mapping.items())
        rnd.shuffle(items)
        return {k: shuffled(v) if isinstance(v, dict) and k not in st_.bundles else v for k, v in items}

    p1 = P.plan(st_)
    st2 = dataclasses.replace(
        st_,
        bundles=shuffled(st_.bundles),
        nodes=dict(sorted(st_.nodes.items(), key=lambda _: rnd.random())),
        dataset_heartbeats={
            k: dict(sorted(v.items(), key=lambda _: rnd.random())) for k, v in st_.dataset_heartbeats.items()
        },
    )
    p2 = P.plan(st2)
    assert p1.to_dict() == p2.to_dict()
    assert json.dumps(p1.to_dict()) == json.dumps(p2.to_dict())
    assert P.render_text(p1) == P.render_text(p2)


def converge(st_: P.ClusterState, rounds: int = 3) -> tuple[P.ClusterState, P.Plan]:
    """Apply plans until one needs nothing; a plan reaches its fixpoint within ``rounds``
    (datasets take two: copy to the new holder, then remove the old one)."""
    for _ in range(rounds):
        p = P.plan(st_)
        if not p.pending():
            return st_, p
        st_ = applied_state(st_, p)
    p = P.plan(st_)
    assert not p.pending(), P.render_text(p)
    return st_, p


@settings(max_examples=80, deadline=None)
@given(clusters(), st.sampled_from([0, GIB, 8 * GIB]))
def test_property_converges_and_a_new_node_moves_nothing(st_, mem):
    p1 = P.plan(st_)
    done, p2 = converge(st_)
    assert p2.placements == p1.placements  # applying a plan does not make it place differently
    nodes = dict(done.nodes, zz=node("zz", mem=mem))
    p3 = P.plan(dataclasses.replace(done, nodes=nodes))
    for bid, before in p2.placements.items():
        after = p3.placements[bid]
        assert set(before) <= set(after)  # nothing moves
        if len(before) == st_.bundles[bid].redundancy:
            assert after == before  # a satisfied bundle is not touched
        else:
            assert set(after) - set(before) <= {"zz"}  # a short one may gain the new node
    assert set(p3.changed_nodes()) <= {"zz"}, P.render_text(p3)


@settings(max_examples=60, deadline=None)
@given(clusters(), st.data())
def test_property_losing_a_node_replaces_only_its_replicas(st_, data):
    done, p1 = converge(st_)
    lost = data.draw(st.sampled_from(sorted(st_.nodes)))
    nodes = {n: o for n, o in done.nodes.items() if n != lost}
    p2 = P.plan(dataclasses.replace(done, nodes=nodes))
    for bid, before in p1.placements.items():
        after = p2.placements[bid]
        assert set(before) - {lost} <= set(after)  # survivors stay
        assert lost not in after
    # and when it comes back, redundancy holds exactly again
    back = applied_state(dataclasses.replace(done, nodes=nodes), p2)
    back = dataclasses.replace(back, nodes=done.nodes, applied=dict(back.applied, **{lost: done.applied.get(lost, {})}))
    p3 = P.plan(back)
    for bid, b in st_.bundles.items():
        if bid in p3.placements:
            assert len(p3.placements[bid]) == min(b.redundancy, len(p3.placements[bid]))
            assert len(p3.placements[bid]) <= b.redundancy


def test_random_large_state_is_deterministic_and_fast_enough():
    rnd = random.Random(7)
    nodes = tuple("n%03d" % i for i in range(50))
    services = [service("s%d" % i, dataset="root", memory=64 * MIB) for i in range(10)]
    bundles = [
        bundle("b%d" % i, services=("s%d" % rnd.randrange(10),), redundancy=rnd.randint(1, 3)) for i in range(500)
    ]
    st_ = state(nodes=nodes, bundles=bundles, services=services)
    p1, p2 = P.plan(st_), P.plan(st_)
    assert p1.to_dict() == p2.to_dict()
    counts = [len(p.bundles) for p in p1.nodes.values()]
    assert max(counts) - min(counts) <= 1  # least-loaded spread


# ---------------------------------------------------------------------------
# _clusterstate: applied records and building a state from store entries


def test_applied_records_round_trip_and_refuse_garbage():
    rec = {"web": P.Applied("sha256:ab", 12.5), "db": P.Applied("sha256:cd", 3.0)}
    raw = cs.encode_applied(rec)
    assert raw == b'{"db":{"digest":"sha256:cd","time":3.0},"web":{"digest":"sha256:ab","time":12.5}}'
    assert cs.decode_applied(raw) == rec
    assert cs.applied_key("n1") == "cluster/applied/n1"
    for bad, where in [
        (b"nope", "applied"),
        (b"[]", "applied"),
        (b'{"web":{"digest":"x"}}', "applied.web"),
        (b'{"web":{"digest":"x","time":"soon"}}', "applied.web.time"),
        (b'{"Web!":{"digest":"x","time":1}}', "applied.Web!"),
    ]:
        with pytest.raises(m.ValidationError) as e:
            cs.decode_applied(bad)
        assert e.value.path == where


def entry(key, value, index=5):
    if not isinstance(value, bytes):
        value = value.to_bytes() if hasattr(value, "to_bytes") else json.dumps(value).encode()
    return Entry(key=key, value=value, modify_index=index)


def test_build_state_reads_every_kind_and_reports_bad_values():
    entries = [
        entry("bundles/shop/config", bundle("shop")),
        entry("bundles/bad/config", b"{not json"),
        entry("bundles/shop/other", b"ignored"),
        entry("services/web/config", service("web")),
        entry("datasets/root/config", dataset("root")),
        entry("datasets/root/content", b'{"digest":"x"}'),
        entry("nodes/a", node("a")),
        entry("nodes/b", b"garbage"),
        entry("heartbeats/datasets/root/a", dhb("root", "a")),
        entry("heartbeats/bundles/shop/a", bhb("shop", "a")),
        entry("heartbeats/bundles/shop/b", b"garbage"),
        entry("cluster/config", m.ClusterConfig(node_ttl=7)),
        entry("cluster/applied/a", cs.encode_applied({"shop": P.Applied("sha256:x", 1.0)})),
        entry("cluster/applied/b", b"[]"),
    ]
    s = cs.build_state(entries, now=99, index=1234)
    assert set(s.bundles) == {"shop"} and set(s.services) == {"web"} and set(s.datasets) == {"root"}
    assert set(s.nodes) == {"a"}
    assert set(s.bundle_heartbeats["shop"]) == {"a"}
    assert s.dataset_heartbeats["root"]["a"].node == "a"
    assert s.config.node_ttl == 7
    assert s.applied == {"a": {"shop": P.Applied("sha256:x", 1.0)}}
    assert set(s.invalid) == {"bundle/bad", "applied/b"}
    assert s.now == 99.0 and s.index == 1234
    # byte-identical values decode to the very same objects (the planner's memo relies on it)
    s2 = cs.build_state(entries, now=100, index=1235)
    assert s2.bundles["shop"] is s.bundles["shop"]
    assert s2.services["web"] is s.services["web"]
    p = P.plan(s2)
    assert p.nodes["a"].bundles["shop"].startswith("sha256:")
    assert any(pr.object == "bundle/bad" for pr in p.problems)


@settings(max_examples=80, deadline=None)
@given(
    clusters(),
    st.lists(
        st.tuples(
            st.sampled_from(["n0", "n1", "n5", "gone"]),
            st.sampled_from(["b0", "b1", "b2", "undeclared"]),
            st.sampled_from(["", "sha256:x"]),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        max_size=8,
    ),
    st.lists(
        st.tuples(
            st.sampled_from(["n0", "n1", "n3", "gone"]),
            st.sampled_from(["b0", "b1", "undeclared"]),
            st.booleans(),
            st.sampled_from(["2026-01-01T00:00:00.000000Z", "0001-01-01T00:00:00.000000Z", "garbage"]),
        ),
        max_size=8,
    ),
    st.dictionaries(st.sampled_from(["bundle/b0", "bundle/zz", "dataset/d0", "service/s1", "applied/n0"]), st.text()),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
)
def test_property_never_raises_on_odd_records(st_, applied, hbs, invalid, now):
    app: dict = {}
    for n, b, d, t in applied:
        app.setdefault(n, {})[b] = P.Applied(d, t)
    bhbs: dict = {}
    for n, b, healthy, t in hbs:
        hb = m.BundleHeartbeat(
            b, n if n != "gone" else "gone", t, {"s0": {"state": "running", "health": {"c": None if healthy else "x"}}}
        )
        bhbs.setdefault(b, {})[n] = hb
    odd = dataclasses.replace(st_, applied=app, bundle_heartbeats=bhbs, invalid=invalid, now=now)
    p = P.plan(odd, grace=0)
    json.dumps(p.to_dict())
    P.render_text(p)
    assert P.plan(odd, grace=0).to_dict() == p.to_dict()

"""The cluster tick's pure decisions (daemons/cerana_cluster_tick/core.py) and its settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._planner import Applied, NodeChanges, NodePlan, Problem
from cerana_cluster_tick import core
from cerana_cluster_tick.config import ConfigError, Settings
from cerana_cluster_tick.loop import run_id


def node_plan(node="n1", bundles=None, *, start=(), update=(), stop=(), add=(), remove=(), deferred=()):
    return NodePlan(
        node=node,
        datasets=tuple(sorted(add)),
        bundles=dict(bundles or {}),
        changes=NodeChanges(
            add_datasets=tuple(add), remove_datasets=tuple(remove), start_bundles=tuple(start),
            update_bundles=tuple(update), stop_bundles=tuple(stop),
        ),
        deferred=tuple(deferred),
    )  # fmt: skip


# -- retries --------------------------------------------------------------------------------------


def test_retry_delay_doubles_and_is_capped():
    assert [core.retry_delay(n, 5, 60) for n in (1, 2, 3, 4, 5, 50)] == [5, 10, 20, 40, 60, 60]


def test_a_failed_node_backs_off_without_holding_back_the_others():
    retries = core.after_run({}, {"a": "boom", "b": None}, {"a": "fa", "b": "fb"}, now=100, initial=5, maximum=60)
    assert set(retries) == {"a"} and retries["a"].failures == 1 and retries["a"].not_before == 105
    sel = core.select({"a": "fa", "b": "fb", "c": "fc"}, retries, now=101)
    assert sel.run == ("b", "c") and sel.waiting == {"a": 105}
    # due again after its delay; a second failure doubles the wait
    assert core.select({"a": "fa"}, retries, now=105).run == ("a",)
    retries = core.after_run(retries, {"a": "boom again"}, {"a": "fa"}, now=105, initial=5, maximum=60)
    assert retries["a"].failures == 2 and retries["a"].not_before == 115 and retries["a"].error == "boom again"
    # success forgets it
    assert core.after_run(retries, {"a": None}, {"a": "fa"}, now=120, initial=5, maximum=60) == {}


def test_a_changed_plan_is_retried_at_once_and_restarts_the_backoff():
    retries = core.after_run({}, {"a": "x"}, {"a": "old"}, now=0, initial=5, maximum=60)
    retries = core.after_run(retries, {"a": "x"}, {"a": "old"}, now=5, initial=5, maximum=60)
    assert retries["a"].failures == 2
    assert core.select({"a": "new"}, retries, now=6).run == ("a",)
    retries = core.after_run(retries, {"a": "x"}, {"a": "new"}, now=6, initial=5, maximum=60)
    assert retries["a"].failures == 1 and retries["a"].not_before == 11


def test_a_node_that_just_succeeded_settles_before_the_same_plan_runs_again():
    retries = core.after_run({}, {"a": None, "b": "x"}, {"a": "fa", "b": "fb"}, now=10, initial=5, maximum=60, settle=3)
    assert retries["a"] == core.Retry(0, 13, "fa", "")
    assert core.select({"a": "fa"}, retries, now=12).run == ()  # heartbeats have not caught up yet
    assert core.select({"a": "fa"}, retries, now=13).run == ("a",)  # still the same after the grace: again
    assert core.select({"a": "other"}, retries, now=11).run == ("a",)  # a new plan runs at once
    # a failure after settling counts from one
    retries = core.after_run(retries, {"a": "boom"}, {"a": "fa"}, now=13, initial=5, maximum=60, settle=3)
    assert retries["a"].failures == 1


def test_a_settling_node_waits_while_it_is_asked_for_part_of_what_it_just_applied():
    applied = frozenset({"add_datasets:web-root", "start_bundles:shop"})
    retries = core.after_run(
        {}, {"a": None}, {"a": "fa"}, now=10, initial=5, maximum=60, settle=3, changes={"a": applied}
    )
    assert retries["a"].changes == applied
    # the bundle's applied record landed, the dataset's heartbeat did not yet: a new fingerprint, same work
    part = frozenset({"add_datasets:web-root"})
    assert core.select({"a": "fb"}, retries, now=11, changes={"a": part}).run == ()
    assert core.select({"a": "fb"}, retries, now=13, changes={"a": part}).run == ("a",)  # settled: again
    # anything new runs at once
    more = part | {"start_bundles:cart"}
    assert core.select({"a": "fc"}, retries, now=11, changes={"a": more}).run == ("a",)
    # a failed node's backoff still follows the fingerprint only
    failed = core.after_run({}, {"a": "boom"}, {"a": "fa"}, now=10, initial=5, maximum=60, changes={"a": applied})
    assert core.select({"a": "fb"}, failed, now=11, changes={"a": part}).run == ("a",)


def test_forget_drops_nodes_that_need_nothing_any_more():
    retries = core.after_run({}, {"a": "x", "b": "y"}, {"a": "1", "b": "2"}, now=0, initial=5, maximum=60)
    assert set(core.forget(retries, ["b"])) == {"b"}


def test_fingerprint_follows_what_the_node_is_asked_to_do():
    a = node_plan(bundles={"shop": "sha256:1"}, start=("shop",))
    assert core.fingerprint(a) == core.fingerprint(node_plan(bundles={"shop": "sha256:1"}, start=("shop",)))
    assert core.fingerprint(a) != core.fingerprint(node_plan(bundles={"shop": "sha256:2"}, start=("shop",)))
    assert core.fingerprint(a) != core.fingerprint(node_plan(bundles={"shop": "sha256:1"}, update=("shop",)))


# -- fencing --------------------------------------------------------------------------------------


def test_fence():
    assert core.fence(True, None) is None
    assert "lock" in core.fence(False, None)
    assert core.fence(True, "bundles/ changed") == "bundles/ changed"
    assert "lock" in core.fence(False, "bundles/ changed")


# -- run results ----------------------------------------------------------------------------------


def ev(kind, host=None, **data):
    return {"event": kind, "event_data": dict(data, **({"host": host} if host else {}))}


def stats(**by):
    base = {k: {} for k in ("ok", "changed", "failures", "dark", "skipped", "processed")}
    for kind, hosts in by.items():
        base[kind] = dict(hosts)
    return ev("playbook_on_stats", **base)


def test_host_results_from_runner_events():
    events = [
        ev("runner_on_ok", "n1", res={"changed": True}, task="Run the bundles' services"),
        ev("runner_on_failed", "n2", res={"msg": "dataset web-root is not on this node"}, task="Run the services"),
        ev("runner_on_failed", "n2", res={"msg": "a later error"}, task="Other"),
        ev("runner_on_failed", "n3", res={"msg": "ignored"}, ignore_errors=True),
        ev("runner_on_unreachable", "n4", res={"msg": "ssh: connect to host 10.0.0.4 port 22: No route to host"}),
        stats(
            ok={"n1": 3, "n3": 2}, changed={"n1": 2}, failures={"n2": 1}, dark={"n4": 1},
            processed={"n1": 1, "n2": 1, "n3": 1, "n4": 1},
        ),
    ]  # fmt: skip
    out = core.host_results(events, ["n1", "n2", "n3", "n4", "n5"])
    assert out["n1"] == core.HostResult("ok", 2, None)
    assert out["n2"].status == "failed"
    assert out["n2"].error == "Run the services: dataset web-root is not on this node"
    assert out["n3"].status == "ok"  # its only failure was ignored
    assert out["n4"].status == "unreachable" and "No route to host" in out["n4"].error
    assert out["n5"].status == "not run" and "cerana_node_id" in out["n5"].error
    assert core.run_status(out) == "partial"
    assert core.run_status({"n1": out["n1"]}) == "ok"
    assert core.run_status({"n2": out["n2"]}) == "failed"
    assert core.run_status({"n1": out["n1"]}, canceled=True) == "canceled"


def test_host_results_without_stats_the_run_did_not_finish():
    events = [ev("runner_on_failed", "n2", res={"results": [{"failed": False}, {"failed": True, "msg": "item broke"}]})]
    out = core.host_results(events, ["n1", "n2"])
    assert out["n1"] == core.HostResult("not run", 0, None)
    assert out["n2"] == core.HostResult("failed", 0, "item broke")


def test_long_errors_are_cut():
    out = core.host_results([ev("runner_on_failed", "n", res={"msg": "x" * 5000})], ["n"])
    assert len(out["n"].error) == core.ERROR_MAX and out["n"].error.endswith("...")


# -- applied records --------------------------------------------------------------------------------


def test_applied_after_a_run():
    previous = {
        "kept": Applied("sha256:k", 10.0),
        "deferred": Applied("sha256:old", 11.0),
        "updated": Applied("sha256:u0", 12.0),
        "stopped": Applied("sha256:s", 13.0),
    }
    np = node_plan(
        bundles={"kept": "sha256:k", "deferred": "sha256:new", "updated": "sha256:u1", "new": "sha256:n",
                 "unknown": "sha256:x"},
        start=("new",), update=("updated",), stop=("stopped",), deferred=("deferred",),
    )  # fmt: skip
    out = core.applied_after(previous, np, 50.0, Applied)
    assert out == {
        "kept": Applied("sha256:k", 10.0),
        "deferred": Applied("sha256:old", 11.0),  # a held-back update keeps the digest it runs
        "updated": Applied("sha256:u1", 50.0),
        "new": Applied("sha256:n", 50.0),
    }


# -- events ------------------------------------------------------------------------------------------


def test_event_keys_sort_by_time_and_prune_keeps_the_newest():
    keys = [core.event_key(f"2026-11-30T03:04:{s:02d}.000000Z", "ab12cd34") for s in (7, 1, 5, 3)]
    assert sorted(keys)[0].startswith("cluster/events/2026-11-30T03:04:01")
    assert core.prune([*keys, "cluster/events/not-an-event"], 2) == sorted(keys)[:2]
    assert core.prune(keys, 10) == []
    assert core.oldest_beyond(["20261130T030405.000001Z", "20261130T030404.999999Z", "x"], 1) == [
        "20261130T030404.999999Z", "20261130T030405.000001Z",
    ]  # fmt: skip


def test_run_ids_sort_by_time():
    import datetime

    a = datetime.datetime(2026, 11, 30, 3, 4, 5, 999999, tzinfo=datetime.UTC)
    b = a + datetime.timedelta(microseconds=1)
    assert run_id(a) == "20261130T030405.999999Z" and run_id(a) < run_id(b)


def test_run_event_lists_are_bounded_and_json():
    nodes = {f"n{i:03d}": node_plan(f"n{i:03d}", {"b": "sha256:1"}, start=("b",)) for i in range(120)}
    changed = sorted(nodes)
    results = {
        n: core.HostResult("ok" if i % 2 else "failed", 1, None if i % 2 else "boom") for i, n in enumerate(changed)
    }
    problems = [Problem(f"bundle/b{i}", "redundancy", "too high").to_dict() for i in range(80)]
    event = core.run_event(
        time_text="2026-11-30T03:04:05.000000Z", applier="tick-a", index=42, status="partial",
        summary=core.plan_summary(nodes, changed), results=results, hosts={"n000": "node0"},
        retries={"n001": core.Retry(2, 130.0, "f", "boom"), "n003": core.Retry(0, 101.0, "f", "")},
        problems=problems, duration=1.23456, run_id="r1", now=100.0,
    )  # fmt: skip
    assert event["plan"]["changed_nodes"] == 120 and event["plan"]["counts"]["start_bundles"] == 120
    assert len(event["plan"]["nodes"]) == core.EVENT_LIST_MAX
    assert len(event["nodes"]["failed"]) == core.EVENT_LIST_MAX and event["nodes"]["run"] == 120
    assert event["nodes"]["counts"] == {"ok": 60, "changed": 60, "failed": 60}
    assert event["nodes"]["errors"]["n000"] == "boom" and event["nodes"]["hosts"] == {"n000": "node0"}
    assert event["retries"] == {"n001": {"failures": 2, "retry_in": 30.0}}
    assert len(event["problems"]) == core.EVENT_LIST_MAX
    assert event["duration"] == 1.235
    assert len(json.dumps(event)) < 64 * 1024
    line = core.log_line(event)
    assert line.startswith("run r1: partial in 1.2 s; 120 node(s), 60 changed; failed: n000 (boom)")
    assert "1 node(s) to retry" in line


def test_problems_event():
    p = Problem("bundle/shop", "services.web", "service web is not declared")
    event = core.problems_event(time_text="t", applier="a", index=3, problems=[p.to_dict()])
    assert event["status"] == "problems" and event["problem_count"] == 1
    assert "bundle/shop services.web: service web is not declared" in core.log_line(event)
    assert core.problems_event(time_text="t", applier="a", index=4, problems=[])["status"] == "resolved"
    key = core.problems_key([p, Problem("a", "b", "c")])
    assert key == (("a", "b", "c"), ("bundle/shop", "services.web", p.reason))


def test_bundle_services_of_started_and_updated_bundles():
    bundles = {
        "shop": m.Bundle.from_dict({"id": "shop", "services": {"web": {}, "db": {}}}),
        "blog": m.Bundle.from_dict({"id": "blog", "services": {"app": {}}}),
        "idle": m.Bundle.from_dict({"id": "idle", "services": {"x": {}}}),
    }
    plans = [node_plan("n1", start=("shop",)), node_plan("n2", update=("blog",), stop=("idle",))]
    assert core.bundle_services(plans, bundles) == {"blog": ["app"], "shop": ["db", "web"]}


def test_skip_tags_leave_out_the_plan_and_the_steps_with_nothing_to_do():
    assert core.skip_tags([node_plan("n1", start=("shop",)), node_plan("n2", add=("web-root",))]) == [
        "cerana_plan", "cerana_stop_bundles", "cerana_remove_datasets"]  # fmt: skip
    assert core.skip_tags([node_plan("n1", update=("shop",), stop=("blog",), remove=("old",))]) == [
        "cerana_plan", "cerana_add_datasets"]  # fmt: skip
    assert core.skip_tags([]) == [
        "cerana_plan",
        "cerana_add_datasets",
        "cerana_stop_bundles",
        "cerana_run_bundles",
        "cerana_remove_datasets",
    ]


def test_every_converge_step_tag_is_on_a_task_of_the_playbook_and_covers_its_loop():
    import yaml

    playbooks = Path(__file__).resolve().parents[2] / "collections/ansible_collections/cerana/platform/playbooks"
    play = yaml.safe_load((playbooks / "converge.yml").read_text())[0]
    tagged = {t["tags"][0]: t for t in play["tasks"] if t.get("tags")}
    assert set(tagged) == {"cerana_plan", *(tag for tag, _lists in core.CONVERGE_STEPS)}
    for tag, lists in core.CONVERGE_STEPS:  # the step's loop walks exactly these change lists
        loop = tagged[tag]["loop"]
        variable = loop.strip("{} ")
        text = loop + str(play["vars"].get(variable, ""))
        assert all(name in text for name in lists), (tag, text)


# -- inventory ----------------------------------------------------------------------------------------


def test_host_map_prefers_cerana_node_id():
    listing = {
        "_meta": {"hostvars": {"node1": {"cerana_node_id": "aa11"}, "node2": {"ansible_host": "10.0.0.2"}}},
        "all": {"children": ["ungrouped", "cerana_nodes"]},
        "cerana_nodes": {"hosts": ["node1", "node2", "node3"]},
    }
    assert core.host_map(listing) == {"aa11": "node1", "node2": "node2", "node3": "node3"}


def test_generated_inventory_names_hosts_by_node_id():
    nodes = {"aa11": m.Node.from_dict({"id": "aa11", "hostname": "n1", "heartbeat": "2026-11-30T03:04:05Z",
                                       "addresses": ["10.0.0.1", "10.0.0.9"]})}  # fmt: skip
    inv = core.generated_inventory(nodes, ["aa11", "bb22"], {"ansible_user": "cerana"})
    group = inv["all"]["children"]["cerana_nodes"]
    assert group["hosts"] == {"aa11": {"cerana_node_id": "aa11", "ansible_host": "10.0.0.1"},
                              "bb22": {"cerana_node_id": "bb22"}}  # fmt: skip
    assert group["vars"] == {"ansible_user": "cerana"} and "vars" not in inv["all"]


def test_next_wait():
    assert core.next_wait(100.0, [], 160.0) == 60.0
    assert core.next_wait(100.0, [103.5, 120.0], 160.0) == 3.5
    assert core.next_wait(100.0, [90.0], 160.0) == 0.0


# -- settings -------------------------------------------------------------------------------------------


def test_settings_precedence_and_errors(tmp_path):
    conf = tmp_path / "tick.toml"
    conf.write_text('resync = "2m"\nforks = 4\nlock_delay = 0\n[consul]\naddress = "http://10.0.0.1:8500"\n')
    s = Settings.load({"forks": "7"}, environ={"CERANA_CLUSTER_TICK_RESYNC": "30s", "CERANA_KV_PREFIX": "p"},
                      path=conf)  # fmt: skip
    assert s.resync == 30.0 and s.forks == 7 and s.lock_delay == 0.0
    assert s.consul.address == "http://10.0.0.1:8500" and s.consul.prefix == "p"
    assert s.playbook == "cerana.platform.converge" and s.inventory == ""
    with pytest.raises(ConfigError, match=r"invalid setting forks \(flag --forks\): must be 1-500, got 0"):
        Settings.load({"forks": "0"}, environ={}, path=conf)
    with pytest.raises(ConfigError, match=r"node_retry_initial .*must not exceed node_retry_max"):
        Settings.load({"node_retry_initial": "10m"}, environ={}, path=conf)
    with pytest.raises(ConfigError, match=r"invalid setting nope \(file .*\): unknown setting"):
        (tmp_path / "bad.toml").write_text("nope = 1\n")
        Settings.load({}, environ={}, path=tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match=r"node_consul_url .*scheme must be http or https"):
        Settings.load({"node_consul_url": "ftp://x"}, environ={}, path=conf)
    assert "secret" not in json.dumps(
        Settings.load({}, environ={"CONSUL_HTTP_TOKEN": "secret"}, path=conf).redacted(), default=str
    )


def test_host_map_reads_tagged_values_of_ansible_core_2_19():
    # what `ansible-inventory --list` prints for variables set by the cerana.platform.nodes plugin
    listing = {"_meta": {"hostvars": {"0ece41e2": {"cerana_node_id": {"__ansible_unsafe": "0ece41e2"}},
                                      "node2": {"cerana_node_id": {"__ansible_unsafe": "bb22"}}}},
               "cerana_nodes": {"hosts": ["0ece41e2", "node2"]}}  # fmt: skip
    assert core.host_map(listing) == {"0ece41e2": "0ece41e2", "bb22": "node2"}


def test_a_node_whose_heartbeat_stops_changing_goes_silent_after_the_ttl():
    seen, silent = core.silent_nodes({}, {"a": "t1", "b": "t1"}, now=100.0, ttl=3)
    assert silent == frozenset() and seen == {"a": ("t1", 100.0), "b": ("t1", 100.0)}
    seen, silent = core.silent_nodes(seen, {"a": "t2", "b": "t1"}, now=102.0, ttl=3)
    assert silent == frozenset() and seen["a"] == ("t2", 102.0) and seen["b"] == ("t1", 100.0)
    seen, silent = core.silent_nodes(seen, {"a": "t3", "b": "t1"}, now=103.0, ttl=3)
    assert silent == {"b"}  # unchanged for 3 s of this clock: whatever its own clock says
    # it heartbeats again: live at once; a node whose key is gone is forgotten
    seen, silent = core.silent_nodes(seen, {"b": "t9"}, now=104.0, ttl=3)
    assert silent == frozenset() and set(seen) == {"b"}

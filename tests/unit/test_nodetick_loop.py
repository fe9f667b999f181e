"""Parts of the node tick loop that need no Consul: check placement and loading the published ports."""

from __future__ import annotations

import datetime
import logging

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _store
from cerana_nodetick import core, loop
from cerana_nodetick.config import Settings

NOW = datetime.datetime(2026, 11, 30, 3, 5, 0, tzinfo=datetime.UTC)


def command_check(*cmd):
    return m.HealthCheck.from_dict({"id": "c", "kind": "command", "args": {"cmd": list(cmd)}, "interval": 60})


def test_a_check_whose_bundle_network_changes_starts_afresh(tmp_path):
    checks = loop.Checks(1)
    try:
        cid = ("shop", "web", "c")
        check = command_check("true")
        assert checks.update({cid: (check, "2026-11-30T03:04:05Z", None)}, 0.0, NOW, settle=5) == {cid: None}
        assert checks.wake.wait(5)  # a first check ended: the loop would tick at once
        checks.wake.clear()
        # same check, now placed in a namespace that does not exist: run again at once, inside it
        # (a first check again: retried while it fails, each failure reported meanwhile)
        place = core.Placement("10.240.0.7", str(tmp_path / "no-such-netns"))
        results = checks.update({cid: (check, "2026-11-30T03:04:05Z", place)}, 1.0, NOW, settle=0.5)
        assert results[cid] and results[cid].startswith("command 'true':")
        # unchanged: not due again before its interval
        assert checks.update({cid: (check, "2026-11-30T03:04:05Z", place)}, 2.0, NOW, settle=5) == results
        assert cid in checks.futures and not checks.wake.is_set()  # still retrying
        checks.close()  # ends the retries
        checks.futures[cid].result(timeout=5)
        assert checks.wake.is_set()
    finally:
        checks.close()


def ticker(tmp_path):
    store = _store.Store(_store.ConnectionSettings(address="http://127.0.0.1:1", prefix="t"))
    tick = loop.NodeTick(Settings(run_dir=tmp_path / "run", data_dir=tmp_path), "n" * 32, store)
    return tick


def fake_nft(tmp_path, exit_code, message=""):
    path = tmp_path / "nft"
    calls = tmp_path / "calls"
    path.write_text(f"#!/bin/sh\ncat >> {calls}\necho '--' >> {calls}\necho '{message}' >&2\nexit {exit_code}\n")
    path.chmod(0o755)
    return str(path), calls


def test_ports_failures_are_logged_once_and_retried_every_tick(tmp_path, caplog):
    tick = ticker(tmp_path)
    tick.nft, calls = fake_nft(tmp_path, 1, "Error: Could not process rule: No such file or directory")
    caplog.set_level(logging.INFO, logger="cerana_nodetick.loop")
    text = "table ip cerana {\n}\n"
    for _ in range(3):
        tick.apply_ports(text)
    assert calls.read_text().count("--") == 3  # retried every tick
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["published ports: nft failed: Error: Could not process rule: No such file or directory; retrying"]
    assert tick.applied_ports is None

    calls.unlink()
    tick.nft, calls = fake_nft(tmp_path, 0)
    tick.apply_ports(text)
    tick.apply_ports(text)  # unchanged: nft is not run again
    assert calls.read_text().count("--") == 1
    assert tick.applied_ports == text
    messages = [r.getMessage() for r in caplog.records]
    assert "published ports: ruleset loaded" in messages and "published ports: loaded again" in messages


def test_a_missing_nft_is_logged_once_and_only_when_there_is_something_to_load(tmp_path, caplog):
    tick = ticker(tmp_path)
    tick.nft = str(tmp_path / "no-nft")
    caplog.set_level(logging.INFO, logger="cerana_nodetick.loop")
    tick.apply_ports("")  # nothing to load and no nft: nothing to say
    assert caplog.records == []
    for _ in range(3):
        tick.apply_ports("table ip cerana {\n}\n")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "published ports are not set" in warnings[0] and "no-nft" in warnings[0]


def test_service_leases_are_renewed_hourly_and_failures_retried_next_tick(tmp_path, caplog, monkeypatch):
    from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio

    calls = []
    outcomes = [_store.Unreachable("http://127.0.0.1:1", "refused"), {"renewed": ["10.240.0.5"], "errors": []}]

    def renew(store, node_id, run_dir, network):
        calls.append((node_id, run_dir, network))
        outcome = outcomes.pop(0) if outcomes else {"renewed": [], "errors": []}
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(_bundle_netio, "renew_leases", renew)
    clock = [1000.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="cerana_nodetick.loop")
    tick = ticker(tmp_path)
    tick.renew_leases("10.240.0.0/16")  # Consul down: logged, retried on the next tick
    tick.renew_leases("10.240.0.0/16")  # renewed
    clock[0] += 1800
    tick.renew_leases("10.240.0.0/16")  # not due within the hour
    clock[0] += 1800
    tick.renew_leases("10.240.0.0/16")  # due again
    assert len(calls) == 3 and calls[0] == ("n" * 32, str(tmp_path / "run"), "10.240.0.0/16")
    messages = [r.getMessage() for r in caplog.records]
    assert any("service leases not renewed: Unreachable" in msg for msg in messages)
    assert "service leases renewed: 10.240.0.5" in messages


def test_a_restarted_instance_is_checked_afresh(tmp_path):
    """The result of the old process says nothing of the new one: a new start time resets it."""
    flag = tmp_path / "up"
    check = m.HealthCheck.from_dict({"id": "c", "kind": "file", "args": {"path": str(flag)}, "interval": 60})
    checks = loop.Checks(1)
    try:
        cid = ("shop", "web", "c")
        flag.write_text("")
        assert checks.update({cid: (check, "2026-11-30T03:04:05Z", None)}, 0.0, NOW, settle=5) == {cid: None}
        flag.unlink()
        # same start time: not due again before its interval, the old result stands
        assert checks.update({cid: (check, "2026-11-30T03:04:05Z", None)}, 1.0, NOW, settle=5) == {cid: None}
        # restarted: checked at once, and the new process's result replaces the old one
        results = checks.update({cid: (check, "2026-11-30T03:04:09Z", None)}, 2.0, NOW, settle=5)
        assert results[cid] == f"{flag}: does not exist"
    finally:
        checks.close()


def test_wait_or_change_returns_early_on_a_change_or_stop():
    import threading
    import time

    stop = threading.Event()
    seen = []
    t0 = time.monotonic()
    assert loop.wait_or_change(stop, 5.0, lambda: seen.append(1) or len(seen) >= 3, poll=0.01) is True
    assert len(seen) == 3 and time.monotonic() - t0 < 2.0
    assert loop.wait_or_change(stop, 0.05, lambda: False, poll=0.01) is False
    stop.set()
    assert loop.wait_or_change(stop, 5.0, lambda: False, poll=0.01) is True


def test_the_retries_of_a_first_check_end_when_its_instance_goes(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = m.HealthCheck.from_dict({"id": "c", "kind": "tcp", "args": {"port": port}, "interval": 1, "timeout": 1})
    checks = loop.Checks(1)
    try:
        cid = ("shop", "web", "c")
        results = checks.update({cid: (check, "2026-11-30T03:04:05Z", None)}, 0.0, NOW, settle=0.3)
        assert "refused" in results[cid]  # reported while it is retried
        fut = checks.futures[cid]
        assert not fut.done()
        assert checks.update({}, 0.5, NOW, settle=0.3) == {}  # the instance is gone
        assert "refused" in fut.result(timeout=2)  # its retries ended (not after FIRST_CHECK_WINDOW)
    finally:
        checks.close()

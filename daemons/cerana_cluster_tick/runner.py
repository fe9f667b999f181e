"""The only caller of ansible-runner: one converge run in its own private data dir.

Each run gets ``<state_dir>/runs/<run id>/`` (mode 0700) as ansible-runner's private data
dir: the inventory (generated, or the configured path), ``env/extravars`` (the plan, written
by ansible-runner and passed with ``-e @file``, so it never shows on a command line),
``artifacts/<run id>/`` (stdout, the command, the failure events). After the run the
environment (which may hold the Consul token: ``env/envvars`` and the copy ansible-runner
keeps in ``artifacts/<id>/command``) is removed and a token in the extra vars is blanked,
so the directory can be kept and read. Only the newest ``keep_runs``
directories are kept.

Per-host results come from the runner's events as they arrive (:func:`core.host_results`);
only the events worth reading later (failures, unreachable hosts, changes, the final
stats) are written to disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cerana_cluster_tick import core

log = logging.getLogger(__name__)

# Events kept on disk under artifacts/<id>/job_events/ (the rest only pass through memory).
_KEEP_EVENTS = {"runner_on_failed", "runner_on_unreachable", "playbook_on_stats", "runner_item_on_failed"}
SECRET_VARS = ("cerana_consul_token",)


@dataclasses.dataclass(frozen=True)
class RunRequest:
    run_id: str
    playbook: str
    inventory: str | Mapping[str, Any]  # a path, or an inventory to write as inventory/hosts.json
    hosts: Sequence[str]  # the --limit
    extravars: Mapping[str, Any]
    envvars: Mapping[str, str]
    forks: int = 10
    timeout: float = 600.0
    skip_tags: Sequence[str] = ()  # the playbook's steps not to queue at all


@dataclasses.dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str  # ansible-runner's: successful, failed, canceled, timeout, error
    rc: int | None
    results: dict[str, core.HostResult]
    duration: float
    directory: Path
    error: str | None = None  # why the run as a whole failed, when no host got to say

    @property
    def canceled(self) -> bool:
        return self.status in ("canceled", "timeout")


class Executor:
    """Runs playbooks with ansible-runner under ``<state_dir>/runs/``."""

    def __init__(self, state_dir: Path, keep_runs: int = 20) -> None:
        self.runs = Path(state_dir) / "runs"
        self.keep_runs = keep_runs

    def run(self, req: RunRequest, cancel: Callable[[], bool]) -> RunResult:
        import ansible_runner  # imported here: a second or so, and only the leader needs it

        self.runs.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.runs.parent, 0o700)
        pdd = self.runs / req.run_id
        pdd.mkdir(mode=0o700)
        inventory: str
        if isinstance(req.inventory, Mapping):
            (pdd / "inventory").mkdir(mode=0o700)
            path = pdd / "inventory" / "hosts.json"
            path.write_text(json.dumps(req.inventory, indent=1, sort_keys=True))
            inventory = str(path)
        else:
            inventory = req.inventory
        events: list[dict[str, Any]] = []

        def on_event(event: dict[str, Any]) -> bool:
            kind = event.get("event")
            if kind in _KEEP_EVENTS or (kind in ("runner_on_ok", "runner_item_on_ok") and _changed(event)):
                events.append(event)
                return True
            return False

        env = dict(req.envvars)
        # ansible-playbook next to this Python (a venv's bin/ is not on a service's PATH)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
        started = time.monotonic()
        error = None
        try:
            r = ansible_runner.run(
                private_data_dir=str(pdd),
                ident=req.run_id,
                playbook=req.playbook,
                inventory=inventory,
                limit=",".join(req.hosts),
                extravars=dict(req.extravars),
                envvars=env,
                forks=req.forks,
                skip_tags=",".join(req.skip_tags) or None,
                timeout=max(1, int(req.timeout)),
                quiet=True,
                event_handler=on_event,
                cancel_callback=cancel,
                settings={"pexpect_timeout": 1, "suppress_ansible_output": True},
            )
            status, rc = r.status, r.rc
        except Exception as e:  # a broken runner setup must not take the daemon down
            status, rc, error = "error", None, f"ansible-runner: {type(e).__name__}: {e}"
        duration = time.monotonic() - started
        results = core.host_results(events, req.hosts)
        if (
            error is None
            and status not in ("successful", "canceled")
            and all(x.status == "not run" for x in results.values())
        ):
            error = self._stdout_tail(pdd, req.run_id) or f"ansible-playbook ended with status {status} (rc {rc})"
        if error:
            results = {h: dataclasses.replace(x, error=x.error or error) for h, x in results.items()}
        self._scrub(pdd, req.run_id)
        self.prune()
        return RunResult(req.run_id, status, rc, results, duration, pdd, error)

    @staticmethod
    def _stdout_tail(pdd: Path, run_id: str, lines: int = 6) -> str:
        try:
            text = (pdd / "artifacts" / run_id / "stdout").read_text(errors="replace")
        except OSError:
            return ""
        tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(tail)[-core.ERROR_MAX :]

    @staticmethod
    def _scrub(pdd: Path, run_id: str) -> None:
        """Remove the environment (env/envvars, and the copy in artifacts/<id>/command) and
        blank secrets in the extra vars after the run."""
        try:
            (pdd / "env" / "envvars").unlink(missing_ok=True)
            command = pdd / "artifacts" / run_id / "command"
            if command.exists():
                data = json.loads(command.read_text())
                command.write_text(json.dumps({k: v for k, v in data.items() if k != "env"}))
            extravars = pdd / "env" / "extravars"
            if extravars.exists():
                data = json.loads(extravars.read_text())
                if any(k in data for k in SECRET_VARS):
                    for k in SECRET_VARS:
                        if k in data:
                            data[k] = "********"
                    extravars.write_text(json.dumps(data))
        except (OSError, ValueError) as e:
            log.warning("could not scrub %s: %s", pdd, e)

    def prune(self) -> None:
        try:
            names = [p.name for p in self.runs.iterdir() if p.is_dir()]
        except OSError:
            return
        for name in core.oldest_beyond(names, self.keep_runs):
            shutil.rmtree(self.runs / name, ignore_errors=True)


def _changed(event: Mapping[str, Any]) -> bool:
    res = (event.get("event_data") or {}).get("res") or {}
    return bool(res.get("changed"))


def _with_venv_bin(path: str) -> str:
    """``path`` with the directory of this Python (its venv's bin/) first, once."""
    venv_bin = str(Path(sys.executable).parent)
    parts = [p for p in path.split(os.pathsep) if p and p != venv_bin]
    return os.pathsep.join([venv_bin, *parts])


def inventory_hosts(inventory: str, envvars: Mapping[str, str]) -> dict[str, str]:
    """{node id: host} of a configured inventory, through ``ansible-inventory --list``."""
    import ansible_runner

    env = dict(envvars)
    env["PATH"] = _with_venv_bin(os.environ.get("PATH", os.defpath))
    # ansible-runner looks the command up on this process's PATH, not on envvars': a venv's bin/
    # is not on a service's PATH
    os.environ["PATH"] = env["PATH"]
    out, err = ansible_runner.get_inventory(
        action="list", inventories=[inventory], response_format="json", envvars=env, quiet=True
    )
    if not isinstance(out, dict):
        raise RuntimeError(f"ansible-inventory -i {inventory} failed: {str(err or out).strip()[-300:]}")
    return core.host_map(out)

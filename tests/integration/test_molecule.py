"""``molecule test`` of every role's scenario (default driver; nodes from ``cerana lab``, nspawn).

Each scenario brings its own lab up and down (create/destroy playbooks) with a name and a
free subnet given here, installs the session's wheelhouse (built once, by the first role run
that needs it), and runs destroy, syntax, create, converge, idempotence, verify,
destroy. The scenarios are independent, so they run at the same time (most of a scenario is
waiting on machines and on Ansible's round trips); each role's test then checks its own
result. Needs root, systemd-container and debootstrap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from cerana_lab import rootfs
from platform_lab import session_wheelhouse

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "collections/ansible_collections/cerana/platform/roles"
BIN = Path(sys.executable).parent

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "systemd-nspawn", "debootstrap", "nsenter")):
    pytest.skip("needs root, iproute2, systemd-container and debootstrap", allow_module_level=True)


def free_subnets(count: int) -> list[str]:
    used = []
    for item in json.loads(
        subprocess.run(
            ["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True
        ).stdout
    ):
        dst = item.get("dst")
        if dst and dst != "default":
            try:
                used.append(IPv4Network(dst, strict=False))
            except ValueError:
                pass
    free = [
        str(net)
        for net in (IPv4Network(f"10.244.{third}.0/24") for third in range(0, 250, 5))
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0)
    ]
    if len(free) < count:
        raise RuntimeError(f"fewer than {count} free 10.244.x.0/24 subnets")
    return free[:count]


def consul_bin() -> str:
    given = os.environ.get("CERANA_CONSUL_BIN")
    if given:
        return given
    return subprocess.run([str(REPO / "scripts/ensure-consul.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


SCENARIOS = sorted(p.name for p in ROLES.iterdir() if (p / "molecule/default").is_dir())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """``molecule test`` of every scenario, all started at once; {role: finished process}."""
    rootfs.ensure_rootfs()
    consul = consul_bin()
    wheelhouse = session_wheelhouse(tmp_path_factory)
    runs = {}
    try:
        for role, subnet in zip(SCENARIOS, free_subnets(len(SCENARIOS)), strict=True):
            tmp = tmp_path_factory.mktemp(f"molecule-{role}")
            lab = f"m{uuid.uuid4().hex[:7]}"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
            env.update(
                PATH=os.pathsep.join([str(BIN), env.get("PATH", os.defpath)]),
                CERANA_CONSUL_BIN=consul,
                CERANA_MOLECULE_LAB=lab,
                CERANA_MOLECULE_SUBNET=subnet,
                CERANA_MOLECULE_WHEELHOUSE=str(wheelhouse),
                ANSIBLE_NOCOLOR="1",
                NO_COLOR="1",
                ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
            )
            out = open(tmp / "molecule.log", "w+")  # noqa: SIM115 (closed below)
            proc = subprocess.Popen([str(BIN / "molecule"), "test"], cwd=ROLES / role, stdout=out,
                                    stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
            runs[role] = (proc, out, lab)
        finished = {}
        for role, (proc, out, _lab) in runs.items():
            try:
                proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.seek(0)
            finished[role] = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), "")
        yield finished
    finally:
        for proc, out, lab in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            subprocess.run([sys.executable, "-m", "cerana_lab", "down", "--name", lab], capture_output=True,
                           check=False)  # fmt: skip


@pytest.mark.parametrize("role", SCENARIOS)
def test_molecule_scenario(role, results):
    proc = results[role]
    assert proc.returncode == 0, proc.stdout[-12000:]

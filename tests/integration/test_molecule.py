"""``molecule test`` of every role's scenario (default driver; nodes from ``cerana lab``, nspawn).

Each scenario brings its own lab up and down (create/destroy playbooks) with a name and a
free subnet given here, and runs destroy, syntax, create, converge, idempotence, verify,
destroy. Needs root, systemd-container and debootstrap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from cerana_lab import rootfs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "collections/ansible_collections/cerana/platform/roles"
BIN = Path(sys.executable).parent

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "systemd-nspawn", "debootstrap", "nsenter")):
    pytest.skip("needs root, iproute2, systemd-container and debootstrap", allow_module_level=True)


def free_subnet() -> str:
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
    for third in range(0, 250, 5):
        net = IPv4Network(f"10.244.{third}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return str(net)
    raise RuntimeError("no free 10.244.x.0/24 subnet")  # fmt: skip


def consul_bin() -> str:
    given = os.environ.get("CERANA_CONSUL_BIN")
    if given:
        return given
    return subprocess.run([str(REPO / "scripts/ensure-consul.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


@pytest.mark.parametrize("role", sorted(p.name for p in ROLES.iterdir() if (p / "molecule/default").is_dir()))
def test_molecule_scenario(role, tmp_path):
    rootfs.ensure_rootfs()
    lab = f"m{uuid.uuid4().hex[:7]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
    env.update(
        PATH=os.pathsep.join([str(BIN), env.get("PATH", os.defpath)]),
        CERANA_CONSUL_BIN=consul_bin(),
        CERANA_MOLECULE_LAB=lab,
        CERANA_MOLECULE_SUBNET=free_subnet(),
        ANSIBLE_NOCOLOR="1",
        NO_COLOR="1",
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
    )
    try:
        proc = subprocess.run(
            [str(BIN / "molecule"), "test"],
            cwd=ROLES / role,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-8000:]
    finally:
        subprocess.run([sys.executable, "-m", "cerana_lab", "down", "--name", lab], capture_output=True, check=False)

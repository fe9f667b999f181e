"""``cerana_lab.host.delete_link``: a link that vanished on its own is not an error, one that
stays is. Links and the namespace are this test's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from cerana_lab import host

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def pair():
    tag = uuid.uuid4().hex[:6]
    ns, outer, inner = f"cll-{tag}", f"cll-{tag}-o", f"cll-{tag}-i"
    ip("netns", "add", ns)
    ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
    try:
        yield ns, outer
    finally:
        ip("link", "delete", outer, check=False)
        ip("netns", "delete", ns, check=False)


def test_deletes_a_link(pair):
    _, outer = pair
    assert host.link_exists(outer)
    host.delete_link(outer)
    assert not host.link_exists(outer)


def test_a_link_gone_with_its_peers_namespace_is_fine(pair):
    ns, outer = pair
    ip("netns", "delete", ns)  # the veth pair goes with the namespace, asynchronously
    host.delete_link(outer)
    assert not host.link_exists(outer)
    host.delete_link(outer)  # and again: nothing left to do is not a failure


def test_a_link_that_stays_is_an_error():
    ns = f"cll-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", ns)
    try:
        # lo cannot be deleted; run the check inside a namespace of our own
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "from cerana_lab import host\n"
             "from cerana_lab.plan import LabError\n"
             "try:\n    host.delete_link('lo')\nexcept LabError as e:\n    print('LabError:', e)\n"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        ip("netns", "delete", ns, check=False)
    assert proc.stdout.startswith("LabError: `ip link delete lo` failed:"), proc.stdout + proc.stderr

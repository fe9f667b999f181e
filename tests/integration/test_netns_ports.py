"""``_systemd.listening_in``: the listening TCP ports of a network namespace, read by a thread
that joins it (no process started), in a namespace this test makes itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import uuid

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _systemd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]

LISTEN = """
import socket, sys
s4 = socket.socket(); s4.bind(("127.0.0.1", 0)); s4.listen()
s6 = socket.socket(socket.AF_INET6); s6.bind(("::1", 0)); s6.listen()
print(s4.getsockname()[1], s6.getsockname()[1], flush=True)
sys.stdin.read()
"""


@pytest.fixture
def netns():
    name = f"cnp-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_ports_of_the_namespace_not_of_the_caller(netns: str) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", LISTEN],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port4, port6 = map(int, proc.stdout.readline().split())
        threads = threading.active_count()
        inside = _systemd.listening_in(f"/run/netns/{netns}")
        assert set(inside) == {port4, port6}
        assert all(inside[p] for p in (port4, port6))  # with their socket inodes
        # the caller stayed in its own namespace: its sockets are not those (inodes are unique)
        here = _systemd.listening()
        assert not any(inside[p] & here.get(p, set()) for p in (port4, port6))
        assert threading.active_count() == threads  # the reader thread is gone
        with open("/proc/self/ns/net") as f, open(f"/run/netns/{netns}") as g:
            assert os.fstat(f.fileno()).st_ino != os.fstat(g.fileno()).st_ino
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_a_missing_namespace_is_a_clear_error() -> None:
    with pytest.raises(_systemd.InstanceError, match="cannot read the ports in /run/netns/cnp-none"):
        _systemd.listening_in("/run/netns/cnp-none")


def test_a_file_that_is_no_namespace_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "plain"
    path.write_text("")
    with pytest.raises(_systemd.InstanceError, match="cannot read the ports in"):
        _systemd.listening_in(str(path))

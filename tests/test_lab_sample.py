"""``cerana lab sample-dataset``: a directory that runs the sample services as a root of its own."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from cerana_lab import cli


def test_sample_dataset_runs_python_with_nothing_from_the_host(tmp_path, capsys):
    root = tmp_path / "sample"
    assert cli.main(["lab", "sample-dataset", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root)
    assert (root / "app/backend.py").exists() and (root / "app/front.py").exists()
    assert not (root / "usr/lib/python3.11/test").exists()
    # bytecode only for what the apps import (not the host's __pycache__), hash-based and
    # unchecked (flags 1): used as it is, whatever the modification times of a copy
    pycs = list(root.rglob("*.pyc"))
    assert root / "usr/lib/python3.11/http/__pycache__/server.cpython-311.pyc" in pycs
    assert 20 < len(pycs) < 200 and not list((root / "app").rglob("*.pyc"))
    assert {int.from_bytes(p.read_bytes()[4:8], "little") for p in pycs} == {1}
    links = [p for p in root.rglob("*") if p.is_symlink()]
    assert links and not [p for p in links if os.readlink(p).startswith("/")]  # importable as a dataset
    if os.geteuid() != 0 or not shutil.which("chroot"):
        pytest.skip("running it needs root (chroot)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the backend, chrooted into the dataset: only the dataset's files exist for it
    proc = subprocess.Popen([shutil.which("chroot"), str(root), "/usr/bin/python3", "/app/backend.py"],
                            env={"PORT": str(port)}, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    answer = json.load(resp)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the backend did not answer"
                time.sleep(0.2)
        assert (answer["backend"] == "127.0.0.1" and answer["pid"] == proc.pid) or answer["pid"] > 0
    finally:
        proc.kill()
        proc.wait()


def test_sample_dataset_refuses_an_existing_directory(tmp_path, caplog):
    assert cli.main(["lab", "sample-dataset", str(tmp_path)]) == 1
    assert "exists" in caplog.text

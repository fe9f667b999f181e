"""The AWX execution environment definition in ``ee/``: ansible-builder accepts it, and its
Python requirements cover every third-party package the collection's plugins import."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EE = REPO / "ee"
COLLECTION = REPO / "collections" / "ansible_collections" / "cerana" / "platform"
BIN = Path(sys.executable).parent
# import name -> the distribution that provides it
DISTRIBUTIONS = {"consul": "py-consul", "zstandard": "zstandard", "libvirt": "libvirt-python"}


def third_party_imports() -> set[str]:
    found = set()
    for path in (COLLECTION / "plugins").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("ansible", "ansible_collections", "__future__"):
                    found.add(top)
    return found


def requirement_names() -> set[str]:
    names = set()
    for line in (EE / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(line.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower())
    return names


def test_requirements_cover_every_third_party_import():
    imports = third_party_imports()
    assert "consul" in imports  # the scan works
    optional = {"libvirt"}  # VM services only; documented in ee/requirements.txt
    missing = {DISTRIBUTIONS.get(i, i) for i in imports - optional} - requirement_names()
    assert not missing, f"ee/requirements.txt lacks {sorted(missing)}"


def test_ansible_builder_creates_the_build_context(tmp_path):
    for f in EE.iterdir():
        shutil.copy(f, tmp_path / f.name)
    subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "build", str(COLLECTION), "--output-path", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    proc = subprocess.run(
        [str(BIN / "ansible-builder"), "create", "-f", "execution-environment.yml",
         "--output-filename", "Containerfile"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    containerfile = (tmp_path / "context" / "Containerfile").read_text()
    assert "COPY _build/cerana /build/cerana" in containerfile
    assert "collection install" in containerfile
    assert list((tmp_path / "context" / "_build" / "cerana").glob("cerana-platform-*.tar.gz"))
    wanted = (tmp_path / "context" / "_build" / "requirements.yml").read_text()
    assert "cerana-platform-" in wanted

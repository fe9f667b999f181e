"""`ansible-galaxy collection build` makes an installable artifact of the collection."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

COLLECTION = Path(__file__).resolve().parents[1] / "collections" / "ansible_collections" / "cerana" / "platform"


def test_collection_builds_and_installs(tmp_path):
    galaxy = Path(sys.executable).with_name("ansible-galaxy")
    subprocess.run([galaxy, "collection", "build", str(COLLECTION), "--output-path", str(tmp_path)], check=True)
    (artifact,) = tmp_path.glob("cerana-platform-*.tar.gz")
    with tarfile.open(artifact) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("MANIFEST.json"))
    assert manifest["collection_info"]["namespace"] == "cerana"
    assert manifest["collection_info"]["name"] == "platform"
    assert {"plugins/modules/dataset.py", "plugins/module_utils/_store.py", "meta/runtime.yml"} <= names
    assert not any(n.startswith("tests/output") or "__pycache__" in n for n in names)

    # It installs into a collections path (--force: the editable install is visible too).
    dest = tmp_path / "installed"
    subprocess.run([galaxy, "collection", "install", "--force", str(artifact), "-p", str(dest)], check=True)
    assert (dest / "ansible_collections" / "cerana" / "platform" / "plugins" / "modules" / "bundle.py").is_file()

"""Small files travel in batches between real data servers on loopback (``POST .../files``),
and a source without batches (an older data server) still serves a whole copy, file by file."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils._dataclient import DataClient, DataServerError
from cerana_dataserver import replicate, server
from cerana_dataserver.config import Settings

pytestmark = pytest.mark.integration

SMALL = 300  # files of a few hundred bytes to a few KiB: many more than one batch holds
BIG = 3 * replicate.BATCH_FILE  # one file fetched on its own


def tree() -> dict[str, bytes]:
    files = {f"lib/m{i:03d}.py": (b"# module %d\n" % i) * (i % 97 + 1) for i in range(SMALL)}
    files["lib/empty.py"] = b""
    files["data/blob.bin"] = os.urandom(BIG)
    return files


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for d in sorted({os.path.dirname(p) for p in files}):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


class Counting(server.Handler):
    """The real handler; counts what was asked of it."""

    calls: dict[str, int]
    batches_refused = False

    def send_file(self, dataset_id: str, rel: str) -> None:
        self.calls["file"] += 1
        super().send_file(dataset_id, rel)

    def send_files(self, dataset_id: str, paths) -> None:
        self.calls["batch"] += 1
        if self.batches_refused:  # as a data server from before batches answers
            self.send_json(404, {"error": "no such endpoint: POST %s" % self.path})
            return
        super().send_files(dataset_id, paths)


@pytest.fixture
def servers(tmp_path):
    made = []

    def start(name: str, refuse_batches: bool = False):
        base = tmp_path / name
        settings = Settings(data_dir=base / "data", run_dir=base / "run", address="127.0.0.1", port=1)
        node = server.Node(settings)
        node.start()
        calls = {"file": 0, "batch": 0}
        handler = type("H", (Counting,), {"node": node, "settings": settings, "timeout": 30,
                                          "calls": calls, "batches_refused": refuse_batches})  # fmt: skip
        srv = server.DataServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        made.append((srv, thread))
        return f"http://127.0.0.1:{srv.server_address[1]}", calls, base / "data"

    yield start
    for srv, thread in made:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("refuse_batches", [False, True], ids=["batches", "older-source"])
def test_a_tree_of_small_files_is_copied_whole(servers, refuse_batches):
    files = tree()
    src_url, src_calls, _ = servers("src", refuse_batches)
    dst_url, _, dst_data = servers("dst")
    imported = DataClient(src_url).put_tar("lib", [tar_of(files)])
    got = DataClient(dst_url).replicate("lib", {"sources": [src_url], "digest": imported["digest"]})
    assert got["digest"] == imported["digest"] and not got["existing"]
    assert DataClient(dst_url).info("lib") is not None
    root = Path(dst_data) / "datasets" / "lib"
    assert {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} == files
    batches = -(-(SMALL + 1) // replicate.BATCH_FILES)  # the empty file is in one too
    if refuse_batches:  # asked (by the workers that started at once), then every file on its own
        assert 1 <= src_calls["batch"] <= min(batches, replicate.Puller.__init__.__kwdefaults__["parallel"])
        assert src_calls["file"] == SMALL + 1  # an empty file needs no request
    else:  # one request per batch, the big file on its own
        assert src_calls["file"] == 1 and src_calls["batch"] == batches


def test_a_batch_names_files_of_the_dataset_only(servers):
    src_url, _, _ = servers("src")
    DataClient(src_url).put_tar("lib", [tar_of({"a.txt": b"a"})])
    client = DataClient(src_url)
    for paths in (["../../etc/passwd"], ["nope.txt"], [], "a.txt", ["a.txt"] * (server.MAX_BATCH + 1)):
        with pytest.raises(DataServerError) as err:
            client.open_files("lib", paths)
        assert err.value.status in (400, 404, 422), (paths, err.value)
    resp, sizes = client.open_files("lib", ["a.txt", "a.txt"])
    assert sizes == [1, 1] and resp.read() == b"aa"


def test_batches_group_small_whole_files_only():
    def seg(path: str, size: int, start: int = 0, end: int | None = None):
        from ansible_collections.cerana.platform.plugins.module_utils import _datasets as ds

        return replicate.Segment(ds.Entry("f", path, 0o644, size, "x"), start, size if end is None else end)

    segs = [seg(f"s{i}", 10) for i in range(replicate.BATCH_FILES + 5)]
    segs += [seg("big", replicate.BATCH_FILE + 1), seg("part", 10 * replicate.BATCH_FILE, 0, 100)]
    segs += [seg(f"m{i}", replicate.BATCH_FILE) for i in range(20)]
    groups = replicate.batches(segs)
    # 128 files, then 5 small ones and as many of 256 KiB as fit in BATCH_BYTES
    assert [len(g) for g in groups][:2] == [replicate.BATCH_FILES, 5 + 15]
    assert all(sum(s.entry.size for s in g) <= replicate.BATCH_BYTES for g in groups)
    assert sum(len(g) for g in groups) == replicate.BATCH_FILES + 5 + 20
    assert not any(s.entry.path in ("big", "part") for g in groups for s in g)

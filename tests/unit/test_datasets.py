"""module_utils/_datasets.py: the digest, safe extraction and archive damage, without a network."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _datasets as ds


def tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x" * (ds.CHUNK + 17))
    (root / "e").write_bytes(b"")
    (root / "x.sh").write_text("#!/bin/sh\n")
    (root / "x.sh").chmod(0o755)
    (root / "l").symlink_to("a/b/f")
    return root


def tar_bytes(root, mode="w"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        tf.add(root, arcname=".")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_digest_is_the_same_for_the_tree_and_every_archive(tmp_path, mode):
    src = tree(tmp_path / "src")
    want = ds.scan_tree(src).digest
    data = tar_bytes(src, mode)
    assert ds.scan_tar(io.BytesIO(data)).digest == want
    dest = tmp_path / "dest"
    dest.mkdir()
    assert ds.extract_tar(io.BytesIO(data), str(dest)).digest == want
    assert ds.scan_tree(dest).digest == want


def test_zstd_and_export_round_trip(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    src = tree(tmp_path / "src")
    m = ds.scan_tree(src)
    assert ds.scan_tar(io.BytesIO(zstandard.ZstdCompressor().compress(tar_bytes(src)))).digest == m.digest
    out = io.BytesIO()
    ds.write_tar(str(src), m, out)
    again = io.BytesIO()
    ds.write_tar(str(src), m, again)
    assert out.getvalue() == again.getvalue()  # deterministic
    assert ds.scan_tar(io.BytesIO(out.getvalue())).digest == m.digest


def test_digest_ignores_times_owners_and_write_bits_but_not_content(tmp_path):
    src = tree(tmp_path / "src")
    before = ds.scan_tree(src).digest
    os.utime(src / "e", (1, 1))
    (src / "e").chmod(0o444)
    assert ds.scan_tree(src).digest == before
    (src / "e").write_bytes(b"!")
    assert ds.scan_tree(src).digest != before


def test_content_hash_is_chunked_and_slicing_independent():
    data = os.urandom(2 * ds.CHUNK + 5)
    a, b = ds.ContentHasher(), ds.ContentHasher()
    a.update(data)
    for i in range(0, len(data), 999_983):
        b.update(data[i : i + 999_983])
    assert a.hexdigest() == b.hexdigest() and a.size == len(data)
    assert ds.ContentHasher().hexdigest() == __import__("hashlib").sha256(b"").hexdigest()


def member(tf, name, data=b"x", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if info.isreg() else None)


def archive(*members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kw in members:
            member(tf, name, **kw)
    return buf.getvalue()


BAD = {
    "dotdot": (archive(("a/../../x", {})), "'..'"),
    "absolute": (archive(("/etc/x", {})), "absolute path"),
    "chardev": (archive(("d", {"data": b"", "type": tarfile.CHRTYPE})), "character device"),
    "blockdev": (archive(("d", {"data": b"", "type": tarfile.BLKTYPE})), "block device"),
    "hardlink-out": (archive(("h", {"data": b"", "type": tarfile.LNKTYPE, "linkname": "../x"})), "'..'"),
    "hardlink-missing": (archive(("h", {"data": b"", "type": tarfile.LNKTYPE, "linkname": "nope"})), "earlier file"),
    "symlink-abs": (archive(("s", {"data": b"", "type": tarfile.SYMTYPE, "linkname": "/etc"})), "absolute target"),
    "symlink-up": (archive(("s", {"data": b"", "type": tarfile.SYMTYPE, "linkname": "../x"})), "points outside"),
    "symlink-chain": (
        archive(
            ("dot", {"data": b"", "type": tarfile.SYMTYPE, "linkname": "."}),
            ("esc", {"data": b"", "type": tarfile.SYMTYPE, "linkname": "dot/.."}),
        ),
        "resolves outside",
    ),
    "through-link": (
        archive(("s", {"data": b"", "type": tarfile.SYMTYPE, "linkname": "a"}), ("s/f", {})),
        "through the symbolic link",
    ),
    "duplicate": (archive(("f", {}), ("f", {})), "twice"),
    "empty": (b"", "empty file"),
    "garbage": (b"\x01" * 2048, "not a readable tar"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_unsafe_and_damaged_archives_are_refused(tmp_path, name):
    data, fragment = BAD[name]
    with pytest.raises(ds.DatasetError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        ds.scan_tar(io.BytesIO(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ds.DatasetError):
        ds.extract_tar(io.BytesIO(data), str(dest))
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_truncation_is_detected(tmp_path):
    src = tree(tmp_path / "src")
    plain = tar_bytes(src)
    gz = tar_bytes(src, "w:gz")
    for cut in (plain[:1536], plain[: len(plain) - 10240 + 512], gz[: len(gz) // 2], gz[:-9]):
        with pytest.raises(ds.CorruptArchive):
            ds.scan_tar(io.BytesIO(cut))


def test_quota(tmp_path):
    src = tree(tmp_path / "src")
    size = ds.scan_tree(src).size
    ds.scan_tar(io.BytesIO(tar_bytes(src)), quota=size)
    with pytest.raises(ds.QuotaExceeded):
        ds.scan_tar(io.BytesIO(tar_bytes(src)), quota=size - 1)
    with pytest.raises(ds.QuotaExceeded):
        ds.scan_tree(src, quota=size - 1)


def test_node_store_commit_is_atomic_and_read_only(tmp_path):
    store = ds.NodeStore(str(tmp_path / "data"))
    src = tree(tmp_path / "src")
    staging = store.new_staging("web")
    m = ds.extract_tar(io.BytesIO(tar_bytes(src)), staging)
    assert not store.exists("web")
    store.commit(staging, "web", m, read_only=True)
    assert store.exists("web") and store.info("web")["manifest"].digest == m.digest
    assert (tmp_path / "data/datasets/web/e").stat().st_mode & 0o777 == 0o444
    assert (tmp_path / "data/datasets/web/x.sh").stat().st_mode & 0o777 == 0o555
    assert (tmp_path / "data/datasets/web/a").stat().st_mode & 0o777 == 0o555
    leftover = store.new_staging("other")
    assert store.clean_staging() == [os.path.basename(leftover)]
    assert store.remove("web") and not store.exists("web") and os.listdir(store.staging) == []

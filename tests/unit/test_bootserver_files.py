"""Served-path resolution, platform images, the TFTP root, HTTP ranges and routes (RFC 9110 14)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cerana_bootserver import images as img
from cerana_bootserver import web


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "a.bin").write_bytes(b"A")
    (r / "sub" / "b.bin").write_bytes(b"B")
    (tmp_path / "secret").write_bytes(b"S")
    (r / "out").symlink_to(tmp_path / "secret")
    (r / "outdir").symlink_to(tmp_path)
    (r / "in").symlink_to("sub/b.bin")
    (r / "loop").symlink_to("loop")
    return r.resolve()


@pytest.mark.parametrize(("name", "want"), [("a.bin", "a.bin"), ("sub/b.bin", "sub/b.bin"), ("in", "sub/b.bin")])
def test_resolve_inside_serves_files_and_inner_symlinks(root, name, want):
    assert img.resolve_inside(root, name) == root / want


@pytest.mark.parametrize(
    "name",
    ["", "/etc/passwd", "../secret", "sub/../../secret", "sub/../a.bin", "./a.bin", "sub//b.bin", "out",
     "outdir/secret", "sub", "missing", "loop", "a.bin\0", "sub\\b.bin", "x" * 5000],
)  # fmt: skip
def test_resolve_inside_refuses(root, name):
    with pytest.raises(img.NotServable):
        img.resolve_inside(root, name)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b.bin", ".", "..", "/", "\\", "\0", "%2e", "~", "sub", "out", "in"]), max_size=12)
)
def test_resolve_inside_never_leaves_the_root(tmp_path_factory, pieces):
    name = "".join(pieces)
    base = tmp_path_factory.getbasetemp() / "fuzzroot"
    if not base.exists():
        (base / "root" / "sub").mkdir(parents=True)
        (base / "root" / "sub" / "b.bin").write_bytes(b"B")
        (base / "secret").write_bytes(b"S")
        (base / "root" / "out").symlink_to(base / "secret")
    root = (base / "root").resolve()
    try:
        path = img.resolve_inside(root, name)
    except img.NotServable:
        return
    assert path.is_relative_to(root) and path.is_file()


def test_images(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "kernel").write_bytes(b"K")
    (tmp_path / "v1" / "initrd").write_bytes(b"I")
    (tmp_path / "current").symlink_to("v1")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "kernel").write_bytes(b"K")
    images = img.Images(tmp_path)
    cur = images.get("current")
    assert cur.kernel == (tmp_path / "v1" / "kernel").resolve()
    assert cur.initrd_sha256 == "a83dd0ccbffe39d071cc317ddf6e97f5c6b1c87af91919271f9fa140b0508c6c"
    assert images.get("broken") is None
    assert images.get("..") is None
    assert images.names() == ["current", "v1"]
    with pytest.raises(img.NotServable):
        images.file("current", "passwd")


def test_prepare_tftp_root_copies_through_symlinks_and_is_idempotent(tmp_path):
    src, dst = tmp_path / "ipxe", tmp_path / "tftp"
    src.mkdir()
    (tmp_path / "boot-ipxe.efi").write_bytes(b"EFI")
    (src / "ipxe.efi").symlink_to(tmp_path / "boot-ipxe.efi")  # as Debian ships it: -> /boot/ipxe.efi
    (src / "undionly.kpxe").write_bytes(b"KPXE")
    assert img.prepare_tftp_root(src, dst) == ["undionly.kpxe", "ipxe.efi"]
    assert not (dst / "ipxe.efi").is_symlink()
    assert (dst / "ipxe.efi").read_bytes() == b"EFI"
    assert img.resolve_inside(dst.resolve(), "ipxe.efi")
    before = os.stat(dst / "undionly.kpxe").st_ino
    assert img.prepare_tftp_root(src, dst) == ["undionly.kpxe", "ipxe.efi"]
    assert os.stat(dst / "undionly.kpxe").st_ino == before  # unchanged: not rewritten
    (src / "undionly.kpxe").write_bytes(b"NEW")
    img.prepare_tftp_root(src, dst)
    assert (dst / "undionly.kpxe").read_bytes() == b"NEW"
    (src / "undionly.kpxe").unlink()
    assert img.prepare_tftp_root(src, dst) == ["undionly.kpxe", "ipxe.efi"]  # the old copy stays
    assert sorted(p.name for p in dst.iterdir()) == ["ipxe.efi", "undionly.kpxe"]  # no temp files left


# -- RFC 9110 14: ranges ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=10-", 100, (10, 99)),
        ("bytes=90-200", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-200", 100, (0, 99)),
        ("bytes = 5-6", 100, (5, 6)),
        ("bytes=0-0", 1, (0, 0)),
        ("bytes=0-1,5-6", 100, None),  # multi-range: ignored, whole file
        ("bytes=9-5", 100, None),  # invalid: ignored
        ("bytes=-", 100, None),
        ("items=0-5", 100, None),
        ("bytes=a-b", 100, None),
    ],
)
def test_parse_range(header, size, want):
    assert web.parse_range(header, size) == want


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100),
                                              ("bytes=0-", 0), ("bytes=-5", 0)])  # fmt: skip
def test_parse_range_unsatisfiable(header, size):
    with pytest.raises(web.Unsatisfiable):
        web.parse_range(header, size)


@given(st.text(max_size=30), st.integers(0, 1 << 40))
def test_parse_range_result_is_always_inside_the_file(header, size):
    try:
        got = web.parse_range(header, size)
    except web.Unsatisfiable:
        return
    if got is not None:
        assert 0 <= got[0] <= got[1] < size


# -- routes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/boot/52:54:00:AA:bb:cc.ipxe", web.Route("script", mac="52:54:00:aa:bb:cc")),
        ("/boot/52-54-00-aa-bb-cc.ipxe", web.Route("script", mac="52:54:00:aa:bb:cc")),
        ("/boot/525400aabbcc.ipxe?x=1", web.Route("script", mac="52:54:00:aa:bb:cc")),
        ("/boot/52%3A54%3A00%3Aaa%3Abb%3Acc.ipxe", web.Route("script", mac="52:54:00:aa:bb:cc")),
        ("/boot.ipxe", web.Route("chain")),
        ("/kernel", web.Route("image", image="current", file="kernel")),
        ("/initrd", web.Route("image", image="current", file="initrd")),
        ("/images/v1/kernel", web.Route("image", image="v1", file="kernel")),
        ("/undionly.kpxe", web.Route("binary", file="undionly.kpxe")),
        ("/ipxe.efi", web.Route("binary", file="ipxe.efi")),
        ("/images/../kernel", web.Route("notfound")),
        ("/images/%2e%2e/kernel", web.Route("notfound")),
        ("/images/%2E%2E/v1/kernel", web.Route("notfound")),
        ("/images/%252e%252e/kernel", web.Route("notfound")),
        ("/images/v1/passwd", web.Route("notfound")),
        ("/images/v1/../../etc/passwd", web.Route("notfound")),
        ("/images/v1%2fkernel", web.Route("image", image="v1", file="kernel")),  # decoded once, then checked
        ("/boot/zz:54:00:aa:bb:cc.ipxe", web.Route("notfound")),
        ("/etc/passwd", web.Route("notfound")),
        ("/", web.Route("notfound")),
    ],
)
def test_route(path, want):
    assert web.route(path, "current") == want

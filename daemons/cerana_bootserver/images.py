"""Files the boot servers hand out: safe path resolution, platform images, the TFTP root.

* :func:`resolve_inside` is the one place a client-supplied name becomes a path: it
  rejects absolute names, ``..``, NUL and anything that resolves (symlinks included)
  outside the root. TFTP and HTTP both go through it.
* A platform image is a directory ``<images_dir>/<name>/`` holding ``kernel`` and
  ``initrd``; ``current`` may be a symlink to a versioned sibling (it resolves inside
  the images root, so it is allowed).
* :func:`prepare_tftp_root` copies the iPXE binaries into the TFTP root. It copies
  rather than links: Debian's ``/usr/lib/ipxe/ipxe.efi`` is itself a symlink to
  ``/boot/ipxe.efi``, which the resolution check would (rightly) refuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_FILES = ("kernel", "initrd")
IPXE_FILES = ("undionly.kpxe", "ipxe.efi")
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class NotServable(Exception):
    """A name that does not lead to a regular file inside the root (the message says why)."""


def resolve_inside(root: Path, name: str) -> Path:
    """``root/name`` resolved, if it is a regular file inside ``root`` (which must be resolved already).

    ``name`` uses ``/`` separators; a leading ``/`` is an error, not "relative to root",
    because TFTP and HTTP callers strip what they mean to strip themselves.
    """
    if not name or "\0" in name or "\\" in name:
        raise NotServable("empty name or NUL/backslash in %r" % name)
    if name.startswith("/"):
        raise NotServable("absolute name %r" % name)
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise NotServable("empty, '.' or '..' segment in %r" % name)
    try:
        path = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError) as e:  # missing, loop, too long
        raise NotServable("%r: %s" % (name, getattr(e, "strerror", None) or e)) from None
    if not path.is_relative_to(root):
        raise NotServable("%r resolves outside the root" % name)
    if not path.is_file():
        raise NotServable("%r is not a regular file" % name)
    return path


def valid_image_name(name: str) -> bool:
    return bool(_IMAGE_NAME.match(name)) and name not in (".", "..")


@dataclasses.dataclass(frozen=True)
class Image:
    name: str
    kernel: Path
    initrd: Path
    initrd_sha256: str


class Images:
    """The platform images below ``root``; SHA-256 of each initrd is cached by (path, size, mtime)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Image | None:
        """The image ``name`` if both of its files are servable, else None."""
        if not valid_image_name(name):
            return None
        try:
            kernel = resolve_inside(self.root, name + "/kernel")
            initrd = resolve_inside(self.root, name + "/initrd")
        except NotServable as e:
            log.debug("image %s: %s", name, e)
            return None
        return Image(name, kernel, initrd, self._sha256(initrd))

    def names(self) -> list[str]:
        try:
            entries = sorted(p.name for p in self.root.iterdir())
        except OSError:
            return []
        return [n for n in entries if self.get(n) is not None]

    def file(self, name: str, which: str) -> Path:
        """The servable path of ``kernel`` or ``initrd`` of image ``name``; raises NotServable."""
        if which not in IMAGE_FILES or not valid_image_name(name):
            raise NotServable("no such image file %s/%s" % (name, which))
        return resolve_inside(self.root, "%s/%s" % (name, which))

    def _sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._hashes:
                return self._hashes[key]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._hashes[key] = digest
        return digest


def prepare_tftp_root(source_dir: str | os.PathLike, root: str | os.PathLike, names=IPXE_FILES) -> list[str]:
    """Copy ``names`` from ``source_dir`` (symlinks followed) into ``root``; returns what is there now.

    Each copy goes to a temporary file that is renamed into place, so a client never
    reads half a file. Unchanged files (same size and content) are left alone. A
    missing source is logged and skipped: the other architecture can still boot.
    """
    src, dst = Path(source_dir), Path(root)
    dst.mkdir(parents=True, exist_ok=True)
    present = []
    for name in names:
        source, target = src / name, dst / name
        if not source.is_file():
            log.warning("iPXE binary %s is missing (Debian package ipxe); clients that need it cannot boot", source)
            if target.is_file() and not target.is_symlink():
                present.append(name)
            continue
        if not target.is_symlink() and target.is_file() and _same(source, target):
            present.append(name)
            continue
        fd, tmp = tempfile.mkstemp(dir=dst, prefix="." + name + ".")
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as inp:
                shutil.copyfileobj(inp, out)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        log.info("copied %s to %s", source, target)
        present.append(name)
    return present


def _same(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True

# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Dataset content: the digest, safe tar extraction, manifests, and a node's dataset directory.

Standard library only (plus the optional ``zstandard`` package for zstd archives); used
by the dataset modules (to digest a source before sending it) and by the node data
server (``cerana-dataserver``), which is the only writer of a node's datasets.

**Digest.** A dataset is a tree of directories, regular files and symbolic links. Its
manifest lists every entry but the root, sorted by the path's UTF-8 bytes, as
``(type, path, mode, size, value)``: type ``d``/``f``/``l``; path relative, ``/``-separated;
mode the permission bits with the write bits masked off (``mode & 0o555``: read-only
copies clear them, and set-id and sticky bits are dropped on import); size the file's
length (0 for directories and links); value the file's content hash or the link's target
(empty for directories). A file's content hash is the SHA-256 of the concatenated
SHA-256 digests of its 4 MiB chunks (the last one shorter; an empty file has none), so
a big file can be hashed and fetched in chunks, in parallel. The dataset digest is
``sha256:`` + SHA-256 of ``b"cerana-dataset-v1\\0"`` followed by each entry's five fields,
each terminated by a NUL byte (no field can contain one). Owners, times, extended
attributes and hard-link structure are not part of a dataset: the same tree gives the
same digest on every node, whoever extracted it and when.

**On a node.** ``<data_dir>/datasets/<id>/`` is a dataset (what the node tick heartbeats);
``<data_dir>/.manifests/<id>.json`` its manifest, written before the directory appears;
``<data_dir>/.staging/<id>.<random>/`` a copy being received, renamed into ``datasets/``
only once complete and verified (same file system: the rename is atomic). Read-only
datasets have files ``0444`` (``0555`` when executable) and directories ``0555``.
"""

from __future__ import annotations

import bz2
import dataclasses
import errno
import functools
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import time
import uuid
import zlib

from ansible_collections.cerana.platform.plugins.module_utils._files import atomic_write, fsync_dir

try:
    import zstandard

    HAS_ZSTD = True
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None
    HAS_ZSTD = False

CHUNK = 4 << 20
DIGEST_MAGIC = b"cerana-dataset-v1\0"
DATASETS_DIR = "datasets"
STAGING_DIR = ".staging"
MANIFESTS_DIR = ".manifests"
COMPRESSIONS = ("none", "gzip", "zstd")
_BUF = 1 << 20


class DatasetError(Exception):
    """Base class; ``status`` is the HTTP status the data server answers with."""

    status = 500


class UnsafeArchive(DatasetError):
    """An entry would land outside the dataset, or is of a type datasets cannot hold."""

    status = 422


class CorruptArchive(DatasetError):
    """The archive is truncated or damaged."""

    status = 422


class QuotaExceeded(DatasetError):
    status = 413


class DigestMismatch(DatasetError):
    status = 422


class NoSpace(DatasetError):
    status = 507


class Conflict(DatasetError):
    status = 409


class NotFound(DatasetError):
    status = 404


class InUse(DatasetError):
    status = 409

    def __init__(self, msg, users):
        super().__init__(msg)
        self.users = users


# ---------------------------------------------------------------------------
# Hashing and manifests


class ContentHasher:
    """The chunked content hash of one file, fed in any slicing."""

    def __init__(self):
        self._outer = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._fill = 0
        self.size = 0

    def update(self, data):
        view = memoryview(data)
        self.size += len(view)
        while view:
            take = min(len(view), CHUNK - self._fill)
            self._chunk.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == CHUNK:
                self._outer.update(self._chunk.digest())
                self._chunk = hashlib.sha256()
                self._fill = 0

    def add_chunk_digest(self, digest, length):
        """Account for a whole chunk hashed elsewhere (parallel hashing); call at chunk boundaries only."""
        self._outer.update(digest)
        self.size += length

    def hexdigest(self):
        outer = self._outer.copy()
        if self._fill:
            outer.update(self._chunk.digest())
        return outer.hexdigest()


def hash_file(path):
    """The content hash of a file."""
    h = ContentHasher()
    with open(path, "rb") as f:
        while True:
            data = f.read(_BUF)
            if not data:
                break
            h.update(data)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Entry:
    type: str  # d, f, l
    path: str
    mode: int  # permission bits as stored (0o777 at most)
    size: int = 0
    value: str = ""  # content hash (f) or link target (l)

    def record(self):
        return b"".join(
            f.encode("utf-8") + b"\0"
            for f in (self.type, self.path, "%o" % (self.mode & 0o555), str(self.size), self.value)
        )

    def to_list(self):
        return [self.type, self.path, self.mode, self.size, self.value]

    @classmethod
    def from_list(cls, item):
        t, path, mode, size, value = item
        if t not in ("d", "f", "l") or not isinstance(path, str) or not isinstance(mode, int):
            raise CorruptArchive("bad manifest entry %r" % (item,))
        check_member_path(path)
        return cls(t, path, int(mode), int(size), str(value))


def _sort_key(entry):
    return entry.path.encode("utf-8")


@dataclasses.dataclass(frozen=True)
class Manifest:
    entries: tuple

    @classmethod
    def of(cls, entries):
        return cls(tuple(sorted(entries, key=_sort_key)))

    @property
    def digest(self):
        h = hashlib.sha256(DIGEST_MAGIC)
        for e in self.entries:
            h.update(e.record())
        return "sha256:" + h.hexdigest()

    @property
    def size(self):
        return sum(e.size for e in self.entries if e.type == "f")

    @property
    def files(self):
        return sum(1 for e in self.entries if e.type == "f")

    def to_dict(self, **extra):
        d = {"digest": self.digest, "size": self.size, "files": self.files}
        d.update(extra)
        d["entries"] = [e.to_list() for e in self.entries]
        return d

    @classmethod
    def from_dict(cls, data):
        try:
            return cls.of(Entry.from_list(i) for i in data["entries"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptArchive("bad manifest: %s" % e) from None


def check_member_path(name):
    """The normalised relative path of an archive member; raises UnsafeArchive."""
    if "\0" in name:
        raise UnsafeArchive("entry %r: NUL in the name" % name)
    if name.startswith("/"):
        raise UnsafeArchive("entry %r: absolute path" % name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchive("entry %r: '..' would leave the dataset" % name)
    return "/".join(parts)


def check_link_target(path, target):
    """Refuse absolute targets and targets that climb out of the dataset (lexically)."""
    if not target or "\0" in target:
        raise UnsafeArchive("symbolic link %r: empty target" % path)
    if target.startswith("/"):
        raise UnsafeArchive("symbolic link %r -> %r: absolute target points outside the dataset" % (path, target))
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchive("symbolic link %r -> %r points outside the dataset" % (path, target))


def scan_tree(root, *, quota=None, skip_symlink_check=False):
    """The Manifest of a directory tree (symbolic links are not followed)."""
    entries = []
    total = 0
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise UnsafeArchive("file name %r is not UTF-8" % rel) from None
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode) & 0o777
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry("d", rel, mode))
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
                if quota is not None and total > quota:
                    raise QuotaExceeded("the content is larger than the quota of %d bytes" % quota)
                entries.append(Entry("f", rel, mode, st.st_size, hash_file(full)))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                if not skip_symlink_check:
                    check_link_target(rel, target)
                entries.append(Entry("l", rel, 0o777, 0, target))
            else:
                raise UnsafeArchive(
                    "%r is a device, socket or FIFO: datasets hold only files, directories and links" % rel
                )
    if not skip_symlink_check:
        check_symlinks_inside(root, entries)
    return Manifest.of(entries)


def check_symlinks_inside(root, entries):
    """Every link, fully resolved on disk, stays inside ``root`` (catches chains through '.')."""
    real_root = os.path.realpath(root)
    for e in entries:
        if e.type != "l":
            continue
        real = os.path.realpath(os.path.join(root, e.path))
        if real != real_root and not real.startswith(real_root + os.sep):
            raise UnsafeArchive("symbolic link %r -> %r resolves outside the dataset" % (e.path, e.value))


# ---------------------------------------------------------------------------
# Archives


class _Peek:
    """A read-only stream with the first bytes available for sniffing; counts what was read."""

    def __init__(self, raw):
        self.raw = raw
        self.head = b""
        self.count = 0

    def peek(self, n):
        while len(self.head) < n:
            more = self.raw.read(n - len(self.head))
            if not more:
                break
            self.head += more
        return self.head[:n]

    def read(self, n=-1):
        if self.head:
            if n is None or n < 0:
                data = self.head + self.raw.read()
                self.head = b""
            else:
                data, self.head = self.head[:n], self.head[n:]
        else:
            data = self.raw.read(n)
        self.count += len(data)
        return data

    def readable(self):
        return True


def sniff(head):
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return "none"


def decompressed(raw):
    """(stream of tar bytes, compression name, counting reader of the raw bytes)."""
    peek = _Peek(raw)
    kind = sniff(peek.peek(6))
    if kind == "gzip":
        return gzip.GzipFile(fileobj=peek, mode="rb"), kind, peek
    if kind == "zstd":
        if not HAS_ZSTD:
            raise CorruptArchive("the archive is zstd-compressed and the zstandard Python package is not installed")
        return zstandard.ZstdDecompressor().stream_reader(peek, read_across_frames=True), kind, peek
    if kind == "bzip2":
        return bz2.BZ2File(peek, "rb"), kind, peek
    if kind == "xz":
        return lzma.LZMAFile(peek, "rb"), kind, peek
    return peek, kind, peek


_EOF_HEADER = tarfile.EOFHeaderError
_EMPTY_HEADER = tarfile.EmptyHeaderError
_TRUNCATED_HEADER = tarfile.TruncatedHeaderError
_INVALID_HEADER = tarfile.InvalidHeaderError


class _StrictTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped: only a zero block is a proper end of archive."""

    @classmethod
    def fromtarfile(cls, tarfile):  # the base class's parameter name (it shadows the module here)
        try:
            return super().fromtarfile(tarfile)
        except _EOF_HEADER:
            tarfile._cerana_end = None
            raise
        except _EMPTY_HEADER:
            tarfile._cerana_end = "the archive ends without its end-of-archive marker (truncated?)"
            raise
        except _TRUNCATED_HEADER:
            tarfile._cerana_end = "the archive is truncated inside a header"
            raise
        except _INVALID_HEADER as e:
            tarfile._cerana_end = "corrupt tar header: %s" % e
            raise


_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, lzma.LZMAError, ValueError, zlib.error)
if HAS_ZSTD:
    _ARCHIVE_ERRORS = (*_ARCHIVE_ERRORS, zstandard.ZstdError)


def _iter_members(stream):
    """Yield (TarInfo, TarFile) from a tar byte stream; raises CorruptArchive on damage."""
    try:
        tf = tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo, bufsize=_BUF)  # noqa: SIM115
    except _ARCHIVE_ERRORS as e:
        raise CorruptArchive("not a readable tar archive: %s" % (e or type(e).__name__)) from None
    tf._cerana_end = "the archive ends without its end-of-archive marker (truncated?)"
    try:
        for info in tf:
            yield info, tf
        if tf._cerana_end:
            raise CorruptArchive(tf._cerana_end)
    except _ARCHIVE_ERRORS as e:
        raise CorruptArchive("damaged archive: %s" % (e or type(e).__name__)) from None


def _archive_errors(fn):
    """Reading member data can fail too: report damage as CorruptArchive wherever it shows."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _ARCHIVE_ERRORS as e:
            raise CorruptArchive("damaged archive: %s" % (e or type(e).__name__)) from None

    return wrapper


def _member_kind(info, path):
    if info.isdir():
        return "d"
    if info.isreg():
        return "f"
    if info.issym():
        return "l"
    if info.islnk():
        return "h"
    what = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}
    raise UnsafeArchive(
        "entry %r is a %s: datasets hold only files, directories and links"
        % (path, what.get(info.type, "special file"))
    )


class _Walker:
    """Shared checks of one pass over an archive: paths, links, duplicates, quota."""

    def __init__(self, quota):
        self.quota = quota
        self.total = 0
        self.kinds = {}  # path -> d/f/l
        self.entries = {}

    def member(self, info):
        try:
            name = info.name
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsafeArchive("entry %r: the name is not UTF-8" % info.name) from None
        path = check_member_path(name)
        kind = _member_kind(info, name)
        if not path:
            if kind != "d":
                raise UnsafeArchive("entry %r: the root of the dataset must be a directory" % name)
            return None, kind
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            k = self.kinds.get(parent)
            if k == "l":
                raise UnsafeArchive("entry %r goes through the symbolic link %r" % (name, parent))
            if k == "f":
                raise UnsafeArchive("entry %r is below the file %r" % (name, parent))
            if k is None:
                self.kinds[parent] = "d"
                self.entries[parent] = Entry("d", parent, 0o755)
        old = self.kinds.get(path)
        if old is not None and not (old == "d" and kind == "d"):
            raise UnsafeArchive("entry %r appears twice in the archive" % name)
        if kind == "l":
            check_link_target(path, info.linkname)
        if kind == "h":
            target = check_member_path(info.linkname)
            if self.kinds.get(target) != "f":
                raise UnsafeArchive(
                    "hard link %r -> %r does not point to an earlier file of the archive" % (name, info.linkname)
                )
            size = self.entries[target].size
        else:
            size = info.size if kind == "f" else 0
        if kind in ("f", "h"):
            self.total += size
            if self.quota is not None and self.total > self.quota:
                raise QuotaExceeded("the content is larger than the quota of %d bytes" % self.quota)
        return path, kind

    def add(self, entry):
        self.kinds[entry.path] = entry.type
        self.entries[entry.path] = entry

    def manifest(self):
        return Manifest.of(self.entries.values())


def _mode(info):
    return info.mode & 0o777


@_archive_errors
def scan_tar(raw, *, quota=None, progress=None):
    """The Manifest of a tar stream (any supported compression), without extracting it."""
    stream, _kind, counter = decompressed(raw)
    w = _Walker(quota)
    for info, tf in _iter_members(stream):
        path, kind = w.member(info)
        if path is None:
            continue
        if kind == "d":
            w.add(Entry("d", path, _mode(info)))
        elif kind == "l":
            w.add(Entry("l", path, 0o777, 0, info.linkname))
        elif kind == "h":
            target = w.entries[check_member_path(info.linkname)]
            w.add(Entry("f", path, target.mode, target.size, target.value))
        else:
            h = ContentHasher()
            f = tf.extractfile(info)
            while True:
                data = f.read(_BUF)
                if not data:
                    break
                h.update(data)
                if progress:
                    progress(counter.count)
            if h.size != info.size:
                raise CorruptArchive("entry %r is truncated" % info.name)
            w.add(Entry("f", path, _mode(info), info.size, h.hexdigest()))
    m = w.manifest()
    _check_lexical_chains(m)
    return m


def _check_lexical_chains(manifest):
    """Links resolved through the other links of the manifest must stay inside (no disk needed)."""
    links = {e.path: e.value for e in manifest.entries if e.type == "l"}
    if not links:
        return

    def resolve(path, depth=0):
        if depth > 40:
            raise UnsafeArchive("symbolic link loop at %r" % path)
        out = []
        parts = path.split("/")
        for i, part in enumerate(parts):
            if part in ("", "."):
                continue
            if part == "..":
                if not out:
                    return None
                out.pop()
                continue
            out.append(part)
            here = "/".join(out)
            if here in links:
                target = posixpath.join(posixpath.dirname(here), links[here])
                rest = "/".join(parts[i + 1 :])
                res = resolve(target + ("/" + rest if rest else ""), depth + 1)
                return res
        return "/".join(out)

    for path, target in links.items():
        if resolve(posixpath.join(posixpath.dirname(path), target)) is None:
            raise UnsafeArchive("symbolic link %r -> %r resolves outside the dataset" % (path, target))


def _write_all(fd, data, where):
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace("no space left on the device of %s" % where) from None
            raise
        view = view[n:]


@_archive_errors
def extract_tar(raw, dest, *, quota=None, progress=None):
    """Extract a tar stream into the empty directory ``dest`` safely; returns its Manifest.

    Never follows a link: every entry is checked before it is created, files are
    created with O_EXCL|O_NOFOLLOW, and links are made last-checked on disk too.
    Raises UnsafeArchive, CorruptArchive, QuotaExceeded or NoSpace; the caller removes
    ``dest`` on failure.
    """
    stream, _kind, counter = decompressed(raw)
    w = _Walker(quota)
    dirs = {}
    for info, tf in _iter_members(stream):
        path, kind = w.member(info)
        if path is None:
            continue
        full = os.path.join(dest, path)
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            _makedirs(dest, os.path.dirname(path))
        if kind == "d":
            if not os.path.isdir(full):
                os.mkdir(full, 0o700)
            dirs[path] = _mode(info)
            w.add(Entry("d", path, _mode(info)))
        elif kind == "l":
            os.symlink(info.linkname, full)
            w.add(Entry("l", path, 0o777, 0, info.linkname))
        elif kind == "h":
            target_path = check_member_path(info.linkname)
            target = w.entries[target_path]
            os.link(os.path.join(dest, target_path), full, follow_symlinks=False)
            w.add(Entry("f", path, target.mode, target.size, target.value))
        else:
            h = ContentHasher()
            src = tf.extractfile(info)
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                while True:
                    data = src.read(_BUF)
                    if not data:
                        break
                    h.update(data)
                    _write_all(fd, data, dest)
                    if progress:
                        progress(counter.count)
                os.fchmod(fd, _mode(info))
            finally:
                os.close(fd)
            if h.size != info.size:
                raise CorruptArchive("entry %r is truncated" % info.name)
            w.add(Entry("f", path, _mode(info), info.size, h.hexdigest()))
    for path in w.entries:
        if w.kinds[path] == "d" and path not in dirs:
            dirs[path] = 0o755
    for path, mode in dirs.items():
        os.chmod(os.path.join(dest, path), mode)
    m = w.manifest()
    _check_lexical_chains(m)
    check_symlinks_inside(dest, m.entries)
    return m


def _makedirs(root, rel):
    cur = root
    for part in rel.split("/"):
        if not part:
            continue
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            raise UnsafeArchive("entry goes through the symbolic link %r" % part)
        if not os.path.isdir(cur):
            os.mkdir(cur, 0o755)


def write_tar(root, manifest, out, *, progress=None):
    """Write the dataset at ``root`` as a plain, deterministic tar to ``out`` (a writable stream).

    Entries in manifest order, times 0, owner root, no hard links.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_BUF) as tf:
        sent = 0
        for e in manifest.entries:
            info = tarfile.TarInfo(e.path)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = e.mode
            full = os.path.join(root, e.path)
            if e.type == "d":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif e.type == "l":
                info.type = tarfile.SYMTYPE
                info.linkname = e.value
                tf.addfile(info)
            else:
                info.size = e.size
                with open(full, "rb") as f:
                    tf.addfile(info, f)
                sent += e.size
                if progress:
                    progress(sent)


class Compressor:
    """A writable stream that compresses into ``out`` (none, gzip or zstd)."""

    def __init__(self, out, compression):
        self.out = out
        self.compression = compression
        if compression == "gzip":
            self._w = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
        elif compression == "zstd":
            if not HAS_ZSTD:
                raise DatasetError("zstd compression needs the zstandard Python package")
            self._w = zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(out, closefd=False)
        elif compression == "none":
            self._w = out
        else:
            raise DatasetError("unknown compression %r (none, gzip, zstd)" % compression)

    def write(self, data):
        return self._w.write(data)

    def close(self):
        if self._w is not self.out:
            self._w.close()


class Tee:
    """Read from ``src``; everything read is also written to ``sink``."""

    def __init__(self, src, sink):
        self.src = src
        self.sink = sink
        self.count = 0

    def read(self, n=-1):
        data = self.src.read(n)
        if data:
            self.sink.write(data)
            self.count += len(data)
        return data

    def readable(self):
        return True

    def drain(self):
        while self.read(_BUF):
            pass


# ---------------------------------------------------------------------------
# A node's dataset directory


def make_read_only(root, manifest):
    for e in reversed(manifest.entries):  # children before parents
        full = os.path.join(root, e.path)
        if e.type == "f":
            os.chmod(full, 0o555 if e.mode & 0o111 else 0o444)
        elif e.type == "d":
            os.chmod(full, 0o555)
    os.chmod(root, 0o555)


def make_writable(root, manifest):
    """Give the owner write access again (a read-write copy made from a read-only parent)."""
    for e in manifest.entries:
        if e.type in ("f", "d"):
            full = os.path.join(root, e.path)
            os.chmod(full, stat.S_IMODE(os.lstat(full).st_mode) | 0o200)
    os.chmod(root, 0o755)


def rmtree(path):
    """Remove a tree even when it was made read-only (as another user than root would need)."""
    if not os.path.lexists(path):
        return

    def onerror(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


class NodeStore:
    """The datasets of one node under ``data_dir`` (see the module docstring)."""

    def __init__(self, data_dir):
        self.data_dir = os.path.abspath(data_dir)
        self.datasets = os.path.join(self.data_dir, DATASETS_DIR)
        self.staging = os.path.join(self.data_dir, STAGING_DIR)
        self.manifests = os.path.join(self.data_dir, MANIFESTS_DIR)

    def ensure(self):
        for d in (self.datasets, self.staging, self.manifests):
            os.makedirs(d, exist_ok=True)

    def path(self, dataset_id):
        return os.path.join(self.datasets, dataset_id)

    def manifest_path(self, dataset_id):
        return os.path.join(self.manifests, dataset_id + ".json")

    def exists(self, dataset_id):
        return os.path.isdir(self.path(dataset_id))

    def ids(self):
        try:
            return sorted(n for n in os.listdir(self.datasets) if os.path.isdir(os.path.join(self.datasets, n)))
        except FileNotFoundError:
            return []

    def new_staging(self, dataset_id):
        self.ensure()
        path = os.path.join(self.staging, "%s.%s" % (dataset_id, uuid.uuid4().hex[:12]))
        os.mkdir(path, 0o755)
        return path

    def clean_staging(self):
        """Remove copies left by a crash (called at start-up); returns what was removed."""
        removed = []
        try:
            names = os.listdir(self.staging)
        except FileNotFoundError:
            names = []
        for name in names:
            rmtree(os.path.join(self.staging, name))
            removed.append(name)
        try:
            for name in os.listdir(self.manifests):
                if name.startswith(".tmp") or (name.endswith(".json") and not self.exists(name[:-5])):
                    os.unlink(os.path.join(self.manifests, name))
        except FileNotFoundError:
            pass
        return removed

    def info(self, dataset_id):
        """{digest, size, files, read_only, manifest}; a read-only dataset's manifest is the
        recorded one, a read-write dataset's is computed from its current content."""
        if not self.exists(dataset_id):
            raise NotFound("dataset %s is not on this node" % dataset_id)
        recorded = None
        try:
            with open(self.manifest_path(dataset_id)) as f:
                recorded = json.load(f)
        except (FileNotFoundError, ValueError):
            recorded = None
        read_only = bool(recorded and recorded.get("read_only"))
        if recorded and read_only:
            manifest = Manifest.from_dict(recorded)
        else:
            manifest = scan_tree(self.path(dataset_id), skip_symlink_check=True)
        return {"read_only": read_only, "manifest": manifest}

    def commit(self, staging, dataset_id, manifest, *, read_only):
        """Make a verified staging copy visible: manifest first, then the atomic rename."""
        if read_only:
            make_read_only(staging, manifest)
        else:
            os.chmod(staging, 0o755)
        with atomic_write(self.manifest_path(dataset_id), fsync=True) as f:
            json.dump(manifest.to_dict(id=dataset_id, read_only=read_only, committed=time.time()), f)
        try:
            os.rename(staging, self.path(dataset_id))
        except OSError as e:
            os.unlink(self.manifest_path(dataset_id))
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise Conflict("dataset %s appeared on this node meanwhile" % dataset_id) from None
            raise
        # The rename is durable only once the directories holding the new names are.
        for directory in (self.manifests, os.path.dirname(self.path(dataset_id))):
            fsync_dir(directory)

    def remove(self, dataset_id):
        """Remove a dataset: first out of sight (rename into staging), then delete."""
        path = self.path(dataset_id)
        if not os.path.isdir(path):
            return False
        self.ensure()
        gone = os.path.join(self.staging, "%s.removing-%s" % (dataset_id, uuid.uuid4().hex[:8]))
        os.rename(path, gone)
        try:
            os.unlink(self.manifest_path(dataset_id))
        except FileNotFoundError:
            pass
        rmtree(gone)
        return True

    def free_bytes(self):
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize


def reflink_copy_args(src, dst):
    """The ``cp`` command that copies a tree as cheaply as the file system allows.

    ``--reflink=auto`` shares blocks copy-on-write on btrfs/XFS (and falls back to a
    real copy elsewhere). Hard links are never used for a read-write child: a write to
    a hard-linked file changes the one inode both names share, i.e. the read-only parent.
    """
    return ["cp", "-a", "--reflink=auto", "--no-preserve=ownership", src + "/.", dst]


def stream_chunks(fileobj, size=_BUF):
    while True:
        data = fileobj.read(size)
        if not data:
            return
        yield data

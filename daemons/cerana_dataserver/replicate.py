"""Pulling a dataset from other nodes' data servers into this node's staging directory.

Files are cut into segments (whole small files; big files in pieces aligned to the
4 MiB hash chunks) fetched in parallel, round-robin over the sources; files up to 256 KiB
come in batches, many in one request (``POST .../files``), falling back to one request
each when a batch fails or the source is an older data server. Each segment keeps
its chunk digests and its offset, so an interrupted connection resumes with a Range
request (from the same source or the next one) at the byte where it stopped. A file's
content hash is checked against the source's manifest, and the whole tree's digest
against the expected one, before anything becomes visible.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ansible_collections.cerana.platform.plugins.module_utils import _datasets as ds
from ansible_collections.cerana.platform.plugins.module_utils._dataclient import DataClient, DataServerError

log = logging.getLogger(__name__)

SEGMENT = 16 * ds.CHUNK  # 64 MiB: files above this are fetched in several pieces
_BUF = 1 << 20
# Files up to BATCH_FILE bytes are fetched in batches (one request for up to BATCH_FILES files
# or BATCH_BYTES bytes): for a tree of many small files the requests, not the bytes, cost.
BATCH_FILE = 256 * 1024
BATCH_FILES = 128
BATCH_BYTES = 4 << 20


class Cancelled(ds.DatasetError):
    status = 499


@dataclass
class Segment:
    entry: ds.Entry
    start: int
    end: int  # exclusive
    pos: int = 0
    digests: list[bytes] = field(default_factory=list)
    source: int = 0
    part: int = 0  # index of the segment in its file

    def __post_init__(self) -> None:
        self.pos = self.start


class _Chunks:
    """SHA-256 digests of consecutive ``ds.CHUNK``-sized pieces of a stream, appended to ``digests``."""

    def __init__(self, digests: list[bytes]) -> None:
        self.digests = digests
        self.hash = hashlib.sha256()
        self.filled = 0

    def update(self, data: memoryview) -> None:
        off, n = 0, len(data)
        while off < n:  # hash in chunk-aligned pieces
            take = min(n - off, ds.CHUNK - self.filled)
            self.hash.update(data[off : off + take])
            self.filled += take
            off += take
            if self.filled == ds.CHUNK:
                self.digests.append(self.hash.digest())
                self.hash = hashlib.sha256()
                self.filled = 0

    def finish(self) -> None:
        if self.filled:
            self.digests.append(self.hash.digest())


def _no_endpoint(exc: BaseException) -> bool:
    """Whether ``exc`` is a data server's 404 for an endpoint it does not have (not for a file)."""
    body = getattr(exc, "body", None) or {}
    return (
        isinstance(exc, DataServerError)
        and exc.status == 404
        and str(body.get("error", "")).startswith("no such endpoint")
    )


def batches(segs: Sequence[Segment]) -> list[list[Segment]]:
    """The whole-file segments of small files (up to ``BATCH_FILE`` bytes), grouped in order into
    batches of at most ``BATCH_FILES`` files and ``BATCH_BYTES`` bytes."""
    out: list[list[Segment]] = []
    size = 0
    for s in segs:
        if not (s.start == 0 and s.end == s.entry.size <= BATCH_FILE):
            continue
        if not out or len(out[-1]) >= BATCH_FILES or size + s.entry.size > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(s)
        size += s.entry.size
    return out


@dataclass
class Stats:
    bytes: int = 0
    resumed: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_progress: float = field(default_factory=time.monotonic)

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            self.last_progress = time.monotonic()


def segments_of(entry: ds.Entry, parallel: int) -> list[Segment]:
    if entry.size <= SEGMENT or parallel <= 1:
        return [Segment(entry, 0, entry.size)]
    per = -(-entry.size // parallel)
    per = max(SEGMENT // 4, -(-per // ds.CHUNK) * ds.CHUNK)
    out = []
    start = 0
    while start < entry.size:
        end = min(entry.size, start + per)
        out.append(Segment(entry, start, end, part=len(out)))
        start = end
    return out


class Puller:
    """Fetch ``manifest``'s files from ``sources`` into ``dest`` (an empty staging directory)."""

    def __init__(
        self,
        dataset_id: str,
        manifest: ds.Manifest,
        sources: Sequence[str],
        dest: str,
        *,
        parallel: int = 4,
        retry_window: float = 20.0,
        timeout: float = 60.0,
        fsync: bool = True,
        cancel: threading.Event | None = None,
    ) -> None:
        self.id = dataset_id
        self.manifest = manifest
        self.sources = list(sources)
        self.dest = dest
        self.parallel = parallel
        self.retry_window = retry_window
        self.timeout = timeout
        self.fsync = fsync
        self.cancel = cancel or threading.Event()
        self.stats = Stats()
        self._local = threading.local()
        self._clients: list[DataClient] = []
        self._clients_lock = threading.Lock()
        self._no_batches: set[int] = set()  # sources without batches (404 no such endpoint)

    def _client(self, index: int) -> DataClient:
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if index not in clients:
            clients[index] = DataClient(self.sources[index], timeout=self.timeout)
            with self._clients_lock:
                self._clients.append(clients[index])
        return clients[index]

    def run(self, on_progress: Callable[[Stats], None] | None = None) -> ds.Manifest:
        """Fetch everything; returns the Manifest of what was received (hashes computed locally)."""
        for e in self.manifest.entries:  # directories first (sorted paths put parents first)
            full = os.path.join(self.dest, e.path)
            if e.type == "d":
                os.mkdir(full, 0o700)
        segs: list[Segment] = []
        for e in self.manifest.entries:
            if e.type == "f":
                fd = os.open(
                    os.path.join(self.dest, e.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
                )
                try:
                    if e.size:
                        try:
                            os.posix_fallocate(fd, 0, e.size)
                        except OSError as exc:
                            if exc.errno in (28, 122):
                                raise ds.NoSpace(
                                    "no space left on the device of %s for %s" % (self.dest, e.path)
                                ) from None
                finally:
                    os.close(fd)
                segs.extend(segments_of(e, self.parallel))
        for i, s in enumerate(segs):
            s.source = i % len(self.sources)
        # The first piece of every file, then the second ones, ...: concurrent workers write
        # different files (writers of one file queue on its inode lock), biggest first so
        # that the tail of the copy is not one big segment alone. Small files in batches.
        small = batches(segs)
        batched = {id(s) for b in small for s in b}
        order: list[list[Segment]] = [
            [s] for s in sorted(segs, key=lambda s: (s.part, -(s.end - s.start))) if id(s) not in batched
        ]
        order += small
        left = Counter(s.entry.path for s in segs)
        left_lock = threading.Lock()
        errors: list[BaseException] = []

        def work(group: list[Segment]) -> None:
            if errors or self.cancel.is_set():
                return
            try:
                if len(group) > 1:
                    self._fetch_batch(group)
                else:
                    self._fetch(group[0])
                for seg in group:
                    with left_lock:
                        left[seg.entry.path] -= 1
                        complete = not left[seg.entry.path]
                    if complete and self.fsync:  # once per file, when all its pieces are written
                        self._sync(seg.entry.path)
            except BaseException as exc:
                errors.append(exc)
                self.cancel.set()

        try:
            with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="pull") as pool:
                futures = [pool.submit(work, g) for g in order]
                while wait(futures, timeout=0.5).not_done:
                    if on_progress:
                        on_progress(self.stats)
        finally:
            with self._clients_lock:
                for c in self._clients:
                    c.close()
        if errors:
            raise errors[0]
        if self.cancel.is_set():
            raise Cancelled("the replication of %s was cancelled" % self.id)
        return self._local_manifest(segs)

    def _local_manifest(self, segs: list[Segment]) -> ds.Manifest:
        by_file: dict[str, list[Segment]] = {}
        for s in segs:
            by_file.setdefault(s.entry.path, []).append(s)
        entries = []
        for e in self.manifest.entries:
            full = os.path.join(self.dest, e.path)
            if e.type == "d":
                os.chmod(full, e.mode)
                entries.append(ds.Entry("d", e.path, e.mode))
            elif e.type == "l":
                ds.check_link_target(e.path, e.value)
                os.symlink(e.value, full)
                entries.append(ds.Entry("l", e.path, 0o777, 0, e.value))
            else:
                parts = sorted(by_file[e.path], key=lambda s: s.start)
                outer = hashlib.sha256()
                for s in parts:
                    for d in s.digests:
                        outer.update(d)
                value = outer.hexdigest()
                if value != e.value:
                    raise ds.DigestMismatch("file %s: content hash %s, expected %s" % (e.path, value, e.value))
                size = os.lstat(full).st_size
                os.chmod(full, e.mode)
                entries.append(ds.Entry("f", e.path, e.mode, size, value))
        m = ds.Manifest.of(entries)
        ds.check_symlinks_inside(self.dest, m.entries)
        return m

    def _fetch_batch(self, group: list[Segment]) -> None:
        """Fetch the whole small files of ``group`` with one request to their source; what that
        does not deliver (an error, an older server without batches, a file of another size)
        is fetched file by file (:meth:`_fetch`, with its retries)."""
        client = self._client(group[0].source)
        done = 0
        if group[0].source in self._no_batches:
            for seg in group:
                self._fetch(seg)
            return
        try:
            resp, sizes = client.open_files(self.id, [s.entry.path for s in group])
            try:
                for seg, size in zip(group, sizes, strict=True):
                    if size != seg.entry.size:
                        raise DataServerError(client.url, 0, "%s has %d bytes, not %d" % (seg.entry.path, size,
                                                                                          seg.entry.size))  # fmt: skip
                    self._receive(resp, seg, client)
                    done += 1
            finally:
                if done < len(group):
                    client.close()
        except (DataServerError, OSError, http.client.HTTPException) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
                raise  # a local error (EIO, ...), not the source's
            if _no_endpoint(exc):
                self._no_batches.add(group[0].source)  # an older data server: not again
            else:
                log.warning("dataset %s: a batch of %d files from %s failed (%s); file by file",
                            self.id, len(group) - done, client.url, exc)  # fmt: skip
            for seg in group[done:]:
                seg.pos, seg.digests = seg.start, []
                self._fetch(seg)

    def _receive(self, resp: Any, seg: Segment, client: DataClient) -> None:
        """One whole file of a batch answer, into its (preallocated) file."""
        fd = os.open(os.path.join(self.dest, seg.entry.path), os.O_WRONLY | os.O_NOFOLLOW)
        chunks = _Chunks(seg.digests)
        try:
            self._pump(resp, fd, seg, chunks, memoryview(bytearray(min(_BUF, max(1, seg.entry.size)))), client.url)
            chunks.finish()
        finally:
            os.close(fd)

    def _pump(self, resp: Any, fd: int, seg: Segment, chunks: _Chunks, view: memoryview, url: str) -> None:
        """Bytes of ``resp`` into ``fd`` from ``seg.pos`` to the segment's end, hashed on the way."""
        while seg.pos < seg.end:
            n = resp.readinto(view[: min(len(view), seg.end - seg.pos)])
            if not n:
                raise DataServerError(url, 0, "the connection ended early")
            chunks.update(view[:n])
            self._write(fd, view[:n], seg.pos)
            seg.pos += n
            self.stats.add(n)

    def _write(self, fd: int, data: memoryview, offset: int) -> None:
        try:
            os.pwrite(fd, data, offset)
        except OSError as e:
            if e.errno in (28, 122):
                raise ds.NoSpace("no space left on the device of %s" % self.dest) from None
            raise

    def _fetch(self, seg: Segment) -> None:
        """Fetch one segment, resuming across sources until done or no progress for retry_window."""
        full = os.path.join(self.dest, seg.entry.path)
        chunks = _Chunks(seg.digests)
        delay = 0.1
        fd = os.open(full, os.O_WRONLY | os.O_NOFOLLOW)
        buf = bytearray(_BUF)
        view = memoryview(buf)
        try:
            while seg.pos < seg.end:
                if self.cancel.is_set():
                    raise Cancelled("the replication of %s was cancelled" % self.id)
                src = seg.source
                client = self._client(src)
                try:
                    resp = client.open_file(
                        self.id, seg.entry.path, seg.pos, seg.end - 1 if (seg.pos or seg.end < seg.entry.size) else None
                    )
                    try:
                        self._pump(resp, fd, seg, chunks, view, client.url)
                        if resp.length:  # a Range end: read the (empty) rest so the connection can be reused
                            resp.read()
                    finally:
                        if seg.pos < seg.end:
                            client.close()
                    delay = 0.1
                except (DataServerError, OSError, http.client.HTTPException) as exc:
                    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
                        raise  # a local error (EIO, ...), not the source's
                    with self.stats.lock:
                        self.stats.retries += 1
                        self.stats.resumed += 1 if seg.pos > seg.start else 0
                        stalled = time.monotonic() - self.stats.last_progress
                    if stalled > self.retry_window:
                        raise ds.DatasetError(
                            "no source could deliver %s of dataset %s for %.0f s (last error: %s)"
                            % (seg.entry.path, self.id, stalled, exc)
                        ) from None
                    log.warning(
                        "dataset %s: %s from %s failed at byte %d (%s); resuming",
                        self.id, seg.entry.path, client.url, seg.pos, exc,
                    )  # fmt: skip
                    seg.source = (src + 1) % len(self.sources)
                    if seg.source == 0 or len(self.sources) == 1:
                        time.sleep(delay)
                        delay = min(2.0, delay * 2)
            chunks.finish()
        finally:
            os.close(fd)

    def _sync(self, path: str) -> None:
        fd = os.open(os.path.join(self.dest, path), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

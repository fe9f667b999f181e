"""The HTTP API of a node's data server. Only this process writes ``<data_dir>/datasets/``.

=======  ==========================================  =============================================
method   path                                        what
=======  ==========================================  =============================================
GET      /v1/health                                  ``{"ok": true, "free": bytes, ...}``
GET      /v1/datasets                                the datasets on this node (no entries)
GET      /v1/datasets/<id>                           one: digest, size, files, read_only, in_use_by
GET      /v1/datasets/<id>/manifest                  the same with ``entries`` (see ``_datasets``)
GET      /v1/datasets/<id>/files/<path>              a file; ``Range: bytes=a-b`` answers 206
GET      /v1/datasets/<id>/tar                       the dataset as a plain, deterministic tar
PUT      /v1/datasets/<id>?digest=&read_only=&quota= import a tar (plain/gzip/zstd/bzip2/xz) body
POST     /v1/datasets/<id>/replicate                 pull it from other data servers (JSON body);
                                                     answers progress lines, then the result
DELETE   /v1/datasets/<id>?force=                    remove; 409 naming the services using it
=======  ==========================================  =============================================

Errors are ``{"error": "<message>"}`` with a 4xx/5xx status. Nothing is visible under
``datasets/`` before it is complete and verified; failures remove their staging copy.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import logging
import os
import socket
import socketserver
import subprocess
import threading
import time
import urllib.parse
from typing import Any

from ansible_collections.cerana.platform.plugins.module_utils import _datasets as ds
from ansible_collections.cerana.platform.plugins.module_utils import _instances
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._dataclient import DataClient, DataServerError
from ansible_collections.cerana.platform.plugins.module_utils._files import fsync_dir
from cerana_dataserver.config import Settings
from cerana_dataserver.replicate import Puller

log = logging.getLogger(__name__)

_BUF = 1 << 20
DRAIN_SECONDS = 60.0
MAX_BATCH = 256  # files in one POST .../files answer


class BodyReader:
    """The request body, with Content-Length or chunked transfer encoding."""

    def __init__(self, rfile: Any, length: int | None, chunked: bool) -> None:
        self.rfile = rfile
        self.remaining = length
        self.chunked = chunked
        self.chunk_left = 0
        self.done = not chunked and not length

    def read(self, n: int = -1) -> bytes:
        if self.done:
            return b""
        if n is None or n < 0:
            n = _BUF
        if not self.chunked:
            data = self.rfile.read(min(n, self.remaining))
            if not data:
                raise ds.CorruptArchive("the upload ended after %s bytes too few" % self.remaining)
            self.remaining -= len(data)
            self.done = self.remaining == 0
            return data
        if self.chunk_left == 0:
            line = self.rfile.readline(1024)
            if not line:
                raise ds.CorruptArchive("the upload ended in the middle of a chunk")
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise ds.CorruptArchive("bad chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                self.done = True
                return b""
            self.chunk_left = size
        data = self.rfile.read(min(n, self.chunk_left))
        if not data:
            raise ds.CorruptArchive("the upload ended in the middle of a chunk")
        self.chunk_left -= len(data)
        if self.chunk_left == 0:
            self.rfile.readline(16)
        return data

    def readable(self) -> bool:
        return True

    def drain(self, seconds: float = DRAIN_SECONDS) -> None:
        """Read and drop the rest, so the client can read our answer (bounded in time)."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(OSError, ds.DatasetError):
            while time.monotonic() < deadline and self.read(_BUF):
                pass


class Node:
    """The dataset operations of this node, each under a per-dataset lock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = ds.NodeStore(str(settings.data_dir))
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._manifests: dict[str, tuple[float, dict[str, Any]]] = {}

    def start(self) -> None:
        self.store.ensure()
        removed = self.store.clean_staging()
        if removed:
            log.warning("removed %d unfinished copies left in %s: %s", len(removed), self.store.staging, removed)

    @contextlib.contextmanager
    def locked(self, dataset_id: str):
        with self._guard:
            lock = self._locks.setdefault(dataset_id, threading.Lock())
        if not lock.acquire(blocking=False):
            raise ds.Conflict("another operation on dataset %s is in progress on this node" % dataset_id)
        try:
            yield
        finally:
            lock.release()

    def in_use_by(self, dataset_id: str) -> list[str]:
        instances, _errors = _instances.read_instances(str(self.settings.run_dir))
        return sorted(
            "%s/%s" % (i.bundle, i.service)
            for i in instances
            if dataset_id in i.datasets and _instances.pid_running(i.pid)
        )

    def info(self, dataset_id: str, entries: bool = False) -> dict[str, Any]:
        got = self.store.info(dataset_id)
        man = got["manifest"]
        out = man.to_dict(id=dataset_id, read_only=got["read_only"], in_use_by=self.in_use_by(dataset_id))
        if not entries:
            del out["entries"]
        return out

    def file_entry(self, dataset_id: str, rel: str) -> str:
        """The absolute path of a regular file of the dataset, refusing anything else."""
        root = self.store.path(dataset_id)
        if not os.path.isdir(root):
            raise ds.NotFound("dataset %s is not on this node" % dataset_id)
        rel = ds.check_member_path(rel)
        full = os.path.join(root, rel)
        if not rel or os.path.realpath(full) != os.path.join(os.path.realpath(root), rel):
            raise ds.NotFound("%s is not a file of dataset %s" % (rel, dataset_id))
        return full

    # -- writes ------------------------------------------------------------------

    def import_tar(self, dataset_id: str, body: BodyReader, params: dict[str, str]) -> dict[str, Any]:
        m._label(dataset_id, "id")
        digest = params.get("digest") or None
        read_only = params.get("read_only", "1") not in ("0", "false")
        quota = int(params["quota"]) if params.get("quota") else None
        with self.locked(dataset_id):
            if self.store.exists(dataset_id):
                have = self.info(dataset_id)
                if digest and have["digest"] == digest:
                    body.drain()
                    return dict(have, existing=True)
                raise ds.Conflict("dataset %s is already on this node with digest %s" % (dataset_id, have["digest"]))
            staging = self.store.new_staging(dataset_id)
            start = time.monotonic()
            last = [start]

            def progress(count: int) -> None:
                now = time.monotonic()
                if now - last[0] >= 5:
                    last[0] = now
                    log.info("import %s: %d bytes in %.0f s", dataset_id, count, now - start)

            try:
                man = _translate_os(lambda: ds.extract_tar(body, staging, quota=quota, progress=progress), staging)
                if digest and man.digest != digest:
                    raise ds.DigestMismatch(
                        "the received content has digest %s, expected %s (corrupted in transit?)" % (man.digest, digest)
                    )
                if self.settings.fsync:
                    _sync_tree(staging, man)
                self.store.commit(staging, dataset_id, man, read_only=read_only)
            except BaseException:
                ds.rmtree(staging)
                raise
            secs = time.monotonic() - start
            log.info("imported %s: %d files, %d bytes, %s in %.1f s", dataset_id, man.files, man.size, man.digest, secs)
            return dict(self.info(dataset_id), existing=False, seconds=round(secs, 3))

    def replicate(self, dataset_id: str, req: dict[str, Any], emit: Any, cancel: threading.Event) -> dict[str, Any]:
        m._label(dataset_id, "id")
        source_id = m._label(req.get("source_id") or dataset_id, "source_id")
        digest = req.get("digest")
        read_only = bool(req.get("read_only", True))
        quota = req.get("quota")
        sources = [s for s in req.get("sources") or [] if isinstance(s, str)]
        with self.locked(dataset_id):
            if self.store.exists(dataset_id):
                have = self.info(dataset_id)
                if digest is None or have["digest"] == digest or source_id != dataset_id:
                    return dict(have, existing=True)
                raise ds.Conflict(
                    "dataset %s is already on this node with digest %s, not %s" % (dataset_id, have["digest"], digest)
                )
            start = time.monotonic()
            staging = self.store.new_staging(dataset_id)
            try:
                if source_id != dataset_id and self.store.exists(source_id):
                    man, how = self._derive(source_id, staging, digest, quota), "local copy of %s" % source_id
                    nbytes = man.size
                    stats = None
                else:
                    man, stats = self._pull(dataset_id, source_id, sources, staging, digest, quota, emit, cancel)
                    how = "pulled from %d source(s)" % len(sources)
                    nbytes = stats.bytes
                if digest and man.digest != digest:
                    raise ds.DigestMismatch("the copy has digest %s, expected %s" % (man.digest, digest))
                if not read_only:
                    ds.make_writable(staging, man)
                if self.settings.fsync:
                    _sync_tree(staging, man, data=False)
                self.store.commit(staging, dataset_id, man, read_only=read_only)
            except BaseException:
                ds.rmtree(staging)
                raise
            secs = time.monotonic() - start
            log.info("replica of %s: %s, %d bytes in %.2f s (%s)", dataset_id, man.digest, man.size, secs, how)
            out = dict(self.info(dataset_id), existing=False, seconds=round(secs, 3), bytes=nbytes, how=how)
            if stats is not None:
                out.update(resumed=stats.resumed, retries=stats.retries)
            out["rate"] = round(nbytes / secs) if secs > 0 else 0
            return out

    def _derive(self, source_id: str, staging: str, digest: str | None, quota: int | None) -> ds.Manifest:
        """A copy of the local dataset ``source_id`` (reflinked where the file system can)."""
        parent = self.store.info(source_id)["manifest"]
        if digest and parent.digest != digest:
            raise ds.DigestMismatch("the local %s has digest %s, expected %s" % (source_id, parent.digest, digest))
        if quota is not None and parent.size > quota:
            raise ds.QuotaExceeded("%s holds %d bytes, more than the quota of %d" % (source_id, parent.size, quota))
        if self.store.free_bytes() < parent.size:
            raise ds.NoSpace("no room for %d bytes in %s" % (parent.size, self.store.data_dir))
        proc = subprocess.run(
            ds.reflink_copy_args(self.store.path(source_id), staging), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            err = proc.stderr.strip()
            if "No space" in err:
                raise ds.NoSpace("no space left while copying %s: %s" % (source_id, err))
            raise ds.DatasetError("copying %s failed: %s" % (source_id, err))
        return ds.scan_tree(staging)

    def _pull(self, dataset_id, source_id, sources, staging, digest, quota, emit, cancel):
        if not sources:
            raise ds.NotFound("no source node to copy %s from" % source_id)
        man, usable, reasons = None, [], []
        for url in sources:
            client = DataClient(url, timeout=30)
            try:
                got = client.manifest(source_id)
            except DataServerError as e:
                reasons.append(str(e))
                continue
            finally:
                client.close()
            if digest and got.get("digest") != digest:
                reasons.append("%s has %s with digest %s" % (url, source_id, got.get("digest")))
                continue
            candidate = ds.Manifest.from_dict(got)
            if candidate.digest != got.get("digest"):
                reasons.append("%s sent a manifest that does not match its digest" % url)
                continue
            if man is None:
                man = candidate
            if candidate.digest == man.digest:
                usable.append(url)
        if man is None:
            raise ds.NotFound(
                "no source has dataset %s%s: %s"
                % (source_id, " with digest %s" % digest if digest else "", "; ".join(reasons) or "none answered")
            )
        if quota is not None and man.size > quota:
            raise ds.QuotaExceeded(
                "dataset %s holds %d bytes, more than the quota of %d" % (source_id, man.size, quota)
            )
        free = self.store.free_bytes()
        if free < man.size:
            raise ds.NoSpace("no room for %d bytes in %s (%d free)" % (man.size, self.store.data_dir, free))
        puller = Puller(
            source_id, man, usable, staging,
            parallel=self.settings.parallel, retry_window=self.settings.retry_window,
            timeout=min(self.settings.idle_timeout, 30.0), fsync=self.settings.fsync, cancel=cancel,
        )  # fmt: skip
        total = man.size
        start = time.monotonic()

        def on_progress(stats: Any) -> None:
            secs = time.monotonic() - start
            emit({"bytes": stats.bytes, "total": total, "seconds": round(secs, 3),
                  "rate": round(stats.bytes / secs) if secs > 0 else 0, "resumed": stats.resumed})  # fmt: skip

        local = _translate_os(lambda: puller.run(on_progress), staging)
        return local, puller.stats

    def remove(self, dataset_id: str, force: bool) -> dict[str, Any]:
        with self.locked(dataset_id):
            if not self.store.exists(dataset_id):
                return {"id": dataset_id, "removed": False}
            users = self.in_use_by(dataset_id)
            if users and not force:
                raise ds.InUse("dataset %s is in use by %s on this node" % (dataset_id, ", ".join(users)), users)
            self.store.remove(dataset_id)
            log.info("removed dataset %s%s", dataset_id, " (in use by %s; forced)" % users if users else "")
            return {"id": dataset_id, "removed": True, "was_in_use_by": users}


def _translate_os(fn: Any, where: str) -> Any:
    try:
        return fn()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ds.NoSpace("no space left on the device of %s" % where) from None
        raise


def _sync_tree(root: str, man: ds.Manifest, data: bool = True) -> None:
    if data:
        for e in man.entries:
            if e.type == "f":
                fd = os.open(os.path.join(root, e.path), os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
    fsync_dir(root)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cerana-dataserver"
    node: Node  # set on the subclass made by make_server
    settings: Settings

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- helpers -------------------------------------------------------------------

    def send_json(self, status: int, data: Any, close: bool = False) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(raw)

    def fail(self, exc: BaseException, close: bool = False) -> None:
        if isinstance(exc, ds.DatasetError):
            body: dict[str, Any] = {"error": str(exc)}
            if isinstance(exc, ds.InUse):
                body["in_use_by"] = exc.users
            self.send_json(exc.status, body, close)
        elif isinstance(exc, m.ValidationError):
            self.send_json(400, {"error": str(exc)}, close)
        else:
            log.exception("%s %s failed", self.command, self.path)
            self.send_json(500, {"error": "internal error: %s" % exc}, close)

    def route(self) -> tuple[str | None, str | None, str, dict[str, str]]:
        parsed = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(parsed.query))
        parts = parsed.path.split("/")
        # ['', 'v1', 'datasets', id, rest...]
        if len(parts) < 3 or parts[1] != "v1":
            return None, None, parsed.path, params
        if parts[2] != "datasets" or len(parts) == 3:
            return parts[2], None, "", params
        dataset_id = urllib.parse.unquote(parts[3])
        rest = urllib.parse.unquote("/".join(parts[4:]))
        return "datasets", dataset_id, rest, params

    # -- verbs -----------------------------------------------------------------------

    def do_GET(self) -> None:
        kind, dataset_id, rest, _params = self.route()
        try:
            if kind == "health":
                st = os.statvfs(self.node.store.data_dir)
                free = st.f_bavail * st.f_frsize
                count = len(self.node.store.ids())
                self.send_json(200, {"ok": True, "data_dir": self.node.store.data_dir, "free": free, "datasets": count})
            elif kind == "datasets" and dataset_id is None:
                out = []
                for did in self.node.store.ids():
                    with contextlib.suppress(ds.DatasetError):
                        out.append(self.node.info(did))
                self.send_json(200, {"datasets": out})
            elif kind == "datasets" and rest == "":
                self.send_json(200, self.node.info(dataset_id))
            elif kind == "datasets" and rest == "manifest":
                self.send_json(200, self.node.info(dataset_id, entries=True))
            elif kind == "datasets" and rest.startswith("files/"):
                self.send_file(dataset_id, rest[len("files/") :])
            elif kind == "datasets" and rest == "tar":
                self.send_tar(dataset_id)
            else:
                self.send_json(404, {"error": "no such endpoint: GET %s" % self.path})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:
            self.fail(e)

    def send_file(self, dataset_id: str, rel: str) -> None:
        full = self.node.file_entry(dataset_id, rel)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            raise ds.NotFound("%s is not a file of dataset %s" % (rel, dataset_id)) from None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            start, end = 0, size - 1
            rng = self.headers.get("Range")
            status = 200
            if rng:
                try:
                    unit, _, spec = rng.partition("=")
                    a, _, b = spec.partition("-")
                    if unit.strip() != "bytes" or "," in spec:
                        raise ValueError
                    start = int(a)
                    end = min(int(b), size - 1) if b.strip() else size - 1
                except ValueError:
                    self.send_json(400, {"error": "bad Range %r" % rng})
                    return
                if start >= size or start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", "bytes */%d" % size)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            count = end - start + 1 if size else 0
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(count))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
            self.end_headers()
            self._sendfile(f, start, count)

    def send_files(self, dataset_id: str, paths: Any) -> None:
        """Whole files, one after the other, in one answer: ``X-Cerana-Sizes`` gives each one's
        size (in the order asked). For the many small files of a dataset, where one request
        each costs more than the bytes."""
        if (
            not isinstance(paths, list)
            or not paths
            or len(paths) > MAX_BATCH
            or not all(isinstance(p, str) for p in paths)
        ):
            raise m.ValidationError("paths", "a list of 1 to %d file paths" % MAX_BATCH)
        files = []
        try:
            for rel in paths:
                full = self.node.file_entry(dataset_id, rel)
                try:
                    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    raise ds.NotFound("%s is not a file of dataset %s" % (rel, dataset_id)) from None
                files.append(os.fdopen(fd, "rb"))
            sizes = [os.fstat(f.fileno()).st_size for f in files]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(sum(sizes)))
            self.send_header("X-Cerana-Sizes", ",".join(map(str, sizes)))
            self.end_headers()
            try:
                for f, size in zip(files, sizes, strict=True):
                    if size:
                        self._sendfile(f, 0, size)
            except OSError as e:  # the answer has begun: only closing the connection tells the client
                log.debug("batch of %d files of %s cut short: %s", len(files), dataset_id, e)
                raise BrokenPipeError(str(e)) from None
        finally:
            for f in files:
                f.close()

    def _sendfile(self, f: Any, offset: int, count: int) -> None:
        rate = self.settings.max_rate
        sock = self.connection
        if not rate:
            while count > 0:
                sent = sock.sendfile(f, offset, count)
                if not sent:
                    raise BrokenPipeError("file shrank while sending")
                offset += sent
                count -= sent
            return
        piece = max(4096, rate // 20)
        while count > 0:
            t0 = time.monotonic()
            sent = sock.sendfile(f, offset, min(piece, count))
            if not sent:
                raise BrokenPipeError("file shrank while sending")
            offset += sent
            count -= sent
            pause = sent / rate - (time.monotonic() - t0)
            if pause > 0:
                time.sleep(pause)

    def send_tar(self, dataset_id: str) -> None:
        got = self.node.store.info(dataset_id)
        root = self.node.store.path(dataset_id)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("X-Cerana-Digest", got["manifest"].digest)
        self.send_header("X-Cerana-Size", str(got["manifest"].size))
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        ds.write_tar(root, got["manifest"], self.wfile)

    def do_PUT(self) -> None:
        kind, dataset_id, rest, params = self.route()
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        length = None if chunked else int(self.headers.get("Content-Length") or 0)
        body = BodyReader(self.rfile, length, chunked)
        if kind != "datasets" or not dataset_id or rest:
            body.drain()
            self.send_json(404, {"error": "no such endpoint: PUT %s" % self.path}, close=True)
            return
        try:
            result = self.node.import_tar(dataset_id, body, params)
        except Exception as e:
            log.warning("import of %s refused: %s", dataset_id, e)
            body.drain()
            self.fail(e, close=True)
            return
        self.send_json(200, result, close=True)

    def do_DELETE(self) -> None:
        kind, dataset_id, rest, params = self.route()
        try:
            if kind != "datasets" or not dataset_id or rest:
                self.send_json(404, {"error": "no such endpoint: DELETE %s" % self.path})
                return
            self.send_json(200, self.node.remove(dataset_id, params.get("force") in ("1", "true")))
        except Exception as e:
            self.fail(e)

    def do_POST(self) -> None:
        kind, dataset_id, rest, _params = self.route()
        try:
            length = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(length) or b"{}")
            if kind == "datasets" and dataset_id and rest == "files" and isinstance(req, dict):
                try:
                    self.send_files(dataset_id, req.get("paths"))
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                except Exception as e:
                    self.fail(e)
                return
            if kind != "datasets" or not dataset_id or rest != "replicate" or not isinstance(req, dict):
                self.send_json(404, {"error": "no such endpoint: POST %s" % self.path}, close=True)
                return
        except ValueError as e:
            self.send_json(400, {"error": "bad request body: %s" % e}, close=True)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        cancel = threading.Event()
        last = [0.0]

        def emit(progress: dict[str, Any]) -> None:
            now = time.monotonic()
            if now - last[0] < 1.0:
                return
            last[0] = now
            try:
                self.wfile.write(json.dumps({"progress": progress}).encode() + b"\n")
            except OSError:
                log.warning("replica of %s: the client went away; cancelling", dataset_id)
                cancel.set()

        try:
            result = self.node.replicate(dataset_id, req, emit, cancel)
            line = {"result": result}
        except Exception as e:
            log.warning("replica of %s failed: %s", dataset_id, e)
            if isinstance(e, ds.DatasetError | m.ValidationError):
                line = {"error": str(e), "status": getattr(e, "status", 400)}
            else:
                log.exception("replica of %s", dataset_id)
                line = {"error": "internal error: %s" % e, "status": 500}
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(line).encode() + b"\n")


class DataServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def make_server(settings: Settings) -> DataServer:
    node = Node(settings)
    node.start()
    handler = type("BoundHandler", (Handler,), {"node": node, "settings": settings, "timeout": settings.idle_timeout})
    family = socket.AF_INET6 if ":" in settings.address else socket.AF_INET
    server_cls = type("BoundServer", (DataServer,), {"address_family": family})
    return server_cls((settings.address, settings.port), handler)

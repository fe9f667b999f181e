# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""HTTP client of the node data servers (``cerana-dataserver``), and where to find them.

Standard library only (``http.client``: requests are streamed both ways, which
``open_url`` does not do). Timeouts are *idle* timeouts: a transfer may take hours as
long as bytes keep moving (the original's coordinator cut every request at 60 s).

A node's data server is at the URL in its ``cerana_data_url`` label, else at
``http://<first address of the node>:<port>`` (port 7811 unless told otherwise).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse

DEFAULT_PORT = 7811
URL_LABEL = "cerana_data_url"
_BUF = 1 << 20


class DataServerError(Exception):
    """The data server refused (``status`` is its HTTP status) or could not be reached (0)."""

    def __init__(self, url, status, message, body=None):
        self.url = url
        self.status = status
        self.body = body or {}
        super().__init__(message)


def node_url(node, port=DEFAULT_PORT):
    """The data server URL of a ``Node`` record; None when it has no address."""
    label = (node.labels or {}).get(URL_LABEL)
    if label:
        return label.rstrip("/")
    if not node.addresses:
        return None
    addr = node.addresses[0]
    return "http://%s:%d" % ("[%s]" % addr if ":" in addr else addr, port)


def choose_node(nodes, *, wanted=None, need=0):
    """The live node for a first copy: ``wanted`` (id or hostname) or the one with the most free disk.

    Ties go to the lowest id, so the choice is reproducible. Raises ValueError.
    """
    usable = [n for n in nodes if n.addresses or (n.labels or {}).get(URL_LABEL)]
    if wanted:
        for n in usable:
            if wanted in (n.id, n.hostname):
                return n
        raise ValueError("node %s is not live (no nodes/ record with an address)" % wanted)
    if not usable:
        raise ValueError("no live nodes: no node has a nodes/ record with an address")
    best = sorted(usable, key=lambda n: (-n.disk_free, n.id))[0]
    if need and best.disk_free < need:
        raise ValueError(
            "no node has room for %d bytes: the most free disk is %d bytes on node %s" % (need, best.disk_free, best.id)
        )
    return best


def find_node(nodes, wanted):
    for n in nodes:
        if wanted in (n.id, n.hostname):
            return n
    return None


def candidate_sources(nodes, heartbeats, dataset_id, *, exclude=()):
    """Nodes that may hold ``dataset_id``: those whose heartbeats say so first, then every other live node."""
    beating = {hb.node for hb in heartbeats.get(dataset_id, [])}
    ordered = sorted(nodes, key=lambda n: (n.id not in beating, n.id))
    return [n for n in ordered if n.id not in exclude]


class Progress:
    """Samples of a transfer for the result (bytes, seconds, rate), about every ``every`` seconds."""

    def __init__(self, total=None, every=2.0, log=None):
        self.total = total
        self.every = every
        self.log = log
        self.start = time.monotonic()
        self.last = self.start
        self.bytes = 0
        self.samples = []

    def update(self, count):
        self.bytes = count
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.samples.append(self.sample(now))
            if self.log:
                self.log(self.line(self.samples[-1]))

    def sample(self, now=None):
        seconds = (now or time.monotonic()) - self.start
        rate = self.bytes / seconds if seconds > 0 else 0.0
        return {"bytes": self.bytes, "seconds": round(seconds, 3), "rate": round(rate), "total": self.total}

    @staticmethod
    def line(s):
        total = " of %d" % s["total"] if s.get("total") else ""
        return "%d%s bytes in %.1f s (%.1f MB/s)" % (s["bytes"], total, s["seconds"], s["rate"] / 1e6)

    def result(self):
        final = self.sample()
        return dict(final, progress=self.samples)


class DataClient:
    """One data server. Methods raise DataServerError; ``timeout`` is an idle timeout in seconds."""

    def __init__(self, url, timeout=300.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise DataServerError(url, 0, "bad data server URL %r" % url)
        self.url = url.rstrip("/")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.timeout = timeout
        self._conn = None

    # -- plumbing ---------------------------------------------------------------

    def _connect(self):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _fail(self, exc, what):
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, socket.timeout):
            reason = "no data for %ss" % self.timeout
        return DataServerError(self.url, 0, "data server %s: %s: %s" % (self.url, what, reason))

    @staticmethod
    def path(dataset_id, *rest, **params):
        p = "/v1/datasets/%s" % urllib.parse.quote(dataset_id, safe="")
        for r in rest:
            p += "/" + urllib.parse.quote(r, safe="/")
        q = {k: ("1" if v is True else "0" if v is False else str(v)) for k, v in params.items() if v is not None}
        return p + ("?" + urllib.parse.urlencode(q) if q else "")

    def open(self, method, path, *, headers=None, body=None):
        """Send a request on a kept-alive connection; returns the (unread) response."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                return self._conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                # A kept-alive connection the server closed meanwhile: one fresh try.
                self.close()
                if attempt or body is not None:
                    raise self._fail(e, "%s %s" % (method, path)) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise self._fail(e, "%s %s" % (method, path)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, resp, what):
        try:
            raw = resp.read()
            body = json.loads(raw or b"{}")
        except (OSError, ValueError, http.client.HTTPException):
            body = {}
        self.close()
        msg = body.get("error") or "HTTP %s" % resp.status
        return DataServerError(self.url, resp.status, "%s on %s: %s" % (what, self.url, msg), body)

    def json(self, method, path, *, what, allow_404=False):
        resp = self.open(method, path)
        if resp.status == 404 and allow_404:
            resp.read()
            return None
        if resp.status >= 400:
            raise self._error(resp, what)
        try:
            return json.loads(resp.read() or b"{}")
        except (OSError, ValueError, http.client.HTTPException) as e:
            self.close()
            raise self._fail(e, what) from None

    # -- the API ----------------------------------------------------------------

    def health(self):
        return self.json("GET", "/v1/health", what="health check")

    def info(self, dataset_id):
        """{id, digest, size, files, read_only, in_use_by} or None when the node does not have it."""
        return self.json("GET", self.path(dataset_id), what="reading dataset %s" % dataset_id, allow_404=True)

    def manifest(self, dataset_id):
        return self.json("GET", self.path(dataset_id, "manifest"), what="reading the manifest of %s" % dataset_id)

    def delete(self, dataset_id, *, force=False):
        return self.json("DELETE", self.path(dataset_id, force=force), what="removing dataset %s" % dataset_id)

    def open_files(self, dataset_id, paths):
        """(the response, [size, ...]) for whole files of the dataset sent one after the other in
        one answer (small files: one request instead of one each). Raises DataServerError with
        status 404 when the server has no such endpoint (an older data server)."""
        body = json.dumps({"paths": list(paths)}).encode()
        resp = self.open("POST", self.path(dataset_id, "files"), body=body,
                         headers={"Content-Type": "application/json"})  # fmt: skip
        if resp.status >= 400:
            raise self._error(resp, "reading %d files of dataset %s" % (len(paths), dataset_id))
        try:
            sizes = [int(v) for v in (resp.getheader("X-Cerana-Sizes") or "").split(",") if v != ""]
        except ValueError:
            sizes = []
        if len(sizes) != len(paths) or sum(sizes) != (resp.length or 0):
            self.close()
            raise DataServerError(self.url, resp.status, "%s sent a batch of files with bad sizes" % self.url)
        return resp, sizes

    def open_tar(self, dataset_id):
        """The streaming response of the dataset's tar export (read it, then close())."""
        resp = self.open("GET", self.path(dataset_id, "tar"))
        if resp.status >= 400:
            raise self._error(resp, "exporting dataset %s" % dataset_id)
        return resp

    def open_file(self, dataset_id, path, start=0, end=None):
        """The response for bytes ``start``..``end`` (inclusive) of a file of the dataset."""
        headers = {}
        if start or end is not None:
            headers["Range"] = "bytes=%d-%s" % (start, "" if end is None else end)
        resp = self.open("GET", self.path(dataset_id, "files", path), headers=headers)
        if resp.status >= 400:
            raise self._error(resp, "reading %s of dataset %s" % (path, dataset_id))
        if headers and resp.status != 206:
            resp.read()
            raise DataServerError(self.url, resp.status, "%s ignored a Range request" % self.url)
        return resp

    def put_tar(self, dataset_id, chunks, *, length=None, progress=None, **params):
        """Stream a tar (any compression) to the node as dataset ``dataset_id``; returns the server's answer.

        ``chunks`` yields bytes; without ``length`` the body is sent chunked.
        """
        conn = self._connect()
        what = "importing dataset %s" % dataset_id
        sent = 0
        try:
            conn.putrequest("PUT", self.path(dataset_id, **params))
            conn.putheader("Content-Type", "application/x-tar")
            if length is None:
                conn.putheader("Transfer-Encoding", "chunked")
            else:
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            try:
                for data in chunks:
                    if not data:
                        continue
                    if length is None:
                        conn.send(b"%x\r\n" % len(data) + data + b"\r\n")
                    else:
                        conn.send(data)
                    sent += len(data)
                    if progress:
                        progress(sent)
                if length is None:
                    conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server stopped reading: its answer says why
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self._fail(e, "%s (after %d bytes)" % (what, sent)) from None
        conn.close()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        if resp.status >= 400:
            raise DataServerError(
                self.url,
                resp.status,
                "%s on %s: %s" % (what, self.url, body.get("error") or "HTTP %s" % resp.status),
                body,
            )
        return body

    def replicate(self, dataset_id, request, *, on_progress=None):
        """Ask the node to pull ``dataset_id`` from other data servers; follows its progress lines."""
        what = "replicating dataset %s" % dataset_id
        conn = self._connect()
        try:
            conn.request(
                "POST",
                self.path(dataset_id, "replicate"),
                body=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            if resp.status >= 400:
                raw = resp.read()
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {}
                raise DataServerError(
                    self.url,
                    resp.status,
                    "%s on %s: %s" % (what, self.url, body.get("error") or "HTTP %s" % resp.status),
                    body,
                )
            final = None
            while True:
                line = resp.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "progress" in msg:
                    if on_progress:
                        on_progress(msg["progress"])
                else:
                    final = msg
            if final is None:
                raise DataServerError(self.url, 0, "%s on %s: the server stopped answering mid-way" % (what, self.url))
            if "error" in final:
                raise DataServerError(
                    self.url, final.get("status", 500), "%s on %s: %s" % (what, self.url, final["error"]), final
                )
            return final["result"]
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise self._fail(e, what) from None
        finally:
            conn.close()

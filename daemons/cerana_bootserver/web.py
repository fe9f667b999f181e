"""The boot HTTP server: iPXE scripts, platform kernels and initrds, iPXE binaries.

Routes (GET and HEAD; anything else is 405):

    /boot/<mac>.ipxe            the script for that MAC (52-54-00-.., colons and bare hex also accepted)
    /boot.ipxe                  chains to /boot/${netX/mac:hexhyp}.ipxe (for a fixed DHCP URL)
    /images/<name>/kernel|initrd   files of a platform image (Range: one range -> 206)
    /kernel, /initrd            the default image's files (the original's URLs)
    /undionly.kpxe, /ipxe.efi   the iPXE binaries of the TFTP root (UEFI HTTP boot)

The pure parts (:func:`parse_range`, :func:`route`) do no I/O. The server is stdlib
``ThreadingHTTPServer`` with ``server_bind`` replaced: the stock one calls
``socket.getfqdn()``, a DNS lookup that stalls for seconds in a namespace without a
resolver (environment.md 2.3).
"""

from __future__ import annotations

import dataclasses
import http.server
import logging
import re
import socketserver
import threading
import urllib.parse
from pathlib import Path

from cerana_bootserver import images as img
from cerana_bootserver import ipxe

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_MAC_PATH = re.compile(r"^/boot/([0-9A-Fa-f]{2}(?:[:-]?[0-9A-Fa-f]{2}){5})\.ipxe$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


# -- pure: ranges --------------------------------------------------------------------


class Unsatisfiable(Exception):
    """416: the range lies outside the representation."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``(first, last)`` to send, or None for the whole file (200).

    RFC 9110 14.2: a syntactically invalid Range is ignored, and so is a multi-range
    request (a server MAY ignore Range; this one sends the whole file rather than
    multipart/byteranges). A single range that starts at or past the end raises
    :class:`Unsatisfiable` (416); a suffix range ``-N`` means the last N bytes.
    """
    if header is None:
        return None
    m = _RANGE.match(header.strip().replace(" ", ""))
    if not m:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable(header)
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignore
    if start >= size:
        raise Unsatisfiable(header)
    return start, min(end, size - 1)


# -- pure: routing -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Route:
    kind: str  # script | chain | image | binary | notfound
    mac: str | None = None
    image: str | None = None
    file: str | None = None


def normalize_mac(text: str) -> str:
    hexdigits = re.sub(r"[:-]", "", text).lower()
    return ":".join(hexdigits[i : i + 2] for i in range(0, 12, 2))


def route(raw_path: str, default_image: str, binaries=img.IPXE_FILES) -> Route:
    """Map a request target to a :class:`Route`. Percent-decoding happens once, before any check."""
    path = urllib.parse.urlsplit(raw_path).path
    path = urllib.parse.unquote(path, errors="strict") if "%" in path else path
    if "\0" in path or "\\" in path or any(seg in (".", "..") for seg in path.split("/")):
        return Route("notfound")
    m = _MAC_PATH.match(path)
    if m:
        return Route("script", mac=normalize_mac(m.group(1)))
    if path == "/boot.ipxe":
        return Route("chain")
    if path in ("/kernel", "/initrd"):
        return Route("image", image=default_image, file=path[1:])
    parts = path.split("/")
    is_image = len(parts) == 4 and parts[:2] == ["", "images"] and parts[3] in img.IMAGE_FILES
    if is_image and img.valid_image_name(parts[2]):
        return Route("image", image=parts[2], file=parts[3])
    if len(parts) == 2 and parts[1] in binaries:
        return Route("binary", file=parts[1])
    return Route("notfound")


# -- the server ----------------------------------------------------------------------


@dataclasses.dataclass
class WebContext:
    """Everything a request needs; shared by the handler threads (all members are thread-safe)."""

    images: img.Images
    tftp_root: str
    policy: ipxe.ScriptPolicy
    view_for: object
    """``view_for(mac) -> ipxe.ClusterView`` (Consul-backed in production, a lambda in tests)."""


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "cerana-bootserver"
    protocol_version = "HTTP/1.1"
    ctx: WebContext  # set on the subclass the server creates

    def log_message(self, format, *args):
        log.info("%s %s", self.client_address[0], format % args)

    def do_GET(self):
        self._serve(head=False)

    def do_HEAD(self):
        self._serve(head=True)

    def _method_not_allowed(self):
        self._send_bytes(405, b"method not allowed\n", "text/plain", head=False, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

    def _serve(self, head):
        ctx = self.ctx
        try:
            r = route(self.path, ctx.policy.default_image)
        except UnicodeDecodeError:
            r = Route("notfound")
        if r.kind == "script":
            self._script(r.mac, head)
        elif r.kind == "chain":
            self._send_bytes(200, ipxe.chain_script().encode(), "text/plain; charset=utf-8", head)
        elif r.kind == "image":
            try:
                path = ctx.images.file(r.image, r.file)
            except img.NotServable as e:
                log.info("refused %s: %s", self.path, e)
                self._send_bytes(404, b"not found\n", "text/plain", head)
                return
            self._send_file(path, head)
        elif r.kind == "binary":
            try:
                path = img.resolve_inside(_resolved(ctx.tftp_root), r.file)
            except img.NotServable as e:
                log.info("refused %s: %s", self.path, e)
                self._send_bytes(404, b"not found\n", "text/plain", head)
                return
            self._send_file(path, head)
        else:
            self._send_bytes(404, b"not found\n", "text/plain", head)

    def _script(self, mac, head):
        ctx = self.ctx
        try:
            view = ctx.view_for(mac)
        except Exception as e:  # Consul down: boot unknown-style rather than not at all
            log.warning("cluster state unavailable for %s (%s): serving the default plan", mac, e)
            view = ipxe.ClusterView()
        available = {}
        for name in {ctx.policy.default_image, *_wanted(view)}:
            found = ctx.images.get(name)
            if found is not None:
                available[name] = ipxe.ImageRef(name, found.initrd_sha256)
        p = ipxe.plan(mac, view, available, ctx.policy)
        log.info("script for %s: %s (%s)", mac, p.action, p.reason)
        self._send_bytes(200, ipxe.render(p).encode(), "text/plain; charset=utf-8", head,
                         extra={"Cache-Control": "no-store"})  # fmt: skip

    def _send_bytes(self, code, body, ctype, head, extra=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_file(self, path, head):
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            log.warning("cannot open %s: %s", path, e)
            self._send_bytes(404, b"not found\n", "text/plain", head)
            return
        with f:
            size = f.seek(0, 2)
            try:
                rng = parse_range(self.headers.get("Range"), size)
            except Unsatisfiable:
                self._send_bytes(416, b"range not satisfiable\n", "text/plain", head,
                                 extra={"Content-Range": "bytes */%d" % size})  # fmt: skip
                return
            first, last = rng if rng is not None else (0, size - 1)
            length = last - first + 1 if size else 0
            self.send_response(206 if rng is not None else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            if rng is not None:
                self.send_header("Content-Range", "bytes %d-%d/%d" % (first, last, size))
            self.end_headers()
            if head:
                return
            f.seek(first)
            left = length
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


def _wanted(view):
    return {n.labels.get(ipxe.BOOT_IMAGE_LABEL) for n in view.nodes if n.labels.get(ipxe.BOOT_IMAGE_LABEL)} - {
        ipxe.LOCAL
    }


def _resolved(root):
    return Path(root).resolve()


class BootHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer without the reverse DNS lookup in ``server_bind``."""

    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host  # the stock server_bind puts socket.getfqdn(host) here
        self.server_port = port


def make_server(ctx: WebContext, address: str = "0.0.0.0", port: int = 80) -> BootHTTPServer:
    handler = type("BootHandler", (_Handler,), {"ctx": ctx})
    return BootHTTPServer((address, port), handler)


class WebThread:
    """The HTTP server on a daemon thread: ``start()``, ``port``, ``stop()``."""

    def __init__(self, ctx: WebContext, address: str = "0.0.0.0", port: int = 80):
        self.server = make_server(ctx, address, port)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="bootserver-http", daemon=True)  # fmt: skip

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> WebThread:
        self.thread.start()
        log.info("HTTP boot server listening on %s:%d", *self.server.server_address[:2])
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

"""Read-only TFTP (RFC 1350; options RFC 2347 blksize RFC 2348 and tsize RFC 2349) on tftpy.

What tftpy 0.8.7 does and what this wrapper adds (read from its ``TftpStates.py`` and
``TftpServer.py``):

* **Path escapes.** tftpy joins the name to its root and checks ``os.path.abspath`` with
  a string prefix test: lexical only, so a symlink inside the root that points out of it
  is followed, and a name that *starts with* the root path is taken as absolute. Here
  tftpy's own root is an empty private directory, so every request falls through to
  ``dyn_file_func``, and that does the real check (:func:`images.resolve_inside`:
  ``Path.resolve`` + ``is_relative_to`` on the served root; absolute names, ``..`` and
  escaping symlinks are refused with "File not found").
* **Uploads.** Without ``upload_open`` tftpy *writes* WRQ files (and creates
  directories). ``upload_open`` here always refuses (error 2, access violation).
* **Garbage.** tftpy's receive loop only catches its own ``TftpException``; a request
  with a non-ASCII name (``UnicodeDecodeError``) or ``blksize=abc`` (``ValueError``)
  escapes ``listen()`` and would end the server. :class:`TftpService` runs ``listen()``
  under a supervisor that logs and re-binds the same port (transfers in flight at that
  moment are dropped; clients retry).
* **Options.** tftpy negotiates blksize (clamped to 8-65536; RFC 2348 allows at most
  65464, and a client asking more than fits a datagram makes the send fail, which the
  supervisor survives) and tsize (it seeks the file object for the size).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import tftpy

from cerana_bootserver import images as img

log = logging.getLogger(__name__)


class TftpService:
    """tftpy serving ``root`` read-only on a supervised daemon thread."""

    def __init__(self, root, address: str = "0.0.0.0", port: int = 69, *, timeout: float = 2.0, retries: int = 5):
        self.root = Path(root).resolve()
        self.address = address
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self._empty = tempfile.mkdtemp(prefix="cerana-tftp-")
        self._stop = threading.Event()
        self._bound = threading.Event()
        self.restarts = 0
        self.server = self._new_server()
        self.thread = threading.Thread(target=self._run, name="bootserver-tftp", daemon=True)

    def _new_server(self):
        return tftpy.TftpServer(self._empty, dyn_file_func=self.open_file, upload_open=self._refuse_upload)

    # -- the two hooks tftpy calls ---------------------------------------------------

    def open_file(self, name, raddress=None, rport=None):
        """tftpy's ``dyn_file_func``: an open file for a servable name, else None (-> error 1)."""
        try:
            path = img.resolve_inside(self.root, name)
            f = open(path, "rb")  # noqa: SIM115 - tftpy closes it at the end of the session
        except (img.NotServable, OSError) as e:
            log.info("TFTP %s:%s: refused %r: %s", raddress, rport, name, e)
            return None
        log.info("TFTP %s:%s: sending %s", raddress, rport, name)
        return f

    def _refuse_upload(self, path, context):
        log.info("TFTP %s:%s: refused a write request (read-only server)", context.host, context.port)
        return None

    # -- life cycle ------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> TftpService:
        self.thread.start()
        if not self._bound.wait(timeout):
            raise OSError("TFTP server did not bind %s:%d within %ss" % (self.address, self.port, timeout))
        if self._error is not None:
            raise self._error
        log.info("TFTP server listening on %s:%d, serving %s", self.address, self.port, self.root)
        return self

    _error: OSError | None = None

    def _run(self):
        while not self._stop.is_set():
            try:
                self._listen()
                return  # listen() returns only after stop()
            except OSError as e:
                if not self._bound.is_set():  # could not bind: report to start()
                    self._error = e
                    self._bound.set()
                    return
                log.exception("TFTP server socket failed; restarting it")
            except Exception as e:  # tftpy's parser on garbage: UnicodeDecodeError, ValueError, struct.error
                log.warning("TFTP server loop failed on a malformed packet (%s: %s); restarting it",
                            type(e).__name__, e)  # fmt: skip
            self.restarts += 1
            self._discard()
            time.sleep(0.05)

    def _listen(self):
        server = self.server
        watcher = threading.Thread(target=self._announce, args=(server,), daemon=True)
        watcher.start()
        server.listen(self.address, self.port, timeout=self.timeout, retries=self.retries)

    def _announce(self, server):
        if server.is_running.wait(5):
            if self.port == 0:
                self.port = server.listenport  # keep the same port across restarts
            self._bound.set()

    def _discard(self):
        server = self.server
        for session in list(getattr(server, "sessions", {}).values()):
            try:
                session.end()
            except Exception:
                pass
        try:
            server.sock.close()
        except Exception:
            pass
        self.server = self._new_server()

    def stop(self) -> None:
        self._stop.set()
        self.server.stop(now=True)
        self.thread.join(self.timeout + 3)
        shutil.rmtree(self._empty, ignore_errors=True)

"""Health checkers: one function per kind of ``HEALTH_CHECK_ARGS`` in the collection's ``_models``.

Each returns None when the check passes and a short error text when it fails, and never
raises: :func:`run_check` turns any unexpected exception into an error text too. Every
checker honours ``timeout`` (seconds). ``args`` are a check's validated arguments, with
defaults filled in (``HealthCheck.from_dict``).

Where a check runs depends on the bundle's network on the node (``core.placed_args``
and ``netns``): for a bundle with a network, ``http``/``tcp`` checks whose ``host`` is the
default (127.0.0.1) connect to the instance's address and ``command`` checks run inside
the bundle's network namespace (``nsenter --net=<netns>``); without one they connect to
``host`` and run on the node. ``file`` checks look at a path on the node. ``https`` checks
do not verify the certificate (an instance rarely has one for its address).
"""

from __future__ import annotations

import datetime
import http.client
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

MAX_READ = 64 * 1024
NSENTER = "nsenter"


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # report the redirect status itself


def check_http(args: Mapping[str, Any], timeout: float) -> str | None:
    """GET ``scheme://host:port/path``: the status must be ``expect_status`` and the body match ``body_regex``."""
    host = args.get("host", "127.0.0.1")
    url_host = f"[{host}]" if ":" in host else host
    url = f"{args.get('scheme', 'http')}://{url_host}:{args['port']}{args.get('path', '/')}"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context), _NoRedirect()
    )
    expect = int(args.get("expect_status", 200))
    try:
        try:
            with opener.open(url, timeout=timeout) as resp:
                status, body = resp.status, resp.read(MAX_READ)
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read(MAX_READ) if e.fp else b""
    except urllib.error.URLError as e:
        return f"GET {url}: {_reason(e.reason)}"
    except TimeoutError:
        return f"GET {url}: no answer within {timeout:g} s"
    except (OSError, http.client.HTTPException) as e:
        return f"GET {url}: {_reason(e)}"
    if status != expect:
        return f"GET {url}: status {status}, expected {expect}"
    pattern = args.get("body_regex")
    if pattern and not re.search(pattern, body.decode("utf-8", "replace")):
        return f"GET {url}: the body does not match {pattern!r}"
    return None


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return _short(str(reason))


def check_tcp(args: Mapping[str, Any], timeout: float) -> str | None:
    """Connect to ``host:port``; optionally send ``send`` and expect the answer to match ``expect_regex``."""
    host, port = args.get("host", "127.0.0.1"), int(args["port"])
    where = f"tcp {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if args.get("send"):
                sock.sendall(str(args["send"]).encode("utf-8"))
            pattern = args.get("expect_regex")
            if not pattern:
                return None
            received = b""
            while len(received) < MAX_READ:
                if re.search(pattern, received.decode("utf-8", "replace")):
                    return None
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
            if re.search(pattern, received.decode("utf-8", "replace")):
                return None
            return f"{where}: the answer {_short(received.decode('utf-8', 'replace'), 60)!r} does not match {pattern!r}"
    except TimeoutError:
        return f"{where}: no answer within {timeout:g} s"
    except OSError as e:
        return f"{where}: {_reason(e)}"


def check_command(args: Mapping[str, Any], timeout: float, netns: str | None = None) -> str | None:
    """Run ``cmd`` (a list, no shell); it must exit 0 within ``timeout``. The last output line is reported.

    With ``netns`` (a namespace file such as ``/run/netns/cerana-shop``) it runs inside that
    network namespace, through ``nsenter --net=<netns> --``.
    """
    cmd = [str(c) for c in args["cmd"]]
    argv = [NSENTER, f"--net={netns}", "--", *cmd] if netns else cmd
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a timeout kills the whole process group
        )
    except OSError as e:
        return f"command {argv[0]!r}: {_reason(e)}"
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return f"command {cmd[0]!r}: still running after {timeout:g} s"
    if proc.returncode != 0:
        lines = out.decode("utf-8", "replace").strip().splitlines()
        tail = f": {_short(lines[-1])}" if lines else ""
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return f"command {cmd[0]!r}: {how}{tail}"
    return None


def check_file(args: Mapping[str, Any], timeout: float | None = None) -> str | None:
    """``path`` must exist (or not, with ``exists: false``), with ``mode`` and a size in ``min_size``..``max_size``."""
    path = args["path"]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None if args.get("exists", True) is False else f"{path}: does not exist"
    except OSError as e:
        return f"{path}: {_reason(e)}"
    if args.get("exists", True) is False:
        return f"{path}: exists, but should not"
    mode = args.get("mode")
    if mode is not None and stat.S_IMODE(st.st_mode) != int(mode, 8):
        return f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, expected {int(mode, 8):04o}"
    if args.get("min_size") is not None and st.st_size < args["min_size"]:
        return f"{path}: {st.st_size} bytes, expected at least {args['min_size']}"
    if args.get("max_size") is not None and st.st_size > args["max_size"]:
        return f"{path}: {st.st_size} bytes, expected at most {args['max_size']}"
    return None


def check_uptime(args: Mapping[str, Any], started: str, now: datetime.datetime) -> str | None:
    """The instance must have been up (since ``started``, RFC 3339) for ``min_uptime`` seconds."""
    when = datetime.datetime.fromisoformat(started.replace("Z", "+00:00"))
    up = (now - when).total_seconds()
    if up < args["min_uptime"]:
        return f"up for {max(up, 0):.0f} s, less than {args['min_uptime']} s"
    return None


CHECKERS: dict[str, Callable[..., str | None]] = {
    "http": check_http,
    "tcp": check_tcp,
    "command": check_command,
    "file": check_file,
}


def run_check(
    kind: str,
    args: Mapping[str, Any],
    timeout: float,
    *,
    started: str,
    now: datetime.datetime,
    netns: str | None = None,
) -> str | None:
    """Run one check; None when it passes, else the error text (never raises).

    ``netns``: the bundle's network namespace file; ``command`` checks run inside it.
    """
    try:
        if kind == "uptime":
            return check_uptime(args, started, now)
        if kind == "command":
            return check_command(args, timeout, netns)
        checker = CHECKERS.get(kind)
        if checker is None:
            return f"unknown health check kind {kind!r}"
        return checker(args, timeout)
    except Exception as e:
        return f"{kind} check failed: {type(e).__name__}: {_short(str(e))}"


# Kinds whose failure right after an instance starts usually means "not listening yet".
RETRIED_KINDS = frozenset(("http", "https", "tcp", "command"))


def run_first_check(
    kind: str,
    args: Mapping[str, Any],
    timeout: float,
    *,
    within: float,
    pause: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    report: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    **kw: Any,
) -> str | None:
    """The first check of a new instance (or of a changed check): :func:`run_check`, tried
    again every ``pause`` s while it fails and ``within`` s have not passed, so an instance
    that starts listening a moment after its record appears is reported healthy at once
    rather than one check interval later. Each failure that is retried goes to ``report``.
    Only for :data:`RETRIED_KINDS`; the last failure is returned, also as soon as ``stop`` is set."""
    deadline = clock() + within
    while True:
        result = run_check(kind, args, timeout, **kw)
        if result is None or kind not in RETRIED_KINDS or clock() + pause >= deadline:
            return result
        if report is not None:
            report(result)
        if stop is not None and stop.is_set():
            return result
        sleep(pause)

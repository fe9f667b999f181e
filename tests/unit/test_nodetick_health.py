"""Health checkers against real local things: an HTTP server and sockets on 127.0.0.1, files, commands."""

from __future__ import annotations

import datetime
import http.server
import os
import socket
import sys
import threading
import time

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from cerana_nodetick import health


def args(kind, **given):
    """Validated args with their defaults, as the daemon gets them."""
    return m.HealthCheck.from_dict({"id": "c", "kind": kind, "args": given}).args


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(2)
        status = {"/missing": 404, "/moved": 302}.get(self.path, 200)
        body = b"status: ok\n"
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the checker gave up (timeout test)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def http_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http(http_port):
    assert health.check_http(args("http", port=http_port), 2) is None
    assert health.check_http(args("http", port=http_port, body_regex="status: ok"), 2) is None
    assert "does not match" in health.check_http(args("http", port=http_port, body_regex="^nope"), 2)
    assert "status 404, expected 200" in health.check_http(args("http", port=http_port, path="/missing"), 2)
    assert health.check_http(args("http", port=http_port, path="/missing", expect_status=404), 2) is None
    assert health.check_http(args("http", port=http_port, path="/moved", expect_status=302), 2) is None
    assert "connection refused" in health.check_http(args("http", port=closed_port()), 2)


def test_http_timeout(http_port):
    t0 = time.monotonic()
    error = health.check_http(args("http", port=http_port, path="/slow"), 0.3)
    assert error is not None and ("timed out" in error or "no answer" in error)
    assert time.monotonic() - t0 < 1.5


@pytest.fixture
def tcp_server():
    """A server that greets each client and echoes what it gets."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"+OK ready\r\n")
                conn.settimeout(1)
                try:
                    data = conn.recv(100)
                    conn.sendall(b"echo " + data)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def test_tcp(tcp_server):
    assert health.check_tcp(args("tcp", port=tcp_server), 2) is None
    assert health.check_tcp(args("tcp", port=tcp_server, expect_regex=r"^\+OK"), 2) is None
    assert health.check_tcp(args("tcp", port=tcp_server, send="PING\n", expect_regex="echo PING"), 2) is None
    assert "connection refused" in health.check_tcp(args("tcp", port=closed_port()), 2)


def test_tcp_timeout_when_the_answer_never_matches(tcp_server):
    t0 = time.monotonic()
    error = health.check_tcp(args("tcp", port=tcp_server, expect_regex="never"), 0.5)
    assert error is not None and ("does not match" in error or "no answer" in error)
    assert time.monotonic() - t0 < 2.5


def test_command(tmp_path):
    assert health.check_command(args("command", cmd=["true"]), 2) is None
    error = health.check_command(
        args("command", cmd=[sys.executable, "-c", "print('db down'); raise SystemExit(3)"]), 5
    )
    assert error == f"command {sys.executable!r}: exit status 3: db down"
    assert "no such file" in health.check_command(args("command", cmd=[str(tmp_path / "nope")]), 2)


def test_command_timeout_kills_it():
    t0 = time.monotonic()
    error = health.check_command(args("command", cmd=["sleep", "30"]), 0.3)
    assert error == "command 'sleep': still running after 0.3 s"
    assert time.monotonic() - t0 < 2


def test_file(tmp_path):
    path = tmp_path / "ready"
    assert "does not exist" in health.check_file(args("file", path=str(path)))
    assert health.check_file(args("file", path=str(path), exists=False)) is None
    path.write_bytes(b"x" * 10)
    os.chmod(path, 0o640)
    assert health.check_file(args("file", path=str(path))) is None
    assert "exists, but should not" in health.check_file(args("file", path=str(path), exists=False))
    assert health.check_file(args("file", path=str(path), mode="0640", min_size=10, max_size=10)) is None
    assert "mode 0640, expected 0644" in health.check_file(args("file", path=str(path), mode="0644"))
    assert "at least 11" in health.check_file(args("file", path=str(path), min_size=11))
    assert "at most 9" in health.check_file(args("file", path=str(path), max_size=9))


def test_uptime():
    now = datetime.datetime(2026, 11, 30, 3, 5, 0, tzinfo=datetime.UTC)
    assert health.check_uptime(args("uptime", min_uptime="1m"), "2026-11-30T03:04:00.000000Z", now) is None
    assert health.check_uptime(args("uptime", min_uptime="1m"), "2026-11-30T03:04:30.000000Z", now) == (
        "up for 30 s, less than 60 s"
    )


def test_run_check_never_raises():
    now = datetime.datetime.now(datetime.UTC)
    assert health.run_check("uptime", {"min_uptime": 1}, 1, started="garbage", now=now).startswith(
        "uptime check failed"
    )
    assert health.run_check("smoke", {}, 1, started="", now=now) == "unknown health check kind 'smoke'"
    assert health.run_check("command", {"cmd": ["true"]}, 1, started="", now=now) is None


NOW = datetime.datetime(2026, 11, 30, 3, 5, 0, tzinfo=datetime.UTC)


def test_command_in_a_network_namespace_goes_through_nsenter(tmp_path, monkeypatch):
    """With a namespace, the command runs as ``nsenter --net=<netns> -- cmd...`` (a stand-in nsenter here)."""
    seen = tmp_path / "argv"
    fake = tmp_path / "nsenter"
    fake.write_text(f'#!/bin/sh\necho "$@" > {seen}\nshift 2\nexec "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(health, "NSENTER", str(fake))
    check = args("command", cmd=["sh", "-c", "echo not ready; exit 2"])
    error = health.run_check("command", check, 2, started="2026-11-30T03:04:05Z", now=NOW, netns="/run/netns/x")
    assert seen.read_text() == "--net=/run/netns/x -- sh -c echo not ready; exit 2\n"
    assert error == "command 'sh': exit status 2: not ready"
    # without a namespace nsenter is not used
    seen.unlink()
    assert health.run_check("command", args("command", cmd=["true"]), 2, started="", now=NOW) is None
    assert not seen.exists()


def test_the_first_check_of_an_instance_is_retried_until_it_listens():
    import socket
    import threading
    import time

    from cerana_nodetick import health

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_later():
        time.sleep(0.3)
        server.bind(("127.0.0.1", port))
        server.listen()

    listener = threading.Thread(target=listen_later)
    kw = {"started": "2026-11-30T03:04:05Z", "now": datetime.datetime.now(datetime.UTC)}
    try:
        t0 = time.monotonic()
        listener.start()
        assert health.run_check("tcp", {"port": port}, 1.0, **kw) is not None  # not yet
        assert health.run_first_check("tcp", {"port": port}, 1.0, within=3.0, **kw) is None
        assert 0.25 < time.monotonic() - t0 < 3.0
    finally:
        listener.join()
        server.close()
    # nothing comes: the last failure, after about ``within``
    t0 = time.monotonic()
    result = health.run_first_check("tcp", {"port": port}, 1.0, within=0.4, **kw)
    assert result is not None and "refused" in result and 0.25 < time.monotonic() - t0 < 2.0
    # kinds that a moment does not change are not retried
    calls = []
    result = health.run_first_check("file", {"path": "/nonexistent-cerana"}, 1.0, within=5.0,
                                    sleep=lambda s: calls.append(s), **kw)  # fmt: skip
    assert result and calls == []

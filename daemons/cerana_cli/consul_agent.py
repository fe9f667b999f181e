"""Run a local single-node Consul agent in ``-dev`` mode (tests and ``cerana consul up``).

The agent listens on 127.0.0.1 only, on free ports, with DNS, gRPC and Serf WAN turned
off, and with ``session_ttl_min = "1s"`` so that tests can use short session TTLs.
Optionally ACLs are enabled in default-deny mode with a given master token.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ConsulError(RuntimeError):
    """An expected failure: no binary, the agent does not start, ..."""


def find_consul(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate the consul binary, in the same order as scripts/ensure-consul.sh."""
    candidates: list[tuple[str, str | None]] = [
        ("explicit path", os.fspath(explicit) if explicit else None),
        ("CERANA_CONSUL_BIN", os.environ.get("CERANA_CONSUL_BIN")),
        ("PATH", shutil.which("consul")),
    ]
    tools = os.environ.get("CERANA_TOOLS_DIR") or REPO_ROOT / ".tools"
    candidates.append(("project tools", os.fspath(Path(tools, "consul", "usr", "bin", "consul"))))
    for source, path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return Path(path)
        if path and source in ("explicit path", "CERANA_CONSUL_BIN"):
            raise ConsulError(f"consul binary from {source} is not an executable file: {path}")
    raise ConsulError("no consul binary found; run scripts/ensure-consul.sh (or set CERANA_CONSUL_BIN)")


def free_port() -> int:
    """A TCP port on the loopback address that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def http_request(
    url: str, *, method: str = "GET", data: bytes | None = None, token: str | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """A plain HTTP request; returns (status, body) and never raises on HTTP error statuses."""
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def terminate_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)
    raise ConsulError(f"process {pid} did not exit after SIGKILL")


class ConsulAgent:
    """A ``consul agent -dev`` process bound to 127.0.0.1 on free ports.

    ``workdir`` holds ``data/`` and ``consul.log``; without it a temporary directory is used
    and removed by :meth:`stop`. With ``detach=True`` the agent gets its own session so it
    outlives the calling process (used by ``cerana consul up``).
    """

    def __init__(
        self,
        binary: str | os.PathLike[str] | None = None,
        *,
        acl_master_token: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        http_port: int | None = None,
        detach: bool = False,
        startup_timeout: float = 30.0,
    ) -> None:
        self.binary = find_consul(binary)
        self.acl_master_token = acl_master_token
        self._workdir = Path(workdir) if workdir else None
        self._own_workdir = workdir is None
        self._http_port = http_port
        self.detach = detach
        self.startup_timeout = startup_timeout
        self.http_port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise ConsulError("the agent has not been started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "consul.log"

    @property
    def http_addr(self) -> str:
        if self.http_port is None:
            raise ConsulError("the agent has not been started")
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self, http_port: int) -> list[str]:
        hcl = ['session_ttl_min = "1s"', "disable_update_check = true"]
        if self.acl_master_token is not None:
            hcl.append(
                'acl { enabled = true default_policy = "deny" enable_token_persistence = true '
                f"tokens {{ master = {json.dumps(self.acl_master_token)} }} }}"
            )
        args = [
            os.fspath(self.binary), "agent", "-dev", "-node=cerana-dev",
            f"-bind={LOOPBACK}", f"-client={LOOPBACK}", f"-data-dir={self.workdir / 'data'}",
            f"-http-port={http_port}", "-dns-port=-1", "-grpc-port=-1", "-serf-wan-port=-1",
            f"-serf-lan-port={free_port()}", f"-server-port={free_port()}",
        ]  # fmt: skip
        for fragment in hcl:
            args += ["-hcl", fragment]
        return args

    def start(self) -> Self:
        if self.process is not None:
            raise ConsulError("the agent is already running")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="cerana-consul-"))
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        try:
            for _ in range(3):  # a free port can be taken between free_port() and the agent's bind
                if self._spawn(self._http_port or free_port()):
                    return self
                if self._http_port or "address already in use" not in self._log_tail().lower():
                    break
            raise ConsulError(f"consul agent exited during startup:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _spawn(self, http_port: int) -> bool:
        """Start the process; True once it serves, False if it exited early."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(http_port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
            )
        self.http_port = http_port
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if self._ready():
                return True
            time.sleep(0.05)
        raise ConsulError(f"consul agent not ready after {self.startup_timeout:.0f} s:\n{self._log_tail()}")

    def _ready(self) -> bool:
        try:
            status, body = http_request(f"{self.http_addr}/v1/status/leader", timeout=1.0)
            if status != 200 or json.loads(body or b'""') == "":
                return False
            if self.acl_master_token is None:
                return True
            status, _ = http_request(f"{self.http_addr}/v1/acl/token/self", token=self.acl_master_token, timeout=1.0)
            return status == 200
        except (OSError, ValueError):
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the agent (SIGTERM, then SIGKILL) and remove a temporary workdir."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

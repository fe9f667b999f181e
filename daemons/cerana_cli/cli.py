"""The ``cerana`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cerana_cli import __version__
from cerana_cli.consul_agent import ConsulAgent, ConsulError, http_request, pid_alive, terminate_pid
from cerana_cli.plan import register as register_plan
from cerana_cli.status import register as register_status
from cerana_lab.cli import register as register_lab

log = logging.getLogger("cerana")


class CliError(Exception):
    """An expected error: reported as one line on stderr, exit status 1."""


# --- cerana consul ... --------------------------------------------------------------------


class LocalAgent:
    """The state of the background dev agent kept in ``<dir>/.cerana/consul/``."""

    def __init__(self, base: Path) -> None:
        self.dir = base.resolve() / ".cerana" / "consul"
        self.pid_file = self.dir / "consul.pid"
        self.addr_file = self.dir / "http_addr"

    def pid(self) -> int | None:
        """The pid of the running agent, or None (stale state files are removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        if pid_alive(pid) and any(arg.endswith(b"consul") for arg in cmdline[:1]) and b"agent" in cmdline:
            return pid
        self.clear()
        return None

    def addr(self) -> str:
        return self.addr_file.read_text().strip()

    def clear(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        self.addr_file.unlink(missing_ok=True)


def export_line(addr: str) -> str:
    return f"export CONSUL_HTTP_ADDR={addr}"


def consul_up(args: argparse.Namespace) -> int:
    state = LocalAgent(args.dir)
    if (pid := state.pid()) is not None:
        log.info("consul agent already running (pid %d)", pid)
        print(export_line(state.addr()))
        return 0
    agent = ConsulAgent(args.consul, workdir=state.dir, http_port=args.http_port, detach=True)
    agent.start()
    state.pid_file.write_text(f"{agent.pid}\n")
    state.addr_file.write_text(f"{agent.http_addr}\n")
    log.info("consul agent started (pid %d), log in %s", agent.pid, agent.log_path)
    print(export_line(agent.http_addr))
    return 0


def consul_down(args: argparse.Namespace) -> int:
    state = LocalAgent(args.dir)
    pid = state.pid()
    if pid is None:
        log.info("no consul agent running for %s", args.dir)
        return 0
    terminate_pid(pid)
    state.clear()
    log.info("consul agent stopped (pid %d)", pid)
    return 0


def consul_status(args: argparse.Namespace) -> int:
    state = LocalAgent(args.dir)
    pid = state.pid()
    if pid is None:
        raise CliError(f"no consul agent running for {args.dir}")
    addr = state.addr()
    try:
        status, body = http_request(f"{addr}/v1/status/leader", timeout=2.0)
        leader = json.loads(body) if status == 200 else ""
    except (OSError, ValueError) as exc:
        raise CliError(f"consul agent pid {pid} does not answer at {addr}: {exc}") from exc
    if not leader:
        raise CliError(f"consul agent pid {pid} at {addr} has no leader")
    print(f"running: pid {pid}, {addr}, leader {leader}")
    return 0


def consul_env(args: argparse.Namespace) -> int:
    state = LocalAgent(args.dir)
    if state.pid() is None:
        raise CliError(f"no consul agent running for {args.dir}; start one with: cerana consul up")
    print(export_line(state.addr()))
    return 0


# --- wiring ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cerana", description="Cerana platform tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    consul = groups.add_parser("consul", help="a local Consul dev agent")
    commands = consul.add_subparsers(dest="command", required=True, metavar="ACTION")
    actions: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "up": (consul_up, "start a dev agent in the background and print its export line"),
        "down": (consul_down, "stop the background dev agent"),
        "status": (consul_status, "show whether the dev agent runs and has a leader"),
        "env": (consul_env, "print `export CONSUL_HTTP_ADDR=...` for the running agent"),
    }
    for name, (func, help_text) in actions.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--dir", type=Path, default=Path.cwd(), help="keep state in DIR/.cerana/consul (default: current dir)"
        )
        if name == "up":
            sub.add_argument("--http-port", type=int, help="HTTP port (default: a free port)")
            sub.add_argument("--consul", metavar="PATH", help="consul binary (default: see scripts/ensure-consul.sh)")
        sub.set_defaults(func=func)

    register_lab(groups)
    register_plan(groups)
    register_status(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="cerana: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ConsulError, OSError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

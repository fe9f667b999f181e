"""Settings of cerana-cluster-tick: loaded once from a TOML file, the environment and flags.

Precedence: flags > environment > file > defaults. Every value is validated here, in one
place; a bad one fails start-up with a :class:`ConfigError` naming the setting and where
it came from. This is the only module that reads ``os.environ`` (through the ``environ``
argument of :meth:`Settings.load`).

File (``--config``, ``CERANA_CLUSTER_TICK_CONFIG``; else ``/etc/cerana/cluster-tick.toml``
if it exists)::

    state_dir = "/var/lib/cerana/cluster-tick"
    inventory = "/etc/cerana/nodes.cerana_nodes.yml"   # or leave it out: an inventory of the live nodes
    remote_user = "cerana"
    private_key_file = "/etc/cerana/cluster-tick.key"
    [consul]
    address = "http://127.0.0.1:8500"

Environment: ``CERANA_CLUSTER_TICK_<SETTING>`` and, for Consul, the ``consul`` CLI's
``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_SSL``, ``CONSUL_HTTP_SSL_VERIFY``,
``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY`` and ``CERANA_KV_PREFIX``,
plus ``CERANA_CLUSTER_TICK_CONSUL_TIMEOUT``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ansible_collections.cerana.platform.plugins.module_utils import _store
from cerana_daemon.config import (
    ConfigError,
    parse_abs_path,
    parse_bool,
    parse_duration,
    parse_int,
    parse_log_format,
    parse_log_level,
    parse_optional_path,
    parse_str,
    setting,
)

__all__ = ["CONSUL_HELP", "ENV_PREFIX", "ConfigError", "Settings"]

ENV_PREFIX = "CERANA_CLUSTER_TICK_"
DEFAULT_CONFIG_FILE = Path("/etc/cerana/cluster-tick.toml")

_CONSUL_ENV = {
    "address": ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_SSL"),
    "token": ("CONSUL_HTTP_TOKEN",),
    "validate_certs": ("CONSUL_HTTP_SSL_VERIFY",),
    "ca_path": ("CONSUL_CACERT",),
    "client_cert": ("CONSUL_CLIENT_CERT",),
    "client_key": ("CONSUL_CLIENT_KEY",),
    "prefix": ("CERANA_KV_PREFIX",),
}


def _optional_str(value: Any) -> str:
    return "" if value is None else parse_str(value).strip()


def _optional_url(value: Any) -> str:
    text = _optional_str(value)
    if text:
        try:
            _store.parse_address(text)
        except _store.Invalid as e:
            raise ValueError(str(e)) from None
    return text


def _lock_delay(value: Any) -> float:
    if value in (0, "0", "0s"):
        return 0.0
    return parse_duration(value)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything cerana-cluster-tick can be told; each field's help is also its ``--help`` text."""

    name: str = setting("", _optional_str, "this tick's name in the lock and in events; empty: the host name")
    state_dir: Path = setting(  # noqa: RUF009
        Path("/var/lib/cerana/cluster-tick"), parse_abs_path,
        "directory of the runs (runs/<id>/: ansible-runner's private data dir with its artifacts); mode 0700",
    )  # fmt: skip
    playbook: str = setting(
        "cerana.platform.converge",
        parse_str,
        "the converge playbook: a collection playbook name or a path (run with --skip-tags for the cerana_* "
        "step tags with nothing to do, as in cerana.platform.converge)",
    )
    inventory: str = setting(
        "", _optional_str,
        "Ansible inventory (a path, e.g. a *.cerana_nodes.yml file); empty: one generated per run from the "
        "live nodes, host name = node id, reached at the node's first address",
    )  # fmt: skip
    remote_user: str = setting("", _optional_str, "user Ansible logs in as on the nodes; empty: Ansible's default")
    private_key_file: str | None = setting(None, parse_optional_path, "ssh private key for the nodes")
    python_interpreter: str = setting(
        "/opt/cerana/venv/bin/python", _optional_str,
        "Python on the nodes that runs the node-level modules (needs py-consul: the node tick's venv)",
    )  # fmt: skip
    host_key_checking: bool = setting(True, parse_bool, "check the nodes' ssh host keys (known_hosts)")
    pipelining: bool = setting(
        True, parse_bool, "Ansible pipelining: one ssh round trip per module call (needs no requiretty for sudo)"
    )
    forks: int = setting(10, parse_int(1, 500), "nodes converged in parallel, at most")
    service_settle: float = setting(
        0.0, parse_duration,
        "seconds a started service must stay up for its task to succeed (service_instance's settle); the tick"
        " waits for healthy heartbeats itself",
    )  # fmt: skip
    node_consul_url: str = setting(
        "", _optional_url, "Consul address the nodes use (the modules' consul_url); empty: the node's local agent"
    )
    run_timeout: float = setting(600.0, parse_duration, "a converge run taking longer is cancelled (seconds)")
    stop_timeout: float = setting(
        30.0, parse_duration, "on SIGTERM, how long a running converge may still take before it is cancelled"
    )
    keep_runs: int = setting(20, parse_int(1, 10000), "run directories kept under state_dir/runs")
    keep_events: int = setting(200, parse_int(1, 100000), "events kept under cluster/events/ in Consul")
    resync: float = setting(60.0, parse_duration, "seconds between full passes when nothing changes")
    settle: float = setting(0.1, parse_duration, "after a change wakes the tick, wait this long for more")
    lock_ttl: float = setting(15.0, parse_duration, "TTL of the leader lock's session (Consul's minimum is 10 s)")
    lock_delay: float = setting(
        15.0, _lock_delay, "after the leader dies, Consul keeps the lock from others this long (0 allowed)"
    )
    max_unavailable: int = setting(1, parse_int(1, 1000), "instances of a bundle updated at the same time, at most")
    grace: float = setting(
        10.0, parse_duration, "seconds an applied change may take to show in the heartbeats before it is redone"
    )
    node_retry_initial: float = setting(5.0, parse_duration, "first wait before a failed node is retried")
    node_retry_max: float = setting(300.0, parse_duration, "longest wait between retries of a failing node")
    retry_initial: float = setting(1.0, parse_duration, "first wait after Consul failed a pass; doubles each time")
    retry_max: float = setting(30.0, parse_duration, "longest wait between passes while Consul is unreachable")
    log_level: str = setting("INFO", parse_log_level, "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting("text", parse_log_format, "text or json (one object a line) on stderr")
    consul: _store.ConnectionSettings = dataclasses.field(
        default_factory=lambda: _store.ConnectionSettings(timeout=10.0),
        metadata={"help": "how to reach Consul ([consul] table in the file)"},
    )

    @property
    def identity(self) -> str:
        return self.name or socket.gethostname()

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> Settings:
        """Settings from ``path`` (TOML), then ``environ``, then ``flags`` (non-None values win)."""
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        env = dict(os.environ if environ is None else environ)
        raw: dict[str, tuple[Any, str]] = {}
        consul_raw: dict[str, tuple[Any, str]] = {}

        config_path = path or env.get(ENV_PREFIX + "CONFIG")
        if config_path is None and DEFAULT_CONFIG_FILE.is_file():
            config_path = DEFAULT_CONFIG_FILE
        if config_path is not None:
            where = f"file {config_path}"
            for key, value in _read_toml(Path(config_path)).items():
                if key == "consul":
                    if not isinstance(value, dict):
                        raise ConfigError("consul", where, "must be a table")
                    for ckey, cvalue in value.items():
                        if ckey not in _CONSUL_FIELDS:
                            known = ", ".join(sorted(_CONSUL_FIELDS))
                            raise ConfigError(f"consul.{ckey}", where, f"unknown setting (known: {known})")
                        consul_raw[ckey] = (cvalue, where)
                elif key in _FIELDS:
                    raw[key] = (value, where)
                else:
                    raise ConfigError(key, where, f"unknown setting (known: {', '.join(sorted([*_FIELDS, 'consul']))})")

        for name, value in env.items():
            if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
                continue
            key = name[len(ENV_PREFIX) :].lower()
            where = f"environment variable {name}"
            if key.startswith("consul_") and key[len("consul_") :] in _CONSUL_FIELDS:
                consul_raw[key[len("consul_") :]] = (value, where)
            elif key in _FIELDS:
                raw[key] = (value, where)
            else:
                raise ConfigError(name, "environment", "unknown setting")
        for ckey, names in _CONSUL_ENV.items():
            present = [n for n in names if env.get(n)]
            if not present:
                continue
            try:
                from_env = _store.ConnectionSettings.from_env({n: env[n] for n in names if n in env})
            except _store.Invalid as e:
                raise ConfigError(f"consul.{ckey}", f"environment variable {present[0]}", str(e)) from None
            if ckey == "address" and "CONSUL_HTTP_ADDR" not in present:
                base = consul_raw.get("address", (_store.DEFAULT_ADDRESS, ""))[0]
                if isinstance(base, str) and "://" not in base:
                    consul_raw["address"] = ("https://" + base, f"environment variable {present[0]}")
                continue
            consul_raw[ckey] = (getattr(from_env, ckey), f"environment variable {present[0]}")

        for key, value in flags.items():
            where = f"flag --{key.replace('_', '-')}"
            if key.startswith("consul_") and key[len("consul_") :] in _CONSUL_FIELDS:
                consul_raw[key[len("consul_") :]] = (value, where)
            elif key == "kv_prefix":
                consul_raw["prefix"] = (value, where)
            elif key in _FIELDS:
                raw[key] = (value, where)
            else:
                raise ConfigError(key, where, "unknown setting")

        values: dict[str, Any] = {}
        for key, (value, where) in raw.items():
            try:
                values[key] = _FIELDS[key].metadata["parse"](value)
            except ValueError as e:
                raise ConfigError(key, where, str(e)) from None
        consul_values: dict[str, Any] = {}
        for key, (value, where) in consul_raw.items():
            try:
                consul_values[key] = _CONSUL_FIELDS[key](value)
            except ValueError as e:
                raise ConfigError(f"consul.{key}", where, str(e)) from None
        consul = dataclasses.replace(cls().consul, **consul_values)
        try:
            _store.parse_address(consul.address)
        except _store.Invalid as e:
            raise ConfigError("consul.address", consul_raw.get("address", (None, "default"))[1], str(e)) from None
        settings = cls(**values, consul=consul)
        for lo, hi in (("retry_initial", "retry_max"), ("node_retry_initial", "node_retry_max")):
            if getattr(settings, lo) > getattr(settings, hi):
                where = raw.get(lo, (None, "default"))[1]
                raise ConfigError(lo, where, f"must not exceed {hi} ({getattr(settings, hi):g} s)")
        return settings

    def redacted(self) -> dict[str, Any]:
        """A dict for the start-up log line: the token never appears."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "consul"}
        d = {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
        d["consul"] = self.consul.redacted()
        return d


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config", f"file {path}", "no such file") from None
    except OSError as e:
        raise ConfigError("config", f"file {path}", e.strerror or str(e)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", f"file {path}", f"not valid TOML: {e}") from None


_FIELDS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "consul"}
_CONSUL_FIELDS: dict[str, Callable[[Any], Any]] = {
    "address": parse_str,
    "token": lambda v: parse_str(v) or None,
    "validate_certs": parse_bool,
    "ca_path": parse_optional_path,
    "client_cert": parse_optional_path,
    "client_key": parse_optional_path,
    "prefix": lambda v: parse_str(v).strip("/"),
    "timeout": parse_duration,
}
CONSUL_HELP = {
    "address": "Consul HTTP address, host:port or http(s)://host:port (env CONSUL_HTTP_ADDR)",
    "timeout": "seconds to wait for each Consul request (env CERANA_CLUSTER_TICK_CONSUL_TIMEOUT)",
    "prefix": "KV prefix of the platform's keys (env CERANA_KV_PREFIX)",
}

"""Settings of cerana-node-tick: loaded once from a TOML file, the environment and flags.

Precedence: flags > environment > file > defaults. Every value is validated here, in one
place, and a bad one fails start-up with a :class:`ConfigError` naming the setting and
where it came from. This is the only module that reads ``os.environ`` (through the
``environ`` argument of :meth:`Settings.load`).

File (``--config``, ``CERANA_NODE_TICK_CONFIG``; else ``/etc/cerana/node-tick.toml`` if it
exists)::

    data_dir = "/var/lib/cerana"
    interval = "5s"
    [labels]
    consul_role = "server"
    [consul]
    address = "http://127.0.0.1:8500"
    timeout = "5s"

Environment: ``CERANA_NODE_TICK_<SETTING>`` (``CERANA_NODE_TICK_DATA_DIR``, labels as
``key=value,key=value``, lists comma-separated) and, for Consul, the ``consul`` CLI's
``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_SSL``, ``CONSUL_HTTP_SSL_VERIFY``,
``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY`` and ``CERANA_KV_PREFIX``
(read by the store's ``ConnectionSettings.from_env``), plus ``CERANA_NODE_TICK_CONSUL_TIMEOUT``.
"""

from __future__ import annotations

import dataclasses
import os
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
    parse_labels,
    parse_log_format,
    parse_log_level,
    parse_names,
    parse_optional_path,
    parse_str,
)

__all__ = ["CONSUL_HELP", "ConfigError", "Settings", "parse_duration"]

ENV_PREFIX = "CERANA_NODE_TICK_"
DEFAULT_CONFIG_FILE = Path("/etc/cerana/node-tick.toml")

# Consul setting -> the environment variables ConnectionSettings.from_env reads for it.
_CONSUL_ENV = {
    "address": ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_SSL"),
    "token": ("CONSUL_HTTP_TOKEN",),
    "validate_certs": ("CONSUL_HTTP_SSL_VERIFY",),
    "ca_path": ("CONSUL_CACERT",),
    "client_cert": ("CONSUL_CLIENT_CERT",),
    "client_key": ("CONSUL_CLIENT_KEY",),
    "prefix": ("CERANA_KV_PREFIX",),
}


# -- the settings ---------------------------------------------------------------------------


def _meta(parse: Callable[[Any], Any], help: str) -> dict[str, Any]:
    return {"parse": parse, "help": help}


parse_positive_int = parse_int(1, 1 << 20)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything cerana-node-tick needs; each field's ``help`` is also its ``--help`` text."""

    machine_id_file: Path = dataclasses.field(
        default=Path("/etc/machine-id"),
        metadata=_meta(
            parse_abs_path,
            "file holding the node id (the machine id: 32 hex digits, stable across restarts and address changes)",
        ),
    )
    data_dir: Path = dataclasses.field(
        default=Path("/var/lib/cerana"),
        metadata=_meta(
            parse_abs_path,
            "the node's data directory: datasets are its datasets/<id>/ directories; the node's disk figures are "
            "those of the file system holding it",
        ),
    )
    run_dir: Path = dataclasses.field(
        default=Path("/run/cerana"),
        metadata=_meta(
            parse_abs_path, "where running service instances are recorded (bundles/<bundle>/<service>.json)"
        ),
    )
    interval: float = dataclasses.field(
        default=5.0, metadata=_meta(parse_duration, "seconds between ticks (heartbeats); 5, 5s, 500ms, 1m")
    )
    history_interval: float = dataclasses.field(
        default=60.0, metadata=_meta(parse_duration, "seconds between historical samples (history/nodes/<id>/)")
    )
    labels: dict[str, str] = dataclasses.field(
        default_factory=dict, metadata=_meta(parse_labels, "node labels, key=value,... (e.g. consul_role=server)")
    )
    interfaces: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata=_meta(parse_names, "network interfaces whose addresses are reported, comma-separated; empty: all"),
    )
    retry_initial: float = dataclasses.field(
        default=1.0, metadata=_meta(parse_duration, "first wait after a failed tick, in seconds; doubles each time")
    )
    retry_max: float = dataclasses.field(
        default=30.0, metadata=_meta(parse_duration, "longest wait between retries while Consul is unreachable")
    )
    check_workers: int = dataclasses.field(
        default=4, metadata=_meta(parse_positive_int, "health checks run at the same time, at most")
    )
    log_level: str = dataclasses.field(default="INFO", metadata=_meta(parse_log_level, "DEBUG, INFO, WARNING or ERROR"))
    log_format: str = dataclasses.field(
        default="text", metadata=_meta(parse_log_format, "text or json (one object a line) on stderr")
    )
    consul: _store.ConnectionSettings = dataclasses.field(
        default_factory=lambda: _store.ConnectionSettings(timeout=5.0),
        metadata={"help": "how to reach Consul ([consul] table in the file)"},
    )

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> Settings:
        """Settings from ``path`` (TOML), then ``environ``, then ``flags`` (non-None values win).

        ``flags`` uses the setting names (``interval``, ``consul_address``, ...); ``path``
        None means ``CERANA_NODE_TICK_CONFIG`` or, if it exists, the default file.
        """
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        env = dict(os.environ if environ is None else environ)
        raw: dict[str, tuple[Any, str]] = {}  # name -> (value, source)
        consul_raw: dict[str, tuple[Any, str]] = {}

        # 1. the file
        config_path = path or env.get(ENV_PREFIX + "CONFIG")
        if config_path is None and DEFAULT_CONFIG_FILE.is_file():
            config_path = DEFAULT_CONFIG_FILE
        if config_path is not None:
            data = _read_toml(Path(config_path))
            where = f"file {config_path}"
            for key, value in data.items():
                if key == "consul":
                    if not isinstance(value, dict):
                        raise ConfigError("consul", where, "must be a table")
                    for ckey, cvalue in value.items():
                        if ckey not in _CONSUL_FIELDS:
                            raise ConfigError(
                                f"consul.{ckey}", where, f"unknown setting (known: {', '.join(sorted(_CONSUL_FIELDS))})"
                            )
                        consul_raw[ckey] = (cvalue, where)
                elif key in _FIELDS:
                    raw[key] = (value, where)
                else:
                    raise ConfigError(key, where, f"unknown setting (known: {', '.join(sorted([*_FIELDS, 'consul']))})")

        # 2. the environment
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
            if present:
                try:
                    from_env = _store.ConnectionSettings.from_env({n: env[n] for n in names if n in env})
                except _store.Invalid as e:
                    raise ConfigError(f"consul.{ckey}", f"environment variable {present[0]}", str(e)) from None
                if ckey == "address" and "CONSUL_HTTP_ADDR" not in present:
                    # CONSUL_HTTP_SSL alone turns the configured address into https.
                    base = consul_raw.get("address", (_store.DEFAULT_ADDRESS, ""))[0]
                    if isinstance(base, str) and "://" not in base:
                        consul_raw["address"] = ("https://" + base, f"environment variable {present[0]}")
                    continue
                consul_raw[ckey] = (getattr(from_env, ckey), f"environment variable {present[0]}")

        # 3. the flags
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

        # validate once
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
        if settings.retry_initial > settings.retry_max:
            raise ConfigError(
                "retry_initial", raw.get("retry_initial", (None, "default"))[1],
                f"must not exceed retry_max ({settings.retry_max:g} s)",
            )  # fmt: skip
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
    "timeout": "seconds to wait for each Consul request (env CERANA_NODE_TICK_CONSUL_TIMEOUT)",
    "prefix": "KV prefix of the platform's keys (env CERANA_KV_PREFIX)",
}

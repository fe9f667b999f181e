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
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ansible_collections.cerana.platform.plugins.module_utils import _store

ENV_PREFIX = "CERANA_NODE_TICK_"
DEFAULT_CONFIG_FILE = Path("/etc/cerana/node-tick.toml")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")

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


class ConfigError(Exception):
    """A setting is invalid; the message names the setting and its source."""

    def __init__(self, key: str, source: str, reason: str) -> None:
        self.key = key
        self.source = source
        self.reason = reason
        super().__init__(f"invalid setting {key} ({source}): {reason}")


# -- value parsers: accept TOML-native values and strings (environment, flags) --------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")


def parse_duration(value: Any) -> float:
    """Seconds > 0 from a number or a string such as ``5``, ``5s``, ``500ms``, ``1m``."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration such as 5, 5s or 500ms, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"must be a duration such as 5, 5s or 500ms, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"must be more than 0 seconds, got {value!r}")
    return seconds


def parse_abs_path(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be an absolute path, got {value!r}")
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return Path(value)


def parse_labels(value: Any) -> dict[str, str]:
    """A mapping from a TOML table or ``key=value,key=value``."""
    if isinstance(value, str):
        pairs: list[tuple[str, Any]] = []
        for item in filter(None, (p.strip() for p in value.split(","))):
            if "=" not in item:
                raise ValueError(f"must be key=value pairs separated by commas, got {item!r}")
            k, v = item.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise ValueError(f"must be a table of strings or key=value,..., got {value!r}")
    out: dict[str, str] = {}
    for k, v in pairs:
        if not isinstance(k, str) or not _LABEL_KEY.match(k):
            raise ValueError(f"label key {k!r}: 1-63 characters of letters, digits, '_', '.', '-'")
        if not isinstance(v, str):
            raise ValueError(f"label {k}: the value must be a string, got {v!r}")
        out[k] = v
    return dict(sorted(out.items()))


def parse_names(value: Any) -> tuple[str, ...]:
    """A list of names from a TOML array or a comma-separated string."""
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",")]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(f"must be a list of names, got {value!r}")
    if not all(isinstance(i, str) for i in items):
        raise ValueError(f"must be a list of names, got {value!r}")
    return tuple(i for i in items if i)


def _choice(choices: tuple[str, ...], upper: bool = False) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        v = str(value).strip()
        v = v.upper() if upper else v.lower()
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return v

    return parse


def parse_positive_int(value: Any) -> int:
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1:
        raise ValueError(f"must be a whole number >= 1, got {value!r}")
    return number


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    try:
        return _store.parse_bool(value, "value")
    except _store.Invalid:
        raise ValueError(f"must be true or false, got {value!r}") from None


def parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def parse_optional_path(value: Any) -> str | None:
    if value in (None, ""):
        return None
    return str(parse_abs_path(value))


# -- the settings ---------------------------------------------------------------------------


def _meta(parse: Callable[[Any], Any], help: str) -> dict[str, Any]:
    return {"parse": parse, "help": help}


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
    log_level: str = dataclasses.field(
        default="INFO", metadata=_meta(_choice(LOG_LEVELS, upper=True), "DEBUG, INFO, WARNING or ERROR")
    )
    log_format: str = dataclasses.field(
        default="text", metadata=_meta(_choice(LOG_FORMATS), "text or json (one object a line) on stderr")
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

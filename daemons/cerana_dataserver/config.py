"""Settings of cerana-dataserver: loaded once from a TOML file, the environment and flags.

Precedence: flags > environment (``CERANA_DATASERVER_<SETTING>``) > file (``--config``,
``CERANA_DATASERVER_CONFIG``, else ``/etc/cerana/dataserver.toml`` if it exists) >
defaults. Every value is validated here; a bad one fails start-up with a
:class:`ConfigError` naming the setting and where it came from. This is the only module
that reads ``os.environ`` (through the ``environ`` argument of :meth:`Settings.load`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "CERANA_DATASERVER_"
DEFAULT_CONFIG_FILE = Path("/etc/cerana/dataserver.toml")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?)?\s*$", re.I)


class ConfigError(Exception):
    def __init__(self, key: str, source: str, reason: str) -> None:
        self.key, self.source, self.reason = key, source, reason
        super().__init__(f"invalid setting {key} ({source}): {reason}")


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be a duration such as 30, 30s or 500ms, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"must be a duration such as 30, 30s or 500ms, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as 8388608, 8m, 8MiB (0 = none)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size in bytes such as 8388608 or 8MiB, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"must be a size in bytes such as 8388608 or 8MiB, got {value!r}")
        unit = (match.group(2) or "").lower()[:1]
        n = int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[unit]
    if n < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return n


def parse_int(lo: int, hi: int):
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be an integer, got {value!r}") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be {lo}-{hi}, got {n}")
        return n

    return parse


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def parse_address(value: Any) -> str:
    text = str(value).strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"must be an IP address to listen on, got {value!r}") from None
    return text


def parse_level(value: Any) -> str:
    v = str(value).upper()
    if v not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return v


def _field(default: Any, parse: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"parse": parse, "help": help})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything cerana-dataserver can be told; each field says its unit and default."""

    data_dir: Path = _field(Path("/var/lib/cerana"), Path, "the node's data directory")  # noqa: RUF009
    """The node's data directory (same as the node tick's): datasets/, .staging/, .manifests/."""
    address: str = _field("0.0.0.0", parse_address, "IP address to listen on (the node's management address)")
    """Address to bind: the node's own address, so that a lab node serves only inside its namespace."""
    port: int = _field(7811, parse_int(1, 65535), "TCP port")
    """TCP port; the modules' data_port option (default 7811) must match."""
    run_dir: Path = _field(Path("/run/cerana"), Path, "where running instances are recorded")  # noqa: RUF009
    """Instance records (module_utils/_instances.py): a dataset in use is not removed without force."""
    idle_timeout: float = _field(300.0, parse_duration, "a connection idle for this long is dropped")
    """Seconds without a byte on a connection (not a limit on a whole transfer)."""
    retry_window: float = _field(20.0, parse_duration, "how long a replica keeps retrying sources without progress")
    """While pulling a replica: seconds without progress before giving up on all sources."""
    parallel: int = _field(4, parse_int(1, 64), "parallel connections per replica")
    """Concurrent segment downloads per replica (segments of big files, whole small files)."""
    max_rate: int = _field(0, parse_size, "bytes/s per connection when serving files (0 = unlimited)")
    """Cap on the rate at which each connection serves file data; 0 means no cap."""
    fsync: bool = _field(True, parse_bool, "flush received files to disk before making a copy visible")
    """fdatasync every received file before the rename, so a crash never leaves a torn copy."""
    log_level: str = _field("INFO", parse_level, "DEBUG, INFO, WARNING or ERROR")
    """Log level."""

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        *,
        path: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        env = os.environ if environ is None else environ
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        values: dict[str, tuple[Any, str]] = {}
        file = path or env.get(ENV_PREFIX + "CONFIG")
        if file is None and DEFAULT_CONFIG_FILE.is_file():
            file = str(DEFAULT_CONFIG_FILE)
        if file:
            try:
                with open(file, "rb") as f:
                    data = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError("config", file, str(e)) from None
            names = {f.name for f in dataclasses.fields(cls)}
            for key, value in data.items():
                if key not in names:
                    raise ConfigError(key, f"file {file}", "unknown setting")
                values[key] = (value, f"file {file}")
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in env:
                values[f.name] = (env[name], f"environment variable {name}")
            if f.name in flags:
                values[f.name] = (flags[f.name], f"flag --{f.name.replace('_', '-')}")
        parsed = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                raw, source = values[f.name]
                try:
                    parsed[f.name] = f.metadata["parse"](raw)
                except ValueError as e:
                    raise ConfigError(f.name, source, str(e)) from None
        return cls(**parsed)

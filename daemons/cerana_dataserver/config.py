"""Settings of cerana-dataserver: loaded once from a TOML file, the environment and flags.

Precedence: flags > environment (``CERANA_DATASERVER_<SETTING>``) > file (``--config``,
``CERANA_DATASERVER_CONFIG``, else ``/etc/cerana/dataserver.toml`` if it exists) >
defaults. Every value is validated here; a bad one fails start-up with a
:class:`ConfigError` naming the setting and where it came from. This is the only module
that reads ``os.environ`` (through the ``environ`` argument of :meth:`Settings.load`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cerana_daemon.config import (
    ConfigError,
    parse_bool,
    parse_duration,
    parse_int,
    parse_ip,
    parse_log_level,
    parse_size,
    setting,
)

__all__ = ["ConfigError", "Settings", "parse_duration", "parse_size"]

ENV_PREFIX = "CERANA_DATASERVER_"
DEFAULT_CONFIG_FILE = Path("/etc/cerana/dataserver.toml")
_field = setting


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything cerana-dataserver can be told; each field says its unit and default."""

    data_dir: Path = _field(Path("/var/lib/cerana"), Path, "the node's data directory")  # noqa: RUF009
    """The node's data directory (same as the node tick's): datasets/, .staging/, .manifests/."""
    address: str = _field("0.0.0.0", parse_ip, "IP address to listen on (the node's management address)")
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
    log_level: str = _field("INFO", parse_log_level, "DEBUG, INFO, WARNING or ERROR")
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

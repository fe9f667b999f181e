"""Setting parsers and the error every daemon's ``Settings.load`` raises.

Parsers accept TOML-native values and strings (from the environment and flags), return
the typed value, and raise ``ValueError`` with the reason; ``Settings.load`` turns that
into a :class:`ConfigError` naming the setting and where the value came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?)?\s*$", re.I)
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")


class ConfigError(Exception):
    """A setting is invalid; the message names the setting and its source."""

    def __init__(self, key: str, source: str, reason: str) -> None:
        self.key = key
        self.source = source
        self.reason = reason
        super().__init__(f"invalid setting {key} ({source}): {reason}")


def setting(default: Any, parse: Callable[[Any], Any], help: str, *, factory: bool = False) -> Any:
    """A Settings field: its parser and its ``--help`` text travel in the field's metadata."""
    meta = {"parse": parse, "help": help}
    if factory:
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def add_setting_flags(
    parser: argparse.ArgumentParser, settings_cls: type, env_prefix: str, *, skip: tuple[str, ...] = ()
) -> None:
    """One ``--some-setting`` flag per field of ``settings_cls``, its help from the field's metadata."""
    defaults = settings_cls()
    for field in dataclasses.fields(settings_cls):
        if field.name in skip:
            continue
        default = getattr(defaults, field.name)
        if isinstance(default, Mapping):
            default = ",".join(f"{k}={v}" for k, v in default.items())
        elif isinstance(default, tuple):
            default = ",".join(default)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            metavar=field.name.split("_")[-1].upper(),
            help=f"{field.metadata['help']} (default: {default!s}; env {env_prefix}{field.name.upper()})",
        )


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


def parse_size(value: Any) -> int:
    """Bytes >= 0 from an int or a string such as ``8388608``, ``8m``, ``8MiB``."""
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


def parse_int(lo: int, hi: int) -> Callable[[Any], int]:
    """A parser of whole numbers in ``lo..hi``."""

    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"must be a whole number, got {value!r}")
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a whole number, got {value!r}") from None
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


def parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def parse_abs_path(value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value).startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return Path(value)


def parse_optional_path(value: Any) -> str | None:
    if value in (None, ""):
        return None
    return str(parse_abs_path(value))


def parse_ip(value: Any) -> str:
    text = str(value).strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"must be an IP address, got {value!r}") from None
    return text


def choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[Any], str]:
    """A parser of one of ``choices`` (case-insensitive)."""

    def parse(value: Any) -> str:
        v = str(value).strip()
        v = v.upper() if upper else v.lower()
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return v

    return parse


parse_log_level = choice(LOG_LEVELS, upper=True)
parse_log_format = choice(LOG_FORMATS)


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

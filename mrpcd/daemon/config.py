"""Daemon configuration: YAML merged over the embedded default, validated with clear errors.

A bad config is refused at start with the file, the line and the reason, never half-applied.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from ..paths import default_runtime_dir


class ConfigError(ValueError):
    """The configuration cannot be used; the message says where and why."""


def _positive_int(lo: int, hi: int):
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"must be an integer from {lo} to {hi}")
        return v

    return check


def _power_of_two(v: Any) -> int:
    v = _positive_int(1 << 16, 1 << 30)(v)
    if v & (v - 1):
        raise ValueError("must be a power of two")
    return v


def _optional_str(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise ValueError("must be a string or null")


def _group(v: Any) -> str | int | None:
    if v is None or isinstance(v, (str, int)) and not isinstance(v, bool):
        return v
    raise ValueError("must be a group name, a gid or null")


def _choice(*options: str):
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v

    return check


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
        raise ValueError("must be a number of seconds above 0 and at most 3600")
    return float(v)


VALIDATORS = {
    "control_socket": _optional_str,
    "admin_group": _group,
    "transport": _choice("tcp", "rdma"),
    "ring_size": _power_of_two,
    "max_record": _positive_int(1024, 1 << 30),
    "max_pending_records": _positive_int(16, 1 << 24),
    "connect_timeout": _seconds,
    "log_level": _choice("debug", "info", "warning", "error"),
    "log_format": _choice("text", "json"),
}


@dataclass
class Config:
    control_socket: str
    admin_group: str | int | None
    transport: str
    ring_size: int
    max_record: int
    max_pending_records: int
    connect_timeout: float
    log_level: str
    log_format: str
    source: str = "<embedded default>"


def default_text() -> str:
    return resources.files("mrpcd").joinpath("default_config.yaml").read_text()


def _load_mapping(text: str, source: str) -> tuple[dict, dict[str, int]]:
    """Parse YAML, returning the mapping and the line of each top-level key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:1: the configuration must be a mapping of keys to values")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return data, lines


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The embedded default, then the file at `path`, then `overrides` (command line)."""
    values, _ = _load_mapping(default_text(), "<embedded default>")
    source = "<embedded default>"
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        data, lines = _load_mapping(text, path)
        for key, value in data.items():
            where = f"{path}:{lines.get(key, '?')}"
            if key not in VALIDATORS:
                raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(VALIDATORS))})")
            try:
                values[key] = VALIDATORS[key](value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {key}: {exc} (got {value!r})") from None
        source = path
    for key, value in (overrides or {}).items():
        try:
            values[key] = VALIDATORS[key](value)
        except ValueError as exc:
            raise ConfigError(f"command line: {key}: {exc} (got {value!r})") from None
    if values["control_socket"] is None:
        values["control_socket"] = os.environ.get("MRPCD_SOCKET") or os.path.join(default_runtime_dir(), "control.sock")
    return Config(**values, source=source)

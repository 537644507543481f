"""Daemon configuration: YAML merged over the embedded default, validated with clear errors.

A bad config is refused at start with the file, the line and the reason, never half-applied.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from ..keypath import KeyPathError, KeyPathErrors
from ..typo_hints import did_you_mean

import yaml

from ..paths import default_runtime_dir
from .declared import DeclaredPolicy, parse_policies
from ..transports.security import PeerPolicy, TlsConfig, parse_peers, parse_tls


class ConfigError(ValueError):
    """The configuration cannot be used; the message says where and why. `errors` has one
    entry per problem (a file with several bad keys reports them all; str() joins them)."""

    def __init__(self, message: str, errors: "list[str] | None" = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


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


def _group(v: Any) -> str | int | None:
    # A gid outside gid_t (0 .. 2**32-2; 2**32-1 is "no group") made every admin check
    # raise OverflowError later, when a non-root operator ran mrpcctl.
    if isinstance(v, str) and v.isascii() and v.isdigit():
        v = int(v)  # "65534" (a quoted gid) is that gid, not a group named "65534"
    if v is None or isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 - 1:
        return v
    if isinstance(v, str) and v:
        # resolved now: a name this host does not know would make nobody but root an admin,
        # silently (every admin check would find no such group)
        import grp

        try:
            grp.getgrnam(v)
        except KeyError:
            raise ValueError(f"no group named {v!r} on this host (getent group {v}); name an existing group or a gid") from None
        return v
    raise ValueError("must be a group name, a gid (0 to 4294967294) or null")


# sockaddr_un.sun_path holds 108 bytes, the last one the terminating NUL
MAX_SOCKET_PATH = 107


def _socket_path(v: Any) -> str | None:
    if v is None:
        return v
    if not isinstance(v, str) or not v:
        raise ValueError("must be a socket path or null (the default path)")
    if "\0" in v:
        raise ValueError("must not contain a NUL byte")
    try:
        size = len(os.fsencode(v))
    except UnicodeError:
        raise ValueError("cannot be encoded as a file name") from None
    if size > MAX_SOCKET_PATH:
        raise ValueError(f"is {size} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH} bytes: pick a shorter one")
    return v


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


def _drain_seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600:
        raise ValueError("must be a number of seconds from 0 to 3600")
    return float(v)


METRICS_KEYS = ("address", "buckets")


def _metrics(v: Any) -> dict[str, Any]:
    """`metrics: {address: "host:port" | null, buckets: [seconds, ...]}`; address null = off."""
    from .observe import DEFAULT_BUCKETS

    if v is None:
        v = {}
    if not isinstance(v, dict):
        raise ValueError("must be a mapping with keys address, buckets")
    unknown = sorted(str(k) for k in v if k not in METRICS_KEYS)
    if unknown:
        raise KeyPathError(f"unknown key {unknown[0]!r}{did_you_mean(unknown[0], METRICS_KEYS)} (known: {', '.join(METRICS_KEYS)})", (unknown[0],))
    address = v.get("address")
    if address is not None:
        if not isinstance(address, str) or ":" not in address:
            raise KeyPathError("address must be \"host:port\" (or null to serve no metrics)", ("address",))
        host, _, port = address.rpartition(":")
        if not host.strip("[]"):
            raise KeyPathError(f"address {address!r} names no host: e.g. \"127.0.0.1:{port or 9464}\" "
                               f"(\"0.0.0.0:{port or 9464}\" serves every interface)", ("address",))
        if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise KeyPathError(f"address {address!r} must be host:port with port 0..65535", ("address",))
    buckets = v.get("buckets", list(DEFAULT_BUCKETS))
    if not isinstance(buckets, list) or not buckets:
        raise KeyPathError("buckets must be a non-empty list of seconds", ("buckets",))
    for i, b in enumerate(buckets):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < float("inf"):
            raise KeyPathError(f"buckets must be positive finite numbers, got {b!r}", ("buckets", i))
    if any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise KeyPathError("buckets must be strictly increasing", ("buckets",))
    return {"address": address, "buckets": tuple(float(b) for b in buckets)}


def _limits(v: Any) -> dict[str, int]:
    """`limits: {apps_per_uid: 128, ...}`: descriptors per app and per uid (app_limits.py);
    keys left out keep their defaults."""
    from .app_limits import DEFAULT_LIMITS, LIMIT_RANGE

    if v is None:
        v = {}
    if not isinstance(v, dict):
        raise ValueError(f"must be a mapping with keys {', '.join(DEFAULT_LIMITS)}")
    out = dict(DEFAULT_LIMITS)
    lo, hi = LIMIT_RANGE
    for key, value in v.items():
        if key not in DEFAULT_LIMITS:
            raise KeyPathError(f"unknown key {key!r}{did_you_mean(str(key), DEFAULT_LIMITS)} (known: {', '.join(DEFAULT_LIMITS)})", (key,))
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise KeyPathError(f"{key} must be an integer from {lo} to {hi}", (key,))
        out[key] = value
    return out


# Each validator checks one top-level key's value; an error about a key (or list entry)
# inside that value is a KeyPathError naming it (mrpcd.keypath), and load() reports the
# line of that key path.
VALIDATORS = {
    "control_socket": _socket_path,
    "admin_group": _group,
    "transport": _choice("tcp", "rdma"),
    "ring_size": _power_of_two,
    "max_record": _positive_int(1024, 1 << 30),
    "max_pending_records": _positive_int(16, 1 << 24),
    "max_pending_bytes": _positive_int(1 << 20, 1 << 40),
    "max_peer_backlog": _positive_int(1 << 20, 1 << 40),
    "peer_stall_timeout": _drain_seconds,
    "connect_timeout": _seconds,
    "log_level": _choice("debug", "info", "warning", "error"),
    "log_format": _choice("text", "json"),
    "drain_timeout": _drain_seconds,
    "poll_us": _positive_int(0, 100_000),
    "metrics": _metrics,
    "limits": _limits,
    "tls": parse_tls,  # daemon-to-daemon mutual TLS (transports/security.py)
    "peers": parse_peers,  # peers.allow: CIDR allow-list for daemon-to-daemon TCP
    "policies": parse_policies,  # policies applied to apps by name (declared.py)
}

# What a SIGHUP reload may change in a running daemon; the rest needs a restart.
LIVE_KEYS = ("log_level", "log_format", "max_pending_records", "max_pending_bytes", "max_peer_backlog", "peer_stall_timeout", "connect_timeout", "admin_group", "drain_timeout", "poll_us", "metrics", "limits", "policies")


@dataclass
class Config:
    control_socket: str
    admin_group: str | int | None
    transport: str
    ring_size: int
    max_record: int
    max_pending_records: int
    max_pending_bytes: int
    max_peer_backlog: int
    peer_stall_timeout: float
    connect_timeout: float
    log_level: str
    log_format: str
    drain_timeout: float
    poll_us: int
    metrics: dict[str, Any]
    limits: dict[str, int]
    tls: TlsConfig | None = None
    peers: PeerPolicy = PeerPolicy()
    policies: tuple[DeclaredPolicy, ...] = ()
    source: str = "<embedded default>"


def default_text() -> str:
    return resources.files("mrpcd").joinpath("default_config.yaml").read_text()


def _load_mapping(text: str, source: str) -> tuple[dict, yaml.Node | None]:
    """Parse YAML, returning the mapping and its node (for _line_at)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:  # PyYAML composes recursively: thousands of nested [ or { exhaust the stack
        raise ConfigError(f"{source}: not a usable configuration: nested too deeply") from None
    if data is None:
        return {}, None
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:1: the configuration must be a mapping of keys to values")
    _refuse_duplicate_keys(node, source)  # (so a key names one place in its mapping)
    return data, node


def _line_at(node: yaml.Node | None, path: tuple[Any, ...]) -> int | str:
    """The line of the deepest part of `path` (keys, list indexes from the top) that the
    YAML has: a key's own line, a list entry's; "?" if not even the first key is there."""
    line: int | str = "?"
    for step in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(step):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _refuse_duplicate_keys(node: yaml.Node, source: str) -> None:
    """A key given twice in one mapping is refused: YAML forbids it, PyYAML keeps the last one,
    and a second `metrics:` section would silently drop everything the first one set."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:  # an alias: checked once (and no exponential walk through alias chains)
            continue
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    line = k.start_mark.line + 1
                    if k.value in first:
                        raise ConfigError(f"{source}:{line}: duplicate key {k.value!r} (first on line {first[k.value]})")
                    first[k.value] = line
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


def _shown(value: Any, path: tuple[Any, ...]) -> Any:
    """The part of `value` at `path` (for an error message), or `value` if the path is not there."""
    for step in path:
        try:
            value = value[step]
        except (LookupError, TypeError):
            break
    return value


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The embedded default, then the file at `path`, then `overrides` (command line)."""
    values, _ = _load_mapping(default_text(), "<embedded default>")
    values = {k: VALIDATORS[k](v) if k in VALIDATORS else v for k, v in values.items()}
    source = "<embedded default>"
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:  # a SIGHUP with such a file must keep the old config, not raise
            line = exc.object[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
        data, node = _load_mapping(text, path)
        errors = []  # every bad key at once: fixing one to meet the next costs a restart each
        for key, value in data.items():
            where = f"{path}:{_line_at(node, (key,))}"
            if key not in VALIDATORS:
                errors.append(f"{where}: unknown key {key!r}{did_you_mean(key, VALIDATORS)} (known: {', '.join(sorted(VALIDATORS))})")
                continue
            try:
                values[key] = VALIDATORS[key](value)
            except ValueError as exc:  # (a KeyPathError: the line of the key inside the value it names)
                for one in exc.errors if isinstance(exc, KeyPathErrors) else [exc]:
                    sub = tuple(getattr(one, "path", ()))
                    where = f"{path}:{_line_at(node, (key, *sub))}"
                    if key == "policies" and sub:  # the entry, not the whole list (which may be long)
                        errors.append(f"{where}: {key}[{sub[0]}]: {one} (got {_shown(value, sub[:1])!r})")
                    else:
                        errors.append(f"{where}: {key}: {one} (got {value!r})")
                continue
            if key == "policies":  # each entry says where it is declared (mrpcctl policy list, the log)
                values[key] = tuple(replace(e, where=f"{path}:{_line_at(node, (key, i))}") for i, e in enumerate(values[key]))
        if errors:
            raise ConfigError("; ".join(errors), errors)
        source = path
    for key, value in (overrides or {}).items():
        try:
            values[key] = VALIDATORS[key](value)
        except ValueError as exc:
            raise ConfigError(f"command line: {key}: {exc} (got {value!r})") from None
    if values["control_socket"] is None:
        env = os.environ.get("MRPCD_SOCKET")
        values["control_socket"] = env or os.path.join(default_runtime_dir(), "control.sock")
        try:
            _socket_path(values["control_socket"])
        except ValueError as exc:
            where = "MRPCD_SOCKET" if env else "the default control socket path"
            raise ConfigError(f"{where}: {exc} (got {values['control_socket']!r})") from None
    return Config(**values, source=source)

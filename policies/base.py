"""The policy engine interface: what a policy module implements and what the daemon gives it.

A policy is an `Engine` on an app's datapath (see mrpcd/daemon/datapath.py) that an operator
attaches, reconfigures, upgrades and detaches while the app runs. Policies are *sans-I/O*:
they never touch sockets or the event loop. Everything they need from the outside world —
the clock, timers, the app's schema, a way to answer a request with an error, a way to let
records they held back continue — comes from a `PolicyContext` the daemon implements (and
tests replace with `mrpcd.policies.testing.FakeContext` and a fake clock).

Contract (the daemon relies on it):

* `outbound(batch)` / `inbound(batch)` take a list of records and return the list that
  continues down the chain. A policy may pass, drop, hold back (and later hand back with
  `ctx.resume_outbound/resume_inbound`), answer (`ctx.reply_error`), tag or rewrite records.
  Records of one call must keep their order: a policy that holds a call's START also holds
  the records of that call that follow it.
* `reconfigure(config)` validates first (`validate_config`); on error it raises
  `PolicyConfigError` and the old config stays in force.
* `export_state()` is a non-destructive snapshot of plain, msgpack-able data (held records
  as encoded bytes) carrying a `state_version`. `cls.from_state(ctx, config, state)` builds
  a new instance from a state exported by the same or an *older* version of the module.
  Live upgrade: `state = old.export_state(); new = New.from_state(ctx, cfg, state)`; if that
  raises, the old instance is untouched and keeps running; if it succeeds, the daemon swaps
  `new` in between two batches and calls `old.close(handed_over=True)`.
* `close()` (detach) cancels the policy's timers and returns the records it still holds as
  `HeldRecords(outbound, inbound)`; the daemon re-injects them *after* the policy's position,
  so a detach loses nothing. `close(handed_over=True)` only cancels timers (the held
  records now belong to the new version).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import itertools
import sys
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Protocol, cast, runtime_checkable

from ..daemon.datapath import Engine
from ..marshal import records as R
from ..marshal.schema import Method, Schema
from ..typo_hints import closest, did_you_mean

__all__ = [
    "PolicyConfigError", "PolicySchemaError", "PolicyLoadError", "PolicyStateError", "PolicyContext", "TimerHandle",
    "Policy", "HeldRecords", "CallTracker", "ConfigReader", "BUILTINS", "load_policy_module",
    "encode_records", "decode_records", "status_code", "is_request_start", "is_final_response",
]


class PolicyConfigError(ValueError):
    """A policy's config is invalid; the message names the policy and the key."""


class PolicySchemaError(PolicyConfigError):
    """A config names something (a method) the app's schema does not have: yet. Apart from
    other config errors so a config checked without any app (a policy declared in the
    daemon's config file) can tell "wrong for every app" from "wrong for this app's schema"."""


class PolicyLoadError(ImportError):
    """A policy module cannot be loaded (import failed, no POLICY, not a Policy subclass)."""


class PolicyStateError(ValueError):
    """A state handed to from_state() cannot be taken over (e.g. from a newer version)."""


# ---------------------------------------------------------------------------------------
# What the daemon provides


@runtime_checkable
class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class PolicyContext(Protocol):
    """What a policy sees of the daemon: one instance per (app, attached policy) or per app.

    * `app_id`, `app_name`: the app this datapath belongs to.
    * `schema`: the app's `mrpcd.marshal.schema.Schema` (everything it registered).
    * `method(method_id)`: the schema's Method for an id, or None if the app does not know it.
    * `now()`: monotonic seconds (the only clock a policy may use).
    * `call_later(delay, fn)`: run `fn()` after `delay` seconds on the daemon's loop; returns a
      handle with `.cancel()`.
    * `resume_outbound(engine, records)` / `resume_inbound(engine, records)`: records `engine`
      held back continue through the chain *after* `engine` (outbound: towards the network;
      inbound: towards the app). They must enter the rest of the chain before any batch in
      the same direction that arrives later (running them at once is simplest); policies
      call these only after their own state is updated, so re-entrancy is safe.
    * `reply_error(record, code, details)`: answer the request `record` with a final status
      (RESPONSE START|END|NO_MSG, `:details`); the request does not go on. The answer goes to
      whoever sent the request: the app for a request the app sent (client side, outbound),
      the peer for a request that came from the network (server side, inbound); the daemon
      tells them apart by the record's handle (route role).
    * `log(level, msg, **fields)`: structured log line (`level` a logging level name or int).
    * `globals`: a dict shared by every context of the daemon (the same object for every
      app), where global policies (e.g. the QoS scheduler) keep their shared objects.
    """

    app_id: int
    app_name: str
    globals: dict[str, Any]

    @property
    def schema(self) -> Schema: ...  # (read-only for the policy: the daemon's context derives it)

    def method(self, method_id: int) -> Method | None: ...

    def now(self) -> float: ...

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle: ...

    def resume_outbound(self, engine: Engine, records: list[R.Record]) -> None: ...

    def resume_inbound(self, engine: Engine, records: list[R.Record]) -> None: ...

    def reply_error(self, record: R.Record, code: int, details: str) -> None: ...

    def log(self, level: int | str, msg: str, **fields: Any) -> None: ...


class HeldRecords(NamedTuple):
    """Records a closed policy still held, per direction, in the order they arrived."""

    outbound: list[R.Record]
    inbound: list[R.Record]


# ---------------------------------------------------------------------------------------
# Small helpers shared by the built-ins

_CODE_NAMES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
CODE_NAMES_BY_INT = {v: k for k, v in _CODE_NAMES.items()}
OK, CANCELLED, INVALID_ARGUMENT, PERMISSION_DENIED = 0, 1, 3, 7
RESOURCE_EXHAUSTED, UNAVAILABLE = 8, 14


def status_code(value: Any) -> int | None:
    """A grpc status code from an int (0..16) or a name ("UNAVAILABLE"); None if neither."""
    if type(value) is int and 0 <= value <= 16:
        return value
    if isinstance(value, str):
        return _CODE_NAMES.get(value.upper())
    return None


def is_request_start(rec: R.Record) -> bool:
    return rec.kind == R.REQUEST and bool(rec.flags & R.F_START)


def is_final_response(rec: R.Record) -> bool:
    return rec.kind == R.RESPONSE and bool(rec.flags & R.F_END)


def encode_records(recs: Iterable[R.Record]) -> list[bytes]:
    return [r.encode() for r in recs]


def decode_records(datas: Iterable[bytes]) -> list[R.Record]:
    return [R.parse_record(bytes(d)) for d in datas]


def metadata_value(rec: R.Record, key: str) -> str | bytes | None:
    """The first value of metadata `key` on `rec`, or None (malformed metadata: None)."""
    if not rec.meta:
        return None
    try:
        pairs = R.decode_metadata(rec.meta)
    except R.RecordError:
        return None
    for k, v in pairs:
        if k == key:
            return v
    return None


class CallTracker:
    """Remembers a value per call, (handle, call_id), from the call's START record on.

    Non-START records of a stream carry no method_id; a policy that needs the method (or its
    own per-call data) for them records it here when it sees the START. Bounded: beyond
    `max_calls` the oldest entries are forgotten (and counted in `evicted`). Entries are
    removed when the call ends: on its final RESPONSE (END) or a CANCEL (`observe` does
    that), or explicitly with `pop`.
    """

    __slots__ = ("max_calls", "_calls", "evicted")

    def __init__(self, max_calls: int = 65536) -> None:
        self.max_calls = max_calls
        self._calls: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._calls

    def put(self, rec: R.Record, value: Any) -> None:
        self.put_key((rec.handle, rec.call_id), value)

    def put_key(self, key: tuple[int, int], value: Any) -> None:
        calls = self._calls
        calls[key] = value
        calls.move_to_end(key)
        while len(calls) > self.max_calls:
            calls.popitem(last=False)
            self.evicted += 1

    def get(self, rec: R.Record, default: Any = None) -> Any:
        return self._calls.get((rec.handle, rec.call_id), default)

    def pop(self, rec: R.Record, default: Any = None) -> Any:
        return self._calls.pop((rec.handle, rec.call_id), default)

    def observe(self, rec: R.Record) -> int | None:
        """Track methods: returns the call's method_id (from START, or remembered), or None.

        A REQUEST START stores its method_id; a final RESPONSE or a CANCEL removes the entry.
        """
        key = (rec.handle, rec.call_id)
        if rec.kind == R.REQUEST and rec.flags & R.F_START:
            self.put_key(key, rec.method_id)
            return rec.method_id
        if rec.kind == R.CANCEL or (rec.kind == R.RESPONSE and rec.flags & R.F_END):
            return self._calls.pop(key, None)
        return self._calls.get(key)

    def drop_handle(self, handle: int) -> list[Any]:
        """Forget every call of route `handle` (it closed: no final record of them will
        come); returns their values."""
        keys = [k for k in self._calls if k[0] == handle]
        return [self._calls.pop(k) for k in keys]

    def items(self) -> list[tuple[tuple[int, int], Any]]:
        return list(self._calls.items())

    def clear(self) -> None:
        self._calls.clear()


_MISSING = object()


class ConfigReader:
    """Validates a policy's config dict key by key with messages naming the key.

    r = ConfigReader("ratelimit", config); rate = r.number("rate", required=True, gt=0)
    ...; r.finish() rejects keys nobody asked for (typos must not pass silently).
    """

    def __init__(self, policy: str, config: Any, where: str = "") -> None:
        self.policy = policy
        self.where = where
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise self.error(None, f"config must be a mapping, got {type(config).__name__}")
        self.config = config
        self.seen: set[str] = set()

    def error(self, key: str | None, msg: str) -> PolicyConfigError:
        name = f"{self.where}{key}" if key is not None else self.where.rstrip(".")
        if name:
            return PolicyConfigError(f"{self.policy}: config key {name!r}: {msg}")
        return PolicyConfigError(f"{self.policy}: {msg}")

    def raw(self, key: str, default: Any = _MISSING, required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.config or self.config[key] is None:
            if required:
                close = closest(key, [k for k in self.config if isinstance(k, str) and k not in self.seen])
                raise self.error(key, f"is required (the config has {close!r}: a typo?)" if close else "is required")
            return None if default is _MISSING else default
        return self.config[key]

    def number(self, key: str, default: Any = None, *, required: bool = False, gt: float | None = None,
               ge: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
        v = self.raw(key, default, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise self.error(key, f"must be a finite number, got {v!r}")
        self._bounds(key, v, gt, ge, le, lt)
        return float(v)

    def integer(self, key: str, default: Any = None, *, required: bool = False, gt: int | None = None,
                ge: int | None = None, le: int | None = None) -> Any:
        v = self.raw(key, default, required)
        if v is None:
            return None
        if type(v) is not int:
            raise self.error(key, f"must be an integer, got {v!r}")
        self._bounds(key, v, gt, ge, le, None)
        return v

    def _bounds(self, key: str, v: Any, gt: Any, ge: Any, le: Any, lt: Any) -> None:
        if gt is not None and not v > gt:
            raise self.error(key, f"must be > {gt}, got {v!r}")
        if ge is not None and not v >= ge:
            raise self.error(key, f"must be >= {ge}, got {v!r}")
        if le is not None and not v <= le:
            raise self.error(key, f"must be <= {le}, got {v!r}")
        if lt is not None and not v < lt:
            raise self.error(key, f"must be < {lt}, got {v!r}")

    def string(self, key: str, default: Any = None, *, required: bool = False, choices: Iterable[str] | None = None) -> Any:
        v = self.raw(key, default, required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self.error(key, f"must be a string, got {v!r}")
        if choices is not None:
            choices = list(choices)
            if v not in choices:
                raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
        return v

    def boolean(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        v = self.raw(key, default, required)
        if v is None:
            return None
        if not isinstance(v, bool):
            raise self.error(key, f"must be true or false, got {v!r}")
        return v

    def mapping(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        v = self.raw(key, default, required)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.error(key, f"must be a mapping, got {type(v).__name__}")
        return v

    def sequence(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        v = self.raw(key, default, required)
        if v is None:
            return None
        if not isinstance(v, (list, tuple)):
            raise self.error(key, f"must be a list, got {type(v).__name__}")
        return list(v)

    def code(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        v = self.raw(key, default, required)
        if v is None:
            return None
        c = status_code(v)
        if c is None:
            raise self.error(key, f"must be a grpc status code (0..16 or a name like 'UNAVAILABLE'), got {v!r}")
        return c

    def sub(self, key: str, value: Any) -> "ConfigReader":
        return ConfigReader(self.policy, value, f"{self.where}{key}.")

    def finish(self) -> None:
        extra = sorted(set(self.config) - self.seen, key=str)
        if extra:
            known = ", ".join(sorted(self.seen))
            raise self.error(str(extra[0]), f"unknown key{did_you_mean(extra[0], sorted(self.seen))} (known keys: {known})")


def check_method_path(reader: ConfigReader, key: str, schema: Schema, path: Any) -> Method:
    """The schema's Method for a "/pkg.Service/Method" path, or a PolicyConfigError."""
    if not isinstance(path, str):
        raise reader.error(key, f"method must be a string like '/pkg.Service/Method', got {path!r}")
    for svc in schema.services.values():
        for m in svc.methods:
            if m.path == path:
                return m
    known = sorted(m.path for s in schema.services.values() for m in s.methods)
    hint = f" (the app knows: {', '.join(known[:10])}{', ...' if len(known) > 10 else ''})" if known else " (the app registered no services)"
    raise PolicySchemaError(str(reader.error(key, f"unknown method {path!r}{hint}")))


# ---------------------------------------------------------------------------------------
# The Policy base class


class Policy(Engine):
    """Base of every policy. Subclasses set `name`, `version`, `state_version` and override
    `validate_config` (pure: returns the normalised config or raises PolicyConfigError),
    `apply_config` (installs a validated config), the datapath hooks, and
    `save_state` / `load_state` for live upgrade."""

    name = "policy"
    version = "0"
    state_version = 1  # bump when the exported state's shape changes; load_state reads older ones
    # True: at most one instance per app (qos: an app is one member of a shared scheduler)
    one_per_app = False

    def __init__(self, ctx: PolicyContext, config: dict[str, Any] | None = None) -> None:
        self.ctx = ctx
        self.counters: dict[str, int] = {}
        self.config: dict[str, Any] = {}
        self._timers: set[Any] = set()
        self._closed = False
        normalised = self.validate_config(config if config is not None else {})
        self.config = normalised
        self.raw_config = dict(config or {})
        self.apply_config(normalised)

    # -- config ------------------------------------------------------------------------
    def validate_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Check a config without side effects; return it normalised. Default: no keys."""
        ConfigReader(self.name, config).finish()
        return {}

    def apply_config(self, config: dict[str, Any]) -> None:
        """Install a config that validate_config accepted (must not fail)."""

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Validate, then apply; on a bad config raise PolicyConfigError and keep the old one."""
        normalised = self.validate_config(config if config is not None else {})
        self.check_change(normalised)
        self.config = normalised
        self.raw_config = dict(config or {})
        self.apply_config(normalised)
        self.count("reconfigured")

    def check_change(self, config: dict[str, Any]) -> None:
        """Refuse (PolicyConfigError) a valid, normalised config that cannot replace the
        running one now, given what the policy holds. Default: any valid config can."""

    # -- datapath ------------------------------------------------------------------------
    def outbound(self, batch: list[R.Record]) -> list[R.Record]:
        return batch

    def inbound(self, batch: list[R.Record]) -> list[R.Record]:
        return batch

    # -- live upgrade ----------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """Plain, msgpack-able snapshot (non-destructive) for a newer version to take over."""
        state = {
            "policy": self.name,
            "version": self.version,
            "state_version": self.state_version,
            "counters": dict(self.counters),
        }
        state.update(self.save_state())
        return state

    @classmethod
    def from_state(cls, ctx: PolicyContext, config: dict[str, Any] | None, state: dict[str, Any]) -> "Policy":
        """A new instance continuing from `state` (exported by this or an older version)."""
        if not isinstance(state, dict):
            raise PolicyStateError(f"{cls.name}: state must be a mapping, got {type(state).__name__}")
        sv = state.get("state_version", 1)
        if type(sv) is not int or sv > cls.state_version:
            raise PolicyStateError(
                f"{cls.name} {cls.version}: cannot take over state_version {sv!r} "
                f"(this version reads up to {cls.state_version}); downgrades need a compatible module")
        if state.get("policy", cls.name) != cls.name:
            raise PolicyStateError(f"{cls.name}: state was exported by policy {state.get('policy')!r}")
        obj = cls(ctx, config)
        counters = state.get("counters") or {}
        if isinstance(counters, dict):
            for k, v in counters.items():
                if isinstance(k, str) and type(v) is int:
                    obj.counters[k] = obj.counters.get(k, 0) + v
        try:
            obj.load_state(state, sv)
        except PolicyStateError:
            obj.close(handed_over=True)
            raise
        except (KeyError, TypeError, ValueError, IndexError, R.RecordError) as exc:
            obj.close(handed_over=True)
            raise PolicyStateError(f"{cls.name} {cls.version}: malformed state: {exc!r}") from None
        except BaseException:  # any other failure: the half-built instance must not run on
            obj.close(handed_over=True)  # (its timers would release the old one's calls again)
            raise
        return obj

    def save_state(self) -> dict[str, Any]:
        """The policy's own part of export_state (besides name/version/counters)."""
        return {}

    def on_installed(self) -> None:
        """The upgrade that built this instance from_state has put it on the chain. What
        load_state took over and may go on at once goes from here: released from load_state
        it would leave before the instance is on the chain, and a second time (from the old
        instance) if the upgrade were refused."""

    def load_state(self, state: dict[str, Any], state_version: int) -> None:
        """Take over `state` (written by state_version <= self.state_version). Release
        nothing here (see on_installed)."""

    # -- lifecycle ----------------------------------------------------------------------
    def held(self) -> HeldRecords:
        """The records this policy holds back right now (close() hands them back)."""
        return HeldRecords([], [])

    def drop_held(self) -> None:
        """Forget held records (they were handed over or handed back)."""

    def close(self, handed_over: bool = False) -> HeldRecords:
        """Detach: cancel timers and return what is still held (the daemon re-injects it).

        With handed_over=True (after a successful upgrade) held records belong to the new
        version and nothing is returned.
        """
        self._closed = True
        for t in list(self._timers):
            try:
                t.cancel()
            except Exception:
                pass
        self._timers.clear()
        held = HeldRecords([], []) if handed_over else self.held()
        self.drop_held()
        return held

    @property
    def closed(self) -> bool:
        return self._closed

    def describe(self) -> dict[str, Any]:
        held = self.held()
        return {
            "name": self.name,
            "version": self.version,
            "config": self.raw_config,
            "counters": dict(self.counters),
            "held": {"outbound": len(held.outbound), "inbound": len(held.inbound)},
        }

    # -- helpers for subclasses -------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def call_later(self, delay: float, fn: Callable[[], None]) -> Any:
        """ctx.call_later, remembered so close() cancels it; does nothing once closed."""
        if self._closed:
            return None
        holder: list[Any] = []

        def run() -> None:
            if holder:
                self._timers.discard(holder[0])
            if not self._closed:
                fn()

        handle = self.ctx.call_later(max(0.0, delay), run)
        holder.append(handle)
        self._timers.add(handle)
        return handle

    def cancel_timer(self, handle: Any) -> None:
        if handle is not None:
            handle.cancel()
            self._timers.discard(handle)

    def resume(self, direction: str, records: list[R.Record]) -> None:
        if not records or self._closed:
            return
        if direction == "outbound":
            self.ctx.resume_outbound(self, records)
        else:
            self.ctx.resume_inbound(self, records)


class CallGate(Policy):
    """Base of the policies that decide on each call as it starts, in the direction its
    requests travel: fault, ratelimit, acl, admission, vtc.

    Why one base: they all walk a batch the same way and differ only in their decisions.
    Only REQUEST and CANCEL records concern them (everything else passes in order); a
    REQUEST START goes to `on_start`; the later records of a call the gate refused (answered
    with an error) are dropped until its request stream ends (END or CANCEL), so the peer
    never sees the rest of a call that was already answered; every other later record goes
    to `on_later`. Records the hooks do not append to `out` are dropped or held by them.

    Subclasses implement `on_start`, and override `on_later` (default: pass), `on_batch`
    (called once before each request batch, e.g. to read the clock once),
    `request_direction` (default: the `direction` config key) and `other_direction` (the
    batches going the other way; default: pass untouched)."""

    def __init__(self, ctx: PolicyContext, config: dict[str, Any] | None = None) -> None:
        self.refused = KeySet()  # calls answered with an error: their later records are dropped
        super().__init__(ctx, config)

    def handle_closed(self, handle: int) -> None:
        """The route closed: forget its refused calls, and its calls in `self.calls` (a
        CallTracker, where a gate keeps one) — without this they stay until evicted, or,
        where the tracker never evicts (acl), for good. Gates that count outcomes override
        this to count the lost calls first."""
        self.refused.drop_handle(handle)
        calls = getattr(self, "calls", None)
        if isinstance(calls, CallTracker):
            calls.drop_handle(handle)

    def request_direction(self) -> str:
        return self.config["direction"]

    def request_direction_of(self, config: dict[str, Any]) -> str:
        """The direction requests travel under the normalised `config`."""
        return config["direction"]

    def check_change(self, config: dict[str, Any]) -> None:
        """Held calls are released in the request direction: switching it while calls are
        held would send them the wrong way (an app's own request delivered back to it)."""
        new = self.request_direction_of(config)
        if new != self.request_direction():
            held = self.held()
            n = len(held.outbound) + len(held.inbound)
            if n:
                raise PolicyConfigError(
                    f"{self.name}: cannot switch requests to {new} while {n} records of held calls "
                    f"wait to go {self.request_direction()}; retry when they are released, or detach and attach")

    def outbound(self, batch: list[R.Record]) -> list[R.Record]:
        if self.request_direction() == "outbound":
            return self.requests(batch)
        return self.other_direction(batch)

    def inbound(self, batch: list[R.Record]) -> list[R.Record]:
        if self.request_direction() == "inbound":
            return self.requests(batch)
        return self.other_direction(batch)

    def other_direction(self, batch: list[R.Record]) -> list[R.Record]:
        return batch

    def on_batch(self) -> None:
        """Called once before each batch of the requests' direction."""

    def on_start(self, rec: R.Record, out: list[R.Record]) -> None:
        """A call's REQUEST START: append it to `out` to let it go on, or hold or refuse it
        (a refused call that has more to send goes into `self.refused`)."""
        raise NotImplementedError

    def on_later(self, rec: R.Record, key: tuple[int, int], out: list[R.Record]) -> None:
        """A later REQUEST or a CANCEL of a call not refused (`key` = (handle, call_id))."""
        out.append(rec)

    def requests(self, batch: list[R.Record]) -> list[R.Record]:
        out: list[R.Record] = []
        refused = self.refused
        self.on_batch()
        for rec in batch:
            kind = rec.kind
            if kind != R.REQUEST and kind != R.CANCEL:
                out.append(rec)
            elif kind == R.REQUEST and rec.flags & R.F_START:
                self.on_start(rec, out)
            else:
                key = (rec.handle, rec.call_id)
                if key in refused:
                    if ends_request_stream(rec):
                        refused.discard(key)
                else:
                    self.on_later(rec, key, out)
        return out


# ---------------------------------------------------------------------------------------
# Loading policy modules

BUILTINS = {
    "ratelimit": "mrpcd.policies.ratelimit",
    "acl": "mrpcd.policies.acl",
    "qos": "mrpcd.policies.qos",
    "fault": "mrpcd.policies.fault",
    "metrics": "mrpcd.policies.metrics",
    "admission": "mrpcd.policies.admission",
    "vtc": "mrpcd.policies.vtc",
}
_fresh = itertools.count(1)
_latest: dict[str, Any] = {}  # dotted name -> the newest valid copy an upgrade loaded (attach takes it)


def import_current(name: str) -> Any:
    """The module as the newest upgrade of `name` left it, else as imported."""
    module = _latest.get(name)
    return module if module is not None else importlib.import_module(name)


def import_fresh(name: str) -> Any:
    """`importlib.import_module(name)`, except that a module imported before (an earlier
    upgrade to the same dotted name) is loaded again from its source, so an upgrade runs the
    code now on disk instead of the cached module. The new copy gets a fresh name (in the
    same package, so relative imports work) and the cached module is left as it was: the
    running version keeps its globals, and a copy that fails to import changes nothing.
    mrpcd's own modules (the built-in policies and transport) are never loaded twice."""
    old = sys.modules.get(name)
    if old is None or name == "mrpcd" or name.startswith("mrpcd."):
        return importlib.import_module(name)
    spec = getattr(old, "__spec__", None)
    origin = getattr(spec, "origin", None)
    if spec is None or not getattr(spec, "has_location", False) or not isinstance(origin, str) or not origin.endswith(".py"):
        return old  # built into the interpreter, or not loaded from a source file: nothing to re-read
    is_package = spec.submodule_search_locations is not None
    fresh = f"{name}__mrpcd_upgrade_{next(_fresh)}"
    new_spec = importlib.util.spec_from_file_location(fresh, origin, submodule_search_locations=spec.submodule_search_locations)
    # (origin ends in .py: the source loader always takes it, so there is a spec)
    module = importlib.util.module_from_spec(cast(importlib.machinery.ModuleSpec, new_spec))
    if is_package:
        module.__package__ = name
    with open(origin, "rb") as f:  # from the source itself: a .pyc of an edit in the same second would look current
        code = compile(importlib.util.decode_source(f.read()), origin, "exec", dont_inherit=True)
    sys.modules[fresh] = module  # dataclasses and pickling look modules up here
    try:
        exec(code, module.__dict__)
    finally:
        sys.modules.pop(fresh, None)
    return module


def load_policy_module(spec: str, fresh: bool = False) -> type[Policy]:
    """Load a policy class: a built-in short name ("ratelimit"), a dotted module name, or a
    path to a .py file. A file is imported under a fresh module name every time, so loading
    it again (an upgrade) really runs the new code. The module must export `POLICY = Cls`
    with Cls a Policy subclass. A dotted module is imported once (attaching it to several
    apps shares its module-level state); `fresh` (an upgrade) runs its current code again
    under a new name (import_fresh). Any failure is a PolicyLoadError that says what went wrong.
    """
    if not isinstance(spec, str) or not spec:
        raise PolicyLoadError(f"policy module must be a name or a path, got {spec!r}")
    is_path = spec.endswith(".py") or "/" in spec or spec.startswith(".")
    if is_path:
        path = Path(spec)
        if not path.is_file():
            raise PolicyLoadError(f"policy module {spec}: no such file")
        modname = f"mrpcd_policy_{path.stem.replace('-', '_')}_{next(_fresh)}"
        try:
            mspec = importlib.util.spec_from_file_location(modname, str(path))
            if mspec is None or mspec.loader is None:
                raise PolicyLoadError(f"policy module {spec}: not an importable Python file")
            module = importlib.util.module_from_spec(mspec)
            sys.modules[modname] = module  # dataclasses and pickling look modules up here
            try:
                mspec.loader.exec_module(module)
            finally:
                sys.modules.pop(modname, None)
        except PolicyLoadError:
            raise
        except (Exception, SystemExit) as exc:  # SyntaxError, ImportError, anything it raises
            raise PolicyLoadError(f"policy module {spec} failed to import: {_exc_text(exc)}") from exc
    else:
        name = BUILTINS.get(spec, spec)
        try:
            module = import_fresh(name) if fresh else import_current(name)
        except (Exception, SystemExit) as exc:
            known = ", ".join(sorted(BUILTINS))
            raise PolicyLoadError(f"policy module {spec} failed to import: {_exc_text(exc)} (built-ins: {known})") from exc
    cls = getattr(module, "POLICY", None)
    if cls is None:
        raise PolicyLoadError(f"policy module {spec} has no POLICY (it must export POLICY = YourPolicyClass)")
    if not isinstance(cls, type) or not issubclass(cls, Policy):
        raise PolicyLoadError(
            f"policy module {spec}: POLICY is {cls!r}, not a subclass of mrpcd.policies.base.Policy")
    if cls is Policy:
        raise PolicyLoadError(f"policy module {spec}: POLICY is the Policy base class itself")
    for attr in ("name", "version"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise PolicyLoadError(f"policy module {spec}: {cls.__name__}.{attr} must be a non-empty string")
    if fresh and not is_path:
        _latest[BUILTINS.get(spec, spec)] = module  # later attaches get the upgraded code too
    return cls


def _exc_text(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text.replace("\n", " | ")


# ---------------------------------------------------------------------------------------
# Holding calls back


class HeldCall:
    """One held call: its START record, the records of the same call that followed it, and
    whatever the policy wants to remember about it (`data`, plain data)."""

    __slots__ = ("key", "records", "data")

    def __init__(self, key: tuple[int, int], records: list[R.Record], data: Any = None) -> None:
        self.key = key
        self.records = records
        self.data = data


class HeldCalls:
    """A FIFO of held calls. A call is held from its START; later records of the same call
    are appended to it (`absorb`) so they cannot overtake it; release hands back the whole
    call in order. Export as plain data: [[[record bytes, ...], data], ...]."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[tuple[int, int], HeldCall] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._calls

    def __iter__(self):
        return iter(list(self._calls.values()))

    def hold(self, rec: R.Record, data: Any = None) -> HeldCall:
        rec.own()  # held for long: stop pinning the whole batch buffer it was popped into
        key = (rec.handle, rec.call_id)
        call = self._calls.get(key)
        if call is not None:  # a second START for a held call: keep it behind the first
            call.records.append(rec)
            return call
        call = self._calls[key] = HeldCall(key, [rec], data)
        return call

    def put(self, call: HeldCall) -> None:
        """Append an already-built held call (moved from another queue or from state)."""
        self._calls[call.key] = call

    def absorb(self, rec: R.Record) -> bool:
        """Append `rec` to its held call, if its call is held here."""
        call = self._calls.get((rec.handle, rec.call_id))
        if call is None:
            return False
        call.records.append(rec.own())
        return True

    def peek(self) -> HeldCall | None:
        return next(iter(self._calls.values()), None)

    def popleft(self) -> HeldCall:
        key = next(iter(self._calls))
        return self._calls.pop(key)

    def remove(self, key: tuple[int, int]) -> HeldCall | None:
        return self._calls.pop(key, None)

    def records(self) -> list[R.Record]:
        return [r for c in self._calls.values() for r in c.records]

    def clear(self) -> None:
        self._calls.clear()

    def to_state(self) -> list[list[Any]]:
        return [[[r.encode() for r in c.records], c.data] for c in self._calls.values()]

    @classmethod
    def from_state(cls, items: Any) -> "HeldCalls":
        held = cls()
        for recs, data in items or []:
            parsed = [R.parse_record(bytes(b)) for b in recs]
            if not parsed:
                continue
            first = parsed[0]
            call = held.hold(first, data)
            call.records.extend(parsed[1:])
        return held


class KeySet:
    """A bounded insertion-ordered set of call keys (e.g. calls a policy rejected, whose
    later records it must drop)."""

    __slots__ = ("_d", "max_size")

    def __init__(self, max_size: int = 65536) -> None:
        self._d: dict[tuple[int, int], None] = {}
        self.max_size = max_size

    def add(self, key: tuple[int, int]) -> None:
        self._d[key] = None
        while len(self._d) > self.max_size:
            del self._d[next(iter(self._d))]

    def discard(self, key: tuple[int, int]) -> None:
        self._d.pop(key, None)

    def drop_handle(self, handle: int) -> None:
        for key in [k for k in self._d if k[0] == handle]:
            del self._d[key]

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def to_state(self) -> list[list[int]]:
        return [list(k) for k in self._d]

    def load(self, items: Any) -> None:
        for h, c in items or []:
            self.add((int(h), int(c)))


def ends_request_stream(rec: R.Record) -> bool:
    """The last record the requester sends for a call: a REQUEST with END, or a CANCEL."""
    return rec.kind == R.CANCEL or (rec.kind == R.REQUEST and bool(rec.flags & R.F_END))


def check_direction(reader: ConfigReader, key: str = "direction", default: str = "outbound") -> str:
    return reader.string(key, default, choices=("outbound", "inbound"))

"""Content ACL: allow or deny calls by method and by the value of a request field.

Why: the operator enforces rules on what an app may ask ("no reservations for customer X",
"only these tenants may call Admin") outside the app, where the app cannot bypass them.

TOCTOU safety: the field is read (codec.read_field, which decodes that one field and only
skips the rest) from `record.payload`, which is a private copy the daemon made when it popped
the record from the app's shared-memory ring. The app can rewrite its ring after submitting,
but not this copy, and the bytes checked are the bytes that are sent: no time-of-check /
time-of-use hole.

Config keys:
  rules      list of rules, checked in order, first match wins. A rule:
               method   "/pkg.Service/Method" (must be in the app's schema), or "*" (any
                        method; then no `field`).
               field    optional dotted path into the method's request message ("a.b"); the
                        field must be a single (or optional) scalar or enum field.
               op       with `field`: "eq" | "ne" | "in" | "not_in" | "regex" (re.fullmatch,
                        string fields) | "lt" | "gt" (numeric fields) | "prefix" (string or
                        bytes fields).
               value    the operand (a list for in / not_in; enum values by number or name).
               action   "deny" (default) | "allow".
               details  status details sent on deny (default names the rule).
             A field that is unset (inside an unset message) matches no op.
  default    "allow" (default) | "deny": the action when no rule matches.
  direction  "outbound" (default: the app's own calls, client side) | "inbound" (calls
             arriving from the network on a server app's datapath).
  max_streams  int >= 1 (default 65536): request streams (calls whose START did not end
             their request side) checked at once. A new stream beyond it is refused with
             RESOURCE_EXHAUSTED. Streams are never forgotten to make room: the later
             messages of a forgotten stream could no longer be checked.

Every request message of a call is checked (client streams too). A denied call is answered
PERMISSION_DENIED with the rule's details; when the deny hits a later message of a stream
that already went on, the call is also cancelled downstream (a CANCEL record replaces the
message). A payload that cannot be decoded is denied with INVALID_ARGUMENT (fail closed).
A START that carries no message (client streaming) is decided by method-only rules; field
rules and the default then apply to its messages. Messages of a call the ACL never saw start
(it was attached mid-call) go on unchecked.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Callable, cast

from ..marshal import codec
from ..marshal import records as R
from ..marshal.schema import FLOAT_KINDS, INT_RANGES, Schema
from .base import (
    INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED, CallGate, CallTracker, ConfigReader,
    check_direction, check_method_path,
)

OPS = ("eq", "ne", "in", "not_in", "regex", "lt", "gt", "prefix")


class Rule:
    __slots__ = ("index", "method_id", "path", "field", "pred", "allow", "details")

    def __init__(self, index: int, method_id: int | None, path: str, field: str | None,
                 pred: Callable[[Any], bool] | None, allow: bool, details: str) -> None:
        self.index, self.method_id, self.path, self.field = index, method_id, path, field
        self.pred, self.allow, self.details = pred, allow, details


def _resolve_field(r: ConfigReader, key: str, schema: Schema, message: str, path: Any) -> Any:
    if not isinstance(path, str) or not path:
        raise r.error(key, f"field must be a dotted field path like 'a.b', got {path!r}")
    cur = message
    parts = path.split(".")
    f: Any  # set by the loop (a path has at least one part) or it raises
    for i, part in enumerate(parts):
        msg = schema.messages[cur]
        f = next((x for x in msg.fields if x.name == part), None)
        if f is None:
            names = ", ".join(x.name for x in msg.fields)
            raise r.error(key, f"message {cur} has no field {part!r} (fields: {names})")
        if i < len(parts) - 1:
            if f.type.kind != "message" or f.label in ("repeated", "map"):
                raise r.error(key, f"{cur}.{part} is not a single message field, cannot go into it")
            cur = f.type.ref
    if f.label in ("repeated", "map") or f.type.kind == "message":
        raise r.error(key, f"{cur}.{f.name} is a {f.label if f.label != 'single' else 'message'} field; rules apply to scalar and enum fields")
    return f


def _operand(r: ConfigReader, key: str, schema: Schema, f: Any, v: Any) -> Any:
    """Check one operand against the field's kind; return it in the decoded value's form."""
    kind = f.type.kind
    bad = r.error(key, f"value {v!r} does not fit field {f.name!r} of type {f.type.ref or kind}")
    if kind == "string":
        if not isinstance(v, str):
            raise bad
        return v
    if kind == "bytes":
        if isinstance(v, str):
            return v.encode("utf-8")
        if isinstance(v, bytes):
            return v
        raise bad
    if kind == "bool":
        if not isinstance(v, bool):
            raise bad
        return v
    if kind in INT_RANGES:
        if type(v) is not int:
            raise bad
        return v
    if kind in FLOAT_KINDS:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad
        return float(v)
    if kind == "enum":
        values = dict(schema.enums[f.type.ref].values)
        if isinstance(v, str):
            if v not in values:
                raise r.error(key, f"{v!r} is not a value of enum {f.type.ref} ({', '.join(values)})")
            return values[v]
        if type(v) is int:
            return v
        raise bad
    raise bad


def _predicate(r: ConfigReader, key: str, schema: Schema, f: Any, op: str, value: Any) -> Callable[[Any], bool]:
    kind = f.type.kind
    if op in ("eq", "ne"):
        want = _operand(r, f"{key}.value", schema, f, value)
        return (lambda x: x == want) if op == "eq" else (lambda x: x != want)
    if op in ("in", "not_in"):
        if not isinstance(value, (list, tuple)):
            raise r.error(f"{key}.value", f"op {op!r} needs a list of values, got {value!r}")
        items = [_operand(r, f"{key}.value", schema, f, v) for v in value]
        try:
            s: Any = frozenset(items)
        except TypeError:
            s = items
        return (lambda x: x in s) if op == "in" else (lambda x: x not in s)
    if op == "regex":
        if kind != "string":
            raise r.error(f"{key}.op", f"op 'regex' needs a string field, {f.name!r} is {kind}")
        if not isinstance(value, str):
            raise r.error(f"{key}.value", f"op 'regex' needs a pattern string, got {value!r}")
        try:
            pat = re.compile(value)
        except re.error as exc:
            raise r.error(f"{key}.value", f"bad regular expression {value!r}: {exc}") from None
        return lambda x: pat.fullmatch(x) is not None
    if op in ("lt", "gt"):
        if kind not in INT_RANGES and kind not in FLOAT_KINDS:
            raise r.error(f"{key}.op", f"op {op!r} needs a numeric field, {f.name!r} is {kind}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise r.error(f"{key}.value", f"op {op!r} needs a number, got {value!r}")
        return (lambda x: x < value) if op == "lt" else (lambda x: x > value)
    if op == "prefix":
        if kind not in ("string", "bytes"):
            raise r.error(f"{key}.op", f"op 'prefix' needs a string or bytes field, {f.name!r} is {kind}")
        want = _operand(r, f"{key}.value", schema, f, value)
        return lambda x: x.startswith(want)
    raise r.error(f"{key}.op", f"unknown op {op!r} (ops: {', '.join(OPS)})")


class Acl(CallGate):
    name = "acl"
    version = "1.0"
    state_version = 1

    def __init__(self, ctx: Any, config: dict[str, Any] | None = None) -> None:
        # No eviction (the limit is max_streams, checked before a stream is added): an
        # evicted stream's later messages would pass unchecked.
        self.calls = CallTracker(max_calls=sys.maxsize)
        self.by_method: dict[int, list[Rule]] = {}
        self.any_rules: list[Rule] = []
        super().__init__(ctx, config)

    def validate_config(self, config: dict[str, Any]) -> dict[str, Any]:
        r = ConfigReader(self.name, config)
        schema = self.ctx.schema
        rules = []
        for i, spec in enumerate(r.sequence("rules", [])):
            key = f"rules[{i}]"
            rr = r.sub(key, spec)
            path = rr.raw("method", required=True)
            field = rr.raw("field")
            if path == "*":
                method_id, message = None, None
                if field is not None:
                    raise rr.error("field", "a rule for method '*' cannot test a field (methods have different request types)")
            else:
                m = check_method_path(rr, "method", schema, path)
                method_id, message = m.method_id, m.input
            allow = rr.string("action", "deny", choices=("deny", "allow")) == "allow"
            details = rr.string("details", f"denied by ACL rule {i}" + (f" ({path})" if path != "*" else ""))
            pred = None
            if field is not None:
                # (message is None only for '*', which refused a field above)
                f = _resolve_field(rr, "field", schema, cast(str, message), field)
                op = rr.string("op", required=True, choices=OPS)
                pred = _predicate(rr, key, schema, f, op, rr.raw("value", required=True))
            else:
                rr.seen.update(("op", "value"))
                if spec.get("op") is not None or spec.get("value") is not None:
                    raise rr.error("op", "op and value need a field to test")
            rr.finish()
            rules.append(Rule(i, method_id, path, field, pred, allow, details))
        out = {
            "rules": rules,
            "default_allow": r.string("default", "allow", choices=("allow", "deny")) == "allow",
            "direction": check_direction(r),
            "max_streams": r.integer("max_streams", 65536, ge=1),
        }
        r.finish()
        return out

    def apply_config(self, config: dict[str, Any]) -> None:
        rules = config["rules"]
        self.any_rules = [x for x in rules if x.method_id is None]
        ids = {x.method_id for x in rules if x.method_id is not None}
        self.by_method = {mid: [x for x in rules if x.method_id in (mid, None)] for mid in ids}

    # -- datapath --------------------------------------------------------------------------
    def _rules_for(self, method_id: int) -> list[Rule]:
        rules = self.by_method.get(method_id)
        return rules if rules is not None else self.any_rules

    def on_start(self, rec: R.Record, out: list[R.Record]) -> None:
        if rec.flags & R.F_END:
            self.calls.pop(rec)
        elif (rec.handle, rec.call_id) in self.calls or len(self.calls) < self.config["max_streams"]:
            self.calls.put(rec, rec.method_id)
        else:
            limit = self.config["max_streams"]
            self.count("streams_refused")
            self.ctx.reply_error(rec, RESOURCE_EXHAUSTED,
                                 f"acl: {limit} request streams already being checked (max_streams); retry when some end")
            self.refused.add((rec.handle, rec.call_id))
            return
        self._judge(rec, rec.method_id, True, out)

    def on_later(self, rec: R.Record, key: tuple[int, int], out: list[R.Record]) -> None:
        if rec.kind == R.CANCEL:
            self.calls.pop(rec)
            out.append(rec)
            return
        method_id = self.calls.get(rec)
        if rec.flags & R.F_END:
            self.calls.pop(rec)
        if method_id is None:  # a call we did not see start (attached mid-call)
            out.append(rec)
            return
        self._judge(rec, method_id, False, out)

    def _judge(self, rec: R.Record, method_id: int, start: bool, out: list[R.Record]) -> None:
        verdict = self._decide(rec, method_id, start)
        if verdict is None:
            out.append(rec)
            self.count("allowed")
            return
        code, details = verdict
        self.count("denied" if code == PERMISSION_DENIED else "malformed")
        self.ctx.reply_error(rec, code, details)
        if not start:  # the call already went on: cancel it downstream
            out.append(R.Record(R.CANCEL, R.F_END | R.F_NO_MSG, 1, rec.handle, rec.call_id, 0, 0, b"", b""))
        if not rec.flags & R.F_END:
            self.refused.add((rec.handle, rec.call_id))
        self.calls.pop(rec)

    def _decide(self, rec: R.Record, method_id: int, start: bool) -> tuple[int, str] | None:
        """None to allow, or (code, details) to deny."""
        rules = self._rules_for(method_id)
        no_msg = bool(rec.flags & R.F_NO_MSG)
        if no_msg and not start:
            return None  # a half-close without a message: nothing to check
        values: dict[str | None, Any] = {}  # by rule.field (set where rule.pred is)
        for rule in rules:
            if rule.pred is None:
                matched = True
            else:
                if no_msg:
                    continue
                v = values.get(rule.field, values)
                if v is values:
                    method = self.ctx.method(method_id)
                    if method is None:
                        return INVALID_ARGUMENT, f"acl: unknown method id {method_id}"
                    try:
                        # (a rule with a predicate has its field)
                        v = codec.read_field(self.ctx.schema, method.input, rec.payload, cast(str, rule.field))
                    except (codec.DecodeError, ValueError) as exc:
                        return INVALID_ARGUMENT, f"acl: malformed request message: {exc}"
                    values[rule.field] = v
                try:
                    matched = v is not None and bool(rule.pred(v))
                except TypeError:
                    matched = False
            if matched:
                return None if rule.allow else (PERMISSION_DENIED, rule.details)
        if no_msg:
            return None  # decided by the messages that follow
        return None if self.config["default_allow"] else (PERMISSION_DENIED, "denied by ACL default")

    # -- state -------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {"calls": [[k[0], k[1], v] for k, v in self.calls.items()], "denied": self.refused.to_state()}

    def load_state(self, state: dict[str, Any], state_version: int) -> None:
        for h, c, mid in state.get("calls") or []:
            self.calls.put_key((int(h), int(c)), int(mid))
        self.refused.load(state.get("denied"))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["rules"] = len(self.config["rules"])
        d["streams"] = len(self.calls)
        return d


POLICY = Acl

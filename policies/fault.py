"""Fault injection: delay and/or abort a fraction of calls.

Why: operators and developers test how a system behaves when a dependency is slow or
failing (chaos testing) without changing the app, as Envoy's and Istio's fault filters do.
A delayed call is held back (ctx.call_later) and then continues; an aborted call is answered
with the configured status and never goes on.

Config keys (at least one of delay / abort):
  delay      {"probability": p in [0, 1], "ms": milliseconds >= 0}
  abort      {"probability": p in [0, 1], "code": grpc code (int or name, default
             "UNAVAILABLE"), "details": str (default "fault injected")}
  methods    list of "/pkg.Service/Method" paths the faults apply to (default: all calls)
  seed       int: a deterministic random sequence (tests, reproducible experiments)
  max_delayed (int >= 0, default 10000): calls held at once; beyond it calls are not delayed
  direction  "outbound" (default: the app's own calls) | "inbound" (calls arriving at a
             server app)

Each new call (REQUEST START) draws abort then delay. Delayed and aborted: aborted after the
delay. Records that follow a held call's START wait with it; a CANCEL of a held call drops
it (it never went on).
"""
from __future__ import annotations

import random
from typing import Any

from ..marshal import records as R
from .base import (
    UNAVAILABLE, CallGate, ConfigReader, HeldCalls, HeldRecords, check_direction,
    check_method_path, ends_request_stream,
)


class Fault(CallGate):
    name = "fault"
    version = "1.0"
    state_version = 1

    def __init__(self, ctx: Any, config: dict[str, Any] | None = None) -> None:
        self.held_calls = HeldCalls()
        self.timers: dict[tuple[int, int], Any] = {}
        self.rng = random.Random()
        self._seed: Any = object()
        super().__init__(ctx, config)

    def validate_config(self, config: dict[str, Any]) -> dict[str, Any]:
        r = ConfigReader(self.name, config)
        out: dict[str, Any] = {"delay": None, "abort": None}
        d = r.mapping("delay")
        if d is not None:
            dr = r.sub("delay", d)
            out["delay"] = {"probability": dr.number("probability", required=True, ge=0, le=1),
                            "s": dr.number("ms", required=True, ge=0) / 1000.0}
            dr.finish()
        a = r.mapping("abort")
        if a is not None:
            ar = r.sub("abort", a)
            out["abort"] = {"probability": ar.number("probability", required=True, ge=0, le=1),
                            "code": ar.code("code", UNAVAILABLE),
                            "details": ar.string("details", "fault injected")}
            if out["abort"]["code"] == 0:
                raise ar.error("code", "an abort needs an error code, not OK")
            ar.finish()
        if out["delay"] is None and out["abort"] is None:
            raise r.error("delay", "configure at least one of 'delay' and 'abort'")
        methods = r.sequence("methods")
        out["methods"] = None if methods is None else frozenset(
            check_method_path(r, f"methods[{i}]", self.ctx.schema, p).method_id for i, p in enumerate(methods))
        out["seed"] = r.integer("seed")
        out["max_delayed"] = r.integer("max_delayed", 10000, ge=0)
        out["direction"] = check_direction(r)
        r.finish()
        return out

    def apply_config(self, config: dict[str, Any]) -> None:
        if config["seed"] != self._seed:  # a new seed restarts the sequence; same seed keeps it
            self._seed = config["seed"]
            self.rng.seed(config["seed"])

    # -- datapath --------------------------------------------------------------------------
    def on_start(self, rec: R.Record, out: list[R.Record]) -> None:
        cfg = self.config
        if cfg["methods"] is not None and rec.method_id not in cfg["methods"]:
            out.append(rec)
            return
        abort = cfg["abort"] is not None and self.rng.random() < cfg["abort"]["probability"]
        delay = cfg["delay"] is not None and self.rng.random() < cfg["delay"]["probability"]
        if delay and len(self.held_calls) >= cfg["max_delayed"]:
            delay = False
            self.count("delay_skipped_full")
        if delay:
            self.held_calls.hold(rec, {"due": self.ctx.now() + cfg["delay"]["s"], "abort": abort})
            self._arm((rec.handle, rec.call_id), cfg["delay"]["s"])
            self.count("delayed")
        elif abort:
            self._abort(rec)
        else:
            out.append(rec)

    def on_later(self, rec: R.Record, key: tuple[int, int], out: list[R.Record]) -> None:
        if key not in self.held_calls:
            out.append(rec)
        elif rec.kind == R.CANCEL:
            self.held_calls.remove(key)
            self.cancel_timer(self.timers.pop(key, None))
            self.count("cancelled_delayed")
        else:
            self.held_calls.absorb(rec)

    def _abort(self, rec: R.Record) -> None:
        a = self.config["abort"]
        if a is None:  # reconfigured without abort while the call was delayed
            return
        self.count("aborted")
        self.ctx.reply_error(rec, a["code"], a["details"])
        if not rec.flags & R.F_END:
            self.refused.add((rec.handle, rec.call_id))

    def _arm(self, key: tuple[int, int], delay: float) -> None:
        self.timers[key] = self.call_later(delay, lambda: self._due(key))

    def _due(self, key: tuple[int, int]) -> None:
        self.timers.pop(key, None)
        call = self.held_calls.remove(key)
        if call is None:
            return
        if call.data.get("abort") and self.config["abort"] is not None:
            start = call.records[0]
            self._abort(start)
            if any(ends_request_stream(r) for r in call.records[1:]):
                self.refused.discard(key)
            return
        self.count("released")
        self.resume(self.config["direction"], call.records)

    def handle_closed(self, handle: int) -> None:
        """The route closed: its delayed calls would be released (or aborted) for a
        connection that is gone; drop them and their timers."""
        super().handle_closed(handle)
        for key in [call.key for call in self.held_calls if call.key[0] == handle]:
            self.held_calls.remove(key)
            self.cancel_timer(self.timers.pop(key, None))
            self.count("dropped_handle_closed")

    # -- lifecycle ----------------------------------------------------------------------------
    def held(self) -> HeldRecords:
        recs = self.held_calls.records()
        return HeldRecords(recs, []) if self.config["direction"] == "outbound" else HeldRecords([], recs)

    def drop_held(self) -> None:
        self.held_calls.clear()
        self.timers.clear()

    def save_state(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "held": self.held_calls.to_state(),
            "aborted": self.refused.to_state(),
            "rng": [version, list(internal), gauss],
            "seed": self._seed if isinstance(self._seed, int) or self._seed is None else None,
        }

    def load_state(self, state: dict[str, Any], state_version: int) -> None:
        if state.get("rng") and state.get("seed") == self.config["seed"]:
            v, internal, gauss = state["rng"]
            self.rng.setstate((v, tuple(internal), gauss))
        self.refused.load(state.get("aborted"))
        now = self.ctx.now()
        for call in HeldCalls.from_state(state.get("held")):
            self.held_calls.put(call)
            self._arm(call.key, max(0.0, float(call.data["due"]) - now))


POLICY = Fault

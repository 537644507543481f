"""Admission control: shed new calls when the recent success rate falls.

Why: when a backend is failing, sending it the full load makes recovery slower and wastes
the client's time; rejecting a fraction of calls locally (fast failure) gives it room. The
model is Envoy's admission control filter: over a sliding window of recent outcomes, with
`total` calls of which `ok` succeeded,

    p_reject = ((total - ok / sr_threshold) / (total + 1)) ** (1 / aggression)

clamped to [0, max_rejection_probability], and 0 while total < min_requests. The
rejection probability grows as the success rate falls below the threshold, and it goes back
to 0 as successes return (old failures leave the window). A rejected call is answered
UNAVAILABLE "admission control: success rate X% below Y%".

Outcomes are the final status of the calls this policy let through (their final RESPONSE,
in the opposite direction); a CANCEL is not counted; the app's own calls lost with their
connection count as UNAVAILABLE. Which codes are failures is
configurable (by default the ones that mean the server is in trouble; NOT_FOUND or
PERMISSION_DENIED are answers, not failures).

Config keys:
  window_s                  (number > 0, default 10) sliding window length, seconds
  sr_threshold              (0 < x <= 1, default 0.95) success rate below which calls are shed
  min_requests              (int >= 0, default 20) outcomes in the window needed before shedding
  aggression                (number > 0, default 1.0) > 1 sheds more eagerly
  max_rejection_probability (0..1, default 0.8)
  failure_codes             list of grpc codes (ints or names), default UNKNOWN,
                            DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL,
                            UNAVAILABLE, DATA_LOSS
  seed                      int, deterministic rejections (tests)
  direction                 "outbound" (default: the app's calls) | "inbound" (calls a
                            server app receives)
"""
from __future__ import annotations

import math
import random
from collections import deque
from typing import Any

from ..marshal import records as R
from .base import (
    UNAVAILABLE, CallGate, CallTracker, ConfigReader, check_direction, status_code,
)

DEFAULT_FAILURES = (2, 4, 8, 10, 13, 14, 15)
BINS = 20  # the window is kept as BINS time bins


class Admission(CallGate):
    name = "admission"
    version = "1.0"
    state_version = 1

    def __init__(self, ctx: Any, config: dict[str, Any] | None = None) -> None:
        self.calls = CallTracker()
        self.bins: deque[list[Any]] = deque()  # [bin index, total, ok]
        self.rng = random.Random()
        self._p: tuple[float, float] | None = None
        super().__init__(ctx, config)

    def validate_config(self, config: dict[str, Any]) -> dict[str, Any]:
        r = ConfigReader(self.name, config)
        out = {
            "window_s": r.number("window_s", 10.0, gt=0),
            "sr_threshold": r.number("sr_threshold", 0.95, gt=0, le=1),
            "min_requests": r.integer("min_requests", 20, ge=0),
            "aggression": r.number("aggression", 1.0, gt=0),
            "max_rejection_probability": r.number("max_rejection_probability", 0.8, ge=0, le=1),
            "seed": r.integer("seed"),
            "direction": check_direction(r),
        }
        codes = r.sequence("failure_codes", list(DEFAULT_FAILURES))
        fc = set()
        for i, c in enumerate(codes):
            code = status_code(c)
            if code is None:
                raise r.error(f"failure_codes[{i}]", f"not a grpc status code: {c!r}")
            if code == 0:
                raise r.error(f"failure_codes[{i}]", "OK cannot be a failure")
            fc.add(code)
        out["failure_codes"] = frozenset(fc)
        r.finish()
        return out

    def apply_config(self, config: dict[str, Any]) -> None:
        if config["seed"] is not None:
            self.rng.seed(config["seed"])
        if getattr(self, "_window", None) not in (None, config["window_s"]):
            self.bins.clear()  # a new window length: old bins have another width
        self._window = config["window_s"]
        self._bin_s = config["window_s"] / BINS

    # -- the window ----------------------------------------------------------------------------
    def _prune(self, now: float) -> int:
        idx = math.floor(now / self._bin_s)
        bins = self.bins
        while bins and bins[0][0] <= idx - BINS:
            bins.popleft()
        return idx

    def record_outcome(self, ok: bool) -> None:
        idx = self._prune(self.ctx.now())
        if not self.bins or self.bins[-1][0] != idx:
            self.bins.append([idx, 0, 0])
        b = self.bins[-1]
        b[1] += 1
        b[2] += ok

    def window(self) -> tuple[int, int]:
        """(total, ok) outcomes in the window now."""
        self._prune(self.ctx.now())
        return sum(b[1] for b in self.bins), sum(b[2] for b in self.bins)

    def rejection_probability(self) -> tuple[float, float]:
        """(p_reject, success rate) now."""
        total, ok = self.window()
        sr = ok / total if total else 1.0
        cfg = self.config
        if total < cfg["min_requests"] or total == 0:
            return 0.0, sr
        base = (total - ok / cfg["sr_threshold"]) / (total + 1)
        if base <= 0:
            return 0.0, sr
        p = base ** (1.0 / cfg["aggression"])
        return min(p, cfg["max_rejection_probability"]), sr

    # -- datapath ----------------------------------------------------------------------------------
    def other_direction(self, batch: list[R.Record]) -> list[R.Record]:
        self._outcomes(batch)
        return batch

    def on_batch(self) -> None:
        self._p = None  # the rejection probability, computed at the batch's first START

    def on_start(self, rec: R.Record, out: list[R.Record]) -> None:
        if self._p is None:
            self._p = self.rejection_probability()
        p, sr = self._p
        if p > 0 and self.rng.random() < p:
            self.count("rejected")
            thr = self.config["sr_threshold"]
            self.ctx.reply_error(rec, UNAVAILABLE,
                                 f"admission control: success rate {sr * 100:.1f}% below {thr * 100:.1f}%")
            if not rec.flags & R.F_END:
                self.refused.add((rec.handle, rec.call_id))
            return
        self.count("admitted")
        self.calls.put(rec, 1)
        out.append(rec)

    def on_later(self, rec: R.Record, key: tuple[int, int], out: list[R.Record]) -> None:
        if rec.kind == R.CANCEL:
            self.calls.pop(rec)
        out.append(rec)

    def handle_closed(self, handle: int) -> None:
        """The connection of route `handle` was lost. The app's own calls (outbound) in
        flight on it failed with UNAVAILABLE without a final RESPONSE crossing the chain:
        they count as that outcome (a backend that drops connections is one in trouble).
        Calls a server app received (inbound) were cancelled by their caller leaving: no
        outcome of the server's."""
        lost = self.calls.drop_handle(handle)
        super().handle_closed(handle)
        if lost and self.request_direction() == "outbound":
            self.count("lost_with_connection", len(lost))
            ok = UNAVAILABLE not in self.config["failure_codes"]
            for _ in lost:
                self.record_outcome(ok)

    def _outcomes(self, batch: list[R.Record]) -> None:
        failures = self.config["failure_codes"]
        for rec in batch:
            if rec.kind == R.RESPONSE and rec.flags & R.F_END:
                if self.calls.pop(rec) is not None:
                    self.record_outcome(rec.status not in failures)
            elif rec.kind == R.CANCEL:
                self.calls.pop(rec)

    # -- state -------------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {
            "bin_s": self._bin_s,
            "bins": [list(b) for b in self.bins],
            "calls": [list(k) for k, _ in self.calls.items()],
            "rejected": self.refused.to_state(),
        }

    def load_state(self, state: dict[str, Any], state_version: int) -> None:
        if state.get("bin_s") == self._bin_s:
            self.bins = deque([int(i), int(t), int(o)] for i, t, o in state.get("bins") or [])
        for h, c in state.get("calls") or []:
            self.calls.put_key((int(h), int(c)), 1)
        self.refused.load(state.get("rejected"))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        total, ok = self.window()
        p, sr = self.rejection_probability()
        d["window"] = {"total": total, "ok": ok, "success_rate": sr, "rejection_probability": p}
        return d


POLICY = Admission

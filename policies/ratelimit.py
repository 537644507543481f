"""Token-bucket rate limit on new calls.

Why: an operator caps how fast an app may start RPCs (protecting a shared backend, or a
tenant's quota) without the app's cooperation. Only new calls cost a token: a REQUEST
record with START. The records of a call that follow its START (client-stream messages,
half-close, CANCEL) are never limited, but they never overtake their START either.

Config keys:
  rate        (number > 0, required)  tokens per second (calls per second).
  burst       (number >= 1, default max(1, rate))  bucket size: calls allowed back to back.
  mode        "queue" (default) | "drop".
              queue: a call without a token waits, in arrival order, and is released when
                     the bucket refills (a timer via ctx.call_later); at most `max_queue`
                     calls wait, more are answered RESOURCE_EXHAUSTED.
              drop:  a call without a token is answered RESOURCE_EXHAUSTED
                     "rate limit exceeded" at once.
  max_queue   (int >= 0, default 1024)  queue bound (calls), queue mode.
  per_method  (mapping "/pkg.Service/Method" -> {"rate": r, "burst": b}, default {})
              those methods use their own bucket instead of the shared one; the method
              must be in the app's schema.
  direction   "outbound" (default: the app's own calls, client side) | "inbound" (calls
              arriving from the network on a server app's datapath).

A queued call that the client cancels leaves the queue; nothing of it reached the network,
so the CANCEL is dropped too. Live upgrade carries tokens, refill times, the queued calls
(as encoded records) and the counters.
"""
from __future__ import annotations

from typing import Any

from ..marshal import records as R
from .base import (
    RESOURCE_EXHAUSTED, CallGate, ConfigReader, HeldCalls, HeldRecords, check_direction,
    check_method_path,
)

GLOBAL = "*"


class Bucket:
    __slots__ = ("rate", "burst", "tokens", "last", "queue")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now
        self.queue = HeldCalls()

    def refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = max(self.last, now)

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens >= 1.0 - 1e-9:  # tolerate float rounding of (wait * rate)
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False

    def wait(self) -> float:
        """Seconds until one token is there (after a refill at self.last)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


class RateLimit(CallGate):
    name = "ratelimit"
    version = "1.0"
    state_version = 1

    def __init__(self, ctx: Any, config: dict[str, Any] | None = None) -> None:
        self.buckets: dict[Any, Bucket] = {}
        self._timer: Any = None
        self._now = 0.0  # the clock read once per batch (on_batch)
        super().__init__(ctx, config)

    # -- config ------------------------------------------------------------------------
    def validate_config(self, config: dict[str, Any]) -> dict[str, Any]:
        r = ConfigReader(self.name, config)
        rate = r.number("rate", required=True, gt=0)
        burst = r.number("burst", max(1.0, rate), ge=1)
        out = {
            "rate": rate,
            "burst": burst,
            "mode": r.string("mode", "queue", choices=("queue", "drop")),
            "max_queue": r.integer("max_queue", 1024, ge=0),
            "direction": check_direction(r),
            "per_method": {},
        }
        per = r.mapping("per_method", {})
        for path, spec in per.items():
            key = f"per_method.{path}"
            method = check_method_path(r, key, self.ctx.schema, path)
            sr = r.sub(key, spec)
            mrate = sr.number("rate", required=True, gt=0)
            out["per_method"][method.method_id] = {"path": path, "rate": mrate, "burst": sr.number("burst", max(1.0, mrate), ge=1)}
            sr.finish()
        r.finish()
        return out

    def apply_config(self, config: dict[str, Any]) -> None:
        now = self.ctx.now()
        old = self.buckets
        new: dict[Any, Bucket] = {}
        specs = {GLOBAL: (config["rate"], config["burst"])}
        specs.update({mid: (s["rate"], s["burst"]) for mid, s in config["per_method"].items()})
        for key, (rate, burst) in specs.items():
            b = old.get(key)
            if b is None:
                b = Bucket(rate, burst, now)
            else:
                b.refill(now)
                b.rate, b.burst = rate, burst
                b.tokens = min(b.tokens, burst)
            new[key] = b
        for key, b in old.items():  # a bucket that went away: its waiting calls join the shared queue
            if key not in new:
                for call in b.queue:
                    new[GLOBAL].queue.put(call)
        self.buckets = new
        if self._timer is not None:  # the rates changed: recompute when the next token comes
            self.cancel_timer(self._timer)
            self._timer = None
        self._schedule()

    # -- datapath --------------------------------------------------------------------------
    def on_batch(self) -> None:
        self._now = self.ctx.now()

    def on_start(self, rec: R.Record, out: list[R.Record]) -> None:
        bucket = self.buckets.get(rec.method_id) or self.buckets[GLOBAL]
        if not bucket.queue and bucket.take(self._now):
            self.count("passed")
            out.append(rec)
            return
        queue_mode = self.config["mode"] == "queue"
        if queue_mode and len(bucket.queue) < self.config["max_queue"]:
            bucket.queue.hold(rec)
            self.count("queued")
            self._schedule()
            return
        if queue_mode:
            self.count("rejected_queue_full")
            details = f"rate limit exceeded: queue full ({self.config['max_queue']} calls waiting)"
        else:
            self.count("rejected")
            details = "rate limit exceeded"
        self.ctx.reply_error(rec, RESOURCE_EXHAUSTED, details)
        if not rec.flags & R.F_END:
            self.refused.add((rec.handle, rec.call_id))

    def on_later(self, rec: R.Record, key: tuple[int, int], out: list[R.Record]) -> None:
        held = self._bucket_holding(key)
        if held is None:
            out.append(rec)
        elif rec.kind == R.CANCEL:  # cancelled while waiting: it never left, forget it
            held.queue.remove(key)
            self.count("cancelled_queued")
        else:
            held.queue.absorb(rec)

    def handle_closed(self, handle: int) -> None:
        """The route closed: its queued calls will never be sent nor answered by a peer
        (the app already failed them): drop them rather than release them later."""
        super().handle_closed(handle)
        for b in self.buckets.values():
            for call in b.queue:
                if call.key[0] == handle:
                    b.queue.remove(call.key)
                    self.count("dropped_handle_closed")

    def _bucket_holding(self, key: tuple[int, int]) -> Bucket | None:
        for b in self.buckets.values():
            if key in b.queue:
                return b
        return None

    # -- the refill timer --------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._timer is not None or self.closed:
            return
        now = self.ctx.now()
        waits = []
        for b in self.buckets.values():
            if b.queue:
                b.refill(now)
                waits.append(b.wait())
        if waits:
            self._timer = self.call_later(min(waits), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        released = self._release()
        if released:
            self.resume(self.config["direction"], released)
        self._schedule()

    def _release(self) -> list[R.Record]:
        now = self.ctx.now()
        out: list[R.Record] = []
        for b in self.buckets.values():
            while b.queue and b.take(now):
                call = b.queue.popleft()
                out.extend(call.records)
                self.count("released")
        return out

    # -- lifecycle -----------------------------------------------------------------------------
    def held(self):
        recs = [r for b in self.buckets.values() for r in b.queue.records()]
        return HeldRecords(recs, []) if self.config["direction"] == "outbound" else HeldRecords([], recs)

    def drop_held(self) -> None:
        for b in self.buckets.values():
            b.queue.clear()

    def close(self, handed_over: bool = False):
        self._timer = None
        return super().close(handed_over)

    def save_state(self) -> dict[str, Any]:
        now = self.ctx.now()
        buckets = {}
        for key, b in self.buckets.items():
            b.refill(now)
            buckets[str(key)] = {"tokens": b.tokens, "last": b.last, "queue": b.queue.to_state()}
        return {"buckets": buckets, "rejected": self.refused.to_state()}

    def load_state(self, state: dict[str, Any], state_version: int) -> None:
        for skey, data in (state.get("buckets") or {}).items():
            key: Any = GLOBAL if skey == GLOBAL else int(skey)
            b = self.buckets.get(key) or self.buckets[GLOBAL]
            if key in self.buckets:
                b.tokens = min(b.burst, float(data["tokens"]))
                b.last = min(float(data["last"]), self.ctx.now())
            for call in HeldCalls.from_state(data.get("queue")):
                b.queue.put(call)
        self.refused.load(state.get("rejected"))
        self._schedule()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        now = self.ctx.now()
        d["buckets"] = {}
        for key, b in self.buckets.items():
            b.refill(now)
            d["buckets"][str(key)] = {"tokens": round(b.tokens, 3), "queued": len(b.queue)}
        return d


POLICY = RateLimit

"""Test doubles for policies: a fake clock and a PolicyContext that records what policies do.

    clock = FakeClock()
    ctx = FakeContext(schema, clock=clock)
    pol = RateLimit(ctx, {"rate": 10})
    out = pol.outbound([...])
    clock.advance(0.5)          # runs due timers in time order
    ctx.resumed_out, ctx.errors  # what the policy released / answered
"""
from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable

from ..marshal import records as R
from ..marshal.schema import Method, Schema


class FakeTimer:
    __slots__ = ("when", "seq", "fn", "cancelled")

    def __init__(self, when: float, seq: int, fn: Callable[[], None]) -> None:
        self.when, self.seq, self.fn, self.cancelled = when, seq, fn, False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "FakeTimer") -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class FakeClock:
    """Monotonic time that only moves when a test says so; timers run in advance()."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self._heap: list[FakeTimer] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def call_later(self, delay: float, fn: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.t + max(0.0, delay), next(self._seq), fn)
        heapq.heappush(self._heap, timer)
        return timer

    def pending(self) -> int:
        return sum(1 for t in self._heap if not t.cancelled)

    def advance(self, dt: float) -> None:
        """Move time forward by dt, running every timer that falls due, in order."""
        end = self.t + dt
        while self._heap and self._heap[0].when <= end:
            timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            self.t = max(self.t, timer.when)
            timer.fn()
        self.t = end


class FakeContext:
    """A PolicyContext that records resumed records, error replies and log lines."""

    def __init__(self, schema: Schema | None = None, clock: FakeClock | None = None, app_id: int = 1,
                 app_name: str = "app", globals: dict[str, Any] | None = None) -> None:
        self.app_id = app_id
        self.app_name = app_name
        self.schema = schema if schema is not None else Schema()
        self.clock = clock if clock is not None else FakeClock()
        self.globals = globals if globals is not None else {}
        self.resumed_out: list[R.Record] = []
        self.resumed_in: list[R.Record] = []
        self.errors: list[tuple[R.Record, int, str]] = []
        self.logs: list[tuple[Any, str, dict[str, Any]]] = []

    def method(self, method_id: int) -> Method | None:
        return self.schema.methods_by_id().get(method_id)

    def now(self) -> float:
        return self.clock.now()

    def call_later(self, delay: float, fn: Callable[[], None]) -> FakeTimer:
        return self.clock.call_later(delay, fn)

    def resume_outbound(self, engine: Any, records: list[R.Record]) -> None:
        self.resumed_out.extend(records)

    def resume_inbound(self, engine: Any, records: list[R.Record]) -> None:
        self.resumed_in.extend(records)

    def reply_error(self, record: R.Record, code: int, details: str) -> None:
        self.errors.append((record, code, details))

    def log(self, level: Any, msg: str, **fields: Any) -> None:
        self.logs.append((level, msg, fields))

    # conveniences for tests
    def error_codes(self) -> list[int]:
        return [code for _, code, _ in self.errors]

    def take(self) -> tuple[list[R.Record], list[R.Record], list[tuple[R.Record, int, str]]]:
        """Return and clear (resumed_out, resumed_in, errors)."""
        out = (self.resumed_out, self.resumed_in, self.errors)
        self.resumed_out, self.resumed_in, self.errors = [], [], []
        return out

"""The always-on call observer: per method and status code, what each app called and served.

Why always on and not a policy: the operator's metrics (and the SIGTERM drain, which waits
for calls in flight) must not depend on someone attaching a policy first. It is cheap: the
session hands it every batch at the app's boundary, and it reads only header fields of
START and final records (kind, flags, status, handle, call_id, method_id); it never decodes
metadata or payloads.

Where it sits: at the app's own edge of its datapath, so it sees what the app sees,
including answers the daemon or a policy made up (UNAVAILABLE, rate-limit refusals, ...):

* records the app sent (`from_app`): a REQUEST START opens a *client* call, a final
  RESPONSE (END) closes a *server* call, a CANCEL closes a client call as CANCELLED;
* records delivered to the app (`to_app`): a REQUEST START opens a *server* call, a final
  RESPONSE closes a *client* call, a CANCEL closes a server call as CANCELLED, a GOAWAY for
  a handle closes every call on it (client: UNAVAILABLE, server: CANCELLED).

Counts live in one daemon-wide `CallStats` (so they survive an app's exit: Prometheus
counters must not go backwards); calls in flight live in the app's `Observer`.
"""
from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from typing import Callable

from ..marshal import records as R
from ..marshal.schema import Method, Schema

# Prometheus client's default buckets, seconds.
DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# grpc_code label values as grpc-go (and go-grpc-prometheus) spell them.
CODE_NAMES = (
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
)
GRPC_TYPES = {"unary_unary": "unary", "stream_unary": "client_stream", "unary_stream": "server_stream", "stream_stream": "bidi_stream"}
CANCELLED, UNAVAILABLE = 1, 14
# (grpc_type, grpc_service, grpc_method) of a method id the app's schema does not know.
# One fixed label set, so a misbehaving app cannot blow up the metrics' cardinality.
UNKNOWN_METHOD = ("unknown", "unknown", "unknown")

Labels = tuple[str, str, str]  # grpc_type, grpc_service, grpc_method


def code_name(code: int) -> str:
    return CODE_NAMES[code] if 0 <= code < len(CODE_NAMES) else "Unknown"


def method_labels(m: Method) -> Labels:
    return (GRPC_TYPES[m.kind], m.service, m.name)


class CallStats:
    """Daemon-wide call counters and latency histograms, keyed by side and method labels."""

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.started: dict[tuple[str, Labels], int] = {}
        self.handled: dict[tuple[str, Labels, int], int] = {}
        # (side, labels) -> [per-bucket counts (non-cumulative; last is +Inf), sum, count]
        self.hist: dict[tuple[str, Labels], list] = {}
        self.evicted = 0  # calls forgotten because an app had too many in flight

    def set_buckets(self, buckets: tuple[float, ...]) -> bool:
        """New histogram bounds; the histograms restart (old counts cannot be re-bucketed)."""
        buckets = tuple(buckets)
        if buckets == self.buckets:
            return False
        self.buckets = buckets
        self.hist.clear()
        return True

    def start(self, side: str, labels: Labels) -> None:
        key = (side, labels)
        self.started[key] = self.started.get(key, 0) + 1

    def finish(self, side: str, labels: Labels, code: int, seconds: float) -> None:
        hkey = (side, labels, code)
        self.handled[hkey] = self.handled.get(hkey, 0) + 1
        key = (side, labels)
        h = self.hist.get(key)
        if h is None:
            h = self.hist[key] = [[0] * (len(self.buckets) + 1), 0.0, 0]
        h[0][bisect.bisect_left(self.buckets, seconds)] += 1
        h[1] += seconds
        h[2] += 1


class Observer:
    """One app's calls in flight, feeding the daemon-wide `CallStats`."""

    __slots__ = ("stats", "_schema_of", "_schema", "_methods", "calls", "max_calls", "clock")

    def __init__(self, stats: CallStats, schema_of: Callable[[], Schema], max_calls: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = stats
        self._schema_of = schema_of  # the session's current schema (apps may register more)
        self._schema: Schema | None = None
        self._methods: dict[int, Labels] = {}
        # (handle, call_id) -> (side, labels, start time); insertion order = age
        self.calls: OrderedDict[tuple[int, int], tuple[str, Labels, float]] = OrderedDict()
        self.max_calls = max_calls
        self.clock = clock

    @property
    def in_flight(self) -> int:
        return len(self.calls)

    def _labels(self, method_id: int) -> Labels:
        labels = self._methods.get(method_id)
        if labels is None:
            schema = self._schema_of()
            if schema is not self._schema:  # the app registered more: rebuild once
                self._schema = schema
                self._methods = {mid: method_labels(m) for mid, m in schema.methods_by_id().items()}
                labels = self._methods.get(method_id)
            if labels is None:
                return UNKNOWN_METHOD
        return labels

    def _open(self, rec: R.Record, side: str, now: float) -> None:
        labels = self._labels(rec.method_id)
        self.stats.start(side, labels)
        key = (rec.handle, rec.call_id)
        if key in self.calls:  # a reused call id: the old call can no longer be paired
            del self.calls[key]
        elif len(self.calls) >= self.max_calls:
            self.calls.popitem(last=False)
            self.stats.evicted += 1
        self.calls[key] = (side, labels, now)

    def _close(self, rec: R.Record, side: str, code: int, now: float) -> None:
        entry = self.calls.get((rec.handle, rec.call_id))
        if entry is None or entry[0] != side:
            return
        del self.calls[(rec.handle, rec.call_id)]
        self.stats.finish(side, entry[1], code, now - entry[2])

    def from_app(self, batch: list[R.Record]) -> None:
        """Records the app sent (already parsed and bounds-checked)."""
        now = 0.0
        for rec in batch:
            kind, flags = rec.kind, rec.flags
            if kind == R.REQUEST:
                if flags & R.F_START:
                    now = now or self.clock()
                    self._open(rec, "client", now)
            elif kind == R.RESPONSE:
                if flags & R.F_END:
                    now = now or self.clock()
                    self._close(rec, "server", rec.status, now)
            elif kind == R.CANCEL:
                now = now or self.clock()
                self._close(rec, "client", CANCELLED, now)

    def to_app(self, batch: list[R.Record]) -> None:
        """Records about to enter the app's receive ring."""
        now = 0.0
        for rec in batch:
            kind, flags = rec.kind, rec.flags
            if kind == R.RESPONSE:
                if flags & R.F_END:
                    now = now or self.clock()
                    self._close(rec, "client", rec.status, now)
            elif kind == R.REQUEST:
                if flags & R.F_START:
                    now = now or self.clock()
                    self._open(rec, "server", now)
            elif kind == R.CANCEL:
                now = now or self.clock()
                self._close(rec, "server", CANCELLED, now)
            elif kind == R.GOAWAY:
                now = now or self.clock()
                self.handle_lost(rec.handle, now)

    def handle_lost(self, handle: int, now: float | None = None) -> None:
        """A connection is gone: its client calls fail UNAVAILABLE, its server calls are cancelled."""
        now = self.clock() if now is None else now
        for key in [k for k in self.calls if k[0] == handle]:
            side, labels, t0 = self.calls.pop(key)
            self.stats.finish(side, labels, UNAVAILABLE if side == "client" else CANCELLED, now - t0)

    def close(self) -> None:
        """The app is gone: its calls in flight end without a status (not counted as handled)."""
        self.calls.clear()

"""Logging and per-method metrics of completed calls.

Why: the operator sees, per method and status code, how many calls an app made or served and
how long they took, without instrumenting the app (what a sidecar's stats give).

The policy watches both directions and pairs each call's REQUEST START with its final
RESPONSE (END), by (handle, call_id). A START that goes outbound is a call the app makes
(client side); a START that comes inbound is a call the app serves (server side). A CANCEL
ends a call as CANCELLED. Calls answered by an engine before this one (reply_error) never
reach it: put metrics first on the chain (closest to the app) to count everything the app
sees.

Names follow the gRPC Prometheus convention (go-grpc-prometheus, grpc-java): labels
grpc_type (unary | client_stream | server_stream | bidi_stream), grpc_service, grpc_method,
grpc_code ("OK", "NotFound", ... as grpc-go spells codes). Metric families, with side
"client" or "server":
  mrpcd_{side}_started_total             counter   (type, service, method)
  mrpcd_{side}_handled_total             counter   (type, service, method, code)
  mrpcd_{side}_handling_seconds          histogram (type, service, method): _bucket{le}, _sum, _count

Config keys:
  buckets      increasing positive numbers, seconds (default: the Prometheus client default
               .005 .01 .025 .05 .1 .25 .5 1 2.5 5 10)
  log_calls    bool (default false): one log line per completed call (method, code, seconds)
  log_level    "debug" | "info" (default) | "warning"
  max_tracked  int >= 1 (default 65536): calls in flight remembered at once; the oldest
               are forgotten beyond it (counted as `evicted`)
"""
from __future__ import annotations

import bisect
from typing import Any

from ..marshal import records as R
from .base import CANCELLED, UNAVAILABLE, CallTracker, ConfigReader, Policy

MAX_UNKNOWN_METHODS = 256  # method ids outside the app's schema with a series of their own
OTHER_METHOD = -1  # the series the other unknown method ids share
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GO_CODE_NAMES = [
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
]
GRPC_TYPES = {"unary_unary": "unary", "stream_unary": "client_stream",
              "unary_stream": "server_stream", "stream_stream": "bidi_stream"}


def code_label(code: int) -> str:
    return GO_CODE_NAMES[code] if 0 <= code < len(GO_CODE_NAMES) else f"Code({code})"


class Metrics(Policy):
    name = "metrics"
    version = "1.0"
    state_version = 1

    def __init__(self, ctx: Any, config: dict[str, Any] | None = None) -> None:
        self.calls = CallTracker()
        self._unknown: set[int] = set()  # method ids outside the app's schema with a series
        # (side, method_id) -> started count
        self.started: dict[tuple[str, int], int] = {}
        # (side, method_id, code) -> handled count
        self.handled: dict[tuple[str, int, int], int] = {}
        # (side, method_id) -> [bucket counts (non-cumulative, last = +Inf), sum, count]
        self.hist: dict[tuple[str, int], list[Any]] = {}
        super().__init__(ctx, config)

    def validate_config(self, config: dict[str, Any]) -> dict[str, Any]:
        r = ConfigReader(self.name, config)
        buckets = r.sequence("buckets", list(DEFAULT_BUCKETS))
        for b in buckets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0 or b == float("inf"):
                raise r.error("buckets", f"bucket bounds must be positive finite numbers, got {b!r}")
        if not buckets or any(b >= c for b, c in zip(buckets, buckets[1:])):
            raise r.error("buckets", f"bucket bounds must be a non-empty strictly increasing list, got {buckets!r}")
        out = {
            "buckets": tuple(float(b) for b in buckets),
            "log_calls": r.boolean("log_calls", False),
            "log_level": r.string("log_level", "info", choices=("debug", "info", "warning")),
            "max_tracked": r.integer("max_tracked", 65536, ge=1),
        }
        r.finish()
        return out

    def apply_config(self, config: dict[str, Any]) -> None:
        self.calls.max_calls = config["max_tracked"]
        if self.hist and tuple(self._buckets) != config["buckets"]:
            self.hist.clear()  # new bounds: old histograms cannot be rebinned
            self.count("histograms_reset")
        self._buckets = list(config["buckets"])

    _buckets: list[float] = []

    # -- datapath ---------------------------------------------------------------------------
    def outbound(self, batch: list[R.Record]) -> list[R.Record]:
        self._watch(batch, "client")
        return batch

    def inbound(self, batch: list[R.Record]) -> list[R.Record]:
        self._watch(batch, "server")
        return batch

    def handle_closed(self, handle: int) -> None:
        """The route's connection was lost: its calls in flight ended without a final record
        crossing the chain — the app's own calls UNAVAILABLE, the calls it was serving
        CANCELLED (their caller is gone). Count them so; else they stay tracked until
        evicted and never show in the counts."""
        lost = self.calls.drop_handle(handle)
        if lost:
            now = self.ctx.now()
            for info in lost:
                self._done(info, UNAVAILABLE if info[0] == "client" else CANCELLED, now)

    def _watch(self, batch: list[R.Record], start_side: str) -> None:
        """start_side: the side a START seen in this direction belongs to."""
        now = None
        for rec in batch:
            kind = rec.kind
            if kind == R.REQUEST:
                if rec.flags & R.F_START:
                    if now is None:
                        now = self.ctx.now()
                    key = (start_side, rec.method_id)
                    n = self.started.get(key)
                    if n is None:  # a new series: bounded if the method is not the app's
                        key = self._series(start_side, rec.method_id)
                        n = self.started.get(key, 0)
                    self.started[key] = n + 1
                    before = self.calls.evicted
                    self.calls.put(rec, (start_side, key[1], now))
                    if self.calls.evicted != before:
                        self.count("evicted", self.calls.evicted - before)
            elif kind == R.RESPONSE:
                if rec.flags & R.F_END:
                    info = self.calls.pop(rec)
                    if info is not None:
                        if now is None:
                            now = self.ctx.now()
                        self._done(info, rec.status, now)
            elif kind == R.CANCEL:
                info = self.calls.pop(rec)
                if info is not None:
                    if now is None:
                        now = self.ctx.now()
                    self._done(info, 1, now)

    def _series(self, side: str, method_id: int) -> tuple[str, int]:
        """The (side, method) series a START of `method_id` counts in.

        Why: method ids come from the app (any 32-bit value); one series per id an app
        makes up would grow the daemon's memory (and the Prometheus output) without bound.
        Ids outside the app's schema get their own series up to MAX_UNKNOWN_METHODS, then
        share the OTHER_METHOD one."""
        if method_id == OTHER_METHOD or self.ctx.method(method_id) is not None:
            return side, method_id
        if method_id in self._unknown or len(self._unknown) < MAX_UNKNOWN_METHODS:
            self._unknown.add(method_id)
            return side, method_id
        self.count("unknown_methods_folded")
        return side, OTHER_METHOD

    def _done(self, info: tuple[str, int, float], code: int, now: float) -> None:
        side, mid, t0 = info
        k = (side, mid, code)
        self.handled[k] = self.handled.get(k, 0) + 1
        elapsed = max(0.0, now - t0)
        h = self.hist.get((side, mid))
        if h is None:
            h = self.hist[(side, mid)] = [[0] * (len(self._buckets) + 1), 0.0, 0]
        h[0][bisect.bisect_left(self._buckets, elapsed)] += 1
        h[1] += elapsed
        h[2] += 1
        if self.config["log_calls"]:
            svc, meth, typ = self._labels(mid)
            self.ctx.log(self.config["log_level"], "rpc completed", side=side, service=svc, method=meth,
                         type=typ, code=code_label(code), seconds=round(elapsed, 6))

    def _labels(self, method_id: int) -> tuple[str, str, str]:
        m = self.ctx.method(method_id)
        if m is None:
            return "unknown", "other" if method_id == OTHER_METHOD else f"id_{method_id}", "unary"
        return m.service, m.name, GRPC_TYPES[m.kind]

    # -- output -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Plain data: {"counters": {family: [{"labels", "value"}]}, "histograms": {family:
        [{"labels", "buckets": [[le, cumulative count], ..., ["+Inf", n]], "sum", "count"}]}}."""
        counters: dict[str, list[dict[str, Any]]] = {}
        for (side, mid), n in sorted(self.started.items()):
            svc, meth, typ = self._labels(mid)
            counters.setdefault(f"mrpcd_{side}_started_total", []).append(
                {"labels": {"grpc_type": typ, "grpc_service": svc, "grpc_method": meth}, "value": n})
        for (side, mid, code), n in sorted(self.handled.items()):
            svc, meth, typ = self._labels(mid)
            counters.setdefault(f"mrpcd_{side}_handled_total", []).append(
                {"labels": {"grpc_type": typ, "grpc_service": svc, "grpc_method": meth, "grpc_code": code_label(code)},
                 "value": n})
        hists: dict[str, list[dict[str, Any]]] = {}
        for (side, mid), (counts, total, n) in sorted(self.hist.items()):
            svc, meth, typ = self._labels(mid)
            cum, acc = [], 0
            for le, c in zip(self._buckets + ["+Inf"], counts):
                acc += c
                cum.append([le, acc])
            hists.setdefault(f"mrpcd_{side}_handling_seconds", []).append(
                {"labels": {"grpc_type": typ, "grpc_service": svc, "grpc_method": meth},
                 "buckets": cum, "sum": total, "count": n})
        return {"counters": counters, "histograms": hists, "in_flight": len(self.calls)}

    def prometheus_text(self, extra_labels: dict[str, str] | None = None) -> str:
        """The snapshot in the Prometheus text exposition format (e.g. app="name")."""
        snap = self.snapshot()
        extra = dict(extra_labels or {})
        lines: list[str] = []

        def fmt(labels: dict[str, Any]) -> str:
            items = {**extra, **labels}
            return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in items.items()) + "}"

        for fam, samples in snap["counters"].items():
            lines.append(f"# TYPE {fam} counter")
            lines += [f"{fam}{fmt(s['labels'])} {s['value']}" for s in samples]
        for fam, samples in snap["histograms"].items():
            lines.append(f"# TYPE {fam} histogram")
            for s in samples:
                for le, c in s["buckets"]:
                    lines.append(f"{fam}_bucket{fmt({**s['labels'], 'le': le if le == '+Inf' else repr(float(le))})} {c}")
                lines.append(f"{fam}_sum{fmt(s['labels'])} {s['sum']!r}")
                lines.append(f"{fam}_count{fmt(s['labels'])} {s['count']}")
        return "\n".join(lines) + ("\n" if lines else "")

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["metrics"] = self.snapshot()
        return d

    # -- state ----------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {
            "started": [[s, m, n] for (s, m), n in self.started.items()],
            "handled": [[s, m, c, n] for (s, m, c), n in self.handled.items()],
            "buckets": list(self._buckets),
            "hist": [[s, m, list(h[0]), h[1], h[2]] for (s, m), h in self.hist.items()],
            "calls": [[k[0], k[1], v[0], v[1], v[2]] for k, v in self.calls.items()],
        }

    def load_state(self, state: dict[str, Any], state_version: int) -> None:
        for s, m, n in state.get("started") or []:
            self.started[(s, m)] = self.started.get((s, m), 0) + n
        for s, m, c, n in state.get("handled") or []:
            self.handled[(s, m, c)] = self.handled.get((s, m, c), 0) + n
        if list(state.get("buckets") or []) == self._buckets:
            for s, m, counts, total, n in state.get("hist") or []:
                if len(counts) == len(self._buckets) + 1:
                    self.hist[(s, m)] = [list(counts), float(total), int(n)]
        for h, c, side, mid, t0 in state.get("calls") or []:
            self.calls.put_key((int(h), int(c)), (side, int(mid), float(t0)))
        self._unknown = {m for _s, m in self.started if m != OTHER_METHOD and self.ctx.method(m) is None}


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


POLICY = Metrics

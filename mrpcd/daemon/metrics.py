"""Prometheus text metrics, served over HTTP on the daemon's own event loop.

Why no prometheus_client and no thread: every number already lives in daemon objects (the
call observer's `CallStats`, each session's counters, each engine's `describe()`); a
scrape renders them into the text exposition format (version 0.0.4) on the uvloop loop the
daemon runs on, so nothing is copied, polled or locked between scrapes.

Names follow the gRPC Prometheus convention (go-grpc-prometheus / py-grpc-prometheus),
with the `mrpcd_` prefix in place of `grpc_`; side is `server` (calls an app served) or
`client` (calls an app made):

  mrpcd_{side}_started_total{grpc_type,grpc_service,grpc_method}            counter
  mrpcd_{side}_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}  counter
  mrpcd_{side}_handling_seconds{grpc_type,grpc_service,grpc_method}         histogram

plus per-app counters (`mrpcd_app_*{app_id,app}`), per-policy counters
(`mrpcd_policy_*{app_id,app,policy}`, whatever an engine's describe() reports under
"counters" and "held") and daemon gauges. `stats_snapshot()` gives `mrpcctl stats` the
same numbers.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
from typing import TYPE_CHECKING, Any, Iterable

from .observe import CallStats, code_name
from .reply_limits import REPLY_BUDGET, fit

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("mrpcd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8192  # bytes of request line + headers we read; more is refused
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request head
MAX_CONNECTIONS = 32  # concurrent scrapers; more are refused at once
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


# -- the exposition format ---------------------------------------------------------------
def _escape(value: str) -> str:
    """A label value: backslash, newline and double quote escaped (the text format's rule)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    """HELP text escapes only backslash and newline: a quote stays a quote."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, Any]]) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def metric_name(*parts: str) -> str:
    """A valid metric name from free text (policy counter keys): other characters become _."""
    name = _NAME_BAD.sub("_", "_".join(parts))
    return name if not name[:1].isdigit() else "_" + name


class Family:
    """One metric family: HELP, TYPE and its samples, rendered together (the format wants that)."""

    __slots__ = ("name", "kind", "help", "samples")

    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name, self.kind, self.help = name, kind, help
        self.samples: list[str] = []

    def add(self, value: float, labels: Iterable[tuple[str, Any]] = (), suffix: str = "") -> None:
        self.samples.append(f"{self.name}{suffix}{_labels(labels)} {_num(value)}")

    def render(self) -> str:
        return f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n" + "".join(s + "\n" for s in self.samples)


def _call_families(stats: CallStats) -> list[Family]:
    out = []
    for side, who in (("server", "served by apps on this host"), ("client", "made by apps on this host")):
        started = Family(f"mrpcd_{side}_started_total", "counter", f"RPCs {who} that started.")
        handled = Family(f"mrpcd_{side}_handled_total", "counter", f"RPCs {who} that completed, by grpc status code.")
        hist = Family(f"mrpcd_{side}_handling_seconds", "histogram", f"Seconds from start to final status of RPCs {who}.")
        for (s, (typ, svc, meth)), n in sorted(stats.started.items()):
            if s == side:
                started.add(n, (("grpc_type", typ), ("grpc_service", svc), ("grpc_method", meth)))
        for (s, (typ, svc, meth), code), n in sorted(stats.handled.items()):
            if s == side:
                handled.add(n, (("grpc_type", typ), ("grpc_service", svc), ("grpc_method", meth), ("grpc_code", code_name(code))))
        for (s, (typ, svc, meth)), (counts, total, count) in sorted(stats.hist.items()):
            if s != side:
                continue
            base = (("grpc_type", typ), ("grpc_service", svc), ("grpc_method", meth))
            acc = 0
            for bound, c in zip(stats.buckets, counts):
                acc += c
                hist.add(acc, base + (("le", _num(float(bound))),), "_bucket")
            hist.add(count, base + (("le", "+Inf"),), "_bucket")
            hist.add(total, base, "_sum")
            hist.add(count, base, "_count")
        out += [started, handled, hist]
    return out


def _engine_reports(daemon: "Daemon") -> Iterable[tuple[Any, str, dict[str, Any]]]:
    """(session, policy label, describe()) of every engine that describes itself."""
    for session in list(daemon.sessions.values()):
        for engine in list(session.datapath.engines):
            try:
                d = engine.describe()
            except Exception as exc:  # a buggy policy must not break a scrape
                log.debug("describe() of engine %r failed: %s", engine, exc)
                continue
            if isinstance(d, dict):
                label = getattr(engine, "instance_name", None) or d.get("name") or type(engine).__name__
                yield session, str(label), d


def render(daemon: "Daemon") -> str:
    """The whole scrape, as Prometheus text."""
    fams: list[Family] = []
    g = Family("mrpcd_build_info", "gauge", "Always 1; the version label says which mrpcd runs.")
    g.add(1, (("version", daemon.version),))
    fams.append(g)
    g = Family("mrpcd_uptime_seconds", "gauge", "Seconds since the daemon started.")
    g.add(daemon.uptime())
    fams.append(g)
    g = Family("mrpcd_apps", "gauge", "Apps connected now.")
    g.add(len(daemon.sessions))
    fams.append(g)
    inbound = getattr(daemon, "inbound", None)
    if inbound is not None:
        g = Family("mrpcd_inbound_connections", "gauge", "Connections peers opened to the apps' listeners, open now "
                   "(limits.inbound_connections; refusals: mrpcd_inbound_connections_refused_total).")
        g.add(inbound.open_now())
        fams.append(g)
    for key, value in sorted(daemon.counters.items()):
        c = Family(metric_name("mrpcd", key, "total"), "counter", f"Daemon counter {key}.")
        c.add(value)
        fams.append(c)
    poll = daemon.poller.stats()
    c = Family("mrpcd_poll_ticks_total", "counter", "Event-loop ticks spent polling app rings instead of sleeping (poll_us).")
    c.add(poll["poll_ticks"])
    fams.append(c)
    c = Family("mrpcd_poll_hits_total", "counter", "Records found by polling, each an eventfd wake-up an app did not need.")
    c.add(poll["poll_hits"])
    fams.append(c)
    g = Family("mrpcd_poll_window_seconds", "gauge", "The adaptive poll window now (0: sleeping right after traffic).")
    g.add(poll["poll_window_us"] / 1e6)
    fams.append(g)
    g = Family("mrpcd_calls_in_flight", "gauge", "Calls started and not yet answered, over all apps.")
    g.add(sum(s.observer.in_flight for s in daemon.sessions.values()))
    fams.append(g)
    g = Family("mrpcd_draining", "gauge", "1 while the daemon drains before exiting.")
    g.add(1 if getattr(daemon, "draining", False) else 0)
    fams.append(g)
    c = Family("mrpcd_calls_untracked_total", "counter", "Calls forgotten because an app had too many in flight at once.")
    c.add(daemon.call_stats.evicted)
    fams.append(c)
    fams += _call_families(daemon.call_stats)

    # per app
    app_fams: dict[str, Family] = {}
    pending = Family("mrpcd_app_pending_records", "gauge", "Records waiting for room in the app's receive ring.")
    pending_bytes = Family("mrpcd_app_pending_bytes", "gauge", "Bytes of the records waiting for room in the app's receive ring.")
    inflight = Family("mrpcd_app_calls_in_flight", "gauge", "The app's calls started and not yet answered.")
    for s in sorted(daemon.sessions.values(), key=lambda s: s.app_id):
        labels: tuple[tuple[str, Any], ...] = (("app_id", s.app_id), ("app", s.name))
        for key, value in s.stats.items():
            name = metric_name("mrpcd_app", key, "total")
            fam = app_fams.get(name)
            if fam is None:
                fam = app_fams[name] = Family(name, "counter", f"Per-app counter {key}.")
            fam.add(value, labels)
        pending.add(len(s.pending), labels)
        pending_bytes.add(s.pending.nbytes, labels)
        inflight.add(s.observer.in_flight, labels)
    fams += [app_fams[k] for k in sorted(app_fams)] + [pending, pending_bytes, inflight]

    # per policy: whatever the engines count
    pol_fams: dict[str, Family] = {}
    held = Family("mrpcd_policy_held_records", "gauge", "Records a policy holds back, by direction.")
    for s, policy, d in _engine_reports(daemon):
        labels = (("app_id", s.app_id), ("app", s.name), ("policy", policy))
        counters = d.get("counters")
        if isinstance(counters, dict):
            named: set[str] = set()
            for key, value in counters.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    name = metric_name("mrpcd_policy", str(key), "total")
                    fam = pol_fams.get(name)
                    if fam is None:
                        fam = pol_fams[name] = Family(name, "counter", f"Policy counter {key}.")
                    # two keys of one policy that make the same metric name (a-b, a_b): the
                    # second is told apart by its key, never a duplicate sample
                    fam.add(value, labels if name not in named else labels + (("key", str(key)),))
                    named.add(name)
        h = d.get("held")
        if isinstance(h, dict):
            for direction, n in sorted(h.items()):
                if isinstance(n, int):
                    held.add(n, labels + (("direction", direction),))
    fams += [pol_fams[k] for k in sorted(pol_fams)]
    if held.samples:
        fams.append(held)
    return "".join(f.render() for f in fams)


def stats_snapshot(daemon: "Daemon") -> dict[str, Any]:
    """`mrpcctl stats`: the numbers of the metrics endpoint as plain data."""
    stats = daemon.call_stats
    calls: dict[str, list[dict[str, Any]]] = {"server": [], "client": []}
    for (side, (typ, svc, meth)), n in sorted(stats.started.items()):
        codes = {code_name(c): k for (s2, lab, c), k in stats.handled.items() if s2 == side and lab == (typ, svc, meth)}
        h = stats.hist.get((side, (typ, svc, meth)))
        calls[side].append({"type": typ, "service": svc, "method": meth, "started": n, "handled": codes,
                            "seconds_sum": round(h[1], 6) if h else 0.0, "seconds_count": h[2] if h else 0})
    policies = [{"app_id": s.app_id, "policy": p, "counters": d.get("counters") or {}, "held": d.get("held") or {}}
                for s, p, d in _engine_reports(daemon)]
    server = getattr(daemon, "metrics_server", None)
    apps = [(str(s.app_id), {**s.stats, "pending": len(s.pending), "calls_in_flight": s.observer.in_flight})
            for s in daemon.sessions.values()]
    # Apps choose how many they are and how many methods they call: each section keeps what
    # fits in its share of one control reply and says how much it cut (reply_limits.py).
    truncated: dict[str, int] = {}
    apps, truncated["apps"] = fit(apps, STATS_SHARES["apps"])
    for side in ("server", "client"):
        calls[side], truncated[f"calls.{side}"] = fit(calls[side], STATS_SHARES["calls"])
    policies, truncated["policies"] = fit(policies, STATS_SHARES["policies"])
    out = {
        "daemon": {**daemon.stats(), "calls_in_flight": sum(s.observer.in_flight for s in daemon.sessions.values()),
                   "draining": bool(getattr(daemon, "draining", False)),
                   "metrics_address": server.address if server is not None else None},
        "apps": dict(apps),
        "calls": calls,
        "policies": policies,
    }
    if any(truncated.values()):
        out["truncated"] = {k: n for k, n in truncated.items() if n}
    return out


# Bytes of one `mrpcctl stats` reply each section may take (REPLY_BUDGET in all).
STATS_SHARES = {"apps": REPLY_BUDGET * 3 // 10, "calls": REPLY_BUDGET * 2 // 10, "policies": REPLY_BUDGET * 3 // 10}


# -- the HTTP endpoint -------------------------------------------------------------------
async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """Request line and headers, up to the empty line; lines may end in CRLF or a bare LF.

    Why not readuntil(CRLF CRLF): RFC 9112 2.2 lets a server accept bare LF, and a request
    typed by hand (`printf 'GET /metrics HTTP/1.0\\n\\n' | nc`) would otherwise get no answer.
    ValueError when the head exceeds MAX_REQUEST_HEAD, IncompleteReadError on an early EOF.
    """
    head = b""
    while True:
        line = await reader.readline()  # ValueError past the reader's limit (MAX_REQUEST_HEAD)
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        head += line
        if len(head) > MAX_REQUEST_HEAD:
            raise ValueError("request head too large")
        if line in (b"\r\n", b"\n"):
            return head


class MetricsServer:
    """GET /metrics over HTTP/1.x on the daemon's loop; one request per connection."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.server: asyncio.AbstractServer | None = None
        self.address: str | None = None  # actual "host:port" while serving
        self._connections = 0

    async def start(self, address: str) -> str:
        """Listen on "host:port" (port 0: any); raises OSError if it cannot bind."""
        host, _, port_s = address.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        server = await asyncio.start_server(self._serve, host, int(port_s), limit=MAX_REQUEST_HEAD)
        old, self.server = self.server, server
        sockname = server.sockets[0].getsockname()
        self.address = f"[{sockname[0]}]:{sockname[1]}" if ":" in sockname[0] else f"{sockname[0]}:{sockname[1]}"
        if old is not None:
            old.close()
        log.info("metrics on http://%s/metrics", self.address, extra={"address": self.address})
        return self.address

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            self.address = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                await self._reply(writer, 503, "Service Unavailable", "too many metrics connections\n")
                return
            try:
                head = await asyncio.wait_for(_read_head(reader), REQUEST_TIMEOUT)
            except (asyncio.LimitOverrunError, ValueError):
                await self._reply(writer, 431, "Request Header Fields Too Large", "request head too large\n")
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                return
            parts = head.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                await self._reply(writer, 400, "Bad Request", "not an HTTP/1.x request line\n")
                return
            method, target = parts[0], parts[1].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                await self._reply(writer, 405, "Method Not Allowed", "only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
            elif target == b"/metrics":
                await self._reply(writer, 200, "OK", render(self.daemon), content_type=CONTENT_TYPE, head_only=method == b"HEAD")
            elif target == b"/":
                await self._reply(writer, 200, "OK", "mrpcd: metrics at /metrics\n", head_only=method == b"HEAD")
            else:
                await self._reply(writer, 404, "Not Found", "only /metrics here\n")
        except Exception:  # a scrape must never take the daemon down
            log.exception("metrics request failed")
        finally:
            self._connections -= 1
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, reason: str, body: str, content_type: str = "text/plain; charset=utf-8",
                     extra: str = "", head_only: bool = False) -> None:
        data = body.encode()
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n{extra}\r\n".encode() + (b"" if head_only else data)
        )
        try:
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError):
            pass

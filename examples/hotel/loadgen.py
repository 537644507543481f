"""Hotel load generator: DeathStarBench's wrk2 mixed workload against the frontend.

Closed loop: `--concurrency` workers each send the next request as soon as the previous
one answered, for `--duration` seconds (after `--warmup`) or `--max-requests` requests,
whichever comes first. The mix is wrk2's mixed-workload_type_1.lua: 60% search, 39%
recommend, 0.5% login, 0.5% reserve, with its random dates, points and users. Before the
load, fixed probes call every path once (including the reservations the operator's ACL
must refuse). Prints one JSON object on stdout.

    python loadgen.py --rt {mrpcd,grpc} --gen GEN --target HOST:PORT [--duration S] [--concurrency N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
MIX = (("search", 0.60), ("recommend", 0.39), ("login", 0.005), ("reserve", 0.005))
TIMEOUT = 10.0


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean of latencies in seconds, reported in microseconds (nearest rank)."""
    if not samples:
        return {"p50_us": 0.0, "p90_us": 0.0, "p99_us": 0.0, "mean_us": 0.0}
    s = sorted(samples)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))] * 1e6

    return {"p50_us": rank(0.50), "p90_us": rank(0.90), "p99_us": rank(0.99), "mean_us": sum(s) / len(s) * 1e6}


class Workload:
    """Request builders with wrk2's random choices (seeded)."""

    def __init__(self, fm: Any, seed: int) -> None:
        self.m = fm
        self.rnd = random.Random(seed)

    def dates(self) -> tuple[str, str]:
        d_in = self.rnd.randint(9, 23)
        d_out = self.rnd.randint(d_in + 1, 24)
        return f"2015-04-{d_in:02d}", f"2015-04-{d_out:02d}"

    def point(self) -> tuple[float, float]:
        return 38.0235 + (self.rnd.randint(0, 481) - 240.5) / 1000.0, -122.095 + (self.rnd.randint(0, 325) - 157.0) / 1000.0

    def user(self) -> tuple[str, str]:
        i = self.rnd.randint(0, 500)
        return f"Cornell_{i}", str(i) * 10

    def pick(self) -> str:
        x, acc = self.rnd.random(), 0.0
        for name, p in MIX:
            acc += p
            if x < acc:
                return name
        return MIX[-1][0]

    def request(self, kind: str) -> Any:
        m = self.m
        if kind == "search":
            d_in, d_out = self.dates()
            lat, lon = self.point()
            return m.SearchRequest(inDate=d_in, outDate=d_out, lat=lat, lon=lon, locale="en")
        if kind == "recommend":
            lat, lon = self.point()
            return m.RecommendRequest(require=self.rnd.choice(["dis", "rate", "price"]), lat=lat, lon=lon)
        if kind == "login":
            u, pw = self.user()
            return m.LoginRequest(username=u, password=pw)
        d_in, d_out = self.dates()
        lat, lon = self.point()
        u, pw = self.user()
        return m.ReserveRequest(inDate=d_in, outDate=d_out, lat=lat, lon=lon, hotelId=str(self.rnd.randint(1, 80)),
                                customerName=u, username=u, password=pw, number=1)


async def probes(rt: Any, stub: Any, m: Any, blocked: str, too_many: int) -> dict[str, dict]:
    """Every path once, with the outcome each must have."""
    from rt import error_code, error_details

    def reserve(customer: str, number: int) -> Any:
        return m.ReserveRequest(inDate="2015-04-10", outDate="2015-04-12", lat=38.0, lon=-122.1, hotelId="5",
                                customerName=customer, username="Cornell_2", password="2" * 10, number=number)

    cases: list[tuple[str, Any, Any, str, Any]] = [
        ("login", stub.Login, m.LoginRequest(username="Cornell_1", password="1" * 10), "OK", lambda r: r.ok),
        ("login_wrong_password", stub.Login, m.LoginRequest(username="Cornell_1", password="x"), "OK", lambda r: not r.ok),
        ("search", stub.SearchHotels, m.SearchRequest(inDate="2015-04-10", outDate="2015-04-12", lat=38.0235, lon=-122.095),
         "OK", lambda r: len(r.hotels) > 0),
        ("recommend_dis", stub.Recommend, m.RecommendRequest(require="dis", lat=38.0, lon=-122.1), "OK", lambda r: len(r.hotels) > 0),
        ("recommend_rate", stub.Recommend, m.RecommendRequest(require="rate", lat=38.0, lon=-122.1), "OK", lambda r: len(r.hotels) > 0),
        ("recommend_price", stub.Recommend, m.RecommendRequest(require="price", lat=38.0, lon=-122.1), "OK", lambda r: len(r.hotels) > 0),
        ("recommend_bad", stub.Recommend, m.RecommendRequest(require="stars"), "INVALID_ARGUMENT", None),
        ("reserve", stub.Reserve, reserve("Cornell_2", 1), "OK", lambda r: r.hotelIds == ["5"]),
        ("reserve_blocked_customer", stub.Reserve, reserve(blocked, 1), "PERMISSION_DENIED", None),
        ("reserve_too_many_rooms", stub.Reserve, reserve("Cornell_2", too_many), "PERMISSION_DENIED", None),
    ]
    out = {}
    for name, method, req, want, check in cases:
        try:
            reply = await method(req, timeout=TIMEOUT)
            code, detail = "OK", ""
            ok = want == "OK" and bool(check(reply))
            if want == "OK" and hasattr(reply, "hotels"):
                detail = f"{len(reply.hotels)} hotels"
            elif hasattr(reply, "message"):
                detail = reply.message
        except rt.RpcError as exc:
            code, detail = error_code(exc), error_details(exc)
            ok = code == want
        out[name] = {"expected": want, "code": code, "ok": ok, "detail": detail}
    return out


async def run(args: argparse.Namespace) -> dict:
    from rt import Runtime, error_code

    rt = Runtime(args.rt, app_name="hotel-loadgen")
    m = rt.messages("frontend")
    stub = rt.stub("frontend", rt.channel(args.target))
    result: dict[str, Any] = {"rt": args.rt, "concurrency": args.concurrency}
    result["probes"] = await probes(rt, stub, m, args.blocked_customer, args.too_many_rooms)
    methods = {"search": stub.SearchHotels, "recommend": stub.Recommend, "login": stub.Login, "reserve": stub.Reserve}
    lat: dict[str, list[float]] = {k: [] for k, _ in MIX}
    errors: dict[str, int] = {}
    measuring = False
    stop_at = [0.0]
    sent = [0]

    async def worker(w: int) -> None:
        wl = Workload(m, args.seed * 1000 + w)
        while time.monotonic() < stop_at[0] and sent[0] < args.max_requests:
            kind = wl.pick()
            req = wl.request(kind)
            t0 = time.perf_counter()
            try:
                await methods[kind](req, timeout=TIMEOUT)
                ok = True
            except rt.RpcError as exc:
                ok = False
                code = error_code(exc)
            dt = time.perf_counter() - t0
            if measuring:
                sent[0] += 1
                if ok:
                    lat[kind].append(dt)
                else:
                    errors[f"{kind}:{code}"] = errors.get(f"{kind}:{code}", 0) + 1

    stop_at[0] = time.monotonic() + args.warmup
    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    measuring = True
    t_start = time.monotonic()
    stop_at[0] = t_start + args.duration
    await asyncio.gather(*(worker(w + args.concurrency) for w in range(args.concurrency)))
    elapsed = time.monotonic() - t_start
    every = [x for v in lat.values() for x in v]
    result.update({
        "duration_s": elapsed,
        "requests": sent[0],
        "completed": len(every),
        "errors": errors,
        "throughput_rps": len(every) / elapsed if elapsed > 0 else 0.0,
        "latency": percentiles(every),
        "by_type": {k: {"n": len(v), **percentiles(v)} for k, v in lat.items()},
    })
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rt", required=True, choices=("mrpcd", "grpc"))
    p.add_argument("--gen", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--blocked-customer", default="Mallory")
    p.add_argument("--too-many-rooms", type=int, default=50)
    args = p.parse_args()
    if args.duration <= 0 or args.concurrency < 1 or args.max_requests < 1:
        p.error("--duration must be > 0, --concurrency and --max-requests >= 1")
    sys.path[:0] = [args.gen, HERE]
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The load generator: runs a list of jobs against one target over mrpcd or grpcio, sync or aio.

Why a separate process: the client must not share a GIL (or a core's time slices) with the
server, and every system gets the very same client loop; only the stub underneath differs.
Concurrency N means N threads (sync) or N asyncio tasks on one loop (aio).

    python loadgen.py --api {mrpcd,grpc} --flavor {sync,aio} --target HOST:PORT --gen GEN --jobs jobs.json

jobs.json is a list of objects:
    {"id": str, "kind": "latency"|"throughput"|"stream", "size": int, "concurrency": int,
     "warmup_s": float, "duration_s": float, "max_calls": int}
One JSON object per job is printed on stdout as soon as it finishes (the runner shows progress
from them). Every loop is bounded both by `max_calls` and by time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

STREAM_COUNT = 256                 # messages per Stream call
CALL_TIMEOUT = 60.0
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
KINDS = ("latency", "throughput", "stream")


def check_job(job: Any) -> dict:
    """Bad job files get a clear error, not a traceback from deep inside a loop."""
    if not isinstance(job, dict):
        raise ValueError(f"job must be an object, got {job!r}")
    need = {"id": str, "kind": str, "size": int, "concurrency": int, "warmup_s": (int, float),
            "duration_s": (int, float), "max_calls": int}
    for key, typ in need.items():
        if not isinstance(job.get(key), typ):
            raise ValueError(f"job {job.get('id')!r}: {key!r} missing or not {typ}")
    if job["kind"] not in KINDS:
        raise ValueError(f"job {job['id']!r}: kind must be one of {KINDS}")
    if job["size"] < 0 or job["concurrency"] < 1 or job["max_calls"] < 1 or job["duration_s"] <= 0:
        raise ValueError(f"job {job['id']!r}: size >= 0, concurrency >= 1, max_calls >= 1, duration_s > 0 required")
    return job


class Stubs:
    """The generated stub + message classes of one API."""

    def __init__(self, api: str, flavor: str, target: str) -> None:
        if api == "mrpcd":
            import bench_mrpc as m
            if flavor == "sync":
                import mrpcd
                self.channel = mrpcd.insecure_channel(target, options=GRPC_OPTIONS)
            else:
                import mrpcd.aio
                self.channel = mrpcd.aio.insecure_channel(target, options=GRPC_OPTIONS)
        else:
            import bench_pb2 as m
            import bench_pb2_grpc as g
            import grpc
            if flavor == "sync":
                self.channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
            else:
                self.channel = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
            m.BenchStub = g.BenchStub
        self.m = m
        self.stub = m.BenchStub(self.channel)


def _result(job: dict, t0: float, t1: float, calls: int, messages: int, errors: list[str], **extra: Any) -> dict:
    secs = max(t1 - t0, 1e-9)
    out = {"id": job["id"], "seconds": secs, "calls": calls, "rpc_per_s": calls / secs,
           "errors": len(errors), "first_error": errors[0] if errors else None, **extra}
    if job["kind"] == "throughput":
        out["goodput_Bps"] = calls * job["size"] / secs
    if job["kind"] == "stream":
        out["messages"] = messages
        out["msg_per_s"] = messages / secs
    return out


# ---------------------------------------------------------------- sync (threads)

def run_sync(s: Stubs, job: dict) -> dict:
    kind, size, n = job["kind"], job["size"], job["concurrency"]
    req = s.m.Payload(data=b"x" * size) if kind != "stream" else s.m.StreamRequest(count=STREAM_COUNT, size=size)
    errors: list[str] = []

    def one() -> int:
        if kind == "stream":
            return sum(1 for _ in s.stub.Stream(req, timeout=CALL_TIMEOUT))
        s.stub.Echo(req, timeout=CALL_TIMEOUT)
        return 1

    warm_end = time.monotonic() + job["warmup_s"]
    while time.monotonic() < warm_end:
        one()
    if kind == "latency":
        samples: list[float] = []
        end = time.monotonic() + job["duration_s"]
        t0 = time.monotonic()
        while len(samples) < job["max_calls"] and time.monotonic() < end:
            a = time.perf_counter_ns()
            one()
            samples.append((time.perf_counter_ns() - a) / 1000.0)
        return _result(job, t0, time.monotonic(), len(samples), 0, errors, latency_us=samples)
    # throughput / stream: N threads, counters read at the window's edges
    counts = [0] * n
    msgs = [0] * n
    stop = threading.Event()
    budget = job["max_calls"]

    def worker(i: int) -> None:
        while not stop.is_set() and counts[i] * n < budget:
            try:
                msgs[i] += one()
                counts[i] += 1
            except Exception as exc:  # recorded, the run goes on (and is reported as errors)
                errors.append(repr(exc)[:300])
                if len(errors) > 100:
                    return

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(job["warmup_s"])
    c0, m0, t0 = sum(counts), sum(msgs), time.monotonic()
    end = t0 + job["duration_s"]
    while time.monotonic() < end and any(t.is_alive() for t in threads):
        time.sleep(0.02)
    c1, m1, t1 = sum(counts), sum(msgs), time.monotonic()
    stop.set()
    for t in threads:
        t.join(CALL_TIMEOUT)
    return _result(job, t0, t1, c1 - c0, m1 - m0, errors)


# ---------------------------------------------------------------- aio (tasks)

async def run_aio(s: Stubs, job: dict) -> dict:
    kind, size, n = job["kind"], job["size"], job["concurrency"]
    req = s.m.Payload(data=b"x" * size) if kind != "stream" else s.m.StreamRequest(count=STREAM_COUNT, size=size)
    errors: list[str] = []

    async def one() -> int:
        if kind == "stream":
            k = 0
            async for _ in s.stub.Stream(req, timeout=CALL_TIMEOUT):
                k += 1
            return k
        await s.stub.Echo(req, timeout=CALL_TIMEOUT)
        return 1

    loop = asyncio.get_running_loop()
    warm_end = loop.time() + job["warmup_s"]
    while loop.time() < warm_end:
        await one()
    if kind == "latency":
        samples: list[float] = []
        end = time.monotonic() + job["duration_s"]
        t0 = time.monotonic()
        while len(samples) < job["max_calls"] and time.monotonic() < end:
            a = time.perf_counter_ns()
            await one()
            samples.append((time.perf_counter_ns() - a) / 1000.0)
        return _result(job, t0, time.monotonic(), len(samples), 0, errors, latency_us=samples)
    counts = [0] * n
    msgs = [0] * n
    stop = False
    budget = job["max_calls"]

    async def worker(i: int) -> None:
        while not stop and counts[i] * n < budget:
            try:
                msgs[i] += await one()
                counts[i] += 1
            except Exception as exc:
                errors.append(repr(exc)[:300])
                if len(errors) > 100:
                    return

    tasks = [asyncio.ensure_future(worker(i)) for i in range(n)]
    await asyncio.sleep(job["warmup_s"])
    c0, m0, t0 = sum(counts), sum(msgs), time.monotonic()
    end = t0 + job["duration_s"]
    while time.monotonic() < end and not all(t.done() for t in tasks):
        await asyncio.sleep(0.02)
    c1, m1, t1 = sum(counts), sum(msgs), time.monotonic()
    stop = True
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), CALL_TIMEOUT)
    return _result(job, t0, t1, c1 - c0, m1 - m0, errors)


def _failed(job: dict, exc: BaseException) -> dict:
    """A job that could not run at all (e.g. its warm-up call failed) is reported, not fatal."""
    return {"id": job["id"], "seconds": 0.0, "calls": 0, "rpc_per_s": 0.0, "errors": 1,
            "first_error": f"{type(exc).__name__}: {exc}"[:500]}


def _emit(out: dict) -> None:
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


async def _main_aio(args, jobs: list[dict]) -> None:
    s = Stubs(args.api, "aio", args.target)
    for job in jobs:
        try:
            _emit(await run_aio(s, job))
        except Exception as exc:
            _emit(_failed(job, exc))
    await s.channel.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", choices=["mrpcd", "grpc"], required=True)
    p.add_argument("--flavor", choices=["sync", "aio"], required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--gen", required=True)
    p.add_argument("--jobs", required=True, help="JSON file with the list of jobs")
    args = p.parse_args(argv)
    with open(args.jobs) as f:
        jobs = json.load(f)
    if not isinstance(jobs, list):
        p.error("--jobs must hold a JSON list")
    try:
        jobs = [check_job(j) for j in jobs]
    except ValueError as exc:
        p.error(str(exc))
    sys.path.insert(0, args.gen)
    if args.flavor == "sync":
        s = Stubs(args.api, "sync", args.target)
        for job in jobs:
            try:
                _emit(run_sync(s, job))
            except Exception as exc:
                _emit(_failed(job, exc))
        s.channel.close()
    else:
        # The default asyncio loop for both APIs: grpc.aio runs its own poller and is not
        # supported on uvloop, so uvloop here would favour one side.
        asyncio.run(_main_aio(args, jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

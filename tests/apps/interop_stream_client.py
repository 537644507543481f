"""Token-streaming load for the syscall count test (tests/test_streaming_syscalls.py).

Streams `--streams` server-streaming calls of `--count` small messages each from the
greeter (tests/apps/hello_server.py), back to back, sync or asyncio. The test measures
every process's /proc/PID/io around the run, so the run is fenced by stdin: one warm-up
stream, then "ready" on stdout; the run starts at a "go" line on stdin and ends with one
JSON line on stdout; the process exits at the next stdin line (or EOF).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import mrpcd
import mrpcd.aio

import hello_mrpc


def _wait_for(word: str) -> None:
    line = sys.stdin.readline()
    if line.strip() != word:
        raise SystemExit(f"expected {word!r} on stdin, got {line!r}")


def run_sync(target: str, streams: int, count: int) -> dict:
    stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(target))
    assert sum(1 for _ in stub.SayHelloStream(hello_mrpc.HelloRequest(name="warm", count=count), timeout=60)) == count
    print("ready", flush=True)
    _wait_for("go")
    start = time.perf_counter()
    received = 0
    for i in range(streams):
        for reply in stub.SayHelloStream(hello_mrpc.HelloRequest(name="t", count=count), timeout=60):
            received += 1
    return {"received": received, "seconds": time.perf_counter() - start}


async def run_async(target: str, streams: int, count: int) -> dict:
    stub = hello_mrpc.GreeterStub(mrpcd.aio.insecure_channel(target))
    n = 0
    async for _ in stub.SayHelloStream(hello_mrpc.HelloRequest(name="warm", count=count), timeout=60):
        n += 1
    assert n == count
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, _wait_for, "go")
    start = time.perf_counter()
    received = 0
    for i in range(streams):
        async for _ in stub.SayHelloStream(hello_mrpc.HelloRequest(name="t", count=count), timeout=60):
            received += 1
    return {"received": received, "seconds": time.perf_counter() - start}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--async", dest="use_async", action="store_true")
    args = p.parse_args()
    if args.use_async:
        out = asyncio.run(run_async(args.target, args.streams, args.count))
    else:
        out = run_sync(args.target, args.streams, args.count)
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Test app: calls the greeter through the daemon in MRPCD_SOCKET and prints what it got.

Modes: `unary N` (N calls, prints each reply and a final "ok N"), `stream`, `async N`,
`slow SECONDS` (one slow call; used to kill the client mid-RPC), `status NAME` (prints the
code and details of the failure), `flood CALLS SIZE CONCURRENCY` (short-deadline calls;
prints the codes seen as JSON).
"""
from __future__ import annotations

import asyncio
import sys

import mrpcd
import mrpcd.aio

import hello_mrpc


def main() -> int:
    target, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
    if mode == "async":
        return asyncio.run(run_async(target, int(arg)))
    if mode == "flood":
        return asyncio.run(run_flood(target, int(arg), int(sys.argv[4]), int(sys.argv[5])))
    stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(target))
    if mode == "unary":
        for i in range(int(arg)):
            reply = stub.SayHello(hello_mrpc.HelloRequest(name=f"n{i}"), timeout=20, metadata=[("x-tag", f"t{i}")])
            assert reply.message == f"Hello, n{i}! (t{i})", reply.message
        print(f"ok {arg}", flush=True)
    elif mode == "stream":
        for reply in stub.SayHelloStream(hello_mrpc.HelloRequest(name="s", count=int(arg or 3)), timeout=20):
            print(reply.message, flush=True)
        print("ok stream", flush=True)
    elif mode == "slow":
        print("calling", flush=True)
        stub.SayHello(hello_mrpc.HelloRequest(name=f"slow:{arg}"), timeout=60)
        print("returned", flush=True)
    elif mode == "load":
        return run_load(stub, float(arg), int(sys.argv[4]) if len(sys.argv) > 4 else 4)
    elif mode == "bulk":
        return run_bulk(stub, int(arg), int(sys.argv[4]) if len(sys.argv) > 4 else 8)
    elif mode == "status":
        try:
            stub.SayHello(hello_mrpc.HelloRequest(name=arg), timeout=20)
            print("OK", flush=True)
        except mrpcd.RpcError as exc:
            print(f"{exc.code().name}|{exc.details()}", flush=True)
    return 0


async def run_flood(target: str, calls: int, size: int, conc: int) -> int:
    """`calls` calls of `size` bytes, `conc` at a time, 0.5 s deadline each (a client that
    keeps calling a hung backend). Prints one JSON line: {code: [count, first details]}."""
    import json

    seen: dict[str, list] = {}
    async with mrpcd.aio.insecure_channel(target) as ch:
        stub = hello_mrpc.GreeterStub(ch)
        sem = asyncio.Semaphore(conc)
        name = "x" * size

        async def one() -> None:
            async with sem:
                try:
                    await stub.SayHello(hello_mrpc.HelloRequest(name=name), timeout=0.5)
                    code, details = "OK", ""
                except mrpcd.aio.AioRpcError as exc:
                    code, details = exc.code().name, exc.details()
                seen.setdefault(code, [0, details])[0] += 1

        await asyncio.gather(*(one() for _ in range(calls)))
    print(json.dumps(seen), flush=True)
    return 0


# Request sizes for `bulk`: around the daemon's zero-copy threshold (64 KiB) and well above.
BULK_SIZES = (10, 60_000, 65_496, 65_536, 70_000, 300_000, 1 << 20)


def run_bulk(stub, calls: int, threads: int) -> int:
    """`calls` calls per thread from `threads` threads with big, distinct names (every
    call's bytes differ); each reply must echo its own name byte for byte. Prints
    "started" after the first reply, then "ok bulk N"."""
    import random
    import threading

    failures: list[str] = []
    started = threading.Event()

    def worker(w: int) -> None:
        rnd = random.Random(w)
        for i in range(calls):
            size = BULK_SIZES[(w + i) % len(BULK_SIZES)]
            name = f"{w}:{i}:" + "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz", k=16)) * (size // 16 + 1)
            name = name[:size]
            try:
                reply = stub.SayHello(hello_mrpc.HelloRequest(name=name), timeout=60)
            except mrpcd.RpcError as exc:
                failures.append(f"call {w}/{i}: {exc.code().name} {exc.details()}")
                return
            if reply.message != f"Hello, {name}!":
                failures.append(f"call {w}/{i} ({size} B): reply differs")
                return
            if not started.is_set():
                started.set()
                print("started", flush=True)

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"ok bulk {calls * threads}", flush=True)
    return 0


def run_load(stub, seconds: float, threads: int) -> int:
    """Calls from `threads` threads until STOP_FILE exists or `seconds` pass; counts everything.

    Prints "started" once the first call succeeded, then at the end
    "attempted A completed C failed F" and one line per distinct failure.
    """
    import os
    import threading
    import time

    stop_file = os.environ.get("STOP_FILE", "")
    end = time.monotonic() + seconds
    lock = threading.Lock()
    counts = {"attempted": 0, "completed": 0, "failed": 0}
    errors: dict[str, int] = {}
    started = threading.Event()

    def worker(w: int) -> None:
        i = 0
        while time.monotonic() < end and not (stop_file and os.path.exists(stop_file)):
            with lock:
                counts["attempted"] += 1
            try:
                reply = stub.SayHello(hello_mrpc.HelloRequest(name=f"w{w}-{i}"), timeout=20)
                assert reply.message == f"Hello, w{w}-{i}!", reply.message
                with lock:
                    counts["completed"] += 1
                started.set()
            except Exception as exc:  # count every failure, whatever it is
                key = f"{type(exc).__name__}: {exc}"
                with lock:
                    counts["failed"] += 1
                    errors[key] = errors.get(key, 0) + 1
            i += 1

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    started.wait(20)
    print("started", flush=True)
    for t in pool:
        t.join()
    print(f"attempted {counts['attempted']} completed {counts['completed']} failed {counts['failed']}", flush=True)
    for key, n in errors.items():
        print(f"error x{n}: {key}", flush=True)
    return 0


async def run_async(target: str, n: int) -> int:
    async with mrpcd.aio.insecure_channel(target) as channel:
        stub = hello_mrpc.GreeterStub(channel)
        replies = await asyncio.gather(*(stub.SayHello(hello_mrpc.HelloRequest(name=f"a{i}"), timeout=20) for i in range(n)))
        for i, r in enumerate(replies):
            assert r.message.startswith(f"Hello, a{i}!"), r.message
        got = [r.message async for r in stub.SayHelloStream(hello_mrpc.HelloRequest(name="as", count=4), timeout=20)]
        assert len(got) == 4, got
    print(f"ok async {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

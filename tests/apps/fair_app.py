"""Test app for tests/test_fairness.py: the Streamer service (tests/protos/streaming.proto)
served through the daemon in MRPCD_SOCKET, or a client that floods it.

Modes:
  serve [--workers N] [--async]   Unary: a Summary with the request's size; after
                                  `Unary(seq=-S)` sleeps S ms first (a slow method);
                                  Ping: at once; ServerStream: `seq` chunks of the request's
                                  data; ClientStream: reads one message, then `seq` ms before
                                  reading the rest. Prints "host:port", serves until killed.
  flood TARGET SECONDS CONC MIN_KIB MAX_KIB [echo]
                                  Unary calls of MIN..MAX KiB (echo: ServerStream calls of
                                  one chunk, the request's data sent back), CONC at a time, for at most
                                  SECONDS (bounded; SIGUSR1 ends it sooner), 60 s deadline
                                  each; prints "started" after the first answer, then one
                                  JSON line: {"calls": n, "codes": {code: count}}.
  hammer TARGET SECONDS CONC sync|async DEADLINE [PAUSE_MS]
                                  small unary calls (Ping, and Unary of 100 B), CONC at a
                                  time (threads, or tasks on one event loop), for SECONDS,
                                  each with DEADLINE seconds: a stalled call fails it; each
                                  worker pauses 0..PAUSE_MS between calls (so both sides
                                  go to sleep between them). Prints
                                  one JSON line: {"calls": n, "codes": {...}, "max_s": worst}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mrpcd
import mrpcd.aio

import streaming_mrpc as pb


class Streamer(pb.StreamerServicer):
    def Unary(self, request, context):
        if request.seq < 0:
            time.sleep(-request.seq / 1000)
        return pb.Summary(total=len(request.data))

    def Ping(self, request, context):
        return request

    def ServerStream(self, request, context):
        for i in range(request.seq):
            yield pb.Chunk(data=request.data, seq=i)

    def ClientStream(self, request_iterator, context):
        first = next(request_iterator)
        time.sleep(first.seq / 1000)
        return pb.Summary(total=len(first.data) + sum(len(c.data) for c in request_iterator))


class AsyncStreamer(pb.StreamerServicer):
    async def Unary(self, request, context):
        if request.seq < 0:
            await asyncio.sleep(-request.seq / 1000)
        return pb.Summary(total=len(request.data))

    async def Ping(self, request, context):
        return request


def serve(workers: int, use_async: bool) -> int:
    if use_async:
        async def run() -> None:
            server = mrpcd.aio.server()
            pb.add_StreamerServicer_to_server(AsyncStreamer(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(f"127.0.0.1:{port}", flush=True)
            await server.wait_for_termination()

        asyncio.run(run())
        return 0
    server = mrpcd.server(ThreadPoolExecutor(workers))
    pb.add_StreamerServicer_to_server(Streamer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


def flood(target: str, seconds: float, conc: int, min_kib: int, max_kib: int, echo: bool = False) -> int:
    stub = pb.StreamerStub(mrpcd.insecure_channel(target))
    end = time.monotonic() + seconds
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: stop.set())
    lock = threading.Lock()
    codes: dict[str, int] = {}
    calls = [0]
    started = threading.Event()
    blobs = {k: bytes(k * 1024) for k in range(min_kib, max_kib + 1, max(1, (max_kib - min_kib) // 4 or 1))}
    sizes = sorted(blobs)

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < end and not stop.is_set():
            data = blobs[rnd.choice(sizes)]
            try:
                if echo:
                    got = [len(c.data) for c in stub.ServerStream(pb.Chunk(data=data, seq=1), timeout=60)]
                    code = "OK" if got == [len(data)] else "WRONG"
                else:
                    reply = stub.Unary(pb.Chunk(data=data), timeout=60)
                    code = "OK" if reply.total == len(data) else "WRONG"
            except mrpcd.RpcError as exc:
                code = exc.code().name
            with lock:
                calls[0] += 1
                codes[code] = codes.get(code, 0) + 1
            if not started.is_set():
                started.set()
                print("started", flush=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.1)
    print(json.dumps({"calls": calls[0], "codes": codes}), flush=True)
    return 0


def hammer(target: str, seconds: float, conc: int, kind: str, deadline: float, pause_ms: float) -> int:
    codes: dict[str, int] = {}
    worst = [0.0]
    calls = [0]
    empty = next(c for name, c in vars(pb).items() if name.endswith("Empty") and isinstance(c, type))()
    chunk = pb.Chunk(data=bytes(100))

    def done(t0: float, code: str) -> None:
        calls[0] += 1
        codes[code] = codes.get(code, 0) + 1
        worst[0] = max(worst[0], time.monotonic() - t0)

    if kind == "async":
        async def run() -> None:
            async with mrpcd.aio.insecure_channel(target) as ch:
                stub = pb.StreamerStub(ch)
                end = time.monotonic() + seconds

                async def worker(i: int) -> None:
                    while time.monotonic() < end:
                        t0 = time.monotonic()
                        try:
                            if i % 2:
                                await stub.Ping(empty, timeout=deadline)
                            else:
                                await stub.Unary(chunk, timeout=deadline)
                            code = "OK"
                        except mrpcd.RpcError as exc:
                            code = exc.code().name
                        done(t0, code)
                        if pause_ms:
                            await asyncio.sleep(random.uniform(0, pause_ms) / 1000)

                await asyncio.gather(*(worker(i) for i in range(conc)))

        asyncio.run(run())
    else:
        stub = pb.StreamerStub(mrpcd.insecure_channel(target))
        end = time.monotonic() + seconds
        lock = threading.Lock()

        def worker(i: int) -> None:
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    if i % 2:
                        stub.Ping(empty, timeout=deadline)
                    else:
                        stub.Unary(chunk, timeout=deadline)
                    code = "OK"
                except mrpcd.RpcError as exc:
                    code = exc.code().name
                with lock:
                    done(t0, code)
                if pause_ms:
                    time.sleep(random.uniform(0, pause_ms) / 1000)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps({"calls": calls[0], "codes": codes, "max_s": round(worst[0], 3)}), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["serve", "flood", "hammer"])
    p.add_argument("args", nargs="*")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--async", dest="use_async", action="store_true")
    a = p.parse_args()
    if a.mode == "serve":
        return serve(a.workers, a.use_async)
    if a.mode == "hammer":
        target, seconds, conc, kind, deadline, *pause = a.args
        return hammer(target, float(seconds), int(conc), kind, float(deadline), float(pause[0]) if pause else 0.0)
    target, seconds, conc, lo, hi, *echo = a.args
    return flood(target, float(seconds), int(conc), int(lo), int(hi), echo == ["echo"])


if __name__ == "__main__":
    sys.exit(main())

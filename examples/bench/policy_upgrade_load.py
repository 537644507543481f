"""Load generator for policy_upgrade.py: closed-loop greeter calls, every call timestamped.

Runs `--threads` callers until `--stop-file` exists (or `--seconds` pass) and writes one
JSON object: per call [start (monotonic s), latency (s), ok (bool), error text or ""].
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

import mrpcd

import hello_mrpc


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(args.target))
    stub.SayHello(hello_mrpc.HelloRequest(name="warmup"), timeout=10)
    calls: list[list] = []
    lock = threading.Lock()
    end = time.monotonic() + args.seconds

    def worker(w: int) -> None:
        mine = []
        i = 0
        while time.monotonic() < end and not os.path.exists(args.stop_file):
            t0 = time.monotonic()
            try:
                reply = stub.SayHello(hello_mrpc.HelloRequest(name=f"{w}.{i}"), timeout=10)
                ok, err = reply.message == f"Hello, {w}.{i}!", ""
            except mrpcd.RpcError as exc:
                ok, err = False, f"{exc.code().name}: {exc.details()}"
            mine.append([t0, time.monotonic() - t0, ok, err])
            i += 1
        with lock:
            calls.extend(mine)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.threads)]
    print("started", flush=True)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(args.out, "w") as f:
        json.dump({"calls": calls}, f)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

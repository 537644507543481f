"""Test client for flow control: reads a long stream slowly, then fast; measures throughput.

Prints one JSON line: how far the server got while this client paused, whether every
message arrived in order, this process's peak RSS, and msgs/s of 256-message streams.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import mrpcd

import hello_mrpc


def peak_rss_kb() -> int:
    """This process's peak RSS: VmHWM of its own memory map.

    Not getrusage().ru_maxrss: Linux carries ru_maxrss across execve, so a client spawned by
    a big pytest process would report the parent's peak (seen: 290 MB in a full run).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--progress", required=True)
    p.add_argument("--count", type=int, default=100_000)
    args = p.parse_args()
    stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(args.target))
    out: dict = {}
    stream = stub.SayHelloStream(hello_mrpc.HelloRequest(name="x", count=args.count), timeout=60)
    expected = 0
    for _ in range(1000):
        assert next(stream).message == str(expected)
        expected += 1
    time.sleep(1.0)  # a slow reader: the server must pause
    with open(args.progress) as f:
        out["server_yielded_during_pause"] = int(f.read() or 0)
    out["read_before_pause"] = expected
    in_order = True
    for reply in stream:
        if reply.message != str(expected):
            in_order = False
        expected += 1
    out["received"] = expected
    out["in_order"] = in_order
    out["code"] = stream.code().name
    # token streaming: 256-message streams, back to back
    rounds = 20
    start = time.perf_counter()
    for _ in range(rounds):
        n = sum(1 for _ in stub.SayHelloStream(hello_mrpc.HelloRequest(name="t", count=256), timeout=30))
        assert n == 256
    elapsed = time.perf_counter() - start
    out["stream256_msgs_per_s"] = round(rounds * 256 / elapsed)
    out["client_max_rss_kb"] = peak_rss_kb()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Test app: calls the greeter through the daemon in MRPCD_SOCKET and prints what it got.

Modes: `unary N` (N calls, prints each reply and a final "ok N"), `stream`, `async N`,
`slow SECONDS` (one slow call; used to kill the client mid-RPC), `status NAME` (prints the
code and details of the failure).
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
    elif mode == "status":
        try:
            stub.SayHello(hello_mrpc.HelloRequest(name=arg), timeout=20)
            print("OK", flush=True)
        except mrpcd.RpcError as exc:
            print(f"{exc.code().name}|{exc.details()}", flush=True)
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

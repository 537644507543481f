"""The greeter client: sync and asyncio calls through the local mrpcd to the server's."""
from __future__ import annotations

import argparse
import asyncio
import sys

import mrpcd
import mrpcd.aio

from hello_stubs import import_hello_stubs

hello_mrpc = import_hello_stubs(__file__)


def run_sync(target: str, name: str) -> None:
    with mrpcd.insecure_channel(target) as channel:
        stub = hello_mrpc.GreeterStub(channel)
        reply = stub.SayHello(hello_mrpc.HelloRequest(name=name), timeout=10)
        print(f"sync  unary : {reply.message}")
        for reply in stub.SayHelloStream(hello_mrpc.HelloRequest(name=name), timeout=10):
            print(f"sync  stream: {reply.message}")


async def run_async(target: str, name: str) -> None:
    async with mrpcd.aio.insecure_channel(target) as channel:
        stub = hello_mrpc.GreeterStub(channel)
        reply = await stub.SayHello(hello_mrpc.HelloRequest(name=name), timeout=10)
        print(f"async unary : {reply.message}")
        async for reply in stub.SayHelloStream(hello_mrpc.HelloRequest(name=name), timeout=10):
            print(f"async stream: {reply.message}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--name", default="world")
    args = p.parse_args()
    try:
        run_sync(args.target, args.name)
        asyncio.run(run_async(args.target, args.name))
    except mrpcd.RpcError as exc:
        print(f"RPC failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

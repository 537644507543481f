"""Test app: the greeter served through the daemon in MRPCD_SOCKET; prints its address.

Names with a meaning: "slow:<seconds>" sleeps in the handler while the call is active and
records whether it saw the cancellation in the file given by --cancel-log (and, with
--started-log, that it started, in that file).
"""
from __future__ import annotations

import argparse
import sys
import time

import mrpcd
from serving import serve
import mrpcd.aio

import hello_mrpc


class Greeter(hello_mrpc.GreeterServicer):
    def __init__(self, cancel_log: str | None, started_log: str | None = None) -> None:
        self.cancel_log = cancel_log
        self.started_log = started_log

    def SayHello(self, request, context):
        if request.name.startswith("slow:"):
            seconds = float(request.name.split(":", 1)[1])
            if self.started_log:
                with open(self.started_log, "a") as f:
                    f.write("started\n")
            end = time.monotonic() + seconds
            while time.monotonic() < end and context.is_active():
                time.sleep(0.01)
            if self.cancel_log:
                with open(self.cancel_log, "a") as f:
                    f.write("cancelled\n" if not context.is_active() else "finished\n")
        if request.name == "boom":
            raise RuntimeError("boom")
        if request.name == "abort":
            context.abort(mrpcd.StatusCode.PERMISSION_DENIED, "not you")
        meta = dict(context.invocation_metadata())
        suffix = f" ({meta['x-tag']})" if "x-tag" in meta else ""
        return hello_mrpc.HelloReply(message=f"Hello, {request.name}!{suffix}")

    def SayHelloStream(self, request, context):
        for i in range(request.count or 3):
            yield hello_mrpc.HelloReply(message=f"Hello #{i + 1}, {request.name}!")


class AsyncGreeter(hello_mrpc.GreeterServicer):
    async def SayHello(self, request, context):
        return hello_mrpc.HelloReply(message=f"Hello, {request.name}! (async)")

    async def SayHelloStream(self, request, context):
        for i in range(request.count or 3):
            yield hello_mrpc.HelloReply(message=f"Hello #{i + 1}, {request.name}! (async)")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--cancel-log")
    p.add_argument("--started-log")
    p.add_argument("--async", dest="use_async", action="store_true")
    args = p.parse_args()
    servicer = AsyncGreeter() if args.use_async else Greeter(args.cancel_log, args.started_log)
    return serve(hello_mrpc.add_GreeterServicer_to_server, servicer, args.address, args.use_async)


if __name__ == "__main__":
    sys.exit(main())

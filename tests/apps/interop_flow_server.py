"""Test server for flow control, deadlines and cancellation (greeter from examples/hello).

SayHelloStream yields `count` numbered replies and publishes how many it has yielded to
--progress (a file, rewritten every 10 ms), so a test can see a slow reader pause it.
SayHello with name "sleep:<s>" waits while active and appends what it saw ("cancelled",
"deadline <remaining>" ...) to --log. A server interceptor tags every reply's trailing
metadata with x-intercepted, and refuses calls carrying x-deny.
"""
from __future__ import annotations

import argparse
import threading
import time

import mrpcd

import hello_mrpc


class Tag(mrpcd.ServerInterceptor):
    def intercept_service(self, continuation, details):
        if dict(details.invocation_metadata).get("x-deny"):
            def deny(request, context):
                context.abort(mrpcd.StatusCode.PERMISSION_DENIED, "denied by interceptor")
            return mrpcd.unary_unary_rpc_method_handler(deny, request_type=hello_mrpc.HelloRequest, response_type=hello_mrpc.HelloReply)
        return continuation(details)


class Greeter(hello_mrpc.GreeterServicer):
    def __init__(self, log: str) -> None:
        self.yielded = 0
        self.log = log

    def _note(self, text: str) -> None:
        with open(self.log, "a") as f:
            f.write(text + "\n")

    def SayHello(self, request, context):
        if request.name.startswith("sleep:"):
            self._note(f"remaining {context.time_remaining()}")
            context.add_callback(lambda: self._note("callback"))
            end = time.monotonic() + float(request.name[6:])
            while time.monotonic() < end and context.is_active():
                time.sleep(0.005)
            self._note("cancelled" if not context.is_active() else "finished")
        return hello_mrpc.HelloReply(message=f"Hello, {request.name}!")

    def SayHelloStream(self, request, context):
        for i in range(request.count):
            self.yielded = i + 1
            yield hello_mrpc.HelloReply(message=str(i))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--progress", required=True)
    p.add_argument("--log", required=True)
    args = p.parse_args()
    greeter = Greeter(args.log)

    def publish() -> None:
        while True:
            with open(args.progress + ".tmp", "w") as f:
                f.write(str(greeter.yielded))
            import os
            os.replace(args.progress + ".tmp", args.progress)
            time.sleep(0.01)

    threading.Thread(target=publish, daemon=True).start()
    server = mrpcd.server(interceptors=[Tag()])
    hello_mrpc.add_GreeterServicer_to_server(greeter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

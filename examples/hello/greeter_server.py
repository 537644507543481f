"""The greeter server, as in grpc's helloworld example, served through the local mrpcd.

Run with the daemon's socket in MRPCD_SOCKET (or the default path); prints its address
when it is ready.
"""
from __future__ import annotations

import argparse
import sys

import mrpcd

from hello_stubs import import_hello_stubs

hello_mrpc = import_hello_stubs(__file__)


class Greeter(hello_mrpc.GreeterServicer):
    def SayHello(self, request: hello_mrpc.HelloRequest, context: mrpcd.ServicerContext) -> hello_mrpc.HelloReply:
        return hello_mrpc.HelloReply(message=f"Hello, {request.name}!")

    def SayHelloStream(self, request, context):
        for i in range(3):
            yield hello_mrpc.HelloReply(message=f"Hello #{i + 1}, {request.name}!")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--address", default="127.0.0.1:50051")
    args = p.parse_args()
    try:
        server = mrpcd.server()
        hello_mrpc.add_GreeterServicer_to_server(Greeter(), server)
        port = server.add_insecure_port(args.address)
        server.start()
    except mrpcd.RpcError as exc:  # no daemon, the address taken, ...
        print(f"cannot serve on {args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"greeter server listening on {args.address.rpartition(':')[0]}:{port}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

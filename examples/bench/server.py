"""The benchmark server: one process serving `bench.Bench` over mrpcd or grpcio, sync or asyncio.

Why one file for every system: the handlers (8-byte Echo reply, `count` prebuilt messages per
Stream call) must do the same work everywhere, so the only difference between two runs is
the RPC stack. Prints `READY <port>` on stdout once it accepts calls.

    python server.py --api {mrpcd,grpc} --flavor {sync,aio} --address 127.0.0.1:0 --gen GEN_DIR
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

REPLY = b"12345678"           # every Echo reply: 8 bytes
WORKERS = 32                  # sync servers: same thread pool size for mrpcd and grpcio
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _modules(api: str):
    """(messages module, servicer base, add_servicer function) of the generated stubs."""
    if api == "mrpcd":
        import bench_mrpc as m
        return m, m.BenchServicer, m.add_BenchServicer_to_server
    import bench_pb2 as m
    import bench_pb2_grpc as g
    return m, g.BenchServicer, g.add_BenchServicer_to_server


def _stream_messages(m, request) -> list:
    return [m.Payload(data=b"s" * request.size)] * request.count


def serve_sync(api: str, address: str) -> None:
    m, base, add = _modules(api)
    reply = m.Payload(data=REPLY)

    class Servicer(base):
        def Echo(self, request, context):
            return reply

        def Stream(self, request, context):
            yield from _stream_messages(m, request)

    pool = ThreadPoolExecutor(max_workers=WORKERS)
    if api == "mrpcd":
        import mrpcd
        server = mrpcd.server(pool, options=GRPC_OPTIONS)
    else:
        import grpc
        server = grpc.server(pool, options=GRPC_OPTIONS, maximum_concurrent_rpcs=None)
    add(Servicer(), server)
    port = server.add_insecure_port(address)
    server.start()
    print(f"READY {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(0.5)


async def serve_aio(api: str, address: str) -> None:
    m, base, add = _modules(api)
    reply = m.Payload(data=REPLY)

    class Servicer(base):
        async def Echo(self, request, context):
            return reply

        async def Stream(self, request, context):
            for msg in _stream_messages(m, request):
                yield msg

    if api == "mrpcd":
        import mrpcd.aio
        server = mrpcd.aio.server(options=GRPC_OPTIONS)
    else:
        import grpc
        server = grpc.aio.server(options=GRPC_OPTIONS)
    add(Servicer(), server)
    port = server.add_insecure_port(address)
    await server.start()
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", choices=["mrpcd", "grpc"], required=True)
    p.add_argument("--flavor", choices=["sync", "aio"], required=True)
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--gen", required=True, help="folder with bench_mrpc.py / bench_pb2*.py")
    args = p.parse_args(argv)
    sys.path.insert(0, args.gen)
    if args.flavor == "sync":
        serve_sync(args.api, args.address)
    else:
        asyncio.run(serve_aio(args.api, args.address))
    return 0


if __name__ == "__main__":
    sys.exit(main())

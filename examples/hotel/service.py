"""Run one hotel service as its own process, over mrpcd or grpcio.

    python service.py --rt {mrpcd,grpc} --service NAME --gen GEN --address 127.0.0.1:PORT \
        [--target SVC=HOST:PORT ...] [--acl JSON]

Prints `READY <port>` once it serves; stops on SIGTERM. mrpcd services take their daemon
from MRPCD_SOCKET and register as app `hotel-<service>` (what the operator attaches
policies to).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_targets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, addr = item.partition("=")
        if not sep or not addr:
            raise SystemExit(f"--target wants SERVICE=HOST:PORT, got {item!r}")
        out[name] = addr
    return out


async def serve(args: argparse.Namespace) -> None:
    from rt import Runtime
    from services import CLASSES, DEPENDS

    rt = Runtime(args.rt, app_name=f"hotel-{args.service}")
    targets = parse_targets(args.target)
    missing = [d for d in DEPENDS.get(args.service, ()) if d not in targets]
    if missing:
        raise SystemExit(f"{args.service} needs --target for: {', '.join(missing)}")
    stubs = {name: rt.stub(name, rt.channel(addr)) for name, addr in targets.items()}
    cls = CLASSES[args.service]
    if args.service == "reservation":
        servicer = cls(rt, stubs, acl=json.loads(args.acl) if args.acl else None)
    else:
        servicer = cls(rt, stubs)
    server = rt.server()
    rt.add_servicer(args.service, servicer, server)
    port = server.add_insecure_port(args.address)
    await server.start()
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rt", required=True, choices=("mrpcd", "grpc"))
    p.add_argument("--service", required=True, choices=("frontend", "search", "geo", "rate", "profile", "reservation", "user", "recommendation"))
    p.add_argument("--gen", required=True, help="directory with the generated stubs")
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--target", action="append", default=[], help="SERVICE=HOST:PORT of a service this one calls")
    p.add_argument("--acl", help="reservation on grpcio: the in-app ACL rule, JSON {blocked_customers, max_rooms}")
    args = p.parse_args()
    sys.path[:0] = [args.gen, HERE]
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

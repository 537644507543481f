"""`mrpcctl`: the operator's command line for a running mrpcd (over its control socket)."""
from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from . import control_proto as cp
from .paths import default_socket_path


class Control:
    """A blocking control-socket client without an app session (no rings)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.frames = cp.FrameBuffer()
        self.inbox: list[dict] = []

    def call(self, op: str, **args: Any) -> dict:
        self.sock.sendall(cp.encode({"op": op, "id": 1, **args}))
        while not self.inbox:
            data = self.sock.recv(1 << 16)
            if not data:
                raise cp.ControlError("mrpcd closed the connection")
            self.inbox.extend(self.frames.feed(data))
        reply = self.inbox.pop(0)
        if not reply.get("ok"):
            raise cp.ControlError(reply.get("error", "request failed"), reply.get("code", 2))
        return reply


def _print_apps(reply: dict) -> None:
    apps = reply["apps"]
    if not apps:
        print("no apps connected")
        return
    print(f"{'APP':>4}  {'NAME':<20} {'PID':>7}  {'SERVICES':<30} {'LISTENING':<22} ROUTES  ENGINES")
    for a in apps:
        engines = ",".join(e["name"] for e in a["engines"]) or "-"
        print(f"{a['app_id']:>4}  {a['name'][:20]:<20} {a['pid']:>7}  {','.join(a['services'])[:30] or '-':<30} "
              f"{','.join(a['listening'])[:22] or '-':<22} {len(a['routes']):>6}  {engines}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mrpcctl", description="Inspect and steer a running mrpcd.")
    p.add_argument("--socket", default=None, help="control socket (default: MRPCD_SOCKET or the per-user default)")
    p.add_argument("--json", action="store_true", help="print raw JSON")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ping", help="is the daemon alive; its pid, version, uptime")
    sub.add_parser("apps", help="connected apps, their services, routes and datapath engines")
    sub.add_parser("stats", help="daemon and per-app counters")
    sub.add_parser("shutdown", help="stop the daemon gracefully (admin only)")
    args = p.parse_args(argv)
    path = args.socket or default_socket_path()
    try:
        ctl = Control(path)
    except OSError as exc:
        print(f"mrpcctl: cannot reach mrpcd at {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        reply = ctl.call(args.cmd)
    except cp.ControlError as exc:
        print(f"mrpcctl: {args.cmd}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mrpcctl: {args.cmd}: {exc}", file=sys.stderr)
        return 1
    reply.pop("id", None)
    reply.pop("ok", None)
    if args.json or args.cmd == "stats":
        print(json.dumps(reply, indent=2, sort_keys=True))
    elif args.cmd == "apps":
        _print_apps(reply)
    elif args.cmd == "ping":
        print(f"mrpcd {reply['version']} pid {reply['pid']} up {reply['uptime']:.1f}s")
    else:
        print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

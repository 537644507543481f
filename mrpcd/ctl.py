"""`mrpcctl`: the operator's command line for a running mrpcd (over its control socket)."""
from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import socket
import sys
import time
from typing import Any

from . import control_proto as cp
from . import paths
from .paths import SYSTEM_SOCKET


def _socket_path(explicit: str | None) -> str:
    """--socket, else what an app would reach (paths.client_socket_path)."""
    return explicit or paths.client_socket_path()


class Control:
    """A blocking control-socket client without an app session (no rings)."""

    TIMEOUT = 30.0  # seconds for connecting and for each reply

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.TIMEOUT)
        try:
            self._connect(path)
        except OSError:
            self.sock.close()
            raise
        self.frames = cp.FrameBuffer(strict=False)
        self.inbox: list[dict] = []

    def _connect(self, path: str) -> None:
        """Connect, waiting while the daemon's listen backlog is full.

        Why a loop: with a timeout set, an AF_UNIX connect to a full backlog fails at once
        with EAGAIN instead of waiting, so many clients at once would fail spuriously.
        """
        deadline = time.monotonic() + self.TIMEOUT
        while True:
            try:
                self.sock.connect(path)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, "timed out waiting for mrpcd to accept the connection") from None
                time.sleep(0.01)

    def call(self, op: str, **args: Any) -> dict:
        try:
            data = cp.encode({"op": op, "id": 1, **args})
        except (TypeError, ValueError, OverflowError, cp.ControlError) as exc:
            # e.g. a YAML date in --config, a --position beyond 64 bits: refuse before sending
            raise ValueError(f"the request cannot be sent: {exc} (use plain numbers, strings, lists and mappings)") from None
        try:
            self.sock.sendall(data)
        except BrokenPipeError:  # the daemon closed; what it said before (why it refused us) is still to read
            pass
        while not self.inbox:
            data = self.sock.recv(1 << 16)
            if not data:
                raise cp.ControlError("mrpcd closed the connection")
            self.inbox.extend(self.frames.feed(data))
        reply = self.inbox.pop(0)
        if not reply.get("ok"):
            raise cp.ControlError(reply.get("error", "request failed"), reply.get("code", 2))
        return reply


def _printable(text: Any) -> str:
    """Text for the operator's terminal: app and policy names come from any local user, so
    control characters (escape sequences, newlines) are shown escaped, never sent raw."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def _listed(app: dict, key: str) -> str:
    """One of an app's lists as a cell: the entries the daemon sent, then "... and K more"
    for those it left out (it sends the first few of a long list, `<key>_more` says how many more)."""
    text = _printable(",".join(app.get(key, ())))
    more = app.get(key + "_more", 0)
    if more:
        text += f"{',' if text else ''}... and {more} more"
    return text or "-"


def _all_pages(ctl: "Control", op: str, req: dict) -> dict:
    """An app listing (`apps`, `policies`) in full: the daemon sends what fits in one reply
    and `next_after` when more apps follow; asked again from there until none do."""
    reply = ctl.call(op, **req)
    while reply.get("more"):
        after = reply.pop("next_after")
        more = ctl.call(op, **req, after=after)
        if not more["apps"] or more["apps"][0]["app_id"] <= after:  # (no progress: stop rather than loop)
            break
        reply["apps"] += more["apps"]
        reply["more"] = more.get("more", 0)
        reply["next_after"] = more.get("next_after")
    reply.pop("next_after", None)
    if not reply.get("more"):
        reply.pop("more", None)
    return reply


def _print_apps(reply: dict) -> None:
    apps = reply["apps"]
    if not apps:
        print("no apps connected")
        return
    # columns as wide as their longest value: a long name, service list or address list is
    # shown whole (it was cut at a fixed width, with nothing saying so)
    rows = [(str(a["app_id"]), _printable(a["name"]), str(a["pid"]), _listed(a, "services"), _listed(a, "listening"),
             str(len(a.get("routes", ())) + a.get("routes_more", 0)),
             _printable(",".join(e["name"] for e in a.get("engines", ()))) or ("-" if "error" not in a else f"({a['error']})"))
            for a in apps]
    header = ("APP", "NAME", "PID", "SERVICES", "LISTENING", "ROUTES", "ENGINES")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    right = (True, False, True, False, False, True, False)
    for r in (header, *rows):
        cells = [c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(r, widths, right)]
        print("  ".join(cells).rstrip())


def _load_config_arg(text: str | None) -> dict | None:
    """--config takes inline YAML/JSON (`{rate: 100}`) or @path to a YAML/JSON file."""
    if text is None:
        return None
    import yaml

    what = "--config"
    if text.startswith("@"):
        what = f"--config {text}"
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"{what}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{what}: not UTF-8 text") from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # one line: where and why (PyYAML's own text spans several)
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"{what} is not valid YAML/JSON: {where}{getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:  # PyYAML composes recursively
        raise ValueError("--config is nested too deeply") from None
    _check_string_keys(value)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("--config must be a mapping, e.g. '{rate: 100, burst: 10}'")
    return value


def _check_string_keys(value: Any) -> None:
    """The daemon takes only string map keys from clients (and closes the connection on
    others, with a msgpack message): say which key is wrong before sending."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"--config keys must be strings (quote them): got {k!r}")
                stack.append(item)
        elif isinstance(v, list):
            stack.extend(v)


def _module_spec(spec: str) -> str:
    """A module given as a file (it ends in .py or holds a '/', as the daemon's loaders tell
    them apart) is named by its absolute path: the daemon runs in another folder, so
    `--module ./v2.py` must mean the file beside the operator, not one beside the daemon."""
    if spec.endswith(".py") or "/" in spec or spec.startswith("."):
        return os.path.abspath(spec)
    return spec


def _policy_request(args: argparse.Namespace) -> tuple[str, dict]:
    config = _load_config_arg(getattr(args, "config", None))
    app = getattr(args, "app", None)
    if args.pcmd == "list":
        return "policies", {"app": app}
    if args.pcmd == "attach":
        return "policy_attach", {"app": app, "policy": _module_spec(args.policy), "config": config, "name": args.name,
                                 "position": args.position}
    if args.pcmd == "detach":
        return "policy_detach", {"app": app, "name": args.name}
    if args.pcmd == "config":
        return "policy_config", {"app": app, "name": args.name, "config": config}
    return "policy_upgrade", {"app": app, "name": args.name, "module": _module_spec(args.module), "config": config}


def _json_value(value: Any) -> Any:
    """What JSON has no type for (a policy's config may hold bytes): bytes as base64 text,
    the rest as its text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def _print_policies(reply: dict) -> None:
    if reply.get("config_policies_refused"):  # the daemon config's `policies:` that did not apply
        print(_printable(f"config policies: {reply['config_policies_refused']}"))
    if not reply["apps"]:
        print("no apps connected")  # (an empty listing looked like a hung or broken command)
        return
    for app in reply["apps"]:
        print(f"app {app['app_id']} ({_printable(app['name'])}):")
        if not app["policies"] and not app.get("waiting"):
            print("  (no policies)")
        for p in app["policies"]:
            # [position] instance: policy version, the module when it is not the built-in of that name, counters
            line = f"  [{p['position']}] {p['instance']}: {p.get('name')} {p.get('version', '')}".rstrip()
            if p.get("module") and p.get("module") != p.get("name"):
                line += f" from {p['module']}"
            if p.get("describe_error"):
                line += f" (its describe() failed: {p['describe_error']})"
            if p.get("source") == "config":  # declared in the daemon's config file (a reload manages it)
                line += f" [config {p.get('declared_at') or ''}]".replace(" ]", "]")
            counters = ", ".join(f"{k}={v}" for k, v in sorted((p.get("counters") or {}).items()))
            if counters:
                line += f" ({counters})"
            print(_printable(line))
        for w in app.get("waiting") or ():  # declared, not attachable yet: the app may not call until it is
            print(_printable(f"  [waiting] {w['instance']}: {w.get('kind')} [config {w.get('declared_at') or ''}]: {w.get('waiting')}"))


def _policy_doc(spec: str) -> int:
    """`mrpcctl policy doc NAME`: the policy module's docstring (what it does, its config
    keys), read from its source without running it."""
    import ast
    import importlib.util

    from .policies.base import BUILTINS

    if spec.endswith(".py") or "/" in spec:
        source_path = os.path.abspath(spec)
    else:
        try:
            found = importlib.util.find_spec(BUILTINS.get(spec, spec))
        except (ImportError, ValueError):
            found = None
        origin = found.origin if found is not None else None
        if origin is None or origin in ("built-in", "frozen"):
            print(f"mrpcctl: policy doc: no policy module {spec!r} (built-ins: {', '.join(sorted(BUILTINS))})", file=sys.stderr)
            return 2
        source_path = origin
    try:
        with open(source_path, encoding="utf-8") as f:
            text = ast.get_docstring(ast.parse(f.read(), source_path))
    except OSError as exc:
        print(f"mrpcctl: policy doc: cannot read {source_path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (SyntaxError, ValueError, UnicodeDecodeError) as exc:
        print(f"mrpcctl: policy doc: cannot parse {source_path}: {exc}", file=sys.stderr)
        return 2
    print(text or f"{source_path} has no docstring")
    return 0


def _print_policy_change(args: argparse.Namespace, reply: dict) -> None:
    """One line per app for attach / config / upgrade / detach (--json prints the reply)."""
    for kind, items in reply.items():
        for x in items if isinstance(items, list) else ():
            who = f"app {x.get('app_id')} ({_printable(x.get('app_name', '?'))})"
            instance = getattr(args, "name", None) or x.get("name")
            policy = f"{x.get('name')} {x.get('version', '')}".rstrip()
            config = json.dumps(x.get("config"), sort_keys=True, default=_json_value)
            if kind == "attached":
                line = f"attached {instance} ({policy}) with config {config}"
            elif kind == "configured":
                line = f"{instance} ({policy}) now has config {config}"
            elif kind == "upgraded":
                line = f"{instance} upgraded to {policy}"
            elif kind == "detached":
                line = (f"detached {instance}; the calls it held went on ({x.get('released_inbound', 0)} inbound, "
                        f"{x.get('released_outbound', 0)} outbound)")
            else:
                line = json.dumps(x, sort_keys=True, default=_json_value)
            print(_printable(f"{who}: {line}"))
    if reply.get("more"):
        print(f"... and {reply['more']} more apps (not listed: the reply holds what fits in one control message)")


class _Commands:
    """add_subparsers whose commands' help is also their --help description (it printed
    only the usage line)."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def add_parser(self, name: str, *, help: str) -> argparse.ArgumentParser:
        return self.action.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".", parents=[_global_options()])


def _global_options(suppress: bool = True) -> argparse.ArgumentParser:
    """--socket and --json, for mrpcctl itself and again for every command (`mrpcctl apps
    --json` works as `mrpcctl --json apps`); a command's copy sets them only when given."""
    p = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS if suppress else None
    p.add_argument("--socket", default=default,
                   help=f"control socket (default: MRPCD_SOCKET, else the per-user default, else {SYSTEM_SOCKET})")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="print raw JSON (bytes values as base64 text)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `mrpcctl stats | head`: the reader left. Stop quietly, and keep Python's exit-time
        # flush of stdout from raising again (the recipe in the `signal` module's docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="mrpcctl", description="Inspect and steer a running mrpcd.", parents=[_global_options(suppress=False)])
    sub = _Commands(p.add_subparsers(dest="cmd", required=True))
    sub.add_parser("ping", help="is the daemon alive; its pid, version, uptime")
    sub.add_parser("apps", help="connected apps, their services, routes and datapath engines")
    sub.add_parser("stats", help="daemon and per-app counters (JSON)")
    sub.add_parser("shutdown", help="stop the daemon gracefully (admin only)")
    pol = sub.add_parser("policy", help="list, attach, detach, reconfigure and upgrade policies on running apps")
    psub = _Commands(pol.add_subparsers(dest="pcmd", required=True))
    pl = psub.add_parser("list", help="policies on each app's datapath, with their counters")
    pl.add_argument("app", nargs="?", help="app_id or name (default: all apps)")
    pa = psub.add_parser("attach", help="attach a policy to an app (admin only)")
    pa.add_argument("app", help="app_id or name (every app of that name)")
    pa.add_argument("policy", help="built-in (ratelimit, acl, qos, fault, metrics, admission, vtc), dotted module, or path.py")
    pa.add_argument("--name", help="instance name (default: the policy's name)")
    pa.add_argument("--config", help="YAML/JSON mapping, or @file (its keys: mrpcctl policy doc POLICY)")
    pa.add_argument("--position", type=int, help="index in the chain: 0 (nearest the app) .. its length (the default: last, nearest the network)")
    pdoc = psub.add_parser("doc", help="print a policy's documentation and config keys (no daemon needed)")
    pdoc.add_argument("policy", help="built-in (ratelimit, acl, qos, fault, metrics, admission, vtc), dotted module, or path.py")
    pd = psub.add_parser("detach", help="detach a policy; what it holds goes on (admin only)")
    pd.add_argument("name", help="the policy instance name (see `mrpcctl policy list`)")
    pd.add_argument("--app", help="app_id or name (default: every app that has it)")
    pc = psub.add_parser("config", help="reconfigure a policy in place (admin only)")
    pc.add_argument("name", help="the policy instance name (see `mrpcctl policy list`)")
    pc.add_argument("--config", required=True, help="the whole new config: YAML/JSON mapping, or @file")
    pc.add_argument("--app", help="app_id or name (default: every app that has it)")
    pu = psub.add_parser("upgrade", help="load a new version of a policy, carrying its state over (admin only)")
    pu.add_argument("name", help="the policy instance name (see `mrpcctl policy list`)")
    pu.add_argument("--module", required=True, help="path.py, dotted module or built-in name of the new version")
    pu.add_argument("--config", help="new config (default: keep the current one)")
    pu.add_argument("--app", help="app_id or name (default: every app that has it)")
    tr = sub.add_parser("transport", help="live-upgrade the transport engine (admin only)")
    tsub = _Commands(tr.add_subparsers(dest="tcmd", required=True))
    tu = tsub.add_parser("upgrade", help="hand every open connection to a new transport version, sockets kept")
    tu.add_argument("--module", required=True, help="dotted module or path.py exporting PeerConnection")
    args = p.parse_args(argv)
    if args.cmd == "policy" and args.pcmd == "doc":  # local: the daemon is not asked
        return _policy_doc(args.policy)
    path = _socket_path(args.socket)
    try:
        ctl = Control(path)
    except OSError as exc:
        hint = ""
        if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
            hint = " (is the daemon running? start it with `mrpcd`, or name its socket with --socket or MRPCD_SOCKET)"
        print(f"mrpcctl: cannot reach mrpcd at {path}: {exc.strerror or exc}{hint}", file=sys.stderr)
        return 1
    try:
        if args.cmd == "policy":
            op, req = _policy_request(args)
        elif args.cmd == "transport":
            op, req = "transport_upgrade", {"module": _module_spec(args.module)}
        else:
            op, req = args.cmd, {}
        reply = _all_pages(ctl, op, req) if op in ("apps", "policies") else ctl.call(op, **req)
    except cp.ControlError as exc:  # the daemon refused: its text says why
        print(f"mrpcctl: {args.cmd}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # a bad --config, an unreadable @file, a lost socket
        print(f"mrpcctl: {args.cmd}: {exc}", file=sys.stderr)
        return 2
    reply.pop("id", None)
    reply.pop("ok", None)
    if args.cmd == "transport" and not args.json:
        print(f"transport version {reply['version']}: {reply['connections']} connections handed over")
        for failure in reply.get("failed", []):
            print(f"  not handed over: {failure}")
        if reply.get("failed_more"):
            print(f"  ... and {reply['failed_more']} more not handed over (see the daemon's log)")
    elif args.cmd == "policy" and not args.json:
        if args.pcmd == "list":
            _print_policies(reply)
        else:
            _print_policy_change(args, reply)
    elif args.json or args.cmd == "stats":
        print(json.dumps(reply, indent=2, sort_keys=True, default=_json_value))
        if reply.get("truncated"):  # the daemon cut sections to fit one reply: say so where a reader looks
            cut = ", ".join(f"{k}: {n} more" for k, n in sorted(reply["truncated"].items()))
            print(f"mrpcctl: {args.cmd}: the reply was cut to fit one control message ({cut} not shown)", file=sys.stderr)
    elif args.cmd == "apps":
        _print_apps(reply)
    elif args.cmd == "ping":
        state = f", draining: {reply.get('in_flight', '?')} calls in flight" if reply.get("draining") else ""
        print(f"mrpcd {reply['version']} pid {reply['pid']} up {reply['uptime']:.1f}s{state}")
    else:
        print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

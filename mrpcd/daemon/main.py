"""`mrpcd`: run the daemon in the foreground (development) or under systemd (Type=notify)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time

from .config import ConfigError, default_text, load
from .daemon import Daemon


class JsonFormatter(logging.Formatter):
    """Structured logs: one JSON object a line, for journald or a log shipper."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) our state; a no-op when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(path)
            s.sendall(state.encode())
        except OSError as exc:
            logging.getLogger("mrpcd").warning("cannot notify systemd at %s: %s", path, exc)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mrpcd", description="RPC as a managed system service: the per-host daemon.")
    p.add_argument("-c", "--config", help="YAML config file (default: the embedded default config)")
    p.add_argument("--socket", help="control socket path (overrides the config)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--print-default-config", action="store_true", help="print the embedded default config and exit")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_default_config:
        sys.stdout.write(default_text())
        return 0
    overrides = {}
    if args.socket:
        overrides["control_socket"] = args.socket
    if args.log_level:
        overrides["log_level"] = args.log_level
    try:
        config = load(args.config, overrides)
    except ConfigError as exc:
        print(f"mrpcd: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"mrpcd: configuration {config.source} is valid")
        return 0
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])

    import uvloop  # the daemon never runs on the default loop: 2-3x slower on these machines

    async def run() -> int:
        daemon = Daemon(config)
        try:
            await daemon.start()
        except (RuntimeError, OSError) as exc:
            logging.getLogger("mrpcd").error("cannot start: %s", exc)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        sd_notify(f"READY=1\nSTATUS=serving {config.control_socket}\nMAINPID={os.getpid()}")
        await daemon.run_until_stopped()
        sd_notify("STOPPING=1")
        return 0

    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())

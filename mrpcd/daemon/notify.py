"""systemd's notify protocol (sd_notify(3)), without libsystemd.

Why here and not a library: the protocol is one datagram of `KEY=VALUE` lines sent to the
AF_UNIX socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace),
and the daemon needs exactly five messages: READY=1, RELOADING=1 (+ MONOTONIC_USEC, which
systemd ≥ 253 requires to pair the reload with the following READY=1), STOPPING=1,
WATCHDOG=1 and STATUS=. Outside systemd `$NOTIFY_SOCKET` is unset and every call is a no-op,
so the same binary runs in the foreground unchanged.

The watchdog: systemd sets `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the pid that must ping);
we ping at half the interval, as sd_watchdog_enabled(3) recommends, from a timer on the
daemon's own event loop, so a wedged loop stops the pings and systemd restarts us.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("mrpcd.notify")


class Notifier:
    """Sends sd_notify messages to `$NOTIFY_SOCKET` (or nowhere when it is unset)."""

    def __init__(self, environ: "os._Environ[str] | dict[str, str] | None" = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET") or ""
        if path.startswith("@"):
            path = "\0" + path[1:]
        self.address = path
        self.watchdog_interval = watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """Send `fields` ("READY=1", "STATUS=...") as one datagram; False if it could not go."""
        if not self.address:
            return False
        msg = "\n".join(f.replace("\n", " ") for f in fields) + "\n"
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(msg.encode(), self.address)
            return True
        except OSError as exc:
            if not self._warned:  # once: a missing manager must not flood the log
                self._warned = True
                log.warning("cannot notify systemd at %r: %s", self.address.replace("\0", "@"), exc)
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self, status: str = "reloading configuration") -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    # -- watchdog ------------------------------------------------------------------------
    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping WATCHDOG=1 every half interval on `loop` (no thread: a stuck loop stops it)."""
        if not self.enabled or self.watchdog_interval is None or self._watchdog is not None:
            return
        # half the interval, as sd_watchdog_enabled(3) says, but never a busy loop of pings
        # (a WATCHDOG_USEC of a few microseconds would make every loop turn send one)
        period = max(self.watchdog_interval / 2, WATCHDOG_MIN_PERIOD)

        def ping() -> None:
            self.send("WATCHDOG=1")
            self._watchdog = loop.call_later(period, ping)

        ping()

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def close(self) -> None:
        self.stop_watchdog()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


WATCHDOG_MIN_PERIOD = 0.05  # seconds between pings at least, whatever WATCHDOG_USEC says


def watchdog_interval(env: "os._Environ[str] | dict[str, str]") -> float | None:
    """The watchdog interval in seconds, or None when systemd asked for no watchdog pings.

    Like sd_watchdog_enabled(3): `$WATCHDOG_USEC` must be a positive integer, and when
    `$WATCHDOG_PID` is set it must be our pid (else the pings are some other process's job).
    """
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not an integer", pid)
            return None
    return usec / 1e6

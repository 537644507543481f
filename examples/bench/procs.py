"""Child processes of a benchmark run: start, wait until ready, always clean up.

Why its own module: every system under test (daemons, servers, nginx, envoy) is a set of
processes on loopback that must be gone when the run ends, even on error or Ctrl-C.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import time
from typing import IO, Sequence


class ProcessError(RuntimeError):
    """A child did not come up; the message carries the tail of its log."""


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, and never one this process handed out before: the
    ports are bound later by the child processes, so until then the kernel may offer the
    same one again (a hotel deployment asks for eight, then its sidecars for more)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port that was not handed out already")


def log_tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class Procs:
    """A group of child processes stopped together (SIGTERM, then SIGKILL), newest first."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.items: list[tuple[str, subprocess.Popen, str]] = []

    def start(self, name: str, argv: Sequence[str], env: dict | None = None, stdout_pipe: bool = False) -> subprocess.Popen:
        log = os.path.join(self.log_dir, f"{name}.log")
        with open(log, "ab") as errf:
            proc = subprocess.Popen(list(argv), env=env, stderr=errf, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE if stdout_pipe else errf, start_new_session=True)
        self.items.append((name, proc, log))
        return proc

    def log_of(self, proc: subprocess.Popen) -> str:
        for _, p, log in self.items:
            if p is proc:
                return log
        return ""

    def fail(self, proc: subprocess.Popen, what: str) -> ProcessError:
        return ProcessError(f"{what} (exit code {proc.poll()}); log tail:\n{log_tail(self.log_of(proc))}")

    def wait_port(self, proc: subprocess.Popen, port: int, what: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise self.fail(proc, f"{what} exited early")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise self.fail(proc, f"{what} did not listen on port {port} within {timeout}s")

    def wait_unix(self, proc: subprocess.Popen, path: str, what: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise self.fail(proc, f"{what} exited early")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                    return
            except OSError:
                time.sleep(0.05)
        raise self.fail(proc, f"{what} did not open {path} within {timeout}s")

    def read_line(self, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> str:
        """The next stdout line of a child started with stdout_pipe, or a clear error."""
        out: IO[bytes] = proc.stdout  # type: ignore[assignment]
        sel = selectors.DefaultSelector()
        sel.register(out, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                raise self.fail(proc, f"{what}: no output within {timeout}s")
        finally:
            sel.close()
        line = out.readline().decode(errors="replace")
        if not line:
            raise self.fail(proc, f"{what}: exited without output")
        return line.strip()

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        if proc.stdout:
            proc.stdout.close()

    def stop_all(self) -> None:
        while self.items:
            _, proc, _ = self.items.pop()
            self.stop(proc)

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks

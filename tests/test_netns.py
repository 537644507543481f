"""Multi-host without a second host: two daemons in two network namespaces joined by a veth pair.

Loopback tests cannot tell whether the daemons really talk over a network: everything
shares one `lo`. Here daemon A and the client app live in namespace A, daemon B and the
greeter server in namespace B, and the only link between the namespaces is a veth pair
with addresses from a private range that exists only inside them. Apps still reach their
daemon through its control socket file (a path-named Unix socket works across network
namespaces; the shared memory is a memfd passed over it), so what crosses namespaces by
network is exactly the daemon-to-daemon TCP. The veth's packet counters prove it went
over the wire.

The namespaces (named with this process's pid) are always deleted, also on failure;
the test is skipped, with the reason, where they cannot be made (not root, no `ip`,
EPERM in a container without CAP_SYS_ADMIN).
"""
from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PID = os.getpid()
NS_A, NS_B = f"mrpcd-a-{PID}", f"mrpcd-b-{PID}"
VETH_A, VETH_B = f"mva{PID}", f"mvb{PID}"  # interface names: at most 15 characters
# 10.213.0.0/16 is used by nothing here; inside the namespaces it is the only route anyway.
_NET = f"10.213.{PID % 250 + 1}"
ADDR_A, ADDR_B = f"{_NET}.1", f"{_NET}.2"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def _delete_stale() -> None:
    """Namespaces left by an earlier run that was itself SIGKILLed (their pid is gone)."""
    listed = _ip("netns", "list", check=False).stdout
    for name, pid in re.findall(r"^(mrpcd-[ab]-(\d+))\b", listed, re.M):
        if int(pid) != PID and not os.path.exists(f"/proc/{pid}"):
            _ip("netns", "del", name, check=False)


def _delete_namespaces() -> None:
    for ns in (NS_A, NS_B):  # deleting a namespace deletes the veth end inside it, and so the pair
        _ip("netns", "del", ns, check=False)


def _make_namespaces() -> None:
    _ip("netns", "add", NS_A)
    _ip("netns", "add", NS_B)
    _ip("link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B)
    _ip("link", "set", VETH_A, "netns", NS_A)
    _ip("link", "set", VETH_B, "netns", NS_B)
    for ns, dev, addr in ((NS_A, VETH_A, ADDR_A), (NS_B, VETH_B, ADDR_B)):
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", dev, "up")


@pytest.fixture
def namespaces():
    """Namespaces A and B joined by the veth pair; skipped with the reason where impossible."""
    if shutil.which("ip") is None:
        pytest.skip("needs `ip` (iproute2) to make network namespaces")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    _delete_stale()
    try:
        _make_namespaces()
    except subprocess.CalledProcessError as exc:
        _delete_namespaces()
        pytest.skip(f"cannot make network namespaces here: `{' '.join(exc.cmd)}`: {exc.stderr.strip()}")
    try:
        yield
    finally:
        _delete_namespaces()
        left = _ip("netns", "list", check=False).stdout
        assert NS_A not in left and NS_B not in left, f"namespaces not deleted: {left}"


def _veth_packets(ns: str, dev: str) -> tuple[int, int]:
    """(rx_packets, tx_packets) of `dev`, read inside `ns` (`ip netns exec` mounts its /sys)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/rx_packets",
                          f"/sys/class/net/{dev}/statistics/tx_packets"], capture_output=True, text=True,
                         timeout=20, check=True).stdout.split()
    return int(out[0]), int(out[1])


def _wait_for_conn(ns: str, pid: int, pattern: str, timeout: float = 10.0) -> str:
    """The established TCP connection of process `pid` in `ns` matching `pattern` (`ss -tnp`)."""
    end = time.monotonic() + timeout
    while True:
        out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tnpH", "state", "established"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        for line in out.splitlines():
            if re.search(pattern, line) and f"pid={pid}," in line:
                return " ".join(line.split())
        if time.monotonic() > end:
            raise AssertionError(f"no connection /{pattern}/ of pid {pid} in {ns}:\n{out}")
        time.sleep(0.05)


class _NsProc:
    """A process run inside a namespace with `ip netns exec` (which execs it: our pid is its pid)."""

    def __init__(self, ns: str, args: list[str], env: dict[str, str], log: Path | None = None) -> None:
        self.log_path = log
        out = open(log, "wb") if log else subprocess.PIPE
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], env=env, stdout=out,
                                     stderr=subprocess.STDOUT if log else subprocess.PIPE, text=log is None)
        if log:
            out.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def _start_daemon(ns: str, tmp: Path, name: str) -> tuple[_NsProc, str]:
    sock = str(tmp / f"{name}.sock")
    d = _NsProc(ns, [sys.executable, "-m", "mrpcd.daemon.main", "--socket", sock, "--log-level", "debug"],
                dict(os.environ), log=tmp / f"{name}.log")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise RuntimeError(f"mrpcd in {ns} exited with {d.proc.returncode}:\n{d.log()}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return d, sock
        except OSError:
            time.sleep(0.02)
    d.stop()
    raise RuntimeError(f"mrpcd in {ns} did not start:\n{d.log()}")


def _app_env(sock: str, gen: Path) -> dict[str, str]:
    env = {**os.environ, "MRPCD_SOCKET": sock}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gen), str(ROOT / "tests" / "apps"), env.get("PYTHONPATH", "")]))
    return env


def _run_client(ns: str, sock: str, gen: Path, *args: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(ROOT / "tests" / "apps" / "hello_client.py"), *args],
                       env=_app_env(sock, gen), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


N_UNARY = 100


def test_two_daemons_in_two_namespaces_over_a_veth(namespaces, gen_dir, tmp_path):
    procs: list[_NsProc] = []
    try:
        da, sock_a = _start_daemon(NS_A, tmp_path, "a")
        procs.append(da)
        db, sock_b = _start_daemon(NS_B, tmp_path, "b")
        procs.append(db)
        server = _NsProc(NS_B, [sys.executable, str(ROOT / "tests" / "apps" / "hello_server.py"), "--address", f"{ADDR_B}:0"],
                         _app_env(sock_b, gen_dir))
        procs.append(server)
        if not select.select([server.proc.stdout], [], [], 20)[0]:
            raise AssertionError("the server app in namespace B printed no address in 20 s")
        address = server.proc.stdout.readline().strip()
        assert address.startswith(f"{ADDR_B}:"), (address, server.proc.poll())
        # the server's address is not one the root namespace has: only namespace A's veth leads there
        with socket.socket() as s:
            s.settimeout(0.5)
            assert s.connect_ex((ADDR_B, int(address.rpartition(":")[2]))) != 0

        rx0, tx0 = _veth_packets(NS_A, VETH_A)
        out = _run_client(NS_A, sock_a, gen_dir, address, "unary", str(N_UNARY))
        assert out.strip() == f"ok {N_UNARY}"
        out = _run_client(NS_A, sock_a, gen_dir, address, "stream", "5")
        assert out.splitlines() == [f"Hello #{i}, s!" for i in range(1, 6)] + ["ok stream"]
        out = _run_client(NS_A, sock_a, gen_dir, address, "async", "32")
        assert out.strip() == "ok async 32"
        rx1, tx1 = _veth_packets(NS_A, VETH_A)
        rx_b, tx_b = _veth_packets(NS_B, VETH_B)

        # Sequential unary calls wait for each reply, so each one is at least one TCP segment
        # each way over the veth (batching cannot merge them); plus handshakes, streams, ACKs.
        print(f"veth {VETH_A}: rx +{rx1 - rx0} tx +{tx1 - tx0} packets for {N_UNARY} unary calls + stream + async")
        assert tx1 - tx0 >= N_UNARY and rx1 - rx0 >= N_UNARY, (rx0, tx0, rx1, tx1)
        assert rx_b >= tx1 - tx0 and tx_b >= rx1 - rx0  # B's end saw what A's end sent (and more: ARP etc.)
        # While a call is in flight, the daemon-to-daemon connection seen from both ends: daemon
        # A's socket from A's veth address to the server's address, daemon B's the mirror.
        slow = subprocess.Popen(["ip", "netns", "exec", NS_A, sys.executable, str(ROOT / "tests" / "apps" / "hello_client.py"),
                                 address, "status", "slow:2"], env=_app_env(sock_a, gen_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            port = address.rpartition(":")[2]
            conn_a = _wait_for_conn(NS_A, da.proc.pid, rf"{re.escape(ADDR_A)}:\d+\s+{re.escape(address)}\b")
            conn_b = _wait_for_conn(NS_B, db.proc.pid, rf"{re.escape(ADDR_B)}:{port}\s+{re.escape(ADDR_A)}:\d+")
            print(f"ns A: {conn_a}\nns B: {conn_b}")
            out, err = slow.communicate(timeout=30)
            assert out.strip() == "OK", err
        finally:
            if slow.poll() is None:
                slow.kill()
                slow.communicate(timeout=5)
        assert da.proc.poll() is None and db.proc.poll() is None
    finally:
        for p in reversed(procs):
            p.stop()

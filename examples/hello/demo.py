"""`make demo`: two daemons on this host, the greeter server behind one, the client behind the other.

Each daemon runs with the embedded default config (only its control socket differs, as two
daemons on one host must); the replies printed by the client crossed both daemons over TCP.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"mrpcd exited early with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"mrpcd did not open {path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="mrpcd-demo-") as tmp:
        gen = os.path.join(tmp, "gen")
        subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(HERE / "hello.proto"), "-o", gen], check=True)
        print(f"generated stubs: {', '.join(sorted(os.listdir(gen)))}")
        try:
            sockets = {}
            for name in ("client-host", "server-host"):
                path = os.path.join(tmp, f"{name}.sock")
                proc = subprocess.Popen([sys.executable, "-m", "mrpcd.daemon.main", "--socket", path],
                                        stderr=open(os.path.join(tmp, f"{name}.log"), "wb"))
                procs.append(proc)
                wait_for_socket(path, proc)
                sockets[name] = path
                print(f"mrpcd ({name}) pid {proc.pid} serving {path}")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([gen, str(HERE), os.environ.get("PYTHONPATH", "")]))
            address = f"127.0.0.1:{free_port()}"
            server = subprocess.Popen(
                [sys.executable, str(HERE / "greeter_server.py"), "--address", address],
                env=dict(env, MRPCD_SOCKET=sockets["server-host"]), stdout=subprocess.PIPE, text=True)
            procs.append(server)
            print(server.stdout.readline().strip())
            client = subprocess.run(
                [sys.executable, str(HERE / "greeter_client.py"), "--target", address, "--name", "mrpcd"],
                env=dict(env, MRPCD_SOCKET=sockets["client-host"]), timeout=60)
            for name, path in sockets.items():
                print(f"--- mrpcctl apps ({name})")
                subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", path, "apps"], timeout=10)
            return client.returncode
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())

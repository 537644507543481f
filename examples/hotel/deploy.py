"""Deploy the eight hotel services on loopback for one system under test.

    mrpcd       every service is its own "host": its own mrpcd daemon, its app behind it;
                the load generator has a daemon too. Every call crosses two daemons.
                The reservation ACL is attached by the operator (`mrpcctl policy attach
                hotel-reservation acl --config ...`) on the reservation daemon.
    grpc        the same services on grpcio, calling each other directly; the same ACL
                rule runs inside the reservation service (no operator-side equivalent).
    grpc+nginx  grpc, each service behind a sidecar pair (caller side A, service side B),
    grpc+envoy  so every call crosses two proxies, like it crosses two mrpcd daemons.

Ports are chosen up front, so every process starts at once (clients connect lazily).
The sidecar launcher and process group come from examples/bench (procs.py, sidecars.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import sidecars  # noqa: E402  (examples/bench)
from procs import Procs, free_port  # noqa: E402

from services import DEPENDS  # noqa: E402

SYSTEMS = ("mrpcd", "grpc", "grpc+nginx", "grpc+envoy")
ORDER = ("geo", "rate", "profile", "user", "recommendation", "reservation", "search", "frontend")
DAEMON_CONFIG = "log_level: warning\n"
BLOCKED_CUSTOMERS = ["Mallory", "Trudy"]
MAX_ROOMS = 10
# The operator's content ACL on the reservation service (policies/acl.py rule syntax).
ACL_CONFIG = {
    "direction": "inbound",
    "default": "allow",
    "rules": [
        {"method": "/reservation.Reservation/MakeReservation", "field": "customerName", "op": "in",
         "value": BLOCKED_CUSTOMERS, "action": "deny", "details": "customer is blocked"},
        {"method": "/reservation.Reservation/MakeReservation", "field": "roomNumber", "op": "gt",
         "value": MAX_ROOMS, "action": "deny", "details": f"more than {MAX_ROOMS} rooms"},
    ],
}


class Unavailable(Exception):
    """This system cannot run here; the message says why."""


@dataclass
class Deployment:
    system: str
    rt: str
    target: str
    loadgen_env: dict
    notes: dict = field(default_factory=dict)
    pids: dict = field(default_factory=dict)


def generate_stubs(gen: str) -> None:
    """mrpcd stubs (mrpcd-stubgen) and grpcio stubs (grpc_tools.protoc) from the same .proto files."""
    protos = sorted(str(p) for p in (HERE / "proto").glob("*.proto"))
    os.makedirs(gen, exist_ok=True)
    for argv in ([sys.executable, "-m", "mrpcd.stubgen", "-I", str(HERE / "proto"), "-o", gen, *protos],
                 [sys.executable, "-m", "grpc_tools.protoc", "-I", str(HERE / "proto"), f"--python_out={gen}",
                  f"--grpc_python_out={gen}", *protos]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed: {r.stderr.strip()}")


def mrpcctl(sock: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", sock, *args],
                          capture_output=True, text=True, timeout=30)


def _env(gen: str, sock: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [gen, str(HERE), os.environ.get("PYTHONPATH", "")])))
    env.pop("MRPCD_SOCKET", None)
    if sock:
        env["MRPCD_SOCKET"] = sock
    return env


@contextlib.contextmanager
def deploy(system: str, gen: str, workdir: str, tools: dict) -> Iterator[Deployment]:
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    rt = "mrpcd" if system == "mrpcd" else "grpc"
    kind = system.partition("+")[2]
    binary = None
    if kind:
        binary, why = tools.get(kind, (None, f"{kind} not looked up"))
        if not binary:
            raise Unavailable(why)
    logs = os.path.join(workdir, "logs", system.replace("+", "-"))
    os.makedirs(logs, exist_ok=True)
    with Procs(logs) as procs:
        socks: dict[str, str] = {}
        if rt == "mrpcd":
            conf = os.path.join(workdir, "mrpcd-hotel.yaml")
            with open(conf, "w") as f:
                f.write(DAEMON_CONFIG)
            daemons = {}
            for host in (*ORDER, "loadgen"):
                socks[host] = os.path.join(workdir, f"hotel-{host}.sock")
                daemons[host] = procs.start(f"mrpcd-{host}", [sys.executable, "-m", "mrpcd.daemon.main", "-c", conf,
                                                              "--socket", socks[host]])
            for host, d in daemons.items():
                procs.wait_unix(d, socks[host], f"mrpcd daemon of {host}")
        ports = {svc: free_port() for svc in ORDER}
        # Where callers dial each service: the service itself, or its sidecar pair's A side.
        dial = dict(ports)
        if kind:
            for svc in ORDER:
                b = sidecars.start_nginx if kind == "nginx" else sidecars.start_envoy
                bport = b(procs, binary, workdir, f"{kind}-{svc}-B", ports[svc])
                dial[svc] = b(procs, binary, workdir, f"{kind}-{svc}-A", bport)
        started = {}
        for svc in ORDER:
            argv = [sys.executable, str(HERE / "service.py"), "--rt", rt, "--service", svc, "--gen", gen,
                    "--address", f"127.0.0.1:{ports[svc]}"]
            argv += [f"--target={d}=127.0.0.1:{dial[d]}" for d in DEPENDS.get(svc, ())]
            if svc == "reservation" and rt == "grpc":
                argv += ["--acl", json.dumps({"blocked_customers": BLOCKED_CUSTOMERS, "max_rooms": MAX_ROOMS})]
            started[svc] = procs.start(f"{rt}-{svc}", argv, env=_env(gen, socks.get(svc)), stdout_pipe=True)
        pids = {}
        for svc, proc in started.items():
            line = procs.read_line(proc, f"{svc} service ({rt})")
            if not line.startswith("READY "):
                raise procs.fail(proc, f"{svc} service said {line!r}")
            pids[svc] = proc.pid
        dep = Deployment(system, rt, f"127.0.0.1:{dial['frontend']}", _env(gen, socks.get("loadgen")), pids=pids)
        if rt == "mrpcd":
            r = mrpcctl(socks["reservation"], "--json", "policy", "attach", "hotel-reservation", "acl",
                        "--config", json.dumps(ACL_CONFIG))
            if r.returncode != 0:
                raise Unavailable(f"`mrpcctl policy attach hotel-reservation acl` failed: {r.stderr.strip()}")
            dep.notes["acl"] = "mrpcd policy `acl` attached by mrpcctl to hotel-reservation (inbound)"
            dep.notes["sockets"] = socks
        else:
            dep.notes["acl"] = "same rule compiled into the reservation service (grpcio has no operator-side content policy)"
        yield dep
        if rt == "mrpcd":
            r = mrpcctl(socks["reservation"], "--json", "policy", "list")
            dep.notes["policy_list"] = json.loads(r.stdout) if r.returncode == 0 else r.stderr.strip()

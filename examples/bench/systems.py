"""The systems under test, each deployed on loopback for one client flavor.

    mrpcd        client app → daemon A → TCP → daemon B → server app  (mrpcd stubs)
    grpc         client → server                                      (grpcio stubs)
    grpc+nginx   client → nginx A → nginx B → server                  (grpc_pass, h2c)
    grpc+envoy   client → envoy A → envoy B → server                  (h2c)
    mrpcd+policy mrpcd with ratelimit + acl + metrics attached to the server app's datapath

`deploy()` yields a `Deployment` (target, the client's environment, pids) and tears it all
down afterwards. Policies are attached with `mrpcctl policy attach`, the operator's way.
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

import sidecars
from procs import Procs

HERE = Path(__file__).resolve().parent
SYSTEMS = ("mrpcd", "mrpcd+policy", "grpc", "grpc+nginx", "grpc+envoy")
# Bench daemons get rings big enough for 8 MiB requests (the default ring is 4 MiB).
DAEMON_CONFIG = "ring_size: 67108864\nmax_record: 33554432\nlog_level: warning\n"

# The policy chain of issue 5: metrics + content ACL + rate limit, none of which refuses
# a benchmark call (the ACL reads the request's bytes; the rate limit is far above the load).
POLICY_CHAIN = [
    ("metrics", {}),
    ("acl", {"direction": "inbound", "default": "allow",
             "rules": [{"method": "/bench.Bench/Echo", "field": "data", "op": "prefix", "value": "DENY-",
                        "action": "deny"}]}),
    ("ratelimit", {"direction": "inbound", "rate": 10_000_000, "burst": 10_000_000}),
]


class Unavailable(Exception):
    """This system cannot run on this machine (the message says why)."""


@dataclass
class Deployment:
    system: str
    flavor: str
    api: str
    target: str
    client_env: dict
    pids: dict[str, int] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


def _env(gen: str, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([gen, str(HERE), os.environ.get("PYTHONPATH", "")]), **extra)
    env.pop("MRPCD_SOCKET", None)
    env.update(extra)
    return env


def _start_server(procs: Procs, api: str, flavor: str, gen: str, env: dict) -> tuple[int, int]:
    proc = procs.start(f"server-{api}-{flavor}", [sys.executable, str(HERE / "server.py"), "--api", api,
                                                  "--flavor", flavor, "--gen", gen], env=env, stdout_pipe=True)
    line = procs.read_line(proc, f"{api} {flavor} server")
    if not line.startswith("READY "):
        raise procs.fail(proc, f"{api} {flavor} server said {line!r}")
    return int(line.split()[1]), proc.pid


def mrpcctl(socket_path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", socket_path, *args],
                          capture_output=True, text=True, timeout=30)


def policy_cli_available() -> tuple[bool, str]:
    """Does this checkout's mrpcctl have `policy attach`? (Issue 4 is adding it.)"""
    r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "policy", "attach", "--help"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return True, ""
    return False, "policy chain: not available yet (mrpcctl has no `policy attach`: " + (r.stderr.strip().splitlines() or ["?"])[-1] + ")"


def attach_policies(sock: str, server_pid: int) -> list[dict]:
    """Attach POLICY_CHAIN to the server app (found by pid) with mrpcctl; raise Unavailable with its text on refusal."""
    r = mrpcctl(sock, "--json", "apps")
    if r.returncode != 0:
        raise Unavailable(f"mrpcctl apps failed: {r.stderr.strip()}")
    apps = [a for a in json.loads(r.stdout)["apps"] if a.get("pid") == server_pid]
    if not apps:
        raise Unavailable(f"server app (pid {server_pid}) not found in `mrpcctl apps`")
    app_id = str(apps[0]["app_id"])
    attached = []
    for name, config in POLICY_CHAIN:
        r = mrpcctl(sock, "--json", "policy", "attach", app_id, name, "--config", json.dumps(config))
        if r.returncode != 0:
            raise Unavailable(f"policy chain: `mrpcctl policy attach {app_id} {name}` failed: {r.stderr.strip()}")
        attached.append({"policy": name, "config": config})
    return attached


@contextlib.contextmanager
def deploy(system: str, flavor: str, gen: str, workdir: str, tools: dict) -> Iterator[Deployment]:
    """Start `system` for `flavor` clients; raise Unavailable when it cannot run here."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    with Procs(logs) as procs:
        if system.startswith("mrpcd"):
            if system == "mrpcd+policy":
                ok, why = policy_cli_available()
                if not ok:
                    raise Unavailable(why)
            conf = os.path.join(workdir, "mrpcd-bench.yaml")
            with open(conf, "w") as f:
                f.write(DAEMON_CONFIG)
            socks, pids = {}, {}
            for host in ("A", "B"):
                path = os.path.join(workdir, f"mrpcd-{host}.sock")
                d = procs.start(f"mrpcd-{host}", [sys.executable, "-m", "mrpcd.daemon.main", "-c", conf, "--socket", path])
                procs.wait_unix(d, path, f"mrpcd daemon {host}")
                socks[host], pids[f"daemon_{host}"] = path, d.pid
            port, spid = _start_server(procs, "mrpcd", flavor, gen, _env(gen, MRPCD_SOCKET=socks["B"]))
            pids["server"] = spid
            dep = Deployment(system, flavor, "mrpcd", f"127.0.0.1:{port}", _env(gen, MRPCD_SOCKET=socks["A"]), pids,
                             {"sockets": socks})
            if system == "mrpcd+policy":
                dep.notes["policies"] = attach_policies(socks["B"], spid)
            yield dep
            return
        kind = system.partition("+")[2]
        if kind:
            binary, why = tools.get(kind, (None, f"{kind} not looked up"))
            if not binary:
                raise Unavailable(why)
        port, spid = _start_server(procs, "grpc", flavor, gen, _env(gen))
        pids = {"server": spid}
        if kind:
            port = sidecars.start_pair(kind, procs, binary, workdir, port)
        yield Deployment(system, flavor, "grpc", f"127.0.0.1:{port}", _env(gen), pids)

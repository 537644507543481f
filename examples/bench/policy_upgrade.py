"""Benchmark: the pause and the failures caused by live policy changes under load.

Two daemons on loopback, the greeter server behind one, a closed-loop load generator behind
the other. While the load runs, the operator (this script, through `mrpcctl`) attaches a
rate limit to the client app, upgrades it several times to a new module version (its state:
tokens, queue, counters carried over), and detaches it. Every call is timestamped; the
report compares latency in a window around each swap with the steady state before any
change, and counts failed calls. JSON to stdout (and --out).

    python examples/bench/policy_upgrade.py [--upgrades 5] [--threads 4] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from procs import Procs, free_port  # noqa: E402  (the bench harness's process helpers)

V2 = '''
from mrpcd.policies.ratelimit import RateLimit


class RateLimitNext(RateLimit):
    version = "{version}"


POLICY = RateLimitNext
'''


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(lat_s: list[float]) -> dict:
    us = [x * 1e6 for x in lat_s]
    return {"calls": len(us), "p50_us": percentile(us, 0.5), "p99_us": percentile(us, 0.99), "max_us": max(us) if us else float("nan"),
            "mean_us": statistics.fmean(us) if us else float("nan")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upgrades", type=int, default=5)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--gap", type=float, default=0.5, help="seconds between operator actions")
    p.add_argument("--window", type=float, default=0.05, help="seconds after an action counted as 'around the swap'")
    p.add_argument("--rate", type=float, default=100000, help="rate limit (calls/s); high: measure the swap, not the limit")
    p.add_argument("--out")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mrpcd-policy-bench-") as tmp, Procs(tmp) as procs:
        gen = os.path.join(tmp, "gen")
        subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(ROOT / "examples/hello/hello.proto"), "-o", gen], check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([gen, str(ROOT / "examples/hello"), os.environ.get("PYTHONPATH", "")]))
        socks = {}
        for name in ("client", "server"):
            path = os.path.join(tmp, f"{name}.sock")
            daemon = procs.start(f"mrpcd-{name}", [sys.executable, "-m", "mrpcd.daemon.main", "--socket", path, "--log-level", "warning"])
            procs.wait_unix(daemon, path, f"mrpcd ({name})")
            socks[name] = path
        address = f"127.0.0.1:{free_port()}"
        server = procs.start("greeter-server", [sys.executable, str(ROOT / "examples/hello/greeter_server.py"), "--address", address],
                             env=dict(env, MRPCD_SOCKET=socks["server"]), stdout_pipe=True)
        procs.read_line(server, "greeter server")
        stop, out = os.path.join(tmp, "stop"), os.path.join(tmp, "calls.json")
        load = procs.start("load", [sys.executable, str(HERE / "policy_upgrade_load.py"), "--target", address, "--threads", str(args.threads),
                                    "--stop-file", stop, "--out", out], env=dict(env, MRPCD_SOCKET=socks["client"]), stdout_pipe=True)
        procs.read_line(load, "load generator")

        def ctl(*a: str) -> float:
            t = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", socks["client"], *a], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise SystemExit(f"mrpcctl {' '.join(a)} failed: {r.stderr}")
            return t

        time.sleep(1.0)  # steady state, no policy
        actions: list[tuple[str, float]] = []
        cfg = f"{{rate: {args.rate}, burst: {max(10, int(args.rate / 10))}, mode: queue, max_queue: 100000}}"
        actions.append(("attach", ctl("policy", "attach", "policy_upgrade_load.py", "ratelimit", "--config", cfg)))
        for i in range(args.upgrades):
            time.sleep(args.gap)
            mod = os.path.join(tmp, f"ratelimit_v{i + 2}.py")
            Path(mod).write_text(V2.format(version=f"{i + 2}.0"))
            actions.append((f"upgrade->{i + 2}.0", ctl("policy", "upgrade", "ratelimit", "--module", mod)))
        time.sleep(args.gap)
        actions.append(("detach", ctl("policy", "detach", "ratelimit")))
        time.sleep(args.gap)
        Path(stop).touch()
        load.wait(60)
        calls = json.loads(Path(out).read_text())["calls"]
    first_action = actions[0][1]
    baseline = [lat for t0, lat, ok, _ in calls if t0 < first_action - 0.05 and ok]
    result = {
        "benchmark": "policy_upgrade",
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "params": vars(args),
        "total_calls": len(calls),
        "failed_calls": sum(1 for c in calls if not c[2]),
        "failures": sorted({c[3] for c in calls if not c[2]}),
        "baseline": summary(baseline),
        "actions": [],
    }
    for name, t in actions:
        # calls that were in flight at the action, or started within the window after it
        around = [lat for t0, lat, ok, _ in calls if t0 <= t + args.window and t0 + lat >= t]
        s = summary(around)
        s["action"] = name
        s["p99_vs_baseline"] = s["p99_us"] / result["baseline"]["p99_us"] if baseline else None
        result["actions"].append(s)
    swaps = [a for a in result["actions"] if a["action"].startswith("upgrade")]
    result["upgrade_pause"] = {"worst_max_us": max(a["max_us"] for a in swaps), "worst_p99_us": max(a["p99_us"] for a in swaps)} if swaps else {}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if result["failed_calls"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

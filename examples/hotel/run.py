"""Hotel reservation (DeathStarBench) over mrpcd, grpcio, and grpcio behind sidecars.

One command: deploys each system on loopback (deploy.py), runs the wrk2-mix load
generator against its frontend (loadgen.py), and prints a table of latency percentiles and
throughput; writes hotel.json and hotel.png (matplotlib) into --out.

    python examples/hotel/run.py [--quick] [--systems mrpcd,grpc,grpc+nginx,grpc+envoy] [--out DIR]

--quick: 3 s of load per system, nginx sidecars only (16 Envoy processes take longer to
start than the whole quick run). A system that cannot run here is listed with the reason.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import deploy  # noqa: E402
import sidecars  # noqa: E402  (examples/bench, put on sys.path by deploy)


def run_load(dep: deploy.Deployment, gen: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, str(HERE / "loadgen.py"), "--rt", dep.rt, "--gen", gen, "--target", dep.target,
            "--duration", str(args.duration), "--warmup", str(args.warmup), "--concurrency", str(args.concurrency),
            "--blocked-customer", deploy.BLOCKED_CUSTOMERS[0], "--too-many-rooms", str(deploy.MAX_ROOMS + 1)]
    r = subprocess.run(argv, env=dep.loadgen_env, capture_output=True, text=True,
                       timeout=args.duration + args.warmup + 120)
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def acl_counters(res: dict) -> dict:
    """The acl policy's counters on the reservation app, from `mrpcctl policy list`."""
    pl = res.get("notes", {}).get("policy_list")
    if not isinstance(pl, dict):
        return {}
    for app in pl.get("apps", []):
        for pol in app.get("policies", []):
            if pol.get("name") == "acl":
                return pol.get("counters", {})
    return {}


def acl_note(res: dict) -> str:
    c = acl_counters(res)
    if c:
        return f"acl policy (mrpcctl): {c.get('allowed', 0)} allowed, {c.get('denied', 0)} denied"
    return "acl compiled into the reservation service"


def table(results: list[dict]) -> str:
    head = f"{'system':<12} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7} {'probes':>7}  notes"
    lines = [head, "-" * len(head)]
    for res in results:
        if "error" in res:
            lines.append(f"{res['system']:<12} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {'-':>7} {'-':>7}  unavailable: {res['error']}")
            continue
        lat = res["latency"]
        probes = res["probes"]
        ok = sum(p["ok"] for p in probes.values())
        lines.append(f"{res['system']:<12} {res['throughput_rps']:>8.0f} {lat['p50_us'] / 1e3:>8.2f} {lat['p90_us'] / 1e3:>8.2f} "
                     f"{lat['p99_us'] / 1e3:>8.2f} {sum(res['errors'].values()):>7} {ok:>3}/{len(probes):<3}  acl: {res['notes'].get('acl', '')[:60]}")
    return "\n".join(lines)


def probe_table(results: list[dict]) -> str:
    ran = [r for r in results if "probes" in r]
    if not ran:
        return ""
    names = list(ran[0]["probes"])
    head = f"{'probe':<26}" + "".join(f"{r['system']:>24}" for r in ran)
    lines = [head, "-" * len(head)]
    for n in names:
        lines.append(f"{n:<26}" + "".join(f"{r['probes'][n]['code'] + (' ok' if r['probes'][n]['ok'] else ' WRONG'):>24}" for r in ran))
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> str | None:
    """Latency percentiles and throughput per system; returns why not, if no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[examples]')"
    ran = [r for r in results if "latency" in r]
    if not ran:
        return "no system ran"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["system"] for r in ran]
    width = 0.25
    for k, q in enumerate(("p50_us", "p90_us", "p99_us")):
        ax1.bar([i + (k - 1) * width for i in range(len(ran))], [r["latency"][q] / 1e3 for r in ran], width, label=q[:3])
    ax1.set_xticks(range(len(ran)), names)
    ax1.set_ylabel("latency (ms)")
    ax1.set_title(f"hotel reservation, wrk2 mix, {ran[0]['concurrency']} clients")
    ax1.legend()
    ax2.bar(names, [r["throughput_rps"] for r in ran], color="tab:gray")
    ax2.set_ylabel("requests/s")
    ax2.set_title("throughput (closed loop)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run, nginx sidecars only")
    p.add_argument("--systems", help=f"comma-separated subset of {','.join(deploy.SYSTEMS)}")
    p.add_argument("--duration", type=float, help="seconds of measured load per system (default 15, quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of unmeasured load first (default 2, quick 0.5)")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default 16)")
    p.add_argument("--out", default="hotel-results", help="directory for hotel.json and hotel.png")
    p.add_argument("--no-install", action="store_true", help="do not apt-get nginx / pip install envoy")
    args = p.parse_args()
    args.duration = args.duration or (3.0 if args.quick else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0)
    if args.duration <= 0 or args.concurrency < 1:
        p.error("--duration must be > 0 and --concurrency >= 1")
    systems = args.systems.split(",") if args.systems else list(deploy.SYSTEMS)
    bad = [s for s in systems if s not in deploy.SYSTEMS]
    if bad:
        p.error(f"unknown system(s) {', '.join(bad)}; known: {', '.join(deploy.SYSTEMS)}")
    tools: dict = {}
    if any(s.endswith("+nginx") for s in systems):
        tools["nginx"] = sidecars.find_nginx(install=not args.no_install)
    if any(s.endswith("+envoy") for s in systems):
        tools["envoy"] = (None, "skipped in --quick (16 Envoy processes start slower than the whole quick run)") \
            if args.quick and not args.systems else sidecars.find_envoy(install=not args.no_install)
    os.makedirs(args.out, exist_ok=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mrpcd-hotel-") as tmp:
        gen = os.path.join(tmp, "gen")
        deploy.generate_stubs(gen)
        for system in systems:
            t0 = time.monotonic()
            print(f"== {system} ...", file=sys.stderr, flush=True)
            try:
                with deploy.deploy(system, gen, tmp, tools) as dep:
                    res = run_load(dep, gen, args)
                res.update(system=system, notes={k: v for k, v in dep.notes.items() if k != "sockets"})
            except deploy.Unavailable as exc:
                res = {"system": system, "error": str(exc)}
            res["wall_s"] = time.monotonic() - t0
            res["acl_counters"] = acl_counters(res)
            results.append(res)
    print(table(results))
    print()
    print(probe_table(results))
    out_json = os.path.join(args.out, "hotel.json")
    png = os.path.join(args.out, "hotel.png")
    why = plot(results, png)
    with open(out_json, "w") as f:
        json.dump({"quick": args.quick, "duration_s": args.duration, "concurrency": args.concurrency,
                   "png": None if why else png, "png_missing_reason": why, "results": results}, f, indent=1)
    print(f"\nwrote {out_json}" + (f" and {png}" if not why else f" (no plot: {why})"))
    wrong = [f"{r['system']}:{n}" for r in results if "probes" in r for n, pr in r["probes"].items() if not pr["ok"]]
    if wrong:
        print(f"probes with the wrong outcome: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

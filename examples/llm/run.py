"""LLM serving pipeline over mrpcd: fairness (VTC), a per-client rate limit, cancellation.

One command deploys four daemons on loopback ("hosts": clients, gateway, tokenizer, model)
and the three services, then runs the same three clients three times:

    none            no policy: the model server's slots go first come, first served
    vtc             `mrpcctl policy attach llm-model vtc`: Virtual Token Counter scheduling
                    of Model.Generate (input tokens + 2 x output tokens per client)
    vtc+ratelimit   vtc, plus `ratelimit` on the heavy client's own app (its quota of
                    generations per second, i.e. of prompt + output tokens per second)

heavy floods long prompts (12 open generations), light-1 and light-2 send short ones (2
each). It prints, per run and client, the service received (output tokens/s, and weighted
tokens/s as VTC counts them) and VTC's own per-client counters from `mrpcctl policy list`;
then the cancellation probes: a client cancel and an expired deadline at the gateway must
stop the model server's generation (its counters say so). Writes llm.json into --out.

    python examples/llm/run.py [--quick] [--duration S] [--out DIR]
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
sys.path.insert(0, str(HERE.parent / "bench"))
from procs import Procs, free_port  # noqa: E402  (examples/bench)

CLIENTS = {  # name: (concurrency, prompt words, max tokens)
    "heavy": (12, 300, 96),
    "light-1": (2, 20, 32),
    "light-2": (2, 20, 32),
}
LIGHT = ("light-1", "light-2")
SLOTS = 4
VTC_CONFIG = {"methods": ["/llm.Model/Generate"], "max_inflight": SLOTS, "w_in": 1, "w_out": 2,
              "client_id": {"field": "client_id"}, "input_tokens": {"field": "prompt_ids"}}
HEAVY_RATE = 1.0  # generations per second for the heavy client in the rate-limited run
RATELIMIT_CONFIG = {"direction": "outbound", "rate": HEAVY_RATE, "burst": 1, "mode": "queue", "max_queue": 1000}
RUNS = (
    ("none", []),
    ("vtc", [("model", "llm-model", "vtc", VTC_CONFIG)]),
    ("vtc+ratelimit", [("model", "llm-model", "vtc", VTC_CONFIG), ("clients", "llm-client-heavy", "ratelimit", RATELIMIT_CONFIG)]),
)


class Pipeline:
    """The deployed daemons and services."""

    def __init__(self, procs: Procs, workdir: str, gen: str, token_ms: float) -> None:
        self.procs, self.workdir, self.gen = procs, workdir, gen
        conf = os.path.join(workdir, "mrpcd-llm.yaml")
        with open(conf, "w") as f:
            f.write("log_level: warning\n")
        self.socks: dict[str, str] = {}
        daemons = {}
        for host in ("clients", "gateway", "tokenizer", "model"):
            self.socks[host] = os.path.join(workdir, f"llm-{host}.sock")
            daemons[host] = procs.start(f"mrpcd-{host}", [sys.executable, "-m", "mrpcd.daemon.main", "-c", conf,
                                                          "--socket", self.socks[host]])
        for host, d in daemons.items():
            procs.wait_unix(d, self.socks[host], f"mrpcd daemon {host}")
        self.addr = {s: f"127.0.0.1:{free_port()}" for s in ("gateway", "tokenizer", "model")}
        started = {}
        for svc in ("model", "tokenizer", "gateway"):
            argv = [sys.executable, str(HERE / "service.py"), svc, "--address", self.addr[svc]]
            if svc == "model":
                argv += ["--slots", str(SLOTS), "--token-ms", str(token_ms)]
            if svc == "gateway":
                argv += ["--tokenizer", self.addr["tokenizer"], "--model", self.addr["model"]]
            started[svc] = procs.start(f"llm-{svc}", argv, env=self.env(svc), stdout_pipe=True)
        for svc, proc in started.items():
            line = procs.read_line(proc, f"llm {svc}")
            if not line.startswith("READY"):
                raise procs.fail(proc, f"llm {svc} said {line!r}")

    def env(self, host: str) -> dict:
        return dict(os.environ, MRPCD_SOCKET=self.socks[host],
                    PYTHONPATH=os.pathsep.join(filter(None, [self.gen, str(HERE), os.environ.get("PYTHONPATH", "")])))

    def ctl(self, host: str, *args: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", self.socks[host], "--json", *args],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"mrpcctl {' '.join(args)} failed: {r.stderr.strip()}")
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def model_stats(self) -> dict:
        import mrpcd

        import llm_mrpc as m
        app = mrpcd.connect(self.socks["clients"], name="llm-operator")
        try:
            stub = m.ModelStub(mrpcd.insecure_channel(self.addr["model"], app=app))
            return json.loads(stub.Stats(m.StatsRequest(), timeout=10).json)
        finally:
            app.close()


def run_clients(pipe: Pipeline, policies: list, duration: float) -> tuple[dict, dict]:
    """Start the clients, attach `policies` once their apps exist, run, return (clients, policy list)."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for seed, (name, (conc, words, toks)) in enumerate(CLIENTS.items()):
            procs[name] = subprocess.Popen(
                [sys.executable, str(HERE / "client.py"), "--name", name, "--target", pipe.addr["gateway"],
                 "--concurrency", str(conc), "--prompt-words", str(words), "--max-tokens", str(toks),
                 "--duration", str(duration), "--seed", str(seed + 1)],
                env=pipe.env("clients"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=open(os.path.join(pipe.workdir, f"client-{name}.log"), "ab"), text=True)
        for name, p in procs.items():
            line = p.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"client {name} said {line!r} (exit {p.poll()})")
        for host, app, policy, config in policies:
            pipe.ctl(host, "policy", "attach", app, policy, "--config", json.dumps(config))
        for p in procs.values():
            p.stdin.write("go\n")
            p.stdin.flush()
        out = {}
        for name, p in procs.items():
            stdout, _ = p.communicate(timeout=duration + 60)
            if p.returncode != 0:
                raise RuntimeError(f"client {name} exited {p.returncode}; see {pipe.workdir}/client-{name}.log")
            out[name] = json.loads(stdout.strip().splitlines()[-1])
        listing = pipe.ctl("model", "policy", "list")
        for host, app, policy, config in policies:
            if host != "clients":  # a client app's policy went away with the app
                pipe.ctl(host, "policy", "detach", policy)
        return out, listing
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(5)


def vtc_clients(listing: dict) -> dict:
    for app in listing.get("apps", []):
        for pol in app.get("policies", []):
            if pol.get("name") == "vtc":
                return pol.get("clients", {})
    return {}


def summarize(name: str, clients: dict, listing: dict) -> dict:
    w = {c: clients[c]["weighted_service_per_s"] for c in clients}
    total = sum(w.values()) or 1.0
    light = sum(w[c] for c in LIGHT)
    return {
        "run": name, "clients": clients, "vtc": vtc_clients(listing),
        "light_share": light / total,
        "heavy_to_light_ratio": w["heavy"] / max(1e-9, light / len(LIGHT)),
        "gap_weighted_per_s": max(w.values()) - min(w.values()),
    }


def table(runs: list[dict]) -> str:
    head = (f"{'run':<14} {'client':<8} {'out tok/s':>9} {'weighted/s':>10} {'share':>6} {'done':>5} {'ttft p50':>9} "
            f"{'ttft p99':>9} {'errors':<14} {'VTC service':>11} {'VTC counter':>11} {'VTC adm':>7}")
    lines = [head, "-" * len(head)]
    for run in runs:
        total = sum(c["weighted_service_per_s"] for c in run["clients"].values()) or 1.0
        for name, c in run["clients"].items():
            v = run["vtc"].get(name)
            vtc = f"{v['service']:>11.0f} {v['counter']:>11.0f} {v['admitted']:>7}" if v else f"{'-':>11} {'-':>11} {'-':>7}"
            errs = ",".join(f"{k}:{n}" for k, n in c["errors"].items()) or "-"
            lines.append(f"{run['run']:<14} {name:<8} {c['output_tokens_per_s']:>9.0f} {c['weighted_service_per_s']:>10.0f} "
                         f"{c['weighted_service_per_s'] / total:>6.1%} {c['completed']:>5} {c['ttft_p50_ms']:>7.0f}ms "
                         f"{c['ttft_p99_ms']:>7.0f}ms {errs:<14} {vtc}")
        lines.append(f"{'':<14} light clients' share {run['light_share']:.1%}; heavy/light service ratio "
                     f"{run['heavy_to_light_ratio']:.2f}; gap (max-min weighted/s) {run['gap_weighted_per_s']:.0f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 s per run instead of 15")
    p.add_argument("--duration", type=float, help="seconds per run")
    p.add_argument("--token-ms", type=float, default=6.0, help="model: milliseconds per generated token")
    p.add_argument("--out", default="llm-results", help="directory for llm.json")
    args = p.parse_args()
    duration = args.duration or (5.0 if args.quick else 15.0)
    if duration <= 0 or args.token_ms < 0:
        p.error("--duration must be > 0 and --token-ms >= 0")
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mrpcd-llm-") as tmp:
        gen = os.path.join(tmp, "gen")
        subprocess.run([sys.executable, "-m", "mrpcd.stubgen", "-I", str(HERE), "-o", gen, str(HERE / "llm.proto")],
                       check=True, timeout=120)
        sys.path[:0] = [gen, str(HERE)]
        with Procs(os.path.join(tmp)) as procs:
            pipe = Pipeline(procs, tmp, gen, args.token_ms)
            runs = []
            for name, policies in RUNS:
                print(f"== {name} ({duration:.0f} s) ...", file=sys.stderr, flush=True)
                clients, listing = run_clients(pipe, policies, duration)
                runs.append(summarize(name, clients, listing))
                time.sleep(0.3)
            before = pipe.model_stats()
            r = subprocess.run([sys.executable, str(HERE / "client.py"), "--name", "probe", "--target", pipe.addr["gateway"],
                                "--probe"], env=pipe.env("clients"), capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise SystemExit(f"cancellation probe failed: {r.stderr.strip()[-2000:]}")
            probe = json.loads(r.stdout.strip().splitlines()[-1])
            after = pipe.model_stats()
    print(table(runs))
    cancel = {
        "client_cancel": {**probe["client_cancel"], "model": after.get("probe-cancel", {})},
        "deadline": {**probe["deadline"], "model": after.get("probe-deadline", {})},
        "model_cancelled_during_load": sum(v["cancelled"] for k, v in before.items()),
    }
    print()
    for what, c in (("client cancel after 5 tokens", cancel["client_cancel"]), ("0.3 s deadline", cancel["deadline"])):
        mm = c["model"]
        print(f"{what:<30}: client got {c['tokens_received']} tokens"
              + (f", status {c['code']} after {c['after_s']} s" if "code" in c else "")
              + f"; model server: started {mm.get('started', 0)}, cancelled {mm.get('cancelled', 0)}, "
              f"generated {mm.get('tokens', 0)} of 400 tokens, {mm.get('tokens_not_generated', 0)} not generated")
    print(f"generations the model server stopped because clients cancelled at the end of the load runs: "
          f"{cancel['model_cancelled_during_load']}")
    out = os.path.join(args.out, "llm.json")
    with open(out, "w") as f:
        json.dump({"duration_s": duration, "token_ms": args.token_ms, "slots": SLOTS, "clients": CLIENTS,
                   "vtc_config": VTC_CONFIG, "ratelimit_config": RATELIMIT_CONFIG, "runs": runs,
                   "cancellation": cancel}, f, indent=1)
    print(f"\nwrote {out}")
    ok = all(c["model"].get("cancelled", 0) >= 1 for c in (cancel["client_cancel"], cancel["deadline"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

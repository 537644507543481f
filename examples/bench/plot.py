"""The PNG: latency p50/p99, throughput, streaming and the target ratios of one bench.json.

Why a separate module: the runner works without matplotlib (the JSON is the record); the
plot is a view of it and can be redrawn: `python plot.py results/bench.json out.png`.
"""
from __future__ import annotations

import json
import sys
from typing import Any


def _label(r: dict) -> str:
    return f"{r['system']}/{r['flavor']}"


def _size(n: int) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n // k}{unit}"
    return f"{n}B"


def plot(report: dict[str, Any], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [r for r in report["results"] if r.get("calls") and not r.get("errors")]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    ax = axes[0][0]
    for label in sorted({_label(r) for r in res if r["kind"] == "latency"}):
        pts = sorted((r["size"], r["p50_us"], r["p99_us"]) for r in res if r["kind"] == "latency" and _label(r) == label)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.plot([p[0] for p in pts], [p[2] for p in pts], linestyle=":", color=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel="request bytes (reply 8 B)", ylabel="µs (solid p50, dotted p99)",
           title="latency, concurrency 1")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    points = sorted({(r["size"], r["concurrency"]) for r in res if r["kind"] == "throughput"})
    labels = sorted({_label(r) for r in res if r["kind"] == "throughput"})
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        vals = []
        for size, c in points:
            hit = [r["rpc_per_s"] for r in res if r["kind"] == "throughput" and _label(r) == label
                   and (r["size"], r["concurrency"]) == (size, c)]
            vals.append(hit[0] if hit else 0)
        ax.bar([j + i * width for j in range(len(points))], vals, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(points))], [f"{_size(s)} c={c}" for s, c in points])
    ax.set(yscale="log", ylabel="RPC/s", title="throughput")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    st = sorted((r for r in res if r["kind"] == "stream"), key=lambda r: (r["concurrency"], _label(r)))
    ax.barh([f"{_label(r)} c={r['concurrency']}" for r in st], [r["msg_per_s"] for r in st])
    ax.set(xlabel="messages/s", title="server streaming, 256 messages per call")
    ax = axes[1][1]
    tg = [t for t in report.get("targets", []) if "ratio" in t]
    ax.barh([t["target"] for t in tg], [t["ratio"] for t in tg],
            color=["tab:green" if t.get("met") else "tab:red" for t in tg])
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set(xscale="log", xlabel="ratio mrpcd / peer (green: target met)", title="issue 5 targets")
    ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"mrpcd bench ({report['mode']}), {report['machine']['cpus']} CPUs, {report['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: plot.py bench.json out.png")
    with open(sys.argv[1]) as f:
        print(plot(json.load(f), sys.argv[2]))

"""One client of the LLM gateway (its own mrpcd app, `llm-client-<name>`), closed loop.

    python client.py --name NAME --target ADDR --concurrency N --prompt-words W --max-tokens T --duration S
    python client.py --name NAME --target ADDR --probe      # the cancellation probes

Load mode: prints `READY`, waits for a line on stdin (so the operator can attach policies
to this app first), then keeps N generations open for S seconds and cancels what is still
running at the end. Counts only tokens received inside the window. Prints one JSON object.

Probe mode: one generation cancelled by the client after 5 tokens and one whose 0.3 s
deadline expires mid-stream, both asking for 400 tokens: the model server must stop both
(run.py reads its counters).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

import mrpcd
import mrpcd.aio

import llm_mrpc as m
import tokenizer


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


async def load(args: argparse.Namespace, stub: m.GatewayStub) -> dict:
    rnd = random.Random(args.seed)
    stats: dict[str, Any] = {"name": args.name, "concurrency": args.concurrency, "requests": 0, "completed": 0,
                             "output_tokens": 0, "input_tokens": 0, "errors": {}}
    ttft: list[float] = []
    t_end = [0.0]

    async def one() -> None:
        prompt = " ".join(rnd.choice(tokenizer.WORDS) for _ in range(args.prompt_words))
        t0 = time.monotonic()
        stats["requests"] += 1
        try:
            async for chunk in stub.Generate(m.GenerateRequest(client_id=args.name, prompt=prompt, max_tokens=args.max_tokens),
                                             timeout=args.timeout):
                now = time.monotonic()
                if now > t_end[0]:
                    return
                if chunk.index == 0:
                    ttft.append(now - t0)
                    stats["input_tokens"] += chunk.prompt_tokens
                stats["output_tokens"] += 1
            stats["completed"] += 1
        except mrpcd.RpcError as exc:
            code = exc.code().name
            stats["errors"][code] = stats["errors"].get(code, 0) + 1

    async def worker() -> None:
        while time.monotonic() < t_end[0]:
            await one()

    t0 = time.monotonic()
    t_end[0] = t0 + args.duration
    tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    await asyncio.sleep(args.duration)
    for t in tasks:
        t.cancel()  # calls still open are cancelled (CANCEL goes to the gateway, then the model)
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - t0
    stats.update(duration_s=elapsed, output_tokens_per_s=stats["output_tokens"] / elapsed,
                 weighted_service_per_s=(stats["input_tokens"] + 2 * stats["output_tokens"]) / elapsed,
                 ttft_p50_ms=pct(ttft, 0.5) * 1e3, ttft_p99_ms=pct(ttft, 0.99) * 1e3)
    return stats


async def probe(args: argparse.Namespace, stub: m.GatewayStub) -> dict:
    out: dict[str, Any] = {}
    prompt = "explain the policy of the daemon"
    call = stub.Generate(m.GenerateRequest(client_id=f"{args.name}-cancel", prompt=prompt, max_tokens=400), timeout=30)
    got = 0
    async for _ in call:
        got += 1
        if got == 5:
            call.cancel()
            break
    out["client_cancel"] = {"tokens_received": got, "cancelled": call.cancelled()}
    got = 0
    t0 = time.monotonic()
    try:
        async for _ in stub.Generate(m.GenerateRequest(client_id=f"{args.name}-deadline", prompt=prompt, max_tokens=400), timeout=0.3):
            got += 1
        code = "OK"
    except mrpcd.RpcError as exc:
        code = exc.code().name
    out["deadline"] = {"tokens_received": got, "code": code, "after_s": round(time.monotonic() - t0, 3)}
    await asyncio.sleep(0.5)  # let the CANCELs reach the model server before run.py reads its counters
    return out


async def main_async(args: argparse.Namespace) -> dict:
    app = mrpcd.aio.connect(name=f"llm-client-{args.name}")
    stub = m.GatewayStub(mrpcd.aio.insecure_channel(args.target, app=app))
    if args.probe:
        return await probe(args, stub)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    return await load(args, stub)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--probe", action="store_true")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--prompt-words", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each generation, seconds")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.concurrency < 1 or args.prompt_words < 1 or args.max_tokens < 1 or args.duration <= 0:
        p.error("--concurrency, --prompt-words, --max-tokens must be >= 1 and --duration > 0")
    print(json.dumps(asyncio.run(main_async(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

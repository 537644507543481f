"""Run one service of the LLM pipeline as its own mrpcd app (name `llm-<service>`).

    python service.py {gateway,tokenizer,model} --address 127.0.0.1:PORT [--tokenizer ADDR --model ADDR]
                      [--slots N --token-ms MS --prefill-ms MS]

The daemon comes from MRPCD_SOCKET; the generated llm_mrpc module from PYTHONPATH.
Prints `READY <port>`; stops on SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import mrpcd.aio

import llm_mrpc as m
from services import Gateway, Model, Tokenizer


async def serve(args: argparse.Namespace) -> None:
    app = mrpcd.aio.connect(name=f"llm-{args.service}")
    server = mrpcd.aio.server(app=app)
    if args.service == "model":
        m.add_ModelServicer_to_server(Model(args.slots, args.token_ms, args.prefill_ms), server)
    elif args.service == "tokenizer":
        m.add_TokenizerServicer_to_server(Tokenizer(), server)
    else:
        if not args.tokenizer or not args.model:
            raise SystemExit("gateway needs --tokenizer and --model addresses")
        tok = m.TokenizerStub(mrpcd.aio.insecure_channel(args.tokenizer, app=app))
        model = m.ModelStub(mrpcd.aio.insecure_channel(args.model, app=app))
        m.add_GatewayServicer_to_server(Gateway(tok, model), server)
    port = server.add_insecure_port(args.address)
    await server.start()
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("service", choices=("gateway", "tokenizer", "model"))
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--tokenizer")
    p.add_argument("--model")
    p.add_argument("--slots", type=int, default=4, help="model: generations served at once")
    p.add_argument("--token-ms", type=float, default=6.0, help="model: milliseconds per output token")
    p.add_argument("--prefill-ms", type=float, default=0.05, help="model: milliseconds per prompt token")
    args = p.parse_args()
    if args.slots < 1 or args.token_ms < 0 or args.prefill_ms < 0:
        p.error("--slots must be >= 1, --token-ms and --prefill-ms >= 0")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

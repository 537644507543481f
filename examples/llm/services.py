"""The three services of the pipeline, on mrpcd.aio.

Gateway.Generate: tokenizes the prompt (Tokenizer.Encode), streams Model.Generate back to
the client token by token. The client's deadline is passed on (the remaining time), and a
client that goes away cancels the gateway's handler, whose open model call is cancelled
with it (mrpcd sends CANCEL): the model server stops generating.

Model.Generate: a deterministic token generator with a fixed capacity, like a GPU serving
`slots` sequences at once: prefill costs `prefill_ms` per prompt token, then each output
token `token_ms`. Generations beyond `slots` wait in FIFO order (asyncio.Semaphore), so
without a scheduling policy whoever sends the most requests gets most of the model.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from typing import Any

import mrpcd

import llm_mrpc as m
import tokenizer

MAX_TOKENS = 4096
MAX_PROMPT = 64 * 1024


@dataclass
class ClientStats:
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    tokens: int = 0
    tokens_not_generated: int = 0  # max_tokens - generated, for cancelled generations


class Model(m.ModelServicer):
    def __init__(self, slots: int, token_ms: float, prefill_ms: float) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.token_s = token_ms / 1e3
        self.prefill_s = prefill_ms / 1e3
        self.stats: dict[str, ClientStats] = {}
        self.active = 0

    async def Generate(self, request: m.ModelRequest, context: Any):
        if not 1 <= request.max_tokens <= MAX_TOKENS:
            await context.abort(mrpcd.StatusCode.INVALID_ARGUMENT, f"max_tokens must be 1..{MAX_TOKENS}, got {request.max_tokens}")
        bad = next((t for t in request.prompt_ids if not 0 <= t < tokenizer.VOCAB_SIZE), None)
        if bad is not None:
            await context.abort(mrpcd.StatusCode.INVALID_ARGUMENT, f"prompt token {bad} outside the vocabulary")
        st = self.stats.setdefault(request.client_id or "anonymous", ClientStats())
        st.started += 1
        done = 0
        try:
            async with self.slots:
                self.active += 1
                try:
                    await asyncio.sleep(self.prefill_s * len(request.prompt_ids))
                    state = (sum(request.prompt_ids) * 2654435761 + len(request.prompt_ids)) & 0xFFFFFFFF
                    for i in range(request.max_tokens):
                        await asyncio.sleep(self.token_s)
                        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
                        tid = 256 + state % (tokenizer.VOCAB_SIZE - 256)
                        done += 1
                        st.tokens += 1
                        yield m.ModelToken(token_id=tid, text=tokenizer.piece(tid), index=i)
                finally:
                    self.active -= 1
            st.completed += 1
        except (asyncio.CancelledError, GeneratorExit):
            st.cancelled += 1
            st.tokens_not_generated += request.max_tokens - done
            raise

    async def Stats(self, request: m.StatsRequest, context: Any) -> m.StatsReply:
        return m.StatsReply(json=json.dumps({k: asdict(v) for k, v in self.stats.items()}))


class Tokenizer(m.TokenizerServicer):
    async def Encode(self, request: m.EncodeRequest, context: Any) -> m.EncodeReply:
        if len(request.text) > MAX_PROMPT:
            await context.abort(mrpcd.StatusCode.INVALID_ARGUMENT, f"prompt longer than {MAX_PROMPT} characters")
        return m.EncodeReply(ids=tokenizer.encode(request.text))


class Gateway(m.GatewayServicer):
    def __init__(self, tokenizer_stub: m.TokenizerStub, model_stub: m.ModelStub) -> None:
        self.tok = tokenizer_stub
        self.model = model_stub
        self.cancelled = 0

    async def Generate(self, request: m.GenerateRequest, context: Any):
        if not request.client_id:
            await context.abort(mrpcd.StatusCode.INVALID_ARGUMENT, "client_id is required")
        try:
            enc = await self.tok.Encode(m.EncodeRequest(text=request.prompt), timeout=context.time_remaining())
            call = self.model.Generate(m.ModelRequest(client_id=request.client_id, prompt_ids=list(enc.ids),
                                                      max_tokens=request.max_tokens), timeout=context.time_remaining())
            first = True
            async for tok in call:
                yield m.TokenChunk(text=tok.text, token_id=tok.token_id, index=tok.index,
                                   prompt_tokens=len(enc.ids) if first else 0)
                first = False
        except mrpcd.RpcError as exc:
            await context.abort(exc.code(), exc.details())
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

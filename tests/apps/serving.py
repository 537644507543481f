"""Serve a servicer through the daemon in MRPCD_SOCKET, sync or asyncio, for the test apps.

Prints "host:port" once the daemon listens (tests read that line), then serves until killed.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

import mrpcd
import mrpcd.aio


def _announce(address: str, port: int) -> None:
    print(f"{address.rpartition(':')[0]}:{port}", flush=True)


async def _serve_async(add: Callable[[Any, Any], None], servicer: Any, address: str) -> None:
    server = mrpcd.aio.server()
    add(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    _announce(address, port)
    await server.wait_for_termination()


def serve(add: Callable[[Any, Any], None], servicer: Any, address: str, use_async: bool = False) -> int:
    """`add` is the generated add_XServicer_to_server; `servicer` sync or async to match."""
    if use_async:
        asyncio.run(_serve_async(add, servicer, address))
        return 0
    server = mrpcd.server()
    add(servicer, server)
    port = server.add_insecure_port(address)
    server.start()
    _announce(address, port)
    server.wait_for_termination()
    return 0

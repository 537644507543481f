"""Daemon-to-daemon RDMA transport (RC queue pairs on pyverbs).

The protocol logic is sans-I/O and imports no pyverbs: ``credits`` (flow control),
``framing`` (records over fixed-size receive buffers), ``plan`` (memory registration and
scatter-gather lists), ``setup`` (parameter exchange over the TCP side channel),
``channel`` (all of it for one connection). ``verbs`` is the I/O shell; it imports
pyverbs lazily, so this package imports everywhere. ``connect`` / ``serve`` here have
the signatures of ``mrpcd.transports.tcp``'s and load the shell on first use.

See docs/RDMA.md.
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["available", "connect", "serve"]


def available() -> tuple[bool, str]:
    """(True, device names) if pyverbs imports and an RDMA device exists, else (False, why)."""
    try:
        import pyverbs.device  # noqa: F401
    except Exception as exc:  # ImportError, or a broken binary module
        return False, f"pyverbs not importable: {exc} (see docs/RDMA.md, 'Installing pyverbs')"
    try:
        names = sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        names = []
    if not names:
        return False, "no RDMA device: /sys/class/infiniband is empty or missing"
    return True, ", ".join(names)


async def connect(host: str, port: int, services: dict[str, str], **kwargs: Any) -> Any:
    """``tcp.connect`` over RDMA: see ``mrpcd.transports.rdma.verbs.connect``."""
    from . import verbs
    return await verbs.connect(host, port, services, **kwargs)


async def serve(host: str, port: int, services_for: Any, on_connection: Any, **kwargs: Any) -> Any:
    """``tcp.serve`` over RDMA: see ``mrpcd.transports.rdma.verbs.serve``."""
    from . import verbs
    return await verbs.serve(host, port, services_for, on_connection, **kwargs)

"""Daemon-to-daemon TCP transport (uvloop; the protocol object is compiled, see _tcp.pyx).

```python
conn = await connect("10.0.0.2", 7000, {"helloworld.Greeter": fp})   # client role
server = await serve("0.0.0.0", 7000, services_for, on_connection)    # server role

conn.peer_hello                      # the peer's validated HELLO: {"version", "role", "services"}
conn.set_handlers(on_records, on_close)
conn.send(record_bytes)              # queued; one writelines (→ writev) per loop iteration
conn.send_batch([r1, r2, ...])       # one writelines now
conn.pause_reading(); conn.resume_reading()
await conn.drain()                   # wait while the transport's write buffer is too full
conn.close("reason")                 # flush, GOAWAY(:details=reason), close
```

Handlers: ``on_records(list[Record])`` gets every data record of one read (HELLO / GOAWAY
never reach it); records that arrive before ``set_handlers`` are held (and reading is
paused) until it is called. ``on_close(exc)`` is called exactly once after the socket is
gone: ``None`` when we closed it, ``PeerGoaway`` (a ConnectionError with ``.details``)
when the peer said GOAWAY, ``RecordError`` when the peer sent a malformed frame (we send
it a GOAWAY with the reason), ``ConnectionError`` for anything else (reset, EOF, EOF in the
middle of a record). Nothing the peer sends raises into the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from mrpcd.transports._tcp import PeerConnection, PeerGoaway
from mrpcd.transports.handshake import PROTOCOL_VERSION, HandshakeError

__all__ = [
    "PROTOCOL_VERSION",
    "ConnectTimeout",
    "HandshakeError",
    "PeerConnection",
    "PeerGoaway",
    "connect",
    "serve",
]

log = logging.getLogger("mrpcd.transports.tcp")

DEFAULT_MAX_RECORD = 16 << 20


class ConnectTimeout(ConnectionError, TimeoutError):
    """connect() did not finish the TCP connect and the handshake within its timeout."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def connect(
    host: str,
    port: int,
    services: dict[str, str],
    *,
    max_record: int = DEFAULT_MAX_RECORD,
    timeout: float = 5.0,
) -> PeerConnection:
    """Open a connection to the mrpcd at host:port and run the handshake (client role).

    Raises ``HandshakeError`` (a ConnectionError) if the server refuses us or we refuse it
    (version or schema mismatch; the text says which), ``ConnectTimeout`` after ``timeout``
    seconds, ``ConnectionError`` for everything else, always naming host:port.
    """
    loop = asyncio.get_running_loop()
    where = _hostport(host, port)
    deadline = loop.time() + timeout
    ready: asyncio.Future = loop.create_future()
    services = dict(services)

    def on_ready(conn: PeerConnection, exc: BaseException | None) -> None:
        if ready.done():
            return
        if exc is None:
            ready.set_result(conn)
        else:
            ready.set_exception(exc)

    def factory() -> PeerConnection:
        return PeerConnection("client", lambda: services, on_ready, max_record)

    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(factory, host, port), timeout=max(deadline - loop.time(), 0)
        )
    except asyncio.TimeoutError:
        raise ConnectTimeout(f"cannot connect to mrpcd at {where}: TCP connect timed out after {timeout:g} s") from None
    except OSError as exc:
        raise ConnectionError(f"cannot connect to mrpcd at {where}: {exc.strerror or exc}") from exc

    try:
        return await asyncio.wait_for(asyncio.shield(ready), timeout=max(deadline - loop.time(), 0))
    except asyncio.TimeoutError:
        ready.cancel()  # nobody will wait for it any more
        conn.fail_handshake(f"handshake timed out after {timeout:g} s")
        raise ConnectTimeout(f"cannot connect to mrpcd at {where}: no handshake reply within {timeout:g} s") from None
    except HandshakeError as exc:
        if getattr(exc, "remote", False):
            msg = f"mrpcd at {where} refused the connection: {exc}"
        else:
            msg = f"handshake with mrpcd at {where} failed: {exc}"
        raise HandshakeError(msg) from None
    except ConnectionError as exc:
        raise ConnectionError(f"cannot connect to mrpcd at {where}: {exc}") from None
    except asyncio.CancelledError:
        ready.cancel()
        conn.abort()
        raise


async def serve(
    host: str,
    port: int,
    services_for: Callable[[], dict[str, str]],
    on_connection: Callable[[PeerConnection], None],
    *,
    max_record: int = DEFAULT_MAX_RECORD,
    handshake_timeout: float = 10.0,
    on_handshake_error: Callable[[str, Exception], None] | None = None,
) -> asyncio.AbstractServer:
    """Listen on host:port (port 0: any; see ``server.sockets[0].getsockname()``).

    Every accepted connection runs the handshake (server role) against ``services_for()``
    (called per connection, so newly registered services count). On success
    ``on_connection(conn)`` is called; it should call ``conn.set_handlers``. On failure the
    peer gets a GOAWAY with the reason, the connection is closed, the reason is logged at
    WARNING on ``mrpcd.transports.tcp``, and ``on_handshake_error(peer, exc)`` is called
    if given. A client that sends no HELLO within ``handshake_timeout`` s is dropped.
    """

    def on_ready(conn: PeerConnection, exc: BaseException | None) -> None:
        if exc is None:
            on_connection(conn)
            return
        log.warning("handshake with %s failed: %s", conn.peer, exc)
        if on_handshake_error is not None:
            try:
                on_handshake_error(conn.peer, exc)
            except Exception:
                log.exception("on_handshake_error callback failed")

    def factory() -> PeerConnection:
        return PeerConnection("server", services_for, on_ready, max_record, handshake_timeout)

    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host, port, family=socket.AF_UNSPEC, reuse_address=True)

"""Daemon-to-daemon TCP transport (uvloop; the protocol object is compiled, see _tcp.pyx).

```python
conn = await connect("10.0.0.2", 7000, {"helloworld.Greeter": fp})   # client role
server = await serve("0.0.0.0", 7000, services_for, on_connection)    # server role

# services: {name: fingerprint}, or a handshake.ServiceSet that also carries the closures
conn.peer_hello                      # the peer's validated HELLO: {"version", "role", "services"}
                                     # (+ "closures" of compatible mismatched services: evolution)
conn.set_handlers(on_records, on_close)
conn.send(record_bytes)              # queued; one writelines (→ writev) per loop iteration
conn.send_batch([r1, r2, ...])       # one writelines now
conn.pause_reading(); conn.resume_reading()
await conn.drain()                   # wait while the transport's write buffer is too full
conn.close("reason")                 # flush, GOAWAY(:details=reason), close
```

Security (``mrpcd.transports.security``): ``tls=TlsConfig`` runs mutual TLS under the mrpcd
handshake (the client verifies that the server's certificate names the address it dialled;
the server verifies the client's certificate against the CA); ``allow=AllowList`` limits
the peer addresses. ``serve`` checks the allow-list before any TLS work: a refused peer
gets a GOAWAY saying why on plain TCP, a closed socket under TLS, and a WARNING line here
either way; a failed TLS handshake is logged the same way (asyncio would drop it silently).
``connect`` refuses a target outside the allow-list before dialling, and reports TLS
failures as ``HandshakeError`` naming OpenSSL's reason.

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
import ssl
from typing import Callable, Protocol, Sequence

from mrpcd.transports._tcp import PeerConnection, PeerGoaway
from mrpcd.transports.handshake import PROTOCOL_VERSION, HandshakeError, copy_services, make_goaway
from mrpcd.transports.security import AllowList, TlsConfig, describe_tls_error

__all__ = [
    "PROTOCOL_VERSION",
    "ConnectTimeout",
    "HandshakeError",
    "PeerConnection",
    "PeerGoaway",
    "PeerNotAllowed",
    "connect",
    "serve",
]

log = logging.getLogger("mrpcd.transports.tcp")

DEFAULT_MAX_RECORD = 16 << 20


class Listener(Protocol):
    """What ``serve`` returns: an ``asyncio.Server`` or, under TLS, a ``_TlsListener``."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...

    def is_serving(self) -> bool: ...


class ConnectTimeout(ConnectionError, TimeoutError):
    """connect() did not finish the TCP connect and the handshake within its timeout."""


class PeerNotAllowed(ConnectionRefusedError):
    """The address is outside this daemon's ``peers.allow`` list."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _resolve_allowed(loop: asyncio.AbstractEventLoop, host: str, port: int, allow: AllowList, where: str) -> str:
    """The first address of ``host`` inside the allow-list; PeerNotAllowed if there is none."""
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectionError(f"cannot connect to mrpcd at {where}: cannot resolve {host}: {exc.strerror or exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if allow.permits(address):
            return address
    shown = host if addresses == [host] else f"{host} ({', '.join(addresses)})"
    raise PeerNotAllowed(f"refusing to connect to mrpcd at {where}: {shown} is not in peers.allow ({allow})")


async def connect(
    host: str,
    port: int,
    services: dict[str, str],
    *,
    max_record: int = DEFAULT_MAX_RECORD,
    timeout: float = 5.0,
    tls: TlsConfig | None = None,
    allow: AllowList | None = None,
) -> PeerConnection:
    """Open a connection to the mrpcd at host:port and run the handshake (client role).

    Raises ``HandshakeError`` (a ConnectionError) if the server refuses us or we refuse it
    (version or schema mismatch, TLS failure; the text says which), ``PeerNotAllowed`` when
    host:port is outside ``allow``, ``ConnectTimeout`` after ``timeout`` seconds,
    ``ConnectionError`` for everything else, always naming host:port.
    """
    loop = asyncio.get_running_loop()
    where = _hostport(host, port)
    deadline = loop.time() + timeout
    ready: asyncio.Future = loop.create_future()
    services = copy_services(services)
    dial = host
    if allow is not None:
        dial = await _resolve_allowed(loop, host, port, allow, where)

    def on_ready(conn: PeerConnection, exc: BaseException | None) -> None:
        if ready.done():
            return
        if exc is None:
            ready.set_result(conn)
        else:
            ready.set_exception(exc)

    def factory() -> PeerConnection:
        return PeerConnection("client", lambda: services, on_ready, max_record)

    tls_args: dict = {}
    if tls is not None:
        tls_args = {"ssl": tls.client_context, "server_hostname": host.split("%", 1)[0],
                    "ssl_handshake_timeout": max(deadline - loop.time(), 0.001)}
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(factory, dial, port, **tls_args), timeout=max(deadline - loop.time(), 0)
        )
    except asyncio.TimeoutError:
        raise ConnectTimeout(f"cannot connect to mrpcd at {where}: TCP connect timed out after {timeout:g} s") from None
    except (ssl.SSLError, ssl.CertificateError) as exc:
        raise HandshakeError(f"TLS handshake with mrpcd at {where} failed: {describe_tls_error(exc)}") from None
    except OSError as exc:
        if tls is not None and isinstance(exc, ConnectionError):
            msg = f"TLS handshake with mrpcd at {where} failed: the peer closed the connection ({exc.strerror or exc})"
            msg += "; is it refusing our address (peers.allow) or not speaking TLS?"
            raise HandshakeError(msg) from None
        if isinstance(exc, ConnectionRefusedError):  # the common case: say what it means for the caller
            raise ConnectionError(f"cannot connect to mrpcd at {where}: Connection refused: no server app listens on {where} "
                                  "(is it running, bound to that address?)") from exc
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
        if tls is not None and "during the handshake" in str(exc):
            # TLS 1.3: the server checks our certificate after our side of TLS finished; its
            # refusal arrives as the connection dropping before the mrpcd HELLO reply
            raise HandshakeError(
                f"TLS handshake with mrpcd at {where} failed: the server closed the connection after TLS; "
                f"it most likely refused our certificate (is it signed by the CA in the server's tls.ca?) ({exc})"
            ) from None
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
    tls: TlsConfig | None = None,
    allow: AllowList | None = None,
    admit: Callable[[Accepted], str | None] | None = None,
) -> Listener:
    """Listen on host:port (port 0: any; see ``server.sockets[0].getsockname()``).

    Every accepted connection runs the handshake (server role) against ``services_for()``
    (called per connection, so newly registered services count). On success
    ``on_connection(conn)`` is called; it should call ``conn.set_handlers``. On failure the
    peer gets a GOAWAY with the reason, the connection is closed, the reason is logged at
    WARNING on ``mrpcd.transports.tcp``, and ``on_handshake_error(peer, exc)`` is called
    if given. A client that sends no HELLO within ``handshake_timeout`` s is dropped.
    With ``allow``, peers outside it are refused the same way (before TLS); with ``tls``,
    a failed TLS handshake too (the reason is OpenSSL's).

    With ``admit``, every connection the allow-list lets in is shown to ``admit(accepted)``
    before any handshake or TLS work (``accepted.is_closing()`` tells later whether it is
    still open: the caller counts them). A returned text refuses it: a plain-TCP peer gets
    a GOAWAY with that text, and the socket is closed at once. Not logged here: a peer may
    open connections in a loop, and the caller knows how often it is worth a line.
    """

    def on_ready(conn: PeerConnection, exc: BaseException | None) -> None:
        if exc is None:
            on_connection(conn)
            return
        refused(conn.peer, exc, "handshake")

    def refused(peer: str, exc: BaseException, what: str) -> None:
        log.warning("%s with %s failed: %s", what, peer, exc)
        if on_handshake_error is not None:
            try:
                on_handshake_error(peer, exc)  # type: ignore[arg-type]
            except Exception:
                log.exception("on_handshake_error callback failed")

    def factory() -> PeerConnection:
        return PeerConnection("server", services_for, on_ready, max_record, handshake_timeout)

    loop = asyncio.get_running_loop()
    if tls is not None:
        return await _TlsListener.start(factory, host, port, tls, allow, handshake_timeout, refused, admit)

    protocol: Callable[[], asyncio.BaseProtocol] = factory
    if allow is not None or admit is not None:
        allowed = allow

        def gate() -> _Gate:
            return _Gate(factory, allowed, refused, admit)

        protocol = gate
    if _dual_stack(host):  # asyncio would make it IPv6-only: make the socket here
        return await loop.create_server(protocol, sock=_listening_socket(socket.AF_INET6, ("::", port), True))
    return await loop.create_server(protocol, host, port, family=socket.AF_UNSPEC, reuse_address=True)


def _dual_stack(host: str | None) -> bool:
    """"[::]:port", the address grpc's examples and most grpc servers listen on, is every
    address of both families in grpc (one dual-stack socket), so clients of "localhost:port"
    or "127.0.0.1:port" reach it. asyncio's create_server makes every IPv6 socket
    IPv6-only, which would refuse them; so the wildcard gets a dual-stack socket."""
    return host == "::" and socket.has_ipv6


def _listening_socket(family: int, addr: tuple, dual_stack: bool = False) -> socket.socket:
    """A bound, listening, non-blocking socket; an IPv6 one is IPv6-only unless
    `dual_stack` (the wildcard "::" given as the host, see _dual_stack). That wildcard on
    a kernel without IPv6 listens on IPv4's ("0.0.0.0"), as grpc's wildcard falls back."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        if not dual_stack:
            raise
        family, addr, dual_stack = socket.AF_INET, ("0.0.0.0", addr[1]), False
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
            except OSError:  # no IPV6_V6ONLY here: the system's default (dual-stack on Linux)
                pass
        try:
            sock.bind(addr)
        except OSError as exc:
            raise OSError(exc.errno, f"error while attempting to bind on address {addr!r}: {exc.strerror}") from None
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_of(addr: object) -> tuple[str, str]:
    """(host, "host:port") of a peername."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), _hostport(str(addr[0]), addr[1])
    return "?", "?"


def _refusal(allow: AllowList, host: str) -> str:
    return f"address {host} is not in peers.allow of this daemon"


class Accepted(Protocol):
    """An accepted connection as ``serve``'s ``admit`` sees it: open until is_closing()."""

    def is_closing(self) -> bool: ...


class _Gate(asyncio.Protocol):
    """An accepted plain-TCP socket before the mrpcd handshake: the allow-list check, then
    ``admit`` (see ``serve``); both refuse with a GOAWAY.

    An allowed peer's socket is handed to a PeerConnection at once (inside connection_made,
    before uvloop starts reading, so no byte is lost).
    """

    def __init__(self, factory: Callable[[], PeerConnection], allow: AllowList | None,
                 refused: Callable[[str, BaseException, str], None],
                 admit: Callable[[Accepted], str | None] | None = None) -> None:
        self._factory = factory
        self._allow = allow
        self._refused = refused
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        host, peer = _peer_of(transport.get_extra_info("peername"))
        if self._allow is not None and not self._allow.permits(host):
            reason = _refusal(self._allow, host)
            transport.write(make_goaway(f"connection refused: {reason}"))  # type: ignore[attr-defined]
            transport.close()
            self._refused(peer, PeerNotAllowed(f"connection refused: {reason} ({self._allow})"), "connection")
            return
        if self._admit is not None:
            why = self._admit(transport)
            if why is not None:
                transport.write(make_goaway(f"connection refused: {why}"))  # type: ignore[attr-defined]
                transport.close()
                return
        conn = self._factory()
        transport.set_protocol(conn)
        conn.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # never: the socket changed hands in connection_made
        pass


class _TlsAccepted:
    """An accepted TLS socket as ``admit`` sees it: open during its TLS handshake, closed
    if that fails, then as open as the transport it became."""

    __slots__ = ("transport", "failed")

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.failed = False

    def is_closing(self) -> bool:
        if self.transport is not None:
            return self.transport.is_closing()
        return self.failed


class _TlsListener:
    """Listening sockets for mutual TLS: accept, allow-list check, then the TLS handshake.

    Accepting ourselves and upgrading with ``loop.connect_accepted_socket(ssl=)`` lets a
    failed TLS handshake raise here, where it is logged with the peer and OpenSSL's reason
    (behind ``create_server(ssl=)`` asyncio and uvloop drop it silently), and keeps TLS
    work away from addresses outside the allow-list. Quacks like ``asyncio.Server`` as far
    as the daemon uses it: ``sockets``, ``close()``, ``wait_closed()``, ``is_serving()``.
    """

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    @classmethod
    async def start(cls, factory: Callable[[], PeerConnection], host: str, port: int, tls: TlsConfig,
                    allow: AllowList | None, handshake_timeout: float,
                    refused: Callable[[str, BaseException, str], None],
                    admit: Callable[[Accepted], str | None] | None = None) -> "_TlsListener":
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, _type, _proto, _, addr in dict.fromkeys(infos):
                sockets.append(_listening_socket(family, addr, _dual_stack(host)))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self = cls(sockets)
        timeout = handshake_timeout if handshake_timeout > 0 else 60.0
        for sock in sockets:
            self._spawn(self._accept_loop(sock, factory, tls, allow, timeout, refused, admit))
        return self

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, sock: socket.socket, factory, tls: TlsConfig, allow: AllowList | None,
                           timeout: float, refused, admit: Callable[[Accepted], str | None] | None) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                client, addr = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closed:
                    return
                log.warning("accept on %s failed: %s", sock.getsockname(), exc)
                await asyncio.sleep(0.1)  # EMFILE and friends: do not spin
                continue
            host, peer = _peer_of(addr)
            if allow is not None and not allow.permits(host):
                client.close()  # no TLS work for strangers; they see the connection close
                refused(peer, PeerNotAllowed(f"connection refused: {_refusal(allow, host)} ({allow})"), "connection")
                continue
            accepted = _TlsAccepted()
            if admit is not None and admit(accepted) is not None:
                client.close()  # no TLS work past the bound either (admit logs and counts it)
                continue
            self._spawn(self._handshake(client, peer, factory, tls, timeout, refused, accepted))

    async def _handshake(self, client: socket.socket, peer: str, factory, tls: TlsConfig, timeout: float, refused,
                         accepted: "_TlsAccepted") -> None:
        loop = asyncio.get_running_loop()
        try:
            accepted.transport, _ = await loop.connect_accepted_socket(factory, client, ssl=tls.server_context,
                                                                       ssl_handshake_timeout=timeout)
        except asyncio.CancelledError:
            accepted.failed = True
            client.close()
            raise
        except (ssl.SSLError, ssl.CertificateError) as exc:
            accepted.failed = True
            client.close()
            refused(peer, HandshakeError(f"TLS handshake failed: {describe_tls_error(exc)}"), "TLS handshake")
        except (OSError, asyncio.TimeoutError) as exc:
            accepted.failed = True
            client.close()
            if isinstance(exc, asyncio.TimeoutError):
                why = f"no TLS handshake within {timeout:g} s"
            else:
                why = (f"the peer closed the connection ({exc or type(exc).__name__}); "
                       "it most likely refused our certificate (is it signed by the CA in the peer's tls.ca?)")
            refused(peer, HandshakeError(f"TLS handshake failed: {why}"), "TLS handshake")
        except BaseException:
            accepted.failed = True  # (admit must not count it as open for ever)
            client.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            try:
                loop.remove_reader(sock.fileno())
            except (ValueError, OSError):
                pass
            sock.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def is_serving(self) -> bool:
        return not self._closed

"""Live upgrade of the transport engine: new code takes over open connections, sockets kept.

A transport version is a connection class with `VERSION`, `hand_over()` (the old object
gives up its socket, decoder state, unwritten output, undelivered records and handlers, and
goes quiet) and `adopt(state)` (the new class takes them over and becomes the socket's
protocol with `transport.set_protocol`). Nothing is re-sent and the peer sees no change:
the same TCP connection simply continues under new code, between two event-loop callbacks.
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

from ..policies.base import import_fresh

log = logging.getLogger("mrpcd.transport")
_fresh = itertools.count(1)


class TransportUpgradeError(ValueError):
    """The new transport version cannot be loaded or does not fit; nothing was changed."""


class TransportVersion(Protocol):
    """A transport version's connection class, as far as the daemon uses the class itself."""

    VERSION: ClassVar[Any]

    @classmethod
    def adopt(cls, state: Any) -> Any: ...


def load_transport_class(spec: Any) -> type[TransportVersion]:
    """`spec` is a dotted module or a .py path exporting `PeerConnection`; checked before use."""
    if not isinstance(spec, str) or not spec:
        raise TransportUpgradeError("name the new transport: a dotted module or a .py path exporting PeerConnection")
    try:
        if spec.endswith(".py") or "/" in spec:
            path = Path(spec)
            if not path.is_file():
                raise TransportUpgradeError(f"no such transport module file: {spec}")
            name = f"mrpcd_transport_upgrade_{next(_fresh)}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise TransportUpgradeError(f"transport module {spec}: not an importable Python file (a .py file exporting PeerConnection)")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = import_fresh(spec)  # a dotted module given again: its current code, not the cached one
    except TransportUpgradeError:
        raise
    except (Exception, SystemExit) as exc:  # sys.exit() at import must not end the daemon
        raise TransportUpgradeError(f"cannot load transport {spec}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, "PeerConnection", None)
    if not isinstance(cls, type):
        raise TransportUpgradeError(f"{spec} does not export a PeerConnection class")
    missing = [a for a in ("VERSION", "adopt", "hand_over", "send_batch", "set_handlers") if not hasattr(cls, a)]
    if missing:
        raise TransportUpgradeError(f"{spec}.PeerConnection lacks {', '.join(missing)}: not a transport version")
    return cast("type[TransportVersion]", cls)  # it has every name the daemon uses: checked just above


def migrate(conn: Any, cls: type[TransportVersion]) -> Any:
    """Move one open connection to `cls`; if the new code refuses it, the old class re-adopts it.

    Raises what `hand_over()` or the re-adoption raised: then `conn` is either still open on
    its old code, or closed (its state is lost; the socket was aborted if it could be named).
    """
    if conn.closed:
        return conn
    state = conn.hand_over()
    try:
        return cls.adopt(state)
    except (Exception, SystemExit):  # the new code's sys.exit() must not end the daemon
        log.exception("transport %s could not adopt %s; it stays on %s", getattr(cls, "VERSION", "?"), conn.peer, type(conn).VERSION)
    try:
        return type(conn).adopt(state)
    except (Exception, SystemExit):
        transport = state.get("transport") if isinstance(state, dict) else None
        if transport is not None:
            transport.abort()  # nobody owns the socket any more: the peer sees it go
        raise

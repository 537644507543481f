"""Bounds on the connections peers open to the apps' listeners (`limits:` config).

Why: an app's `bind` makes the daemon listen, and anything that reaches that address (a
peer daemon, or any program on a host `peers.allow` admits) could open connections to it
without end; each costs the daemon a descriptor and memory (buffers, a handshake timer),
and the descriptors are the ones every app needs. The daemon now counts the accepted
connections still open, per listening address (`inbound_connections_per_listener`) and in
all (`inbound_connections`); past either, a new one is closed as it is accepted, before the
handshake (or TLS) costs anything: a plain-TCP peer gets a GOAWAY naming the limit.

How it counts without a hook in every way a connection can end (handshake failures,
routes closed, the transport live-upgraded under it): it keeps the accepted connections'
transports and drops those whose `is_closing()` is true, when a list has doubled since it
was last pruned (amortized O(1) per connection) and before it refuses one (at most every
PRUNE_INTERVAL seconds per list, so a peer hammering a full listener costs a refusal, not
a scan, per attempt).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from ..transports.tcp import Accepted
from .log_limits import worth_logging

log = logging.getLogger("mrpcd.limits")

# How a refusal's text begins: the calling daemon, finding it in the GOAWAY that ended its
# handshake, fails the app's `connect` RESOURCE_EXHAUSTED (session.connect), not as a
# schema mismatch would.
REFUSED_MARK = "resource exhausted: "
REFUSED_COUNTER = "inbound_connections_refused"
PRUNE_INTERVAL = 0.05  # seconds between scans of a full list for connections that closed
_FIRST_PRUNE = 64  # a list is first scanned when it holds this many


class ListenerConnections:
    """The connections accepted on one of an app's listening addresses, not yet seen closed."""

    __slots__ = ("owner", "address", "on_refused", "open", "_next_prune", "_pruned_at", "closed")

    def __init__(self, owner: "InboundConnections", address: str, on_refused: Callable[[], None] | None) -> None:
        self.owner = owner
        self.address = address
        self.on_refused = on_refused  # counts a refusal for the listening app (its stats)
        self.open: list[Accepted] = []
        self._next_prune = _FIRST_PRUNE
        self._pruned_at = float("-inf")
        self.closed = False

    def prune(self, now: float | None = None) -> None:
        """Forget the connections that closed."""
        before = len(self.open)
        self.open = [c for c in self.open if not c.is_closing()]
        self.owner.tracked -= before - len(self.open)
        self._next_prune = max(2 * len(self.open), _FIRST_PRUNE)
        self._pruned_at = time.monotonic() if now is None else now

    def admit(self, conn: Accepted) -> str | None:
        """None to let the new connection in (it is counted), or why it is refused."""
        return self.owner.admit(self, conn)

    def close(self) -> None:
        """The listener closed: its connections (closed with its app) no longer count."""
        if not self.closed:
            self.closed = True
            self.owner.tracked -= len(self.open)
            self.open = []
            self.owner.listeners.discard(self)


class InboundConnections:
    """Counts and bounds the inbound peer connections of the whole daemon.

    `limits` is read on every check, so a reloaded config (SIGHUP) applies to the next
    connection; connections already open above a lowered bound stay open."""

    def __init__(self, limits: Callable[[], dict[str, int]], counters: dict[str, int]) -> None:
        self._limits = limits
        self.listeners: set[ListenerConnections] = set()
        self.tracked = 0  # connections held over all listeners (some may have closed since the last prune)
        # the daemon's counters (`mrpcctl stats`, metrics): connections refused at either bound
        self.counters = counters
        counters.setdefault(REFUSED_COUNTER, 0)
        self._pruned_all_at = float("-inf")

    def listener(self, address: str, on_refused: Callable[[], None] | None = None) -> ListenerConnections:
        """The count of one new listening address; close() it when the listener closes."""
        lc = ListenerConnections(self, address, on_refused)
        self.listeners.add(lc)
        return lc

    def open_now(self) -> int:
        """Inbound connections open now (what `mrpcctl stats` shows): prunes every list."""
        self._prune_all(time.monotonic())
        return self.tracked

    def _prune_all(self, now: float) -> None:
        for lc in list(self.listeners):
            lc.prune(now)
        self._pruned_all_at = now

    def admit(self, lc: ListenerConnections, conn: Accepted) -> str | None:
        """Count `conn` on `lc`, or say why it passes limits.inbound_connections_per_listener
        or limits.inbound_connections."""
        if lc.closed:
            return "the listener is closed"
        limits = self._limits()
        now = time.monotonic()
        per_listener, total = limits["inbound_connections_per_listener"], limits["inbound_connections"]
        if len(lc.open) >= lc._next_prune or len(lc.open) >= per_listener and now - lc._pruned_at >= PRUNE_INTERVAL:
            lc.prune(now)
        if self.tracked >= total and now - self._pruned_all_at >= PRUNE_INTERVAL:
            self._prune_all(now)
        if len(lc.open) >= per_listener:
            return self._refuse(lc, "inbound_connections_per_listener", f"listening address {lc.address} has",
                                len(lc.open), per_listener)
        if self.tracked >= total:
            return self._refuse(lc, "inbound_connections", "this daemon has", self.tracked, total)
        lc.open.append(conn)
        self.tracked += 1
        return None

    def _refuse(self, lc: ListenerConnections, key: str, whose: str, count: int, limit: int) -> str:
        self.counters[REFUSED_COUNTER] = refused = self.counters[REFUSED_COUNTER] + 1
        if lc.on_refused is not None:
            lc.on_refused()
        why = (f"{REFUSED_MARK}{whose} {count} peer connections open in mrpcd: at most {limit} allowed "
               f"(limits.{key} in that mrpcd's config)")
        if worth_logging(refused):  # a peer connecting in a loop must not flood the log
            log.warning("inbound peer connection to %s refused: %s (%d refused so far)", lc.address, why, refused,
                        extra={"limit": key, "refused": refused})
        return why

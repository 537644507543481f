"""A per-app datapath: an ordered chain of engines between the app's rings and the network.

Engines see *batches* (lists of records), one call per wake-up rather than one per RPC:
that is what keeps a Python data plane fast. Outbound batches (app → network) run through
the chain front to back, inbound batches (network → app) back to front. An engine may pass,
drop-with-a-status (via `Datapath.reply_error`), hold back, tag or rewrite records. The
chain is a plain list replaced between two batches, which is what makes engines
hot-swappable (policies build on this contract).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from ..marshal import records as R

if TYPE_CHECKING:
    from .session import AppSession

log = logging.getLogger("mrpcd.datapath")


class Engine:
    """Base of every engine on a datapath. Subclasses override what they need."""

    name = "engine"

    def outbound(self, batch: list[R.Record]) -> list[R.Record]:
        return batch

    def inbound(self, batch: list[R.Record]) -> list[R.Record]:
        return batch

    def export_state(self) -> dict[str, Any]:
        """Everything a new version of this engine needs to carry on (live upgrade)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class Datapath:
    """The engine chain of one app plus the two ends it connects."""

    def __init__(self, session: "AppSession", send_out: Callable[[list[R.Record]], None], deliver_in: Callable[[list[R.Record]], None]) -> None:
        self.session = session
        self.engines: list[Engine] = []
        self._send_out = send_out
        self._deliver_in = deliver_in

    def outbound(self, batch: list[R.Record]) -> None:
        self.outbound_from(0, batch)

    def inbound(self, batch: list[R.Record]) -> None:
        self.inbound_from(len(self.engines) - 1, batch)

    def outbound_from(self, index: int, batch: list[R.Record]) -> None:
        """Run engines[index:] front to back, then hand the batch to the transport."""
        engines = self.engines
        for i in range(max(0, index), len(engines)):
            if not batch:
                return
            batch = engines[i].outbound(batch)
        if batch:
            self._send_out(batch)

    def inbound_from(self, index: int, batch: list[R.Record]) -> None:
        """Run engines[index], engines[index-1], ... engines[0], then deliver to the app."""
        engines = self.engines
        for i in range(min(index, len(engines) - 1), -1, -1):
            if not batch:
                return
            batch = engines[i].inbound(batch)
        if batch:
            self._deliver_in(batch)

    def outbound_after(self, engine: Engine, batch: list[R.Record]) -> None:
        """Records `engine` held back go on towards the network from just after it."""
        try:
            index = self.engines.index(engine) + 1
        except ValueError:  # no longer on the chain (detached meanwhile): skip nothing it did not pass
            index = len(self.engines)
        self.outbound_from(index, batch)

    def inbound_after(self, engine: Engine, batch: list[R.Record]) -> None:
        """Records `engine` held back go on towards the app from just before it."""
        try:
            index = self.engines.index(engine) - 1
        except ValueError:
            index = -1
        self.inbound_from(index, batch)

    def reply_error(self, rec: R.Record, code: int, details: str) -> None:
        """Answer a client's request record with a final status, without it leaving the host."""
        self._deliver_in([error_response(rec.handle, rec.call_id, code, details)])


def error_response(handle: int, call_id: int, code: int, details: str) -> R.Record:
    """A RESPONSE record that ends a call with `code` and `details` (no message)."""
    meta = R.encode_metadata([(":details", details)], internal=True)
    return R.parse_record(
        R.encode_record(R.RESPONSE, R.F_START | R.F_END | R.F_NO_MSG, code, handle, call_id, 0, 0, meta, b"")
    )

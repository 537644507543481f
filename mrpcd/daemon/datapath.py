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
from .log_limits import worth_logging

if TYPE_CHECKING:
    from .session import AppSession

log = logging.getLogger("mrpcd.datapath")
INTERNAL = 13  # grpc status code


class Engine:
    """Base of every engine on a datapath. Subclasses override what they need."""

    name = "engine"

    def outbound(self, batch: list[R.Record]) -> list[R.Record]:
        return batch

    def inbound(self, batch: list[R.Record]) -> list[R.Record]:
        return batch

    def handle_closed(self, handle: int) -> None:
        """A route (handle) of the app closed: no more records of its calls will come.

        Engines that keep per-call state (capacity slots, queued calls) forget that
        handle's calls here; no final RESPONSE or CANCEL of them ever crosses the chain."""

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
        self._failures: dict[str, int] = {}  # engine instance name -> batches it raised on

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
            try:
                batch = engines[i].outbound(batch)
            except (Exception, SystemExit) as exc:
                self.engine_failed(engines[i], "outbound", batch, exc)
                return
        if batch:
            self._send_out(batch)

    def inbound_from(self, index: int, batch: list[R.Record]) -> None:
        """Run engines[index], engines[index-1], ... engines[0], then deliver to the app."""
        engines = self.engines
        for i in range(min(index, len(engines) - 1), -1, -1):
            if not batch:
                return
            try:
                batch = engines[i].inbound(batch)
            except (Exception, SystemExit) as exc:
                self.engine_failed(engines[i], "inbound", batch, exc)
                return
        if batch:
            self._deliver_in(batch)

    def outbound_after(self, engine: Engine, batch: list[R.Record]) -> None:
        """Records `engine` held back go on towards the network from just after it."""
        try:
            index = self.engines.index(engine) + 1
        except ValueError:
            self._off_chain(engine, batch)
            return
        self.outbound_from(index, batch)

    def inbound_after(self, engine: Engine, batch: list[R.Record]) -> None:
        """Records `engine` held back go on towards the app from just before it."""
        try:
            index = self.engines.index(engine) - 1
        except ValueError:
            self._off_chain(engine, batch)
            return
        self.inbound_from(index, batch)

    def _off_chain(self, engine: Engine, batch: list[R.Record]) -> None:
        """An engine not on the chain released records: one detached or replaced (what it
        held went on when it left), or one an upgrade built and did not swap in (the old
        instance still holds them). Sent on, they would go a second time, past engines they
        never passed: dropped, loudly."""
        log.error("policy %s, not on app %s's chain, released %d records; dropped (they went on when it left, "
                  "or the instance on the chain holds them)", getattr(engine, "instance_name", engine.name),
                  self.session.name, len(batch))

    def handle_closed(self, handle: int) -> None:
        """Tell every engine that route `handle` closed (see Engine.handle_closed)."""
        for engine in list(self.engines):
            try:
                engine.handle_closed(handle)
            except (Exception, SystemExit):
                log.exception("app %s: engine %s failed on handle %d closing", self.session.name,
                              getattr(engine, "instance_name", engine.name), handle)

    def engine_failed(self, engine: Engine, direction: str, batch: list[R.Record], exc: BaseException) -> None:
        """An engine (e.g. a buggy policy module) raised on a batch: fail the batch's calls.

        Why here: the records were already popped from the ring or the socket, so letting the
        exception escape would drop them silently (the calls hang until their deadline) and
        abort the pump that wakes the app. Every call with a record in the batch ends with
        INTERNAL on both sides instead; the chain stays as it is for the next batch (the
        operator detaches or upgrades the engine)."""
        name = getattr(engine, "instance_name", engine.name)
        failures = self._failures[name] = self._failures.get(name, 0) + 1
        count = getattr(engine, "count", None)
        if callable(count):
            try:
                count("engine_errors")
            except Exception:
                pass
        if worth_logging(failures):  # a broken engine must not flood the log
            log.error("app %s: engine %s raised on an %s batch (failure %d); its %d records' calls fail with INTERNAL",
                      self.session.name, name, direction, failures, len(batch), exc_info=exc)
        self.session.fail_calls(batch, INTERNAL, f"mrpcd: policy {name} failed: {type(exc).__name__}: {exc}")

    def reply_error(self, rec: R.Record, code: int, details: str) -> None:
        """Answer a client's request record with a final status, without it leaving the host."""
        self._deliver_in([error_response(rec.handle, rec.call_id, code, details)])


def error_response(handle: int, call_id: int, code: int, details: str) -> R.Record:
    """A RESPONSE record that ends a call with `code` and `details` (no message)."""
    meta = R.encode_metadata([(":details", details)], internal=True)
    return R.parse_record(
        R.encode_record(R.RESPONSE, R.F_START | R.F_END | R.F_NO_MSG, code, handle, call_id, 0, 0, meta, b"")
    )

"""Token-fair scheduling for LLM serving: the Virtual Token Counter (VTC).

Why: a model server has a fixed capacity (concurrent generations); under overload the
clients that send the most requests would take all of it. VTC ("Fairness in Serving Large
Language Models", Sheng et al., OSDI 2024) shares the service fairly in *tokens*: each
client has a virtual counter of the service it received, input tokens + w_out * output
tokens (weights w_in, w_out), and whenever a slot frees up the queued request of the client
with the smallest counter is admitted. A client that was idle (or is new) has its counter
lifted, when it arrives, to the smallest counter of the backlogged clients (or, if nobody
is backlogged, to the counter of the last client that left the queue), so idling does not
bank credit (the paper's Algorithm 2). While two clients are backlogged the difference of
the service they received stays bounded (the paper's Theorem: by a constant depending on
the largest request), whatever their request rates.

Where it sits: on the *model server's* datapath (side "server", the default): requests
arrive INBOUND (network -> server app) and are held there; responses go OUTBOUND (server app
-> network), and every response message counts output tokens. Side "client" is the mirror
(requests outbound, responses inbound), e.g. for a gateway that forwards to the model server.

Capacity: `max_inflight` calls admitted and not finished (final RESPONSE, or CANCEL). A
queued call the client cancels leaves the queue silently (the server never saw it).

Config keys:
  side            "server" (default) | "client"  (see above)
  max_inflight    int >= 1 (default 8): calls admitted and not finished
  w_in, w_out     numbers >= 0 (default 1 and 2, as in the paper): token weights
  client_id       {"metadata": key} (default {"metadata": "x-client-id"}) or {"field": path}
                  (a string/int field of the request message); missing -> `default_client`
  default_client  str (default "anonymous")
  input_tokens    {"field": path}: an integer field (its value) or a string / bytes /
                  repeated field (its length) of the request; absent -> `default_input_tokens`
  default_input_tokens  number >= 0 (default 0)
  output_tokens   {"field": path}: as input_tokens, on each response message; absent: every
                  response message counts 1 token (one streamed token per message)
  methods         list of "/pkg.Service/Method" to schedule (default: every method of the
                  app's schema); other calls pass untouched. The fields above must exist in
                  the request (resp. response) message of every scheduled method.
  max_queue       int >= 0 (default 10000): queued calls, all clients; more are answered
                  RESOURCE_EXHAUSTED
  max_clients     int >= 1 (default 100000): idle clients beyond it are forgotten (oldest
                  first)

`service()` (and describe()["clients"]) exports, per client, the virtual counter, the
weighted service actually received, token counts, and admitted / finished / queued /
in-flight calls: what the LLM example plots to show fairness.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ..marshal import codec
from ..marshal import records as R
from ..marshal.schema import INT_RANGES
from .base import (
    INVALID_ARGUMENT, RESOURCE_EXHAUSTED, CallGate, ConfigReader, HeldCalls, HeldRecords,
    check_method_path, metadata_value,
)


class Client:
    __slots__ = ("name", "counter", "service", "input_tokens", "output_tokens", "admitted",
                 "finished", "queue", "inflight")

    def __init__(self, name: str) -> None:
        self.name = name
        self.counter = 0.0  # the virtual counter (lifted)
        self.service = 0.0  # weighted tokens actually received (never lifted)
        self.input_tokens = 0
        self.output_tokens = 0
        self.admitted = 0
        self.finished = 0
        self.queue = HeldCalls()
        self.inflight = 0

    def to_state(self) -> dict[str, Any]:
        return {"name": self.name, "counter": self.counter, "service": self.service,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "admitted": self.admitted, "finished": self.finished, "inflight": self.inflight,
                "queue": self.queue.to_state()}


def _token_count(value: Any) -> int:
    if value is None or isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float):
        return max(0, int(value))
    if isinstance(value, (str, bytes, list, dict)):
        return len(value)
    return 0


def _check_path(r: ConfigReader, key: str, schema: Any, message: str, path: Any, want: str) -> None:
    """`path` must name a field of `message` usable as `want` ("id" or "tokens")."""
    if not isinstance(path, str) or not path:
        raise r.error(key, f"must be a dotted field path, got {path!r}")
    cur = message
    parts = path.split(".")
    f: Any  # set by the loop (a path has at least one part) or it raises
    for i, part in enumerate(parts):
        f = next((x for x in schema.messages[cur].fields if x.name == part), None)
        if f is None:
            raise r.error(key, f"message {cur} has no field {part!r}")
        if i < len(parts) - 1:
            if f.type.kind != "message" or f.label in ("repeated", "map"):
                raise r.error(key, f"{cur}.{part} is not a single message field")
            cur = f.type.ref
    if want == "id":
        if f.label != "single" and f.label != "optional" or f.type.kind not in set(INT_RANGES) | {"string", "bytes", "enum"}:
            raise r.error(key, f"{cur}.{f.name} cannot identify a client (use a string or integer field)")
    else:
        countable = f.label in ("repeated", "map") or f.type.kind in set(INT_RANGES) | {"string", "bytes", "double", "float"}
        if not countable:
            raise r.error(key, f"{cur}.{f.name} cannot count tokens (use an integer field, a string, or a repeated field)")


class Vtc(CallGate):
    name = "vtc"
    version = "1.0"
    state_version = 1

    def __init__(self, ctx: Any, config: dict[str, Any] | None = None) -> None:
        self.clients: OrderedDict[str, Client] = OrderedDict()
        self.inflight: dict[tuple[int, int], tuple[str, int]] = {}  # call -> (client, method_id)
        self.queued_calls: dict[tuple[int, int], str] = {}
        self.last_left = 0.0
        self.seq = 0
        super().__init__(ctx, config)

    # -- config ---------------------------------------------------------------------------
    def validate_config(self, config: dict[str, Any]) -> dict[str, Any]:
        r = ConfigReader(self.name, config)
        schema = self.ctx.schema
        out: dict[str, Any] = {
            "side": r.string("side", "server", choices=("server", "client")),
            "max_inflight": r.integer("max_inflight", 8, ge=1),
            "w_in": r.number("w_in", 1.0, ge=0),
            "w_out": r.number("w_out", 2.0, ge=0),
            "default_client": r.string("default_client", "anonymous"),
            "default_input_tokens": r.number("default_input_tokens", 0, ge=0),
            "max_queue": r.integer("max_queue", 10000, ge=0),
            "max_clients": r.integer("max_clients", 100000, ge=1),
        }
        paths = r.sequence("methods")
        if paths is None:
            methods = [m for s in schema.services.values() for m in s.methods]
        else:
            methods = [check_method_path(r, f"methods[{i}]", schema, p) for i, p in enumerate(paths)]
        out["methods"] = {m.method_id: m for m in methods}

        cid = r.mapping("client_id", {"metadata": "x-client-id"})
        cr = r.sub("client_id", cid)
        meta_key, id_field = cr.string("metadata"), cr.raw("field")
        cr.finish()
        if (meta_key is None) == (id_field is None):
            raise r.error("client_id", "give exactly one of 'metadata' (a metadata key) or 'field' (a request field)")
        if meta_key is not None and (not meta_key or meta_key != meta_key.lower()):
            raise r.error("client_id.metadata", f"metadata keys are lowercase, got {meta_key!r}")
        out["client_meta"], out["client_field"] = meta_key, id_field

        out["input_field"] = out["output_field"] = None
        for key in ("input_tokens", "output_tokens"):
            spec = r.mapping(key)
            if spec is not None:
                sr = r.sub(key, spec)
                out[key.split("_")[0] + "_field"] = sr.raw("field", required=True)
                sr.finish()
        for m in methods:
            if id_field is not None:
                _check_path(r, "client_id.field", schema, m.input, id_field, "id")
            if out["input_field"] is not None:
                _check_path(r, "input_tokens.field", schema, m.input, out["input_field"], "tokens")
            if out["output_field"] is not None:
                _check_path(r, "output_tokens.field", schema, m.output, out["output_field"], "tokens")
        r.finish()
        return out

    def apply_config(self, config: dict[str, Any]) -> None:
        self._req_dir = "inbound" if config["side"] == "server" else "outbound"
        if self.inflight is not None:
            self._admit_and_resume()  # a larger max_inflight admits waiting calls now

    # -- datapath ---------------------------------------------------------------------------
    def request_direction(self) -> str:
        return self._req_dir

    def request_direction_of(self, config: dict[str, Any]) -> str:
        return "inbound" if config["side"] == "server" else "outbound"

    def other_direction(self, batch: list[R.Record]) -> list[R.Record]:
        return self._responses(batch)

    def on_start(self, rec: R.Record, out: list[R.Record]) -> None:
        method = self.config["methods"].get(rec.method_id)
        if method is None:
            out.append(rec)
        else:
            self._arrive(rec, method, out)

    def on_later(self, rec: R.Record, key: tuple[int, int], out: list[R.Record]) -> None:
        name = self.queued_calls.get(key)
        if name is not None:
            client = self.clients[name]
            if rec.kind == R.CANCEL:  # cancelled while queued: it never reached the server
                client.queue.remove(key)
                del self.queued_calls[key]
                self.count("cancelled_queued")
                if not client.queue:
                    self.last_left = max(self.last_left, client.counter)
            else:
                client.queue.absorb(rec)
            return
        out.append(rec)
        if rec.kind == R.CANCEL and key in self.inflight:
            self._finish(key)
            out.extend(self._admit())

    def _arrive(self, rec: R.Record, method: Any, out: list[R.Record]) -> None:
        cfg = self.config
        key = (rec.handle, rec.call_id)
        if key in self.queued_calls or key in self.inflight:
            # a peer reusing the id of a call still here: the books (queues, slots) are per id
            self.count("duplicate_call_id")
            self.ctx.reply_error(rec, INVALID_ARGUMENT, f"vtc: call id {rec.call_id} is already in use on this connection")
            return
        try:
            name, tokens = self._identify(rec, method)
        except (codec.DecodeError, ValueError) as exc:
            self.count("malformed")
            self.ctx.reply_error(rec, INVALID_ARGUMENT, f"vtc: cannot read the request: {exc}")
            if not rec.flags & R.F_END:
                self.refused.add((rec.handle, rec.call_id))
            return
        if len(self.queued_calls) >= cfg["max_queue"] and (self.queued_calls or len(self.inflight) >= cfg["max_inflight"]):
            self.count("rejected_queue_full")
            self.ctx.reply_error(rec, RESOURCE_EXHAUSTED, f"vtc: queue full ({cfg['max_queue']} calls waiting)")
            if not rec.flags & R.F_END:
                self.refused.add((rec.handle, rec.call_id))
            return
        client = self._client(name)
        if not client.queue:  # (re)joining the backlog: lift the counter
            backlogged = [c.counter for c in self.clients.values() if c.queue and c is not client]
            floor = min(backlogged) if backlogged else self.last_left
            if client.counter < floor:
                client.counter = floor
                self.count("lifted")
        self.seq += 1
        client.queue.hold(rec, {"tokens": tokens, "seq": self.seq})
        self.queued_calls[(rec.handle, rec.call_id)] = client.name
        self.count("queued")
        out.extend(self._admit())

    def _identify(self, rec: R.Record, method: Any) -> tuple[str, int]:
        cfg = self.config
        no_msg = bool(rec.flags & R.F_NO_MSG)
        name: Any = None
        if cfg["client_meta"] is not None:
            name = metadata_value(rec, cfg["client_meta"])
            if isinstance(name, bytes):
                name = name.hex()
        elif not no_msg:
            name = codec.read_field(self.ctx.schema, method.input, rec.payload, cfg["client_field"])
            if isinstance(name, bytes):
                name = name.hex()
        name = str(name) if name not in (None, "") else cfg["default_client"]
        tokens = cfg["default_input_tokens"]
        if cfg["input_field"] is not None and not no_msg:
            tokens = _token_count(codec.read_field(self.ctx.schema, method.input, rec.payload, cfg["input_field"]))
        return name, tokens

    def _client(self, name: str) -> Client:
        client = self.clients.get(name)
        if client is None:
            client = self.clients[name] = Client(name)
            if len(self.clients) > self.config["max_clients"]:
                for old in list(self.clients.values()):
                    if len(self.clients) <= self.config["max_clients"]:
                        break
                    if not old.queue and not old.inflight and old is not client:
                        del self.clients[old.name]
                        self.count("clients_forgotten")
        else:
            self.clients.move_to_end(name)
        return client

    def _admit(self) -> list[R.Record]:
        """Admit queued calls while there is capacity, smallest counter first."""
        out: list[R.Record] = []
        cfg = self.config
        while len(self.inflight) < cfg["max_inflight"] and self.queued_calls:
            best = None
            for c in self.clients.values():
                if c.queue:
                    head = c.queue.peek()
                    assert head is not None  # the queue is not empty
                    k = (c.counter, head.data["seq"])
                    if best is None or k < best[0]:
                        best = (k, c)
            assert best is not None  # every queued call is in its client's queue
            client = best[1]
            call = client.queue.popleft()
            del self.queued_calls[call.key]
            tokens = call.data["tokens"]
            charge = cfg["w_in"] * tokens
            client.counter += charge
            client.service += charge
            client.input_tokens += int(tokens)
            client.admitted += 1
            client.inflight += 1
            if not client.queue:
                self.last_left = max(self.last_left, client.counter)
            ends = any(r.kind == R.CANCEL for r in call.records)
            self.inflight[call.key] = (client.name, call.records[0].method_id)
            if ends:  # should not happen (a CANCEL removes the call), but never leak a slot
                self._finish(call.key)
            self.count("admitted")
            out.extend(call.records)
        return out

    def _admit_and_resume(self) -> None:
        recs = self._admit()
        if recs:
            self.resume(self._req_dir, recs)

    def _finish(self, key: tuple[int, int]) -> None:
        entry = self.inflight.pop(key, None)
        if entry is None:
            return
        client = self.clients.get(entry[0])
        if client is not None:
            client.inflight -= 1
            client.finished += 1

    def _responses(self, batch: list[R.Record]) -> list[R.Record]:
        freed = False
        cfg = self.config
        for rec in batch:
            if rec.kind == R.RESPONSE:
                key = (rec.handle, rec.call_id)
                entry = self.inflight.get(key)
                if entry is None:
                    continue
                name, method_id = entry
                if not rec.flags & R.F_NO_MSG:
                    if cfg["output_field"] is None:
                        tokens = 1
                    else:
                        method = cfg["methods"].get(method_id)
                        tokens = 1
                        if method is not None:
                            try:
                                tokens = _token_count(codec.read_field(self.ctx.schema, method.output, rec.payload, cfg["output_field"]))
                            except (codec.DecodeError, ValueError):
                                self.count("malformed_response")
                    client = self.clients.get(name)
                    if client is not None:
                        charge = cfg["w_out"] * tokens
                        client.counter += charge
                        client.service += charge
                        client.output_tokens += tokens
                if rec.flags & R.F_END:
                    self._finish(key)
                    freed = True
            elif rec.kind == R.CANCEL and (rec.handle, rec.call_id) in self.inflight:
                self._finish((rec.handle, rec.call_id))  # the server app cancelled (e.g. it is shutting down)
                freed = True
        if freed:
            self._admit_and_resume()
        return batch

    def handle_closed(self, handle: int) -> None:
        """The route `handle` closed: its calls end without a final RESPONSE or CANCEL
        crossing the policy, so free their slots (else they leak until every call queues
        forever) and drop their queued calls (nobody is left to answer or be answered)."""
        super().handle_closed(handle)
        for key in [k for k in self.inflight if k[0] == handle]:
            self._finish(key)
        for key in [k for k in self.queued_calls if k[0] == handle]:
            client = self.clients[self.queued_calls.pop(key)]
            client.queue.remove(key)
            self.count("dropped_handle_closed")
            if not client.queue:
                self.last_left = max(self.last_left, client.counter)
        self._admit_and_resume()

    # -- output / lifecycle ---------------------------------------------------------------
    def service(self) -> dict[str, dict[str, Any]]:
        return {c.name: {"counter": c.counter, "service": c.service, "input_tokens": c.input_tokens,
                         "output_tokens": c.output_tokens, "admitted": c.admitted, "finished": c.finished,
                         "queued": len(c.queue), "inflight": c.inflight}
                for c in self.clients.values()}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["inflight"] = len(self.inflight)
        d["queued"] = len(self.queued_calls)
        d["clients"] = self.service()
        return d

    def held(self) -> HeldRecords:
        recs = self._held_in_order()
        return HeldRecords(recs, []) if self._req_dir == "outbound" else HeldRecords([], recs)

    def _held_in_order(self) -> list[R.Record]:
        calls = [call for c in self.clients.values() for call in c.queue]
        calls.sort(key=lambda call: call.data["seq"])
        return [r for call in calls for r in call.records]

    def drop_held(self) -> None:
        for c in self.clients.values():
            c.queue.clear()
        self.queued_calls.clear()

    def save_state(self) -> dict[str, Any]:
        return {
            "clients": [c.to_state() for c in self.clients.values()],
            "inflight": [[k[0], k[1], name, mid] for k, (name, mid) in self.inflight.items()],
            "last_left": self.last_left,
            "seq": self.seq,
            "rejected": self.refused.to_state(),
        }

    def load_state(self, state: dict[str, Any], state_version: int) -> None:
        for cs in state.get("clients") or []:
            c = Client(str(cs["name"]))
            c.counter, c.service = float(cs["counter"]), float(cs["service"])
            c.input_tokens, c.output_tokens = int(cs["input_tokens"]), int(cs["output_tokens"])
            c.admitted, c.finished, c.inflight = int(cs["admitted"]), int(cs["finished"]), int(cs["inflight"])
            c.queue = HeldCalls.from_state(cs.get("queue"))
            for call in c.queue:
                self.queued_calls[call.key] = c.name
            self.clients[c.name] = c
        for h, cid, name, mid in state.get("inflight") or []:
            self.inflight[(int(h), int(cid))] = (str(name), int(mid))
        self.last_left = float(state.get("last_left", 0.0))
        self.seq = int(state.get("seq", 0))
        self.refused.load(state.get("rejected"))

    def on_installed(self) -> None:
        self._admit_and_resume()  # a bigger max_inflight than the old version's admits at once


POLICY = Vtc

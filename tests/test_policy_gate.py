"""CallGate: the batch walk fault, ratelimit, acl, admission and vtc share (policies/base.py).

The contract under test: only REQUEST and CANCEL records of the requests' direction reach
the hooks, everything else passes in order; a START goes to on_start; the later records of
a refused call are dropped until its request stream ends (END or CANCEL) and then the call
is forgotten; the other direction goes to other_direction untouched by the gate."""
from __future__ import annotations

from typing import Any

import pytest

from mrpcd.marshal import records as R
from mrpcd.policies.acl import Acl
from mrpcd.policies.base import CallGate, ConfigReader, check_direction
from mrpcd.policies.fault import Fault
from mrpcd.policies.ratelimit import RateLimit
from mrpcd.policies.testing import FakeContext

from test_policies_support import SCHEMA, UPLOAD, cancel, half_close, ids, msg, response, start, unary


class OddRefused(CallGate):
    """Refuses calls with an odd id; records what reached each hook."""

    name = "odd_refused"

    def __init__(self, ctx: Any, config: dict[str, Any] | None = None) -> None:
        self.later: list[tuple[int, int]] = []
        self.batches = 0
        super().__init__(ctx, config)

    def validate_config(self, config: dict[str, Any]) -> dict[str, Any]:
        r = ConfigReader(self.name, config)
        out = {"direction": check_direction(r)}
        r.finish()
        return out

    def on_batch(self) -> None:
        self.batches += 1

    def on_start(self, rec: R.Record, out: list[R.Record]) -> None:
        if rec.call_id % 2:
            self.ctx.reply_error(rec, 7, "odd")
            if not rec.flags & R.F_END:
                self.refused.add((rec.handle, rec.call_id))
        else:
            out.append(rec)

    def on_later(self, rec: R.Record, key: tuple[int, int], out: list[R.Record]) -> None:
        self.later.append((rec.kind, rec.call_id))
        out.append(rec)


def test_gate_walks_a_batch_in_order_and_drops_a_refused_calls_later_records():
    ctx = FakeContext(SCHEMA)
    gate = OddRefused(ctx)
    out = gate.outbound([start(1), response(9), start(2), msg(1), msg(2), half_close(1), unary(4), msg(2, end=True)])
    assert [(r.kind, r.call_id) for r in out] == [
        (R.RESPONSE, 9), (R.REQUEST, 2), (R.REQUEST, 2), (R.REQUEST, 4), (R.REQUEST, 2)]
    assert ctx.error_codes() == [7]
    assert gate.later == [(R.REQUEST, 2), (R.REQUEST, 2)]  # call 1's records never reached on_later
    assert len(gate.refused) == 0  # call 1's half-close ended its stream: forgotten
    assert gate.batches == 1


def test_gate_a_cancel_ends_a_refused_call_and_passes_for_others():
    ctx = FakeContext(SCHEMA)
    gate = OddRefused(ctx)
    assert gate.outbound([start(3), msg(3)]) == []
    assert len(gate.refused) == 1
    out = gate.outbound([cancel(3), start(6), cancel(6)])
    assert [(r.kind, r.call_id) for r in out] == [(R.REQUEST, 6), (R.CANCEL, 6)]
    assert len(gate.refused) == 0 and gate.later == [(R.CANCEL, 6)]


def test_gate_other_direction_is_left_alone_and_direction_is_configurable():
    ctx = FakeContext(SCHEMA)
    gate = OddRefused(ctx)
    batch = [start(1), msg(1)]
    assert gate.inbound(batch) is batch and gate.batches == 0
    gate.reconfigure({"direction": "inbound"})
    assert gate.outbound(batch) is batch
    assert gate.inbound(batch) == [] and gate.batches == 1


@pytest.mark.parametrize("make", [
    lambda ctx: Fault(ctx, {"abort": {"probability": 1.0}, "seed": 1}),
    lambda ctx: RateLimit(ctx, {"rate": 1, "burst": 1, "mode": "drop"}),
    lambda ctx: Acl(ctx, {"rules": [{"method": UPLOAD, "field": "customer_name", "op": "eq", "value": "alice"}]}),
], ids=["fault", "ratelimit", "acl"])
def test_each_gate_policy_drops_a_refused_stream_until_it_ends(make):
    ctx = FakeContext(SCHEMA)
    policy = make(ctx)
    if isinstance(policy, RateLimit):
        assert ids(policy.outbound([unary(100)])) == [100]  # the one token
    out = policy.outbound([start(1), msg(1), msg(1), half_close(1)])
    assert out == [] and len(ctx.errors) == 1
    assert len(policy.refused) == 0  # forgotten at the end of its stream
    out = policy.outbound([start(3), msg(3)])
    assert out == [] and len(policy.refused) == 1
    assert policy.outbound([cancel(3)]) == [] and len(policy.refused) == 0

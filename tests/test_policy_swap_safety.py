"""Hot swaps that must not lose, duplicate or misroute a record (found by review).

Through the real PolicyHost and Datapath, with a stand-in session that records what goes
to the network (`sent`) and to the app (`delivered`): an upgrade that is refused, or whose
new module fails half-way, must leave no second instance releasing the calls the old one
still holds; records released by an engine not on the chain are dropped, not sent past
engines they never passed; policies that take one instance per app, chain positions and
calls delayed by fault whose connection closes.
"""
from __future__ import annotations

import asyncio
import pytest

from mrpcd.daemon.datapath import Datapath, Engine
from mrpcd.daemon.policy_host import PolicyHost, PolicyOpError
from test_policies_support import GEN, SCHEMA, response, unary


class Tap(Engine):
    """A pass-through engine that notes the call ids passing it."""

    def __init__(self, name: str = "tap") -> None:
        self.instance_name = self.name = name
        self.out: list[int] = []
        self.inn: list[int] = []

    def outbound(self, batch):
        self.out += [r.call_id for r in batch]
        return batch

    def inbound(self, batch):
        self.inn += [r.call_id for r in batch]
        return batch


def in_loop(test):
    """Run a test body inside an event loop (PolicyHost and the policies use the running one)."""

    def run(*args, **kwargs):
        async def main():
            return test(*args, **kwargs)

        return asyncio.run(main())

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


class FakeSession:
    def __init__(self) -> None:
        self.app_id, self.name, self.closed, self.routes = 1, "app", False, {}
        self.schema = SCHEMA
        self.sent: list[int] = []
        self.delivered: list[int] = []
        self.failed: list[int] = []
        self.datapath = Datapath(self, lambda b: self.sent.extend(r.call_id for r in b),
                                 lambda b: self.delivered.extend(r.call_id for r in b))

    def methods_by_id(self):
        return SCHEMA.methods_by_id()

    def stop_in_place(self) -> None:
        pass

    def fail_calls(self, batch, code, details) -> None:
        self.failed.extend(r.call_id for r in batch)


BAD_LOAD = '''
from mrpcd.policies.ratelimit import RateLimit

class RateLimitV2(RateLimit):
    version = "2.0-broken"

    def load_state(self, state, state_version):
        super().load_state(state, state_version)  # takes over the queue, arms its refill timer
        raise RuntimeError("a bug in the new version")

POLICY = RateLimitV2
'''


def test_an_upgrade_whose_load_state_fails_leaves_no_second_instance_running(tmp_path):
    module = tmp_path / "ratelimit_v2_broken.py"
    module.write_text(BAD_LOAD)

    async def main() -> None:
        s = FakeSession()
        host = PolicyHost(s, {})
        host.attach("ratelimit", {"rate": 20, "burst": 1})
        tap = Tap()
        s.datapath.engines.append(tap)  # after the rate limit, towards the network
        s.datapath.outbound([unary(i) for i in (1, 2, 3)])
        with pytest.raises(PolicyOpError, match="keeps running.*a bug in the new version"):
            host.upgrade("ratelimit", str(module))
        await asyncio.sleep(0.4)  # the rate limit refills: 2 and 3 go (once, through tap)
        assert s.sent == [1, 2, 3] and tap.out == [1, 2, 3]

    asyncio.run(main())


def _vtc_with_queued_calls() -> tuple[FakeSession, PolicyHost, Tap]:
    """vtc admitting one call at a time, calls 2 and 3 queued; `tap` nearest the app."""
    s = FakeSession()
    host = PolicyHost(s, {})
    tap = Tap()
    s.datapath.engines.append(tap)  # nearest the app: inbound records pass it last
    host.attach("vtc", {"max_inflight": 1}, position=1)
    s.datapath.inbound([unary(i, GEN, payload=b"\x93\xa1a\xa1b\x01") for i in (1, 2, 3)])
    assert s.delivered == [1]
    return s, host, tap


@in_loop
def test_a_vtc_upgrade_built_but_not_swapped_in_releases_nothing():
    """An upgrade over several apps builds every new instance first and drops them all if
    one app refuses: the new vtc, which may admit more calls at once, must not release any
    before it is on the chain (the old instance still holds them: they went twice)."""
    s, host, tap = _vtc_with_queued_calls()
    old, new = host.prepare_upgrade("vtc", "vtc", {"max_inflight": 4})
    assert s.delivered == [1]
    new.close(handed_over=True)  # rolled back
    for call_id in (1, 2, 3):
        s.datapath.outbound([response(call_id)])
    assert s.delivered == [1, 2, 3] and tap.inn == [1, 2, 3]


@in_loop
def test_an_accepted_vtc_upgrade_admits_at_once_from_the_chain():
    s, host, tap = _vtc_with_queued_calls()
    host.upgrade("vtc", "vtc", {"max_inflight": 4})
    assert s.delivered == [1, 2, 3] and tap.inn == [1, 2, 3]  # through the engines before it
    for call_id in (1, 2, 3):
        s.datapath.outbound([response(call_id)])
    assert s.delivered == [1, 2, 3]


def test_records_released_by_an_engine_off_the_chain_are_dropped(caplog):
    s = FakeSession()
    tap, ghost = Tap("tap"), Tap("ghost")
    s.datapath.engines.append(tap)
    s.datapath.outbound_after(ghost, [unary(1)])
    s.datapath.inbound_after(ghost, [unary(2)])
    assert s.sent == [] and s.delivered == [] and tap.out == tap.inn == []
    assert caplog.text.count("not on app app's chain") == 2


def test_a_second_qos_on_one_app_is_refused():
    """qos makes the app one member of a shared scheduler with one queue: a second instance
    took over the first one's queue and released its records past engines between them."""

    async def main() -> None:
        s = FakeSession()
        host = PolicyHost(s, {})
        host.attach("qos", {"per_tick": 1, "tick_s": 0.05}, name="q1")
        with pytest.raises(PolicyOpError, match="takes one per app"):
            host.attach("qos", {}, name="q2")
        assert [d["instance"] for d in host.describe()] == ["q1"]
        host.detach("q1")

    asyncio.run(main())


@pytest.mark.parametrize("position", [-1, 3, True, 1.0])
def test_a_position_outside_the_chain_is_refused(position):
    in_loop(_positions)(position)


def _positions(position):
    s = FakeSession()
    host = PolicyHost(s, {})
    host.attach("metrics", {}, name="m0")
    host.attach("metrics", {}, name="m1")
    with pytest.raises(PolicyOpError, match="out of range"):
        host.attach("metrics", {}, name="bad", position=position)
    host.attach("metrics", {}, name="front", position=0)
    host.attach("metrics", {}, name="end", position=3)
    assert [d["instance"] for d in host.describe()] == ["front", "m0", "m1", "end"]


def test_fault_drops_delayed_calls_whose_connection_closed():
    async def main() -> None:
        s = FakeSession()
        host = PolicyHost(s, {})
        host.attach("fault", {"direction": "outbound", "delay": {"probability": 1.0, "ms": 100}})
        s.datapath.outbound([unary(1, handle=1), unary(2, handle=2)])
        s.datapath.handle_closed(1)
        await asyncio.sleep(0.3)
        assert s.sent == [2]
        [d] = host.describe()
        assert d["counters"].get("dropped_handle_closed") == 1

    asyncio.run(main())

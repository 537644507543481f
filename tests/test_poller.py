"""The daemon's adaptive wake-ups (mrpcd/daemon/poller.py), sans-I/O: a fake clock, a fake
loop that runs callbacks when told, and sessions that only record what was done to them.
The end-to-end side (apps served while the daemon polls, and a daemon that goes quiet
after traffic) is in test_e2e.py."""
from __future__ import annotations

import pytest

from mrpcd.daemon.poller import Poller

US = 1e-6


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, us: float) -> None:
        self.now += us * US


class Loop:
    def __init__(self) -> None:
        self.ready: list = []

    def call_soon(self, cb) -> None:
        self.ready.append(cb)

    def run_one(self) -> bool:
        if not self.ready:
            return False
        self.ready.pop(0)()
        return True


class Tx:
    def __init__(self) -> None:
        self.data = False
        self.flag_lowered = 0

    def has_data(self) -> bool:
        return self.data

    def finish_sleep(self) -> None:
        self.flag_lowered += 1


class Session:
    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self.tx = Tx()
        self.closed = False
        self.pumps = 0
        self.sleeps = 0

    def _pump(self) -> None:  # as AppSession._pump: drain, then hold or sleep
        self.pumps += 1
        self.tx.data = False
        if not self.poller.hold(self):
            self._sleep()

    def _sleep(self) -> None:
        self.sleeps += 1


@pytest.fixture
def rig():
    clock, loop = Clock(), Loop()
    return clock, loop, Poller(loop, 300, clock)


def test_off_never_holds():
    clock, loop = Clock(), Loop()
    p = Poller(loop, 0, clock)
    s = Session(p)
    p.touch()
    assert p.hold(s) is False and not loop.ready


def test_hold_lowers_the_flag_and_ticks_until_data_then_pumps(rig):
    clock, loop, p = rig
    s = Session(p)
    p.touch()
    assert p.hold(s) is True
    assert s.tx.flag_lowered == 1 and p.held() == 1
    assert p.hold(s) is True and s.tx.flag_lowered == 1  # held once
    for _ in range(3):  # nothing yet: the tick keeps coming back
        clock.advance(10)
        assert loop.run_one()
    assert s.pumps == 0 and s.sleeps == 0
    s.tx.data = True
    clock.advance(10)
    loop.run_one()
    assert s.pumps == 1  # found without any eventfd signal
    assert p.held() == 1  # the pump held it again: the window is still open


def test_window_end_puts_held_sessions_to_sleep_and_stops_ticking(rig):
    clock, loop, p = rig
    a, b = Session(p), Session(p)
    p.touch()
    p.hold(a)
    p.hold(b)
    clock.advance(p.window / US + 1)
    loop.run_one()
    assert (a.sleeps, b.sleeps) == (1, 1) and p.held() == 0
    assert not loop.ready  # no tick left: an idle daemon sleeps
    assert p.hold(a) is False  # and a late pump sleeps at once


def test_closed_sessions_are_dropped(rig):
    clock, loop, p = rig
    s = Session(p)
    p.touch()
    p.hold(s)
    s.closed = True
    loop.run_one()
    assert p.held() == 0 and s.sleeps == 0 and s.pumps == 0
    t = Session(p)
    p.hold(t)
    p.release(t)
    assert p.held() == 0


def test_a_corrupt_ring_goes_to_the_pump(rig):
    clock, loop, p = rig
    s = Session(p)

    def corrupt() -> bool:
        raise RuntimeError("ring corrupted")

    s.tx.has_data = corrupt
    p.touch()
    p.hold(s)
    loop.run_one()
    assert s.pumps == 1  # the pump reports it and drops the app


def test_window_shrinks_with_sparse_traffic_and_grows_back_with_steady_traffic(rig):
    clock, loop, p = rig
    top = p.max_window
    for _ in range(5):  # a call every 5 ms: polling 300 us after each would be wasted
        clock.advance(5000)
        p.touch()
    assert p.window == 0
    clock.advance(5000)
    p.touch()
    assert p.hold(Session(p)) is False  # no polling now
    for _ in range(5):  # back to request/response every 100 us
        clock.advance(100)
        p.touch()
    assert p.window == top
    assert p.until == pytest.approx(clock.now + top)


def test_configure_changes_and_stops_polling(rig):
    clock, loop, p = rig
    p.configure(50)
    assert p.max_window == pytest.approx(50 * US)
    p.touch()
    assert p.hold(Session(p)) is True
    p.configure(0)
    clock.advance(1)
    loop.run_one()  # the running tick sees the closed window
    assert p.held() == 0 and not loop.ready
    p.touch()
    assert p.hold(Session(p)) is False

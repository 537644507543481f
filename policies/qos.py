"""QoS: priority and weighted sharing of a call budget across apps (a global policy).

Why: several apps on a host share a backend, a link or a quota; when together they want
more than it can take, the operator decides who goes first (latency-critical apps over
batch jobs) and in what proportion apps of the same priority share what is left.

One `QosScheduler` is shared by every app that attaches a `QosPolicy` naming it (it lives
in `ctx.globals`, the daemon-wide dict). The scheduler admits at most `per_tick` new calls
(REQUEST START records, outbound) per tick of `tick_s` seconds, across all its apps.
While there is budget, records pass at once (no added latency). When the budget of the
current tick is spent, an app's records wait in its own FIFO (an app's records never
overtake each other); at every tick boundary the scheduler releases waiting calls: highest
`priority` first, and among apps of equal priority round-robin, `weight` calls per app per
round. Records that are not new calls (stream messages, CANCEL, responses) cost nothing but
keep their place behind the app's waiting calls.

Config keys (QosPolicy, per app):
  scheduler  name of the shared scheduler (default "default")
  priority   int (default 0): higher is served first
  weight     int >= 1 (default 1): share among apps of the same priority
  per_tick   int >= 1 (default 100): new calls admitted per tick, all apps together  } global:
  tick_s     number > 0 (default 0.01): tick length, seconds                          } the last
             attach/reconfigure that sets them wins

Live upgrade of a QosPolicy hands its queue over; the scheduler object (shared) stays the
same, so new code for the scheduler itself takes effect only once every app detached it.
"""
from __future__ import annotations

from collections import deque
from typing import Any

from ..marshal import records as R
from .base import ConfigReader, HeldRecords, Policy, decode_records

GLOBALS_KEY = "qos.schedulers"


def _costs(rec: R.Record) -> bool:
    return rec.kind == R.REQUEST and bool(rec.flags & R.F_START)


class QosScheduler:
    """The shared part: the budget and the per-app queues (sans-I/O, clock from members)."""

    def __init__(self, name: str, per_tick: int = 100, tick_s: float = 0.01) -> None:
        self.name = name
        self.per_tick = per_tick
        self.tick_s = tick_s
        self.members: dict[int, "QosPolicy"] = {}
        self.queues: dict[int, deque[R.Record]] = {}
        self.window_end = float("-inf")  # the current tick ends then
        self.used = 0
        self.released: dict[int, int] = {}  # app_id -> calls admitted (for describe / tests)
        self._timer: Any = None
        self._timer_owner: "QosPolicy | None" = None

    # -- membership -----------------------------------------------------------------------
    def register(self, policy: "QosPolicy") -> "QosPolicy | None":
        """Make `policy` its app's member; return the member it replaces (an upgrade: the
        app's queue stays here, shared, and the new version serves it)."""
        app = policy.ctx.app_id
        prev = self.members.get(app)
        self.members[app] = policy
        self.queues.setdefault(app, deque())
        return prev if prev is not policy else None

    def unregister(self, policy: "QosPolicy") -> list[R.Record]:
        """Remove `policy` (if it is still the app's member); return the app's waiting records.

        If `policy` replaced a member that is still open (a failed upgrade), that member
        is the app's member again and keeps the queue."""
        app = policy.ctx.app_id
        if self.members.get(app) is not policy:
            return []
        prev = policy.replaced
        if prev is not None and not prev.closed:
            self.members[app] = prev
            if self._timer_owner is policy:
                self._timer, self._timer_owner = None, None
                self._schedule()
            return []
        del self.members[app]
        waiting = list(self.queues.pop(app, ()))
        if self._timer_owner is policy:
            self._timer, self._timer_owner = None, None
            self._schedule()
        return waiting

    def backlog(self, app_id: int | None = None) -> int:
        if app_id is not None:
            return len(self.queues.get(app_id, ()))
        return sum(len(q) for q in self.queues.values())

    # -- budget ---------------------------------------------------------------------------
    def _roll(self, now: float) -> None:
        if now >= self.window_end:
            self.window_end, self.used = now + self.tick_s, 0

    def _take(self) -> bool:
        if self.used < self.per_tick:
            self.used += 1
            return True
        return False

    # -- the datapath side ------------------------------------------------------------------
    def submit(self, policy: "QosPolicy", batch: list[R.Record]) -> list[R.Record]:
        """Records of `policy`'s app that may go now; the others wait in its queue."""
        app = policy.ctx.app_id
        self._roll(policy.ctx.now())
        if self.backlog():
            self._drain()
        q = self.queues.setdefault(app, deque())
        out: list[R.Record] = []
        for i, rec in enumerate(batch):
            if q or (_costs(rec) and not self._take()):
                q.extend(r.own() for r in batch[i:])  # held: stop pinning the batch buffer
                break
            if _costs(rec):
                self.released[app] = self.released.get(app, 0) + 1
            out.append(rec)
        if q:
            self._schedule()
        return out

    def tick(self) -> None:
        self._timer, self._timer_owner = None, None
        owner = next(iter(self.members.values()), None)
        if owner is None:
            return
        self._roll(owner.ctx.now())
        self._drain()
        if self.backlog():
            self._schedule()

    def _drain(self) -> None:
        """Release waiting records within the budget: priority order, weighted round robin."""
        released: dict[int, list[R.Record]] = {}
        levels: dict[int, list[int]] = {}
        for app, q in self.queues.items():
            if q and app in self.members:
                levels.setdefault(self.members[app].priority, []).append(app)
        for prio in sorted(levels, reverse=True):
            apps = levels[prio]
            while apps:
                for app in list(apps):
                    q = self.queues[app]
                    out = released.setdefault(app, [])
                    quota = self.members[app].weight
                    while q and quota > 0:
                        if _costs(q[0]):
                            if not self._take():
                                break
                            quota -= 1
                            self.released[app] = self.released.get(app, 0) + 1
                        out.append(q.popleft())
                    while q and not _costs(q[0]):  # free records up to the next call
                        out.append(q.popleft())
                    if not q:
                        apps.remove(app)
                if self.used >= self.per_tick:
                    break
            if self.used >= self.per_tick:
                break
        for app, recs in released.items():
            if recs:
                self.members[app].resume("outbound", recs)

    def _schedule(self) -> None:
        if self._timer is not None or not self.members or not self.backlog():
            return
        owner = self._timer_owner or next(iter(self.members.values()))
        now = owner.ctx.now()
        self._timer_owner = owner
        self._timer = owner.call_later(max(0.0, self.window_end - now), self.tick)
        if self._timer is None:  # owner closed
            self._timer_owner = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "per_tick": self.per_tick, "tick_s": self.tick_s,
            "apps": {app: {"priority": p.priority, "weight": p.weight, "waiting": self.backlog(app),
                           "admitted": self.released.get(app, 0)} for app, p in self.members.items()},
        }


class QosPolicy(Policy):
    name = "qos"
    one_per_app = True  # the scheduler has one member and one queue per app
    version = "1.0"
    state_version = 1

    def __init__(self, ctx: Any, config: dict[str, Any] | None = None) -> None:
        self.scheduler: QosScheduler | None = None
        self.replaced: QosPolicy | None = None
        self.priority = 0
        self.weight = 1
        super().__init__(ctx, config)

    def validate_config(self, config: dict[str, Any]) -> dict[str, Any]:
        r = ConfigReader(self.name, config)
        out = {
            "scheduler": r.string("scheduler", "default"),
            "priority": r.integer("priority", 0),
            "weight": r.integer("weight", 1, ge=1),
            "per_tick": r.integer("per_tick", None, ge=1),
            "tick_s": r.number("tick_s", None, gt=0),
        }
        r.finish()
        return out

    def apply_config(self, config: dict[str, Any]) -> None:
        self.priority, self.weight = config["priority"], config["weight"]
        schedulers = self.ctx.globals.setdefault(GLOBALS_KEY, {})
        sched = schedulers.get(config["scheduler"])
        if sched is None:
            sched = schedulers[config["scheduler"]] = QosScheduler(config["scheduler"])
        if config["per_tick"] is not None:
            sched.per_tick = config["per_tick"]
        if config["tick_s"] is not None:
            sched.tick_s = config["tick_s"]
        if self.scheduler is not None and self.scheduler is not sched:
            waiting = self.scheduler.unregister(self)  # moved to another scheduler: keep order
            self.replaced = None
            sched.register(self)
            sched.queues[self.ctx.app_id].extendleft(reversed(waiting))
            sched._schedule()
        elif self.scheduler is None:
            self.replaced = sched.register(self)
        self.scheduler = sched

    def outbound(self, batch: list[R.Record]) -> list[R.Record]:
        assert self.scheduler is not None
        return self.scheduler.submit(self, batch)

    def handle_closed(self, handle: int) -> None:
        """The route closed: the app's records for it that still wait here would only be
        released later into a closed channel; drop them."""
        sched = self.scheduler
        if sched is None or sched.members.get(self.ctx.app_id) is not self:
            return
        q = sched.queues.get(self.ctx.app_id)
        if q:
            keep = [r for r in q if r.handle != handle]
            if len(keep) != len(q):
                self.count("dropped_handle_closed", len(q) - len(keep))
                q.clear()
                q.extend(keep)

    def held(self) -> HeldRecords:
        if self.scheduler is None or self.scheduler.members.get(self.ctx.app_id) is not self:
            return HeldRecords([], [])
        return HeldRecords(list(self.scheduler.queues.get(self.ctx.app_id, ())), [])

    def close(self, handed_over: bool = False) -> HeldRecords:
        self._closed = True
        sched = self.scheduler
        waiting = sched.unregister(self) if sched is not None else []
        super().close(handed_over=True)  # cancels our timers, the scheduler's tick among them
        if sched is not None and sched._timer_owner is self:
            sched._timer, sched._timer_owner = None, None
            sched._schedule()  # another member's clock drives the ticks now
        return HeldRecords([] if handed_over else waiting, [])

    def save_state(self) -> dict[str, Any]:
        return {"queue": [r.encode() for r in self.held().outbound]}

    def load_state(self, state: dict[str, Any], state_version: int) -> None:
        recs = decode_records(state.get("queue") or [])
        # Taking over from a live predecessor: the queue is in the shared scheduler already.
        if recs and self.scheduler is not None and self.replaced is None:
            self.scheduler.queues[self.ctx.app_id].extend(recs)
            self.scheduler._schedule()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.scheduler is not None:
            d["scheduler"] = self.scheduler.describe()
        return d


POLICY = QosPolicy

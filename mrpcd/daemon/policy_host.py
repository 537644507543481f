"""The daemon side of policies: contexts, attach / detach / reconfigure / upgrade on live apps.

Every change happens on the event loop between two batches, so a policy never sees a
half-swapped chain. Nothing is lost across a change: a detached policy hands back what it
held and those records re-enter the chain where it stood; an upgrade carries the old
instance's exported state (tokens, queues, counters) into the new code, and if loading or
taking over fails the old instance keeps running untouched.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

from ..marshal import records as R
from ..marshal.schema import Method
from ..policies.base import HeldRecords, Policy, PolicyConfigError, PolicyLoadError, PolicyStateError, load_policy_module
from .datapath import Engine, error_response

if TYPE_CHECKING:
    from .session import AppSession

log = logging.getLogger("mrpcd.policy")


class PolicyOpError(ValueError):
    """An operator's policy request cannot be carried out; the text says why."""


class SessionPolicyContext:
    """What a policy sees of the daemon, for one app (implements policies.base.PolicyContext)."""

    def __init__(self, session: "AppSession", shared: dict[str, Any]) -> None:
        self._session = session
        self.app_id = session.app_id
        self.app_name = session.name
        self.globals = shared
        self._loop = asyncio.get_running_loop()

    @property
    def schema(self):
        return self._session.schema

    def method(self, method_id: int) -> Method | None:
        return self._session.methods_by_id().get(method_id)

    def now(self) -> float:
        return self._loop.time()

    def call_later(self, delay: float, fn: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_later(delay, self._guarded, fn)

    def _guarded(self, fn: Callable[[], None]) -> None:
        if self._session.closed:
            return
        try:
            fn()
        except Exception:
            log.exception("policy timer failed on app %s", self.app_name)

    def resume_outbound(self, engine: Engine, records: list[R.Record]) -> None:
        if records and not self._session.closed:
            self._session.datapath.outbound_after(engine, records)

    def resume_inbound(self, engine: Engine, records: list[R.Record]) -> None:
        if records and not self._session.closed:
            self._session.datapath.inbound_after(engine, records)

    def reply_error(self, record: R.Record, code: int, details: str) -> None:
        """Answer whoever sent the request: the app (client route) or the peer (server route).

        The answer travels the chain the way a response does (outbound to the peer, inbound
        to the app), so the policies the request already passed see its call end (vtc
        frees its slot, metrics counts it); those it did not pass ignore an unknown call."""
        session = self._session
        if session.closed:
            return
        route = session.routes.get(record.handle)
        if route is not None and route.role == "server":
            if not route.conn.closed:
                session.datapath.outbound([error_response(record.handle, record.call_id, code, details)])
        else:
            session.datapath.inbound([error_response(record.handle, record.call_id, code, details)])

    def log(self, level: int | str, msg: str, **fields: Any) -> None:
        lvl = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
        if not isinstance(lvl, int):
            lvl = logging.INFO
        log.log(lvl, "[%s] %s", self.app_name, msg, extra={"fields": {"app_id": self.app_id, **fields}})


class PolicyHost:
    """The policies attached to one app's datapath, by instance name."""

    def __init__(self, session: "AppSession", shared: dict[str, Any]) -> None:
        self.session = session
        self.ctx = SessionPolicyContext(session, shared)

    @property
    def chain(self) -> list[Engine]:
        return self.session.datapath.engines

    def find(self, name: str) -> Policy:
        for engine in self.chain:
            if getattr(engine, "instance_name", None) == name:
                return engine  # type: ignore[return-value]
        names = ", ".join(getattr(e, "instance_name", e.name) for e in self.chain) or "none"
        raise PolicyOpError(f"app {self.session.name} (app_id {self.session.app_id}) has no policy {name!r} (attached: {names})")

    def attach(self, spec: object, config: dict[str, Any] | None, name: str | None = None, position: int | None = None) -> Policy:
        """mrpcctl's attach: build the policy and put it on the chain (at the end by default)."""
        policy = self.build(spec, config, name, position=position)
        self.insert(policy, position)
        return policy

    def build(self, spec: object, config: dict[str, Any] | None, name: str | None = None, position: int | None = None,
              cls: "type[Policy] | None" = None) -> Policy:
        """A new policy instance for this app, checked against its chain but not on it yet.

        Apart from insert() so a reload can build every policy it adds, on every app, before
        it changes any (declared.py); `cls`: the class already loaded (by the config)."""
        if cls is None:
            cls = _load(spec)  # `spec` as a control request gave it: _load refuses anything but a name
        instance = name or cls.name
        if any(getattr(e, "instance_name", None) == instance for e in self.chain):
            raise PolicyOpError(f"app {self.session.name} already has a policy named {instance!r}; detach it or pick --name")
        if getattr(cls, "one_per_app", False) and any(e.name == cls.name for e in self.chain):
            raise PolicyOpError(f"app {self.session.name} already has a {cls.name} policy, and it takes one per app; "
                                "reconfigure or upgrade that one")
        if position is not None and (type(position) is not int or not 0 <= position <= len(self.chain)):
            raise PolicyOpError(f"position {position!r} is out of range: 0 (nearest the app) .. {len(self.chain)} "
                                f"(the end of app {self.session.name}'s chain of {len(self.chain)})")
        try:
            policy = cls(self.ctx, config or {})
        except PolicyConfigError as exc:
            raise PolicyOpError(str(exc)) from None
        except (Exception, SystemExit) as exc:
            raise PolicyOpError(f"policy {spec} failed to start: {type(exc).__name__}: {exc}") from None
        policy.instance_name = instance  # type: ignore[attr-defined]
        policy.module_spec = spec  # type: ignore[attr-defined]
        return policy

    def insert(self, policy: Policy, position: int | None = None) -> None:
        """Put a built policy on the chain (`position` None: at the end)."""
        # a policy sees a record before the app may: the rest of one being received into the
        # app's ring goes to the daemon's memory instead (only its first part was in the ring)
        self.session.stop_in_place()
        chain = self.chain
        chain.insert(len(chain) if position is None else position, policy)
        log.info("policy %s (%s %s) attached to app %s%s", policy.instance_name, policy.name, policy.version,  # type: ignore[attr-defined]
                 self.session.name, " (declared in the config)" if getattr(policy, "source", None) == "config" else "")

    def detach(self, name: str) -> dict[str, int]:
        policy = self.find(name)
        chain = self.chain
        index = chain.index(policy)
        try:
            held = policy.close()
        except (Exception, SystemExit):
            # a broken policy must still come off the chain (detach is the operator's way
            # out); what it reports holding still goes on
            log.exception("policy %s failed to close on app %s; detached anyway", name, self.session.name)
            try:
                held = policy.held()
            except (Exception, SystemExit):
                held = HeldRecords([], [])
        chain.remove(policy)
        # what it held continues from where it stood: outbound to engines after it, inbound to those before it
        dp = self.session.datapath
        if held.outbound:
            dp.outbound_from(index, list(held.outbound))
        if held.inbound:
            dp.inbound_from(index - 1, list(held.inbound))
        log.info("policy %s detached from app %s; %d held records passed on", name, self.session.name, len(held.outbound) + len(held.inbound))
        return {"released_outbound": len(held.outbound), "released_inbound": len(held.inbound)}

    def check_config(self, name: str, config: dict[str, Any]) -> None:
        """Raise PolicyOpError if policy `name` would refuse `config`; changes nothing."""
        try:
            policy = self.find(name)
            policy.check_change(policy.validate_config(config))
        except PolicyConfigError as exc:
            raise PolicyOpError(str(exc)) from None

    def reconfigure(self, name: str, config: dict[str, Any]) -> Policy:
        policy = self.find(name)
        try:
            policy.reconfigure(config)
        except PolicyConfigError as exc:
            raise PolicyOpError(str(exc)) from None
        log.info("policy %s on app %s reconfigured", name, self.session.name)
        return policy

    def upgrade(self, name: str, spec: str, config: dict[str, Any] | None = None) -> Policy:
        return self.commit_upgrade(*self.prepare_upgrade(name, spec, config))

    def prepare_upgrade(self, name: str, spec: object, config: dict[str, Any] | None = None,
                        cls: "type[Policy] | None" = None) -> tuple[Policy, Policy]:
        """The new version built from the old one's state, not yet in the chain: (old, new).

        Separate from commit_upgrade so an upgrade over several apps can build every new
        instance before swapping any; one that is not committed is dropped with
        `new.close(handed_over=True)` (the old instance still holds everything).
        """
        old = self.find(name)
        if cls is None:  # (an upgrade over several apps loads it once: load_upgrade)
            cls = load_upgrade(spec)
        try:
            state = old.export_state()
        except (Exception, SystemExit) as exc:  # the running version's bug: it keeps running
            raise PolicyOpError(f"upgrade refused, {name} keeps running: its export_state() failed: {type(exc).__name__}: {exc}") from None
        # the config as the operator gave it: `old.config` is the normalised form (method ids,
        # Method objects, derived keys) that validate_config does not take as input
        cfg = config if config is not None else getattr(old, "raw_config", None) or {}
        try:
            new = cls.from_state(self.ctx, cfg, state)
        except (PolicyStateError, PolicyConfigError) as exc:
            raise PolicyOpError(f"upgrade refused, {name} keeps running: {exc}") from None
        except (Exception, SystemExit) as exc:
            raise PolicyOpError(f"upgrade refused, {name} keeps running: {type(exc).__name__}: {exc}") from None
        _check_takes_over_held(name, old, new)
        new.instance_name = name  # type: ignore[attr-defined]
        new.module_spec = spec  # type: ignore[attr-defined]
        return old, new

    def commit_upgrade(self, old: Policy, new: Policy) -> Policy:
        """Swap a prepared new version in for `old` (see prepare_upgrade)."""
        name = old.instance_name  # type: ignore[attr-defined]
        chain = self.chain
        for attr in ("source", "declared_at"):  # a declared policy upgraded by mrpcctl is still the config's
            if not hasattr(new, attr) and hasattr(old, attr):
                setattr(new, attr, getattr(old, attr))
        chain[chain.index(old)] = new
        try:
            old.close(handed_over=True)
        except (Exception, SystemExit):  # the new version runs; the old one's failure is only logged
            log.exception("policy %s (old version %s) failed to close on app %s", name, old.version, self.session.name)
        log.info("policy %s on app %s upgraded %s -> %s", name, self.session.name, old.version, new.version)
        try:
            new.on_installed()
        except (Exception, SystemExit):
            log.exception("policy %s (new version %s) failed in on_installed on app %s", name, new.version, self.session.name)
        return new

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for index, engine in enumerate(self.chain):
            d = describe_engine(engine)
            d["instance"] = getattr(engine, "instance_name", engine.name)
            d["module"] = getattr(engine, "module_spec", "")
            d["position"] = index
            d["source"] = getattr(engine, "source", "mrpcctl")  # "config": declared in the daemon's config file
            if d["source"] == "config":
                d["declared_at"] = getattr(engine, "declared_at", "")
            out.append(d)
        return out

    def close_all(self) -> None:
        for engine in list(self.chain):
            close = getattr(engine, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("policy %s failed to close", getattr(engine, "instance_name", engine.name))
        self.chain.clear()


def describe_engine(engine: Any) -> dict[str, Any]:
    """engine.describe(), or, when that raises (a policy's bug), what is known without it and
    the error: one broken policy must not break listing every app, nor an operator's change."""
    try:
        d = engine.describe()
        if not isinstance(d, dict):
            raise TypeError(f"describe() returned {type(d).__name__}, not a mapping")
        return dict(d)
    except (Exception, SystemExit) as exc:
        log.warning("policy %s: describe() failed: %s: %s", getattr(engine, "instance_name", "?"), type(exc).__name__, exc)
        return {"name": getattr(engine, "name", type(engine).__name__), "version": getattr(engine, "version", ""),
                "describe_error": f"{type(exc).__name__}: {exc}"}


def _check_takes_over_held(name: str, old: Policy, new: Policy) -> None:
    """Refuse (closing `new`) an upgrade whose new version holds fewer records than the old.

    Why: commit_upgrade closes the old instance with handed_over=True, which forgets what it
    held; a new module whose from_state ignores the held calls would make them vanish (the
    callers wait for their deadline). Counted per direction; a new version may hold more."""
    try:
        before, after = old.held(), new.held()
        lost = (len(before.outbound) - len(after.outbound), len(before.inbound) - len(after.inbound))
    except (Exception, SystemExit) as exc:
        new.close(handed_over=True)
        raise PolicyOpError(f"upgrade refused, {name} keeps running: cannot count the held records: {type(exc).__name__}: {exc}") from None
    if lost[0] > 0 or lost[1] > 0:
        new.close(handed_over=True)
        raise PolicyOpError(
            f"upgrade refused, {name} keeps running: it holds {len(before.outbound)} outbound and "
            f"{len(before.inbound)} inbound records, the new version took over only {len(after.outbound)} "
            f"and {len(after.inbound)} (its from_state must take over the held calls)")


def load_upgrade(spec: Any) -> type[Policy]:
    """The policy class an upgrade installs: the module's current code (loaded once per
    request, so the apps an upgrade covers share one copy of its module state)."""
    return _load(spec, fresh=True)


def _load(spec: Any, fresh: bool = False) -> type[Policy]:
    """`fresh`: an upgrade - a dotted module already imported runs its current code again.
    An attach takes the module as imported, so module-level state stays one per daemon."""
    if not isinstance(spec, str) or not spec:
        raise PolicyOpError("a policy is named by a built-in name, a dotted module or a .py path")
    try:
        return load_policy_module(spec, fresh=fresh)
    except PolicyLoadError as exc:
        raise PolicyOpError(str(exc)) from None
    except (Exception, SystemExit) as exc:  # the loader wraps import errors, but never let one escape
        raise PolicyOpError(f"cannot load policy {spec}: {type(exc).__name__}: {exc}") from None

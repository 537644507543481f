"""Policies declared in the daemon's config file (`policies:`), applied to apps by name.

Why: policies attached with `mrpcctl policy attach` are run-time state. They are gone when
the daemon restarts, and apps that reconnect to the new daemon (App.successor) would run
unpoliced. Declared policies are what an operator keeps in the config, as with a service
mesh's declarative config: every app whose hello name matches an entry gets the entry's
policy, the daemon reconciles live apps on reload (SIGHUP), and policies attached by mrpcctl
are left alone.

The rules, in one place:

* Order: the entries an app matches, in file order, are its chain from the app outwards,
  and they sit before any policy mrpcctl attaches later (position 0 is nearest the app).
* Hello: the daemon attaches an app's declared policies before it answers the hello, so
  the app has no ring to send on before its policies are in place. A config that needs
  the app's schema (ACL rules, rate limits and faults per method name methods) cannot be
  built before the app registered it: such an entry *waits*, is tried again after every
  schema the app registers, and while any entry waits the app may neither connect nor
  bind (FAILED_PRECONDITION, saying which entry and why). So no call ever passes without
  the policies the config declares for it: an entry that can never apply to an app (a
  method it does not have) stops that app from calling, loudly, rather than letting it
  run unpoliced. `mrpcctl policy list` shows waiting entries with their reason.
* Reload: the new entries are planned on every live app first: policies to attach are
  built, config changes checked, upgrades prepared. If any of that fails for any app the
  whole reload is refused (the log says which app, which entry and why, and `mrpcctl
  policy list` shows the refusal) and nothing changes; otherwise every change is applied,
  with no await in between, so no batch sees half of it. Changes: a declared policy no app
  has yet is attached (next to its declared neighbours), a config-sourced policy no longer
  declared is detached (what it held goes on), a changed config is applied in place
  (state carried over, as `mrpcctl policy config`), a changed kind is a live upgrade (as
  `mrpcctl policy upgrade`). The file wins over run-time changes to *config-sourced*
  policies (a detached one comes back, a reconfigured one gets the file's config again);
  policies attached by mrpcctl are never touched. An app that has not connected or bound
  yet takes an entry it cannot build as waiting, as at hello, instead of refusing the reload.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..keypath import KeyPathError, KeyPathErrors
from ..typo_hints import did_you_mean

if TYPE_CHECKING:
    from ..policies.base import Policy
    from .session import AppSession

log = logging.getLogger("mrpcd.policy")

ENTRY_KEYS = ("app", "kind", "name", "config")
SOURCE_CONFIG = "config"
SOURCE_MRPCCTL = "mrpcctl"
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class DeclaredPolicy:
    """One `policies:` entry, validated. `where` is "file:line" once the loader knows it."""

    app: str  # an app name, or a glob (fnmatch: *, ?, [...]) over app names
    kind: str  # a built-in policy name, a dotted module or a .py path (as mrpcctl takes)
    instance: str  # the instance name on the app's chain (`name`, else the policy's own name)
    config: dict[str, Any] = field(default_factory=dict, hash=False)
    where: str = ""
    # the class loaded at config time (so `--check-config` proved it loads); compare=False:
    # a .py path loads under a new name each time, and that alone is no change
    cls: Any = field(default=None, compare=False, hash=False, repr=False)

    def matches(self, app_name: str) -> bool:
        if _GLOB_CHARS.isdisjoint(self.app):
            return self.app == app_name
        return fnmatch.fnmatchcase(app_name, self.app)

    def label(self) -> str:
        at = f" ({self.where})" if self.where else ""
        return f"declared policy {self.instance!r} ({self.kind}){at}"


def _config_key_path(message: str) -> tuple[Any, ...]:
    """The top-level config key a policy's error names ("config key 'rules[0].action'" ->
    ("rules", 0)), so the error points at that line of the YAML, not only the entry's."""
    m = re.search(r"config key '([A-Za-z0-9_]+)(?:\[(\d+)\])?", message)
    if not m:
        return ()
    return (m.group(1),) if m.group(2) is None else (m.group(1), int(m.group(2)))


def check_entry_config(cls: "type[Policy]", config: dict[str, Any], app: str) -> None:
    """Build the policy once with no app behind it (a fake context, an empty schema) and
    throw it away: the policy's own validation, at config load, so `mrpcd --check-config`
    and a reload refuse a bad config with its line. What needs the app's schema (method
    names) cannot be known yet and is checked when the policy is attached."""
    from ..policies.base import PolicyConfigError, PolicySchemaError
    from ..policies.testing import FakeContext

    try:
        policy = cls(FakeContext(app_name=app), dict(config))
    except PolicySchemaError:
        return
    except PolicyConfigError as exc:
        raise KeyPathError(str(exc), ("config", *_config_key_path(str(exc)))) from None
    except (Exception, SystemExit) as exc:
        raise KeyPathError(f"{cls.name} failed to start with this config: {type(exc).__name__}: {exc}", ("config",)) from None
    try:
        policy.close()
    except (Exception, SystemExit):
        pass


def parse_policies(value: Any) -> tuple[DeclaredPolicy, ...]:
    """The `policies:` section: a list of {app, kind, name?, config?} (see README)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("must be a list of entries {app: NAME, kind: POLICY, name: INSTANCE, config: {...}}")
    out: list[DeclaredPolicy] = []
    errors: list[KeyPathError] = []  # every bad entry at once, each on its line
    for i, entry in enumerate(value):
        try:
            out.append(_parse_entry(i, entry, out))
        except KeyPathError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise KeyPathErrors(errors)
    return tuple(out)


def _parse_entry(i: int, entry: Any, before: list[DeclaredPolicy]) -> DeclaredPolicy:
    """Entry `i` of `policies:` (KeyPathError from the list down); `before`: the good ones."""
    from ..policies.base import PolicyLoadError, load_policy_module

    if not isinstance(entry, dict):
        raise KeyPathError(f"entry {i} must be a mapping with keys {', '.join(ENTRY_KEYS)}", (i,))
    for key in entry:
        if key not in ENTRY_KEYS:
            raise KeyPathError(f"unknown key {key!r}{did_you_mean(str(key), ENTRY_KEYS)} (known: {', '.join(ENTRY_KEYS)})", (i, key))
    app = entry.get("app")
    if not isinstance(app, str) or not app or len(app) > 128:
        raise KeyPathError("app must be an app's name (at most 128 characters) or a glob such as 'web-*'", (i, "app") if "app" in entry else (i,))
    kind = entry.get("kind")
    if not isinstance(kind, str) or not kind:
        raise KeyPathError("kind must be a built-in policy name (acl, ratelimit, ...), a dotted module or a .py path",
                           (i, "kind") if "kind" in entry else (i,))
    try:
        cls = load_policy_module(kind)
    except PolicyLoadError as exc:
        raise KeyPathError(str(exc), (i, "kind")) from None
    except (Exception, SystemExit) as exc:
        raise KeyPathError(f"cannot load policy {kind}: {type(exc).__name__}: {exc}", (i, "kind")) from None
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name or len(name) > 128):
        raise KeyPathError("name must be a non-empty string (the policy's instance name)", (i, "name"))
    config = entry.get("config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise KeyPathError(f"config must be a mapping of the {cls.name} policy's keys (mrpcctl policy doc {kind})", (i, "config"))
    try:
        check_entry_config(cls, config, app)
    except KeyPathError as exc:
        raise exc.under(i) from None
    declared = DeclaredPolicy(app, kind, name or cls.name, dict(config), cls=cls)
    for other in before:  # the same app twice: the second could never attach
        if other.app == app and other.instance == declared.instance:
            raise KeyPathError(f"app {app!r} already has a policy named {declared.instance!r} (an entry above): "
                               "give one of them another name", (i, "name") if name else (i,))
        if other.app == app and getattr(cls, "one_per_app", False) and other.cls is cls:
            raise KeyPathError(f"a {cls.name} policy takes one per app, and an entry above already gives app {app!r} one", (i,))
    return declared


def for_app(entries: "tuple[DeclaredPolicy, ...]", app_name: str) -> list[DeclaredPolicy]:
    """The entries that apply to an app, in chain order; with globs, two entries can give
    one app the same instance name: the first one counts (the later is an error at attach)."""
    return [e for e in entries if e.matches(app_name)]


def _position(chain: list[Any], order: list[str], instance: str) -> int:
    """Where a declared policy goes: after the nearest declared policy before it in the
    file, else before the nearest one after it, else first (config policies sit nearest the
    app, mrpcctl's after them)."""
    names = [getattr(e, "instance_name", None) if getattr(e, "source", None) == SOURCE_CONFIG else None for e in chain]
    idx = order.index(instance)
    for prev in reversed(order[:idx]):
        if prev in names:
            return names.index(prev) + 1
    for nxt in order[idx + 1:]:
        if nxt in names:
            return names.index(nxt)
    return 0


def _mark(policy: "Policy", entry: DeclaredPolicy) -> None:
    policy.source = SOURCE_CONFIG  # type: ignore[attr-defined]
    policy.declared_at = entry.where  # type: ignore[attr-defined]


def _build(session: "AppSession", entry: DeclaredPolicy, taken: set[str]) -> "Policy":
    """The entry's policy for `session`, not yet on its chain (PolicyOpError if it cannot)."""
    from .policy_host import PolicyOpError

    if entry.instance in taken:
        raise PolicyOpError(f"an earlier entry already gives app {session.name} a policy named {entry.instance!r}")
    policy = session.policies.build(entry.kind, entry.config, entry.instance, cls=entry.cls)
    _mark(policy, entry)
    return policy


def _started(session: "AppSession") -> bool:
    """The app connected or bound: calls may flow, so a policy can no longer wait."""
    return bool(session.routes or session.listeners)


def attach_declared(session: "AppSession", entries: "tuple[DeclaredPolicy, ...]") -> None:
    """At hello (and after each schema the app registers): attach what the config declares
    for this app and is not on its chain yet; what cannot be built yet waits (module doc)."""
    from .policy_host import PolicyOpError

    wanted = for_app(entries, session.name)
    if not wanted:
        session.declared_waiting = []
        return
    order = [e.instance for e in wanted]
    waiting: list[tuple[DeclaredPolicy, str]] = []
    taken: set[str] = set()
    for entry in wanted:
        live = next((e for e in session.policies.chain if getattr(e, "instance_name", None) == entry.instance), None)
        if live is not None and getattr(live, "source", None) == SOURCE_CONFIG:
            taken.add(entry.instance)
            continue
        try:
            policy = _build(session, entry, taken)
        except PolicyOpError as exc:
            waiting.append((entry, str(exc)))
            continue
        taken.add(entry.instance)
        session.policies.insert(policy, _position(session.policies.chain, order, entry.instance))
    session.declared_waiting = waiting
    for entry, why in waiting:
        log.info("app %s (app_id %d): %s waits: %s", session.name, session.app_id, entry.label(), why,
                 extra=session.log_fields(policy=entry.instance))


def check_ready(session: "AppSession") -> None:
    """Refuse connect / bind while a declared policy of the app is not attached: a call
    would pass without it. Raises ControlError FAILED_PRECONDITION naming the entry."""
    if not session.declared_waiting:
        return
    from .. import control_proto as cp

    entry, why = session.declared_waiting[0]
    more = len(session.declared_waiting) - 1
    raise cp.ControlError(f"the daemon's config declares a policy this app cannot have yet: {entry.label()}: {why}"
                          + (f" (and {more} more; see `mrpcctl policy list`)" if more else "")
                          + "; no call may pass without it", 9)


def describe_waiting(session: "AppSession") -> list[dict[str, Any]]:
    return [{"instance": e.instance, "kind": e.kind, "source": SOURCE_CONFIG, "declared_at": e.where, "waiting": why}
            for e, why in session.declared_waiting]


class PolicyPlanError(ValueError):
    """A reload's policies cannot be applied to the live apps; `errors` says where and why."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class _AppPlan:
    session: "AppSession"
    order: list[str]
    detach: list[str] = field(default_factory=list)
    reconfigure: list[tuple[DeclaredPolicy, "Policy"]] = field(default_factory=list)
    upgrade: list[tuple[DeclaredPolicy, "Policy", "Policy"]] = field(default_factory=list)  # (entry, old, new)
    attach: list[tuple[DeclaredPolicy, "Policy"]] = field(default_factory=list)
    waiting: list[tuple[DeclaredPolicy, str]] = field(default_factory=list)
    unchanged: list[tuple[DeclaredPolicy, "Policy"]] = field(default_factory=list)  # (its line may have moved)


class ReloadPlan:
    """Every change a reload's `policies:` makes to the live apps, built and checked but not
    applied: `apply()` makes them all (no await in between), `discard()` drops them."""

    def __init__(self, apps: list[_AppPlan]) -> None:
        self.apps = apps

    def changes(self) -> int:
        return sum(len(a.detach) + len(a.reconfigure) + len(a.upgrade) + len(a.attach) for a in self.apps)

    def discard(self) -> None:
        for a in self.apps:
            for _, policy in a.attach:
                _close_quietly(policy, False)
            for _, _, new in a.upgrade:
                _close_quietly(new, True)
        self.apps = []

    def apply(self) -> list[str]:
        """Make the changes; returns what failed even so (a policy that passed its check and
        then refused: a bug in it, logged), normally nothing."""
        from .policy_host import PolicyOpError

        failed: list[str] = []
        for a in self.apps:
            s, host = a.session, a.session.policies
            if s.closed:  # (gone since the plan: nothing to change)
                for _, policy in a.attach:
                    _close_quietly(policy, False)
                for _, _, new in a.upgrade:
                    _close_quietly(new, True)
                continue
            for name in a.detach:
                host.detach(name)
            for entry, old, new in a.upgrade:
                _mark(new, entry)
                host.commit_upgrade(old, new)
            for entry, policy in a.reconfigure:
                try:
                    host.reconfigure(entry.instance, entry.config)
                    _mark(policy, entry)
                except PolicyOpError as exc:
                    failed.append(f"app {s.name} (app_id {s.app_id}): {entry.label()}: {exc}")
            for entry, policy in a.attach:
                host.insert(policy, _position(host.chain, a.order, entry.instance))
            for entry, policy in a.unchanged:
                _mark(policy, entry)
            s.declared_waiting = a.waiting
        self.apps = []
        for f in failed:
            log.error("reload: %s", f)
        return failed


def _close_quietly(policy: "Policy", handed_over: bool) -> None:
    try:
        policy.close(handed_over=handed_over)
    except (Exception, SystemExit):
        log.exception("policy %s failed to close", getattr(policy, "instance_name", "?"))


def plan_reload(sessions: "list[AppSession]", entries: "tuple[DeclaredPolicy, ...]") -> ReloadPlan:
    """What `entries` change on each live app (module doc); PolicyPlanError, with every
    problem on every app and nothing changed, if any change cannot be made."""
    from .policy_host import PolicyOpError, load_upgrade

    plans: list[_AppPlan] = []
    errors: list[str] = []
    for s in sessions:
        if s.closed:
            continue
        wanted = for_app(entries, s.name)
        plan = _AppPlan(s, [e.instance for e in wanted])
        plans.append(plan)
        chain = s.policies.chain
        declared_names = {e.instance for e in wanted}
        for engine in chain:
            if getattr(engine, "source", None) == SOURCE_CONFIG and engine.instance_name not in declared_names:  # type: ignore[attr-defined]
                plan.detach.append(engine.instance_name)  # type: ignore[attr-defined]
        taken: set[str] = set()
        for entry in wanted:
            where = f"app {s.name} (app_id {s.app_id}): {entry.label()}"
            live = next((e for e in chain if getattr(e, "instance_name", None) == entry.instance), None)
            try:
                if entry.instance in taken:
                    raise PolicyOpError(f"an earlier entry already gives app {s.name} a policy named {entry.instance!r}")
                if live is None:
                    try:
                        plan.attach.append((entry, _build(s, entry, taken)))
                    except PolicyOpError as exc:
                        if _started(s):
                            raise
                        plan.waiting.append((entry, str(exc)))
                elif getattr(live, "source", None) != SOURCE_CONFIG:
                    raise PolicyOpError(f"app {s.name} already has a policy {entry.instance!r} attached by mrpcctl, "
                                        "which a reload leaves alone: detach it, or give the entry another name")
                elif getattr(live, "module_spec", None) != entry.kind:
                    cls = entry.cls or load_upgrade(entry.kind)
                    old, new = s.policies.prepare_upgrade(entry.instance, entry.kind, entry.config, cls)
                    plan.upgrade.append((entry, old, new))
                elif getattr(live, "raw_config", None) != entry.config:
                    s.policies.check_config(entry.instance, entry.config)
                    plan.reconfigure.append((entry, live))  # type: ignore[arg-type]
                else:
                    plan.unchanged.append((entry, live))  # type: ignore[arg-type]
            except PolicyOpError as exc:
                errors.append(f"{where}: {exc}")
            taken.add(entry.instance)
    result = ReloadPlan(plans)
    if errors:
        result.discard()
        raise PolicyPlanError(errors)
    return result

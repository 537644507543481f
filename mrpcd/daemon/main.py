"""`mrpcd`: run the daemon in the foreground (development) or under systemd (Type=notify).

The process lifecycle lives here: logging, sd_notify (READY / RELOADING / STOPPING /
WATCHDOG / STATUS), SIGHUP (re-read the config file, apply what can change live, keep the
old config on any error), SIGTERM / SIGINT (graceful drain, then exit 0) and the metrics
endpoint.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
from importlib import resources
from typing import Any

from .config import LIVE_KEYS, VALIDATORS, Config, ConfigError, default_text, load
from .daemon import Daemon
from .declared import PolicyPlanError, ReloadPlan, plan_reload
from .metrics import MetricsServer
from .notify import Notifier

log = logging.getLogger("mrpcd")

# LogRecord attributes of every record; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """Structured logs: one JSON object a line, with the event's fields (app_id, pid, peer, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
                               "msg": record.getMessage()}
        for k, v in _extra_fields(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines; an event's fields follow as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line: app names and other client-supplied text may hold newlines,
        # which would otherwise forge log lines in the journal. (Tracebacks follow as before.)
        line = _one_line(super().formatMessage(record))
        fields = _extra_fields(record)
        if fields:
            line += " [" + " ".join(f"{k}={_one_line(str(v))}" for k, v in fields.items()) + "]"
        return line


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def configure_logging(config: Config, handler: logging.Handler | None = None) -> logging.Handler:
    """Install (or re-configure, on reload) the one stderr handler: journald reads stderr."""
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        logging.basicConfig(handlers=[handler], force=True)
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else TextFormatter())
    logging.getLogger().setLevel(config.log_level.upper())
    return handler


def unit_text() -> str:
    """The shipped systemd unit, with ExecStart pointing at this installation's `mrpcd`."""
    text = resources.files("mrpcd").joinpath("systemd/mrpcd.service").read_text()
    return text.replace("/usr/bin/mrpcd", _unit_exe())


# ProtectHome=yes in the unit makes these inaccessible to the service
_HIDDEN_BY_PROTECT_HOME = ("/home", "/root", "/run/user")


def unit_path_problems(paths: list[str]) -> list[str]:
    """Why the shipped unit's service (DynamicUser=yes, ProtectHome=yes) could not use these
    files: under a folder ProtectHome hides, or behind a folder other users may not enter
    (the transient user is neither its owner nor in its group). Empty when all is well."""
    problems: list[str] = []
    for path in dict.fromkeys(os.path.abspath(p) for p in paths):
        hidden = next((h for h in _HIDDEN_BY_PROTECT_HOME if path == h or path.startswith(h + "/")), None)
        if hidden:
            problems.append(f"{path} is under {hidden}, which the unit's ProtectHome=yes hides from the service")
            continue
        folder = os.path.dirname(path)
        while folder and folder != "/":
            try:
                mode = os.stat(folder).st_mode
            except OSError:
                break
            if not mode & 0o001:  # others may not enter it
                problems.append(f"{path} is in {folder} (mode {mode & 0o777:o}), which the unit's DynamicUser=yes user may not enter")
                break
            folder = os.path.dirname(folder)
    return problems


def unit_warnings(exe: str) -> list[str]:
    """unit_path_problems of what the service runs: the mrpcd script, the real interpreter,
    the standard library and the installed mrpcd package."""
    import mrpcd

    return unit_path_problems([exe, os.path.realpath(sys.executable), os.path.dirname(os.__file__),
                               os.path.dirname(os.path.abspath(mrpcd.__file__))])


def _unit_exe() -> str:
    # The script beside this interpreter first: PATH may hold another installation's mrpcd.
    exe = os.path.join(os.path.dirname(sys.executable), "mrpcd")
    if not os.access(exe, os.X_OK):
        exe = shutil.which("mrpcd") or exe
    return os.path.abspath(exe)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mrpcd", description="RPC as a managed system service: the per-host daemon.",
        epilog="Apps and mrpcctl reach the daemon at MRPCD_SOCKET, else the default control socket "
               "($XDG_RUNTIME_DIR/mrpcd/control.sock or /tmp/mrpcd-$UID/control.sock), else /run/mrpcd/control.sock. "
               "A second daemon on one host needs only its own --socket (and MRPCD_SOCKET for its apps); "
               "server apps choose the addresses it listens on. Signals: SIGHUP re-reads --config, "
               "SIGTERM / Ctrl-C drain (drain_timeout) and exit, a second one stops at once.")
    p.add_argument("-c", "--config", help="YAML config file over the embedded default (mrpcd --print-default-config "
                                          "shows every key); SIGHUP re-reads it")
    p.add_argument("--socket", help="control socket path (overrides control_socket in the config and MRPCD_SOCKET)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--print-default-config", action="store_true", help="print the embedded default config and exit")
    p.add_argument("--print-unit", action="store_true", help="print the systemd unit (for /etc/systemd/system/mrpcd.service) and exit")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    return p.parse_args(argv)


class Service:
    """The daemon plus its process-level duties: notifications, reload, metrics, drain."""

    def __init__(self, config: Config, config_path: str | None, overrides: dict[str, Any], handler: logging.Handler) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.handler = handler
        self.notifier = Notifier()
        self.daemon = Daemon(config)
        self.metrics = MetricsServer(self.daemon)
        self.daemon.metrics_server = self.metrics  # type: ignore[attr-defined]  # mrpcctl stats shows the address
        self._reload_lock = asyncio.Lock()

    def status(self) -> str:
        d = self.daemon
        return f"serving {self.config.control_socket}: {len(d.sessions)} apps, {d.in_flight()} calls in flight"

    async def run(self) -> int:
        try:
            await self.daemon.start()
            address = self.config.metrics["address"]
            if address:
                try:
                    await self.metrics.start(address)
                except OSError as exc:  # e.g. a host name that does not resolve: say which address
                    raise RuntimeError(f"metrics address {address}: {exc.strerror or exc}") from None
        except (RuntimeError, OSError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            errno_ = getattr(exc, "errno", None)
            self.notifier.send(f"STATUS=cannot start: {exc}", f"ERRNO={errno_ if isinstance(errno_, int) and errno_ > 0 else 1}")
            await self.daemon.shutdown()
            self.metrics.close()
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self.notifier.ready(self.status())
        self.notifier.start_watchdog(loop)
        await self.daemon.run_until_stopped(on_stopping=self._on_stopping)
        self.metrics.close()
        log.info("mrpcd stopped")
        self.notifier.close()
        return 0

    def _on_stop_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.stopping:
            # the operator does not want to wait (a second Ctrl-C): calls still in flight get GOAWAY now
            log.warning("%s while draining: not waiting for the %d calls in flight, stopping now", name, self.daemon.in_flight())
            self.daemon.cut_drain()
            return
        log.info("%s: stopping gracefully (drain up to %.1fs; send it again to stop at once)", name, self.config.drain_timeout)
        self.daemon.request_stop()

    @property
    def stopping(self) -> bool:
        return self.daemon.stop_requested

    def _on_hup(self) -> None:
        if self.stopping:  # a reload would tell systemd READY=1 after STOPPING=1
            log.info("SIGHUP ignored: mrpcd is stopping")
            return
        self.daemon.spawn(self.reload())

    def _on_stopping(self) -> None:
        # The watchdog keeps pinging during the drain: the loop is still alive and well.
        self.notifier.stopping(f"draining {self.daemon.in_flight()} calls in flight")

    async def reload(self) -> bool:
        """SIGHUP: re-read the config file; apply the live keys, or keep everything on error."""
        async with self._reload_lock:
            if self.stopping:  # a SIGHUP that came just before the stop: nothing to reload any more
                log.info("reload skipped: mrpcd is stopping")
                return False
            self.notifier.reloading()
            try:
                return await self._reload()
            finally:
                if not self.stopping:  # READY=1 after STOPPING=1 would tell systemd the stop was over
                    self.notifier.ready(self.status())

    async def _reload(self) -> bool:
        source = self.config_path or "<embedded default>"
        try:
            new = load(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc, extra={"config": source})
            return False
        old = self.config
        changed = [k for k in LIVE_KEYS if getattr(new, k) != getattr(old, k)]
        policy_error: str | None = None  # for `mrpcctl policy list` (Daemon.declared_error)
        # the declared policies, planned on every live app before anything changes: if one
        # cannot be applied, the whole reload is refused (declared.py)
        try:
            plan = plan_reload(list(self.daemon.sessions.values()), new.policies)
        except PolicyPlanError as exc:
            self.daemon.declared_error = f"reload of {source} refused, nothing of it applied: {exc}"
            for error in exc.errors:
                log.error("reload refused, the running configuration stays: policies: %s", error, extra={"config": source})
            return False
        if new.metrics["address"] != old.metrics["address"]:
            plan.discard()
            try:
                if new.metrics["address"]:
                    await self.metrics.start(new.metrics["address"])
                else:
                    self.metrics.close()
            except OSError as exc:
                log.error("reload refused, the running configuration stays: metrics address %s: %s", new.metrics["address"], exc,
                          extra={"config": source})
                return False
            # an await happened since the plan (apps may have come, gone, or sent records a
            # policy now holds): plan again, on the loop turn that applies it
            try:
                plan = plan_reload(list(self.daemon.sessions.values()), new.policies)
            except PolicyPlanError as exc:
                plan = ReloadPlan([])
                new.policies = old.policies
                changed = [k for k in changed if k != "policies"]
                policy_error = f"reload of {source}: its policies were not applied: {exc}"
                for error in exc.errors:
                    log.error("reload: policies not applied, the running ones stay: %s", error, extra={"config": source})
        for key in (k for k in VALIDATORS if k not in LIVE_KEYS):  # every key read only at start (peers, tls, ...)
            if getattr(new, key) != getattr(old, key):
                log.warning("reload: %s changed to %r; that takes a restart, keeping %r", key, getattr(new, key), getattr(old, key),
                            extra={"config": source, "key": key})
        for key in changed:  # in place: sessions and the control plane hold this very object
            setattr(old, key, getattr(new, key))
        old.source = new.source
        if "poll_us" in changed:
            self.daemon.poller.configure(old.poll_us)
        policy_changes = plan.changes()
        failed = plan.apply()  # (the loop turn that made the plan: no batch saw half of it)
        if failed:
            policy_error = f"reload of {source} applied, but: " + "; ".join(failed)
        self.daemon.declared_error = policy_error
        if self.daemon.call_stats.set_buckets(old.metrics["buckets"]):
            log.info("reload: histogram buckets changed; latency histograms restart")
        configure_logging(old, self.handler)
        log.info("reload: configuration %s applied (%s)%s", source, ", ".join(changed) or "nothing changed",
                 f"; {policy_changes} policy changes on live apps" if policy_changes else "",
                 extra={"config": source, "changed": changed})
        return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_default_config:
        sys.stdout.write(default_text())
        return 0
    if args.print_unit:
        sys.stdout.write(unit_text())
        problems = unit_warnings(_unit_exe())
        if problems:  # on stderr: stdout is the unit file being written
            print("mrpcd: warning: the service this unit starts could not run this installation:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            print("  install mrpcd with a Python outside home folders, where every user may read both "
                  "(e.g. `/usr/bin/python3 -m venv /opt/mrpcd`), or relax ProtectHome= / DynamicUser= in the unit", file=sys.stderr)
        return 0
    overrides: dict[str, Any] = {}
    if args.socket is not None:  # "" is refused by the config check, not taken as "not given"
        overrides["control_socket"] = args.socket
    if args.log_level:
        overrides["log_level"] = args.log_level
    try:
        config = load(args.config, overrides)
    except ConfigError as exc:
        if len(exc.errors) > 1:
            print("mrpcd: bad configuration:\n" + "".join(f"  {e}\n" for e in exc.errors), end="", file=sys.stderr)
        else:
            print(f"mrpcd: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"mrpcd: configuration {config.source} is valid")
        return 0
    handler = configure_logging(config)

    import uvloop  # the daemon never runs on the default loop: 2-3x slower on these machines

    async def run() -> int:
        return await Service(config, args.config, overrides, handler).run()

    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())

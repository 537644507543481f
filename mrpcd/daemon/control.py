"""The control socket: apps register and open endpoints here; operators query and steer.

Each connection is identified by SO_PEERCRED (pid, uid, gid), not by anything it says. A
connection that says `hello` becomes an app session and lives as long as the connection:
when the app exits or is killed the socket closes and the session is reclaimed. Requests
are answered in order; a bad request gets an error reply and the connection stays usable,
a broken frame closes the connection.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import grp
import logging
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING, Any

from .. import control_proto as cp
from ..marshal.schema import SchemaError
from ..transports.handshake import HandshakeError
from .app_limits import ALL_UIDS, limit_exceeded
from .declared import attach_declared, check_ready, describe_waiting
from .policy_host import PolicyOpError, describe_engine, load_upgrade
from .reply_limits import REPLY_BUDGET, bounded_error, fit, plain
from .session import address_text
from .transport_upgrade import TransportUpgradeError

if TYPE_CHECKING:
    from .daemon import Daemon
    from .session import AppSession

log = logging.getLogger("mrpcd.control")
_CREDS = struct.Struct("3i")
# accept() errors that pass: out of file descriptors or kernel memory.
_ACCEPT_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY = 0.1  # seconds between accept attempts while out of descriptors
_LINGER = 0.5  # seconds a refused control connection is read from before it is closed


def _after(msg: dict) -> int:
    """A listing's `after`: only apps with a greater app_id (paging, reply_limits.py)."""
    after = msg.get("after", 0)
    if after is None:
        return 0
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ValueError("after must be an app_id (a non-negative integer)")
    return after


def _too_big(item: Any, size: int) -> dict:
    """What a listing shows of an app whose own entry would not fit in one reply."""
    keep = {k: item[k] for k in ("app_id", "name", "pid", "uid") if isinstance(item, dict) and k in item}
    return {**keep, "error": f"its description of {size} bytes does not fit in one reply"}


def _cut(key: str, items: list[dict]) -> dict:
    """{key: items (one per app) cut to what fits in one reply} and `more`: how many were
    left out (what the request did, it did on every app)."""
    kept, more = fit(items, REPLY_BUDGET, _too_big)
    reply: dict[str, Any] = {key: kept}
    if more:
        reply["more"] = more
    return reply


def _page(key: str, items: list[dict]) -> dict:
    """_cut, and when some items did not fit, `next_after`: the app_id to ask again from."""
    reply = _cut(key, items)
    if "more" in reply:
        reply["next_after"] = reply[key][-1]["app_id"]
    return reply


class ControlConnection:
    def __init__(self, daemon: "Daemon", sock: socket.socket) -> None:
        self.daemon = daemon
        self.sock = sock
        self.pid, self.uid, self.gid = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
        self.session: "AppSession | None" = None

    def log_fields(self, **more: Any) -> dict[str, Any]:
        """`extra=` fields for log lines about this control client (shown by the JSON log format)."""
        fields: dict[str, Any] = {"pid": self.pid, "uid": self.uid}
        if self.session is not None:
            fields["app_id"] = self.session.app_id
        return {**fields, **more}

    @property
    def is_admin(self) -> bool:
        """Root, or a member of the configured admin group, may change policy."""
        if self.uid == 0:
            return True
        group = self.daemon.config.admin_group
        if group is None:
            return False
        if isinstance(group, int) and self.gid == group:  # a gid needs no entry in the group database
            return True
        try:
            g = grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)
        except KeyError:
            return False
        if self.gid == g.gr_gid:
            return True
        try:
            import pwd

            return pwd.getpwuid(self.uid).pw_name in g.gr_mem
        except KeyError:
            return False

    def _over_connection_limit(self) -> str | None:
        """Count this connection for its uid; the error text if that passes
        limits.control_connections_per_uid or, over every uid, limits.control_connections
        (root and admins are counted, not refused: an operator can always get in)."""
        counts = self.daemon.control_connections
        counts[self.uid] = n = counts.get(self.uid, 0) + 1
        limits = self.daemon.config.limits
        limit, total_limit = limits["control_connections_per_uid"], limits["control_connections"]
        total = sum(counts.values())
        if n <= limit and total <= total_limit or self.is_admin:
            return None
        if n > limit:
            return str(limit_exceeded("control connections", "control_connections_per_uid", n - 1, limit, self.uid))
        return str(limit_exceeded("control connections", "control_connections", total - 1, total_limit, whose=ALL_UIDS))

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        frames = cp.FrameBuffer()
        budget, held = self.daemon.control_budget, 0  # bytes of an unfinished message this connection holds
        try:
            refused = self._over_connection_limit()
            if refused is not None:
                log.warning("control client pid %d refused: %s", self.pid, refused, extra=self.log_fields())
                await self._send({"id": None, "ok": False, "error": refused, "code": 8})
                await self._linger()
                return
            while True:
                data = await loop.sock_recv(self.sock, 1 << 16)
                if not data:
                    return
                try:
                    messages, broken = frames.feed(data), frames.error
                except cp.ControlError as exc:
                    messages, broken = [], exc
                within = budget.update(self.uid, held, frames.buffered)
                held = frames.buffered
                for msg in messages:  # the good requests before a broken frame are answered first
                    await self._dispatch(msg)
                if broken is not None:
                    log.warning("control client pid %d sent a broken frame: %s", self.pid, broken, extra=self.log_fields())
                    await self._send({"id": None, "ok": False, "error": str(broken), "code": 3})
                    return
                if not within:
                    text = (f"uid {self.uid} has more than {budget.limit} bytes of unfinished control messages "
                            "in mrpcd; closing this connection")
                    log.warning("control client pid %d: %s", self.pid, text, extra=self.log_fields())
                    await self._send({"id": None, "ok": False, "error": text, "code": 8})
                    return
        except (ConnectionError, OSError):
            return
        finally:
            budget.update(self.uid, held, 0)
            counts = self.daemon.control_connections
            counts[self.uid] -= 1
            if not counts[self.uid]:
                del counts[self.uid]
            if self.session is not None:
                self.daemon.drop_session(self.session, "control connection closed")
                self.session = None
            self.sock.close()

    async def _linger(self) -> None:
        """After a refusal sent unasked: read (and drop) what the client sends for a moment
        before closing. Closed at once, the client's first request (sent as it connected)
        met a closed socket and it saw 'Broken pipe' instead of the reason it was refused."""
        loop = asyncio.get_running_loop()
        try:
            self.sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(_LINGER):
                while await loop.sock_recv(self.sock, 1 << 16):
                    pass
        except (OSError, TimeoutError):
            pass

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        op, rid = msg.get("op"), msg.get("id")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            await self._send({"id": rid, "ok": False, "error": f"unknown control op {op!r}", "code": 12})
            return
        fds: list[int] = []
        try:
            reply = await handler(msg, fds)
        except HandshakeError as exc:
            await self._send({"id": rid, "ok": False, "error": str(exc), "code": 9})
            return
        except (PolicyOpError, TransportUpgradeError) as exc:
            await self._send({"id": rid, "ok": False, "error": str(exc), "code": 9})
            return
        except (ValueError, SchemaError, cp.ControlError) as exc:
            await self._send({"id": rid, "ok": False, "error": str(exc), "code": getattr(exc, "code", 3)})
            return
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            text = str(exc) or type(exc).__name__
            await self._send({"id": rid, "ok": False, "error": text, "code": 14})
            return
        except (Exception, SystemExit) as exc:  # a daemon bug (or a policy's sys.exit()) must not take the daemon down
            log.exception("control op %s failed", op, extra=self.log_fields(op=op))
            await self._send({"id": rid, "ok": False, "error": f"internal error: {exc}", "code": 13})
            return
        reply.setdefault("ok", True)
        reply["id"] = rid
        await self._send(reply, fds)

    async def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send one reply without blocking the event loop.

        Why awaited: a client that stops reading its replies fills the socket buffer; a
        blocking send would then stall the whole daemon (every app's datapath). Awaiting
        room stalls only this connection, which also stops reading its further requests.
        """
        if message.get("ok") is False:  # its text may quote what the request held: make it fit
            message = bounded_error(message)
        try:
            try:
                data = cp.encode(message)
            except TypeError:  # a policy's describe() holding a set or an object: shown as plain values
                data = cp.encode(message, default=plain)
        except (TypeError, ValueError, OverflowError, cp.ControlError) as exc:
            # e.g. a policy's describe() holding a set: say so, keep the connection
            log.error("control reply to pid %d cannot be encoded: %s", self.pid, exc, extra=self.log_fields())
            data, fds = cp.encode(bounded_error({"id": message.get("id"), "ok": False, "code": 13,
                                                 "error": f"internal error: the reply cannot be encoded: {exc}"})), None
        loop = asyncio.get_running_loop()
        try:
            if fds:
                data = data[await self._send_fds(data, fds):]
            if data:
                await loop.sock_sendall(self.sock, data)
        except OSError as exc:
            log.info("control client pid %d went away: %s", self.pid, exc, extra=self.log_fields())

    async def _send_fds(self, data: bytes, fds: list[int]) -> int:
        """sendmsg with SCM_RIGHTS, waiting for room; returns the bytes sent (fds go with the first)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return socket.send_fds(self.sock, [data], fds)
            except BlockingIOError:
                ready = loop.create_future()
                fd = self.sock.fileno()

                def writable() -> None:
                    if not ready.done():
                        ready.set_result(None)

                loop.add_writer(fd, writable)
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)

    def _need_session(self) -> "AppSession":
        if self.session is None:
            raise cp.ControlError("say hello first: this connection is not an app", 9)
        if self.session.closed:  # requests read before the hang-up: a closed session serves nothing
            raise cp.ControlError(f"mrpcd dropped this app: {self.session.drop_reason}", 14)
        return self.session

    def _hang_up(self) -> None:
        """The daemon dropped this app (not its connection closing): shut the socket down, so
        `serve` sees the end and the app's library, watching for the close, fails its calls
        instead of waiting on rings nobody reads any more."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already gone
            pass

    def _need_admin(self) -> None:
        if not self.is_admin:
            group = self.daemon.config.admin_group
            which = (f"admin group {group!r}" if group is not None
                     else "admin group (none is configured: set admin_group in the daemon's config to allow one)")
            raise cp.ControlError(f"permission denied: uid {self.uid} is neither root nor in the {which}", 7)

    # -- app ops ------------------------------------------------------------------------
    async def op_hello(self, msg: dict, fds: list[int]) -> dict:
        if self.session is not None:
            raise cp.ControlError("this connection already said hello", 9)
        name = msg.get("name") or f"pid{self.pid}"
        if not isinstance(name, str) or len(name) > 128:
            raise ValueError("app name must be a string of at most 128 characters")
        self.daemon.refuse_if_draining("new apps")
        limits = self.daemon.config.limits
        live = [s for s in self.daemon.sessions.values() if not s.closed]
        apps = sum(1 for s in live if s.uid == self.uid)
        exempt = self.is_admin
        if apps >= limits["apps_per_uid"] and not exempt:
            raise limit_exceeded("apps connected", "apps_per_uid", apps, limits["apps_per_uid"], self.uid)
        if len(live) >= limits["apps"] and not exempt:  # many uids must not multiply apps_per_uid
            raise limit_exceeded("apps connected", "apps", len(live), limits["apps"], whose=ALL_UIDS)
        self.session = self.daemon.new_session(name, self.pid, self.uid, self.gid)
        self.session.limits_exempt = exempt
        self.session.hang_up = self._hang_up
        # the config's policies for this name, before the app has rings to send on
        attach_declared(self.session, self.daemon.config.policies)
        fds.extend(self.session.handoff_fds())
        return {"app_id": self.session.app_id, "ring_size": self.daemon.config.ring_size, "shm_size": self.session.shm_size,
                "max_record": self.daemon.config.max_record}

    async def op_schema(self, msg: dict, fds: list[int]) -> dict:
        session = self._need_session()
        reply = {"fingerprints": session.register_schema(msg.get("schema"))}
        if session.declared_waiting:  # a declared policy that named this schema's methods can attach now
            attach_declared(session, self.daemon.config.policies)
        return reply

    async def op_bind(self, msg: dict, fds: list[int]) -> dict:
        services = msg.get("services")
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise ValueError("bind needs a list of service names")
        self.daemon.refuse_if_draining("new listening addresses")
        session = self._need_session()
        check_ready(session)  # no call may come in before the config's policies are on
        return {"address": await session.bind(address_text(msg.get("address")), services)}

    async def op_connect(self, msg: dict, fds: list[int]) -> dict:
        self.daemon.refuse_if_draining("new peer connections")
        session = self._need_session()
        check_ready(session)  # no call may go out before the config's policies are on
        return {"handle": await session.connect(address_text(msg.get("target")))}

    async def op_close(self, msg: dict, fds: list[int]) -> dict:
        handle = msg.get("handle")
        if not isinstance(handle, int):
            raise ValueError("close needs an integer handle")
        self._need_session().close_handle(handle)
        return {}

    # -- operator ops ---------------------------------------------------------------------
    async def op_ping(self, msg: dict, fds: list[int]) -> dict:
        d = self.daemon
        return {"pid": os.getpid(), "version": d.version, "uptime": d.uptime(), "draining": d.draining, "in_flight": d.in_flight()}

    async def op_apps(self, msg: dict, fds: list[int]) -> dict:
        after = _after(msg)
        return _page("apps", [s.describe() for s in self.daemon.sessions.values() if s.app_id > after])

    async def op_stats(self, msg: dict, fds: list[int]) -> dict:
        from .metrics import stats_snapshot  # the same numbers as the Prometheus endpoint

        return stats_snapshot(self.daemon)

    # -- policies -------------------------------------------------------------------------
    def _select_apps(self, selector: Any, required: bool = True) -> list["AppSession"]:
        """An app by id (int or digits) or by name (every app of that name)."""
        sessions = list(self.daemon.sessions.values())
        if selector is None or selector == "":
            if required:
                raise ValueError("name the app: its app_id or its name (see `mrpcctl apps`)")
            return sessions
        if isinstance(selector, bool):  # JSON true is not app 1
            raise ValueError("app must be an app_id or a name")
        if isinstance(selector, int) or (isinstance(selector, str) and selector.isascii() and selector.isdigit()):
            # compared as text: int() of thousands of digits raises a ValueError about Python's limits
            found = [s for s in sessions if str(s.app_id) == str(selector).lstrip("0")]
        elif isinstance(selector, str):
            found = [s for s in sessions if s.name == selector]
        else:
            raise ValueError("app must be an app_id or a name")
        if not found:
            raise cp.ControlError(f"no connected app {selector!r} (see `mrpcctl apps`)", 5)
        return found

    @staticmethod
    def _config_arg(msg: dict) -> dict | None:
        config = msg.get("config")
        if config is not None and not isinstance(config, dict):
            raise ValueError("policy config must be a mapping")
        return config

    async def op_policies(self, msg: dict, fds: list[int]) -> dict:
        apps, after = self._select_apps(msg.get("app"), required=False), _after(msg)
        reply = _page("apps", [{"app_id": s.app_id, "name": s.name, "policies": s.policies.describe(),
                                "waiting": describe_waiting(s)} for s in apps if s.app_id > after])
        refused = getattr(self.daemon, "declared_error", None)
        if refused:  # the last reload's policies could not be applied (nothing of them was)
            reply["config_policies_refused"] = refused
        return reply

    async def op_policy_attach(self, msg: dict, fds: list[int]) -> dict:
        self._need_admin()
        config, name, position = self._config_arg(msg), msg.get("name"), msg.get("position")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("policy instance name must be a non-empty string")
        if position is not None and type(position) is not int:
            raise ValueError("position must be an integer")
        out, done = [], []
        try:
            for s in self._select_apps(msg.get("app")):
                policy = s.policies.attach(msg.get("policy"), config, name, position)
                done.append((s, policy))
        except Exception:
            # all or nothing over the apps of one name: take back what this request attached
            # (no record has reached it yet: nothing awaited in between)
            for s, policy in done:
                s.policies.detach(policy.instance_name)  # type: ignore[attr-defined]
            raise
        for s, policy in done:
            out.append({"app_id": s.app_id, "app_name": s.name, **describe_engine(policy)})
        return _cut("attached", out)

    async def op_policy_detach(self, msg: dict, fds: list[int]) -> dict:
        self._need_admin()
        out = []
        for s in self._apps_with_policy(msg):
            out.append({"app_id": s.app_id, "app_name": s.name, **s.policies.detach(msg["name"])})
        return _cut("detached", out)

    async def op_policy_config(self, msg: dict, fds: list[int]) -> dict:
        self._need_admin()
        config = self._config_arg(msg)
        if config is None:
            raise ValueError("policy config needs a config mapping")
        apps = self._apps_with_policy(msg)
        for s in apps:  # validated on every app first: a config one of them refuses changes none
            s.policies.check_config(msg["name"], config)
        done, failed = [], []
        for s in apps:  # then applied on every app, and only then described
            try:
                done.append((s, s.policies.reconfigure(msg["name"], config)))
            except PolicyOpError as exc:  # it passed check_config, then refused: a policy's bug
                failed.append(f"app {s.app_id}: {exc}")
        if failed:
            applied = ", ".join(str(s.app_id) for s, _ in done) or "none"
            raise PolicyOpError(f"config of {msg['name']!r} applied on apps {applied}; refused on {'; '.join(failed)}")
        return _cut("configured", [{"app_id": s.app_id, "app_name": s.name, **describe_engine(p)} for s, p in done])

    async def op_policy_upgrade(self, msg: dict, fds: list[int]) -> dict:
        self._need_admin()
        module, config = msg.get("module"), self._config_arg(msg)
        prepared = []
        apps = self._apps_with_policy(msg)
        cls = load_upgrade(module)  # once for all the apps: one copy of the new module
        try:  # every app's new version is built before any is swapped in: all or nothing
            for s in apps:
                prepared.append((s, *s.policies.prepare_upgrade(msg["name"], module, config, cls)))
        except BaseException:
            for _, _, new in prepared:
                new.close(handed_over=True)
            raise
        committed = []
        try:  # every app's swap first, and only then the replies
            for s, old, new in prepared:
                committed.append((s, s.policies.commit_upgrade(old, new)))
        finally:
            for _, _, new in prepared[len(committed):]:  # never swapped in: let go of them
                new.close(handed_over=True)
        return _cut("upgraded", [{"app_id": s.app_id, "app_name": s.name, **describe_engine(new)} for s, new in committed])

    def _apps_with_policy(self, msg: dict) -> list["AppSession"]:
        name = msg.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("name the policy instance (see `mrpcctl policy list`)")
        apps = self._select_apps(msg.get("app"), required=False)
        if msg.get("app") in (None, ""):
            apps = [s for s in apps if any(getattr(e, "instance_name", None) == name for e in s.datapath.engines)]
            if not apps:
                raise cp.ControlError(f"no app has a policy named {name!r}", 5)
        for s in apps:  # every app named must have it, before any of them is changed
            s.policies.find(name)
        return apps

    async def op_transport_upgrade(self, msg: dict, fds: list[int]) -> dict:
        self._need_admin()
        reply = self.daemon.upgrade_transport(msg.get("module"))
        reply["failed"], more = fit(reply["failed"], REPLY_BUDGET // 2)  # one line per connection
        if more:
            reply["failed_more"] = more
        return reply

    async def op_shutdown(self, msg: dict, fds: list[int]) -> dict:
        self._need_admin()
        asyncio.get_running_loop().call_soon(self.daemon.request_stop)
        return {}


_PROBE_TIMEOUT = 2.0  # seconds the start-up probe of an existing socket may take
_LOCK_WAIT = 10.0  # seconds to wait for another mrpcd starting on the same path


def _check_private_dir(directory: str) -> None:
    """The per-user default folder lives in /tmp, where anyone may have made it first: use
    it only if it is a real folder of this user that nobody else may write to."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise RuntimeError(f"cannot use {directory} for the control socket: {exc.strerror}") from None
    uid = os.getuid()
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"{directory} is not a folder (a symbolic link?): refusing to put the control socket there; "
                           "remove it or set control_socket / MRPCD_SOCKET")
    if st.st_uid != uid or st.st_mode & 0o022:
        raise RuntimeError(f"{directory} belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}: refusing to put "
                           f"the control socket there (it must be uid {uid}'s and writable by nobody else); remove it or set "
                           "control_socket / MRPCD_SOCKET")


def _prepare_dir(path: str) -> None:
    from ..paths import shared_tmp_runtime_dir

    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot create the control socket's folder {directory}: {exc.strerror or exc}") from None
    if os.path.abspath(directory) == shared_tmp_runtime_dir():
        _check_private_dir(directory)


async def _lock_startup(path: str) -> int:
    """flock `<path>.lock`: two daemons starting on one path do probe, unlink and bind one
    after the other, so neither can delete the socket the other just bound."""
    lock_path = path + ".lock"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _LOCK_WAIT
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RuntimeError(f"cannot create {lock_path} (the start-up lock of control socket {path}): {exc.strerror or exc} "
                               f"(can uid {os.getuid()} write to {os.path.dirname(lock_path) or '.'}?)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if loop.time() >= deadline:
                raise RuntimeError(f"another mrpcd has been starting on {path} for {_LOCK_WAIT:.0f}s (it holds {lock_path})") from None
            await asyncio.sleep(0.02)
            continue
        except OSError as exc:
            os.close(fd)
            raise RuntimeError(f"cannot lock {lock_path}: {exc.strerror or exc}") from None
        try:  # the holder before us removes the file as it lets go: ours must still be the one at the path
            same = os.path.samestat(os.fstat(fd), os.lstat(lock_path))
        except OSError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock_startup(path: str, fd: int) -> None:
    try:
        os.unlink(path + ".lock")  # ours while we hold it (see _lock_startup)
    except OSError:
        pass
    os.close(fd)


def _remove_if_stale(path: str) -> None:
    """Unlink the socket at `path` only when nobody listens on it; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        state = "" if os.path.exists(path) else " (dangling)"
        raise RuntimeError(f"{path} is a symbolic link to {target}{state}; mrpcd neither listens through nor replaces it: "
                           "remove it or choose another control_socket")
    if not stat.S_ISSOCK(st.st_mode):  # never delete what is not ours to replace
        raise RuntimeError(f"{path} exists and is not a socket; remove it or choose another control_socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: a daemon that died without cleaning up
        log.info("removing stale control socket %s (nobody listens on it)", path)
        os.unlink(path)
    except FileNotFoundError:  # gone meanwhile
        pass
    except (BlockingIOError, TimeoutError):  # a full listen backlog: somebody listens
        raise RuntimeError(f"another mrpcd is already serving {path} (it does not accept connections right now)") from None
    except OSError as exc:  # e.g. EACCES: a live daemon's socket we may not connect to; not ours to delete
        raise RuntimeError(f"cannot tell whether another mrpcd serves {path}: connecting to it failed: {exc.strerror or exc}; "
                           "it is left in place: stop the daemon that owns it, or remove it if it is stale") from None
    else:
        raise RuntimeError(f"another mrpcd is already serving {path} (for a second daemon on this host, give it its own "
                           "socket: --socket PATH or control_socket in its config, and MRPCD_SOCKET=PATH to its apps and mrpcctl)")
    finally:
        probe.close()


def unlink_if_ours(path: str, ident: tuple[int, int] | None) -> None:
    """Remove the control socket at shutdown, unless it is no longer the one this daemon bound
    (someone removed ours and another daemon listens there now)."""
    if ident is None:
        return
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
        else:
            log.info("control socket %s is not the one this daemon bound any more; left in place", path)
    except OSError:
        pass


async def serve_control(daemon: "Daemon", path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Listen on `path`; refuses to steal the socket of a daemon that is still alive.

    Returns the listening socket and the (st_dev, st_ino) of the socket file it made."""
    _prepare_dir(path)
    lock = await _lock_startup(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ident = None
    try:
        _remove_if_stale(path)
        sock.bind(path)
        st = os.lstat(path)
        ident = (st.st_dev, st.st_ino)
        os.chmod(path, 0o666)  # any local user may be an app; admin ops check SO_PEERCRED
        sock.listen(128)
    except BaseException as exc:
        sock.close()
        unlink_if_ours(path, ident)
        if isinstance(exc, OSError):
            raise RuntimeError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        raise
    finally:
        _unlock_startup(path, lock)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def accept_loop() -> None:
        warned = False
        while True:
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno not in _ACCEPT_TRANSIENT or sock.fileno() < 0:
                    return  # the listening socket was closed (shutdown)
                # Out of descriptors or memory: the connection waits in the backlog; try
                # again once clients leave instead of never accepting anyone again.
                if not warned:
                    log.warning("control socket: cannot accept a client: %s; retrying", exc.strerror or exc)
                    warned = True
                await asyncio.sleep(_ACCEPT_RETRY)
                continue
            warned = False
            client.setblocking(False)
            conn = ControlConnection(daemon, client)
            daemon.spawn(conn.serve())

    daemon.spawn(accept_loop())
    return sock, ident

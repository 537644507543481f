"""Shared fixtures: real daemons and apps as processes on loopback, always cleaned up."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import importlib.util
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI has 2 cores and the suite runs daemons beside the property tests: wall-clock deadlines
# and "too slow" health checks would fail on load, not on a bug. Example counts stay as set.
settings.register_profile("mrpcd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mrpcd")

ROOT = Path(__file__).resolve().parent.parent
PROTOS = Path(__file__).resolve().parent / "protos"


def load_generated(path: Path, prefix: str):
    """Import a generated module under a private name `prefix + stem` (other tests import
    their own module of the same file name), and leave sys.modules as it was."""
    name = f"{prefix}{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    return mod

@contextlib.asynccontextmanager
async def aio_pair(a, b, pb, servicer, options=None, name: str = "aio", server_interceptors=(), client_interceptors=(), **server_kw):
    """An asyncio server of `servicer` (tests/protos/streaming.proto's Streamer) behind daemon
    `b` and a channel to it from an app behind daemon `a`: (server, channel, client app,
    server app); all closed on exit. `server_kw` go to mrpcd.aio.server."""
    import mrpcd.aio

    srv_app = mrpcd.aio.connect(b.socket, name=f"{name}-server")
    cli_app = mrpcd.aio.connect(a.socket, name=f"{name}-client")
    try:
        server = mrpcd.aio.server(app=srv_app, options=options, interceptors=list(server_interceptors), **server_kw)
        pb.add_StreamerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=cli_app, interceptors=list(client_interceptors))
        try:
            yield server, channel, cli_app, srv_app
        finally:
            await channel.close()
            await server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()


@pytest.fixture
def fake_handlers(monkeypatch):
    """Record what generated add_XServicer_to_server functions ask of the mrpcd runtime:
    [(service, handlers, schema)], each handler (kind, behavior, request, response type)."""
    import mrpcd

    made = []
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        def handler(behavior, request_type, response_type, _kind=kind):
            return (_kind, behavior, request_type, response_type)
        monkeypatch.setattr(mrpcd, f"{kind}_rpc_method_handler", handler, raising=False)

    def generic(service, handlers, schema=None):
        made.append((service, handlers, schema))
        return ("generic", service)

    monkeypatch.setattr(mrpcd, "method_handlers_generic_handler", generic, raising=False)
    return made


def wait_until(pred, timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Poll pred() until it is true or `timeout` seconds pass (then one last try): what the
    tests use for everything that settles asynchronously (fds closing, calls draining)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


class DaemonProc:
    """One mrpcd process with its own control socket, in the foreground, logging to a file."""

    def __init__(self, tmp: Path, name: str, config: str | None = None) -> None:
        self.socket = str(tmp / f"{name}.sock")
        self.log_path = tmp / f"{name}.log"
        args = [sys.executable, "-m", "mrpcd.daemon.main", "--socket", self.socket, "--log-level", "debug"]
        if config is not None:
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(config)
            args += ["--config", str(cfg)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mrpcd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.socket)
                    break
            except OSError:
                time.sleep(0.02)
        else:
            self.stop()
            raise RuntimeError(f"mrpcd did not start:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def env(self) -> dict[str, str]:
        return {**os.environ, "MRPCD_SOCKET": self.socket}

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def daemon_factory(tmp_path):
    made: list[DaemonProc] = []

    def make(name: str = "d", config: str | None = None) -> DaemonProc:
        d = DaemonProc(tmp_path, f"{name}{len(made)}", config)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


@pytest.fixture(scope="module")
def streamer(tmp_path_factory):
    """Two daemons and the stubs of tests/protos/streaming.proto (all four call kinds), per
    test module: (daemon a, daemon b, streaming_mrpc). Apps run in the test process."""
    gen = tmp_path_factory.mktemp("streamer_gen")
    subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(PROTOS / "streaming.proto"), "-I", str(PROTOS), "-o", str(gen)], check=True)
    sys.path.insert(0, str(gen))
    tmp = tmp_path_factory.mktemp("streamer")
    daemons = []
    try:
        daemons.append(DaemonProc(tmp, "a"))
        daemons.append(DaemonProc(tmp, "b"))
        import streaming_mrpc

        yield daemons[0], daemons[1], streaming_mrpc
    finally:
        for d in daemons:
            d.stop()
        sys.path.remove(str(gen))


@pytest.fixture
def two_daemons(daemon_factory):
    return daemon_factory("a"), daemon_factory("b")


@pytest.fixture(scope="session")
def gen_dir(tmp_path_factory):
    """Stubs generated once per run from tests/protos and examples/hello, importable."""
    out = tmp_path_factory.mktemp("gen")
    proto = ROOT / "examples" / "hello" / "hello.proto"
    subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(proto), "-I", str(proto.parent), "-o", str(out)], check=True)
    sys.path.insert(0, str(out))
    yield out
    sys.path.remove(str(out))


@pytest.fixture(scope="session")
def mismatch_gen_dir(tmp_path_factory):
    """Stubs of tests/mismatch/hello.proto: same service name, incompatible request type."""
    out = tmp_path_factory.mktemp("gen_mismatch")
    proto = Path(__file__).resolve().parent / "mismatch" / "hello.proto"
    subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(proto), "-I", str(proto.parent), "-o", str(out)], check=True)
    return out


class AppProc:
    """A helper app (tests/apps/*.py) run as its own process against one daemon."""

    def __init__(self, script: str, daemon: DaemonProc, *args: str, gen: Path | None = None) -> None:
        env = daemon.env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gen) if gen else "", str(ROOT / "tests" / "apps"), env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "apps" / script), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def readline(self, timeout: float = 20) -> str:
        """The next stdout line (servers print their address when ready)."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no output from app in {timeout}s; stderr: {self.stderr_now()}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"app exited ({self.proc.wait()}): {self.proc.stderr.read()}")
        return line.strip()

    def stderr_now(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def app_factory():
    made: list[AppProc] = []

    def make(script: str, daemon: DaemonProc, *args: str, gen: Path | None = None) -> AppProc:
        a = AppProc(script, daemon, *args, gen=gen)
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()
        for f in (a.proc.stdout, a.proc.stderr):
            if f:
                f.close()


@pytest.fixture
def served_policy_env(two_daemons, app_factory, gen_dir):
    """Daemon A for client apps, the greeter behind daemon B; yields (A, address)."""
    a, b = two_daemons
    server = app_factory("hello_server.py", b, gen=gen_dir)
    return a, server.readline()


OTHER_UID = 65534  # "nobody": a local user who is neither root nor in the admin group


def as_other_user(argv: list[str]) -> list[str]:
    """argv run as OTHER_UID with no supplementary groups (setpriv)."""
    return ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups", *argv]


@contextlib.contextmanager
def other_user_daemon(name: str, config: str | None = None):
    """A daemon whose socket (and config file) another local user can reach: its folder
    0755, not pytest's 0700.

    Skips with the reason where that cannot be shown: not root, no setpriv, or a checkout
    that other users cannot read (then they cannot run this Python and mrpcd at all).
    """
    import shutil
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    probe = subprocess.run(as_other_user([sys.executable, "-c", "import mrpcd.ctl"]), capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"uid {OTHER_UID} cannot run this Python/mrpcd (checkout not readable by other users): {probe.stderr.strip()[-200:]}")
    home = Path(tempfile.mkdtemp(prefix=f"mrpcd-{name}-"))
    home.chmod(0o755)
    d = DaemonProc(home, name, config)
    try:
        if config is not None:
            (home / f"{name}.yaml").chmod(0o644)
        yield d
    finally:
        d.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def shared_daemon():
    """A daemon another local user can reach (other_user_daemon)."""
    with other_user_daemon("shared") as d:
        yield d

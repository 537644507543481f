"""The gRPC interop cases (grpc/doc/interop-test-descriptions.md), ported, through two daemons.

A TestService server app (sync or asyncio) sits behind daemon B; a client app (sync or
asyncio) behind daemon A runs every case (tests/apps/interop_client.py, assertions as in
grpc's interop methods.py) and reports each as a JSON line. One client process per
(client, server) pair keeps the whole run to a few seconds; each case is its own test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AppProc, DaemonProc

HERE = Path(__file__).resolve().parent
CASES = [
    "empty_unary", "large_unary", "client_streaming", "server_streaming", "ping_pong", "empty_stream",
    "cancel_after_begin", "cancel_after_first_response", "timeout_on_sleeping_server", "custom_metadata",
    "status_code_and_message", "special_status_message", "unimplemented_method", "unimplemented_service",
]
MODES = [("sync", "sync"), ("sync", "async"), ("async", "sync"), ("async", "async")]


@pytest.fixture(scope="module")
def interop_gen(tmp_path_factory):
    out = tmp_path_factory.mktemp("interop_gen")
    protos = HERE / "protos"
    subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(protos / "test.proto"), "-I", str(protos), "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def interop_env(tmp_path_factory, interop_gen):
    """Daemons A and B, and a sync and an asyncio TestService server behind B."""
    tmp = tmp_path_factory.mktemp("interop")
    daemons = [DaemonProc(tmp, "a"), DaemonProc(tmp, "b")]
    apps: list[AppProc] = []
    try:
        servers = {}
        for mode in ("sync", "async"):
            srv = AppProc("interop_server.py", daemons[1], *(["--async"] if mode == "async" else []), gen=interop_gen)
            apps.append(srv)
            servers[mode] = srv.readline()
        yield daemons, servers, apps
    finally:
        for a in apps:
            a.stop()
        for d in daemons:
            d.stop()


_results: dict[tuple[str, str], dict[str, dict]] = {}


def _run(interop_env, interop_gen, client: str, server: str) -> dict[str, dict]:
    key = (client, server)
    if key not in _results:
        daemons, servers, apps = interop_env
        app = AppProc("interop_client.py", daemons[0], "--target", servers[server], *(["--async"] if client == "async" else []), gen=interop_gen)
        apps.append(app)
        rc, out, err = app.wait(60)
        results = {}
        for line in out.splitlines():
            if line.startswith("{"):
                item = json.loads(line)
                results[item["case"]] = item
        assert results, f"interop client printed nothing (rc {rc}): {err}"
        _results[key] = results
    return _results[key]


@pytest.mark.parametrize("client,server", MODES, ids=[f"{c}-client-{s}-server" for c, s in MODES])
@pytest.mark.parametrize("case", CASES)
def test_interop(interop_env, interop_gen, case, client, server):
    results = _run(interop_env, interop_gen, client, server)
    assert case in results, f"case {case} did not run; got {sorted(results)}"
    assert results[case]["ok"], results[case]["error"]
    assert results[case]["seconds"] < 10

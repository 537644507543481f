"""A buggy or hostile app against a real daemon: it must get a clear error or be dropped,
and the daemon must stay bounded and keep serving the other apps."""
from __future__ import annotations

import mmap
import struct

import pytest

import mrpcd
from conftest import wait_until
from mrpcd.status import RpcError


def _corrupt_tx_head(app: mrpcd.App) -> None:
    """Write a misaligned head into the app's tx ring (offset 0 of its memfd) and wake the daemon."""
    with mmap.mmap(app.rings.fd, app.rings.size) as m:
        struct.pack_into("<Q", m, 0, 3)
    app.daemon_waker.signal()


def test_an_app_dropped_for_its_ring_is_told_and_leaves_nothing_behind(daemon_factory):
    """The daemon dropped an app that broke its ring but kept its control connection open:
    the app never learned (its calls waited for rings nobody read), and a `bind` it sent
    afterwards made a listening socket on the dead session that nothing ever closed."""
    d = daemon_factory()
    before = d.fd_count()
    bad = mrpcd.connect(d.socket, name="corrupter")
    try:
        _corrupt_tx_head(bad)
        assert wait_until(lambda: bad.closed, timeout=10), "the dropped app was not told"
        assert "corrupted its ring" in d.log()
        with pytest.raises(RpcError):
            bad.call("bind", address="127.0.0.1:0", services=[])
        assert wait_until(lambda: d.fd_count() <= before, timeout=10), (before, d.fd_count())
        good = mrpcd.connect(d.socket, name="bystander")
        try:
            assert good.call("ping")["pid"] == d.pid
        finally:
            good.close()
    finally:
        bad.close()
    assert d.alive()


def test_an_app_cannot_register_schemas_without_bound(daemon_factory):
    """Each schema is bounded, but an app could register new ones in a loop: the daemon kept
    them all (and recomputed every fingerprint at each registration). Now an app's schemas
    together are bounded too, with a clear refusal; what it had stays, other apps go on."""
    from mrpcd.daemon.app_limits import MAX_APP_DEFINITIONS

    def schema(k: int, n: int = 4000) -> dict:  # n messages and n services
        return {"messages": [[f"k{k}.p{i}.M", []] for i in range(n)],
                "services": [[f"k{k}.p{i}.S", [["A", f"k{k}.p{i}.M", f"k{k}.p{i}.M", False, False]]] for i in range(n)]}

    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="schemer")
    try:
        registered = 0
        with pytest.raises(RpcError, match="an app may register at most") as refused:
            for k in range(MAX_APP_DEFINITIONS // 8000 + 2):
                app.call("schema", schema=schema(k))
                registered += 1
        assert registered == MAX_APP_DEFINITIONS // 8000
        assert refused.value.code() == mrpcd.StatusCode.INVALID_ARGUMENT
        # the app goes on with what it had; only the new services' fingerprints come back
        reply = app.call("schema", schema=schema(0, 1))
        assert list(reply["fingerprints"]) == ["k0.p0.S"]
        other = mrpcd.connect(d.socket, name="other")
        try:
            assert other.call("schema", schema=schema(0, 10))["fingerprints"]
        finally:
            other.close()
    finally:
        app.close()
    assert d.alive()

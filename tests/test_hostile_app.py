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

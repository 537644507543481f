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


def _apps(d) -> dict[str, dict]:
    """`mrpcctl apps` over the control socket: name -> description."""
    from mrpcd.ctl import Control

    ctl = Control(d.socket)
    try:
        return {a["name"]: a for a in ctl.call("apps")["apps"]}
    finally:
        ctl.sock.close()


def _cpu_seconds(pid: int) -> float:
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_app_that_never_drains_its_rx_ring_cannot_grow_the_daemon_with_refusals(daemon_factory):
    """Pending records for an app's full rx ring were bounded only by pausing its peers'
    sockets; the answers the daemon makes up itself (UNAVAILABLE for a call on a handle that
    is not connected, INTERNAL for a malformed record, a policy's refusal) kept queueing. An
    app that never drained its rx ring and kept sending such calls grew the daemon without
    bound (measured: +46 MB in 10 s at 30,000 calls/s). Now the daemon stops taking the
    app's tx ring while that much waits for it, so the app waits for room instead."""
    import time

    from mrpcd.marshal import records as R

    limit = 1000
    d = daemon_factory(config=f"ring_size: 65536\nmax_pending_records: {limit}\n")
    app = mrpcd.connect(d.socket, name="never-drains")
    try:
        app._rx_lock.acquire()  # its rx thread blocks in its next drain: nothing leaves the rx ring
        call_id, stuck_since, end = 0, None, time.monotonic() + 20
        while time.monotonic() < end:  # until the daemon has stopped taking our records for 1 s
            batch = [R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 999, call_id + i, 1, 0, b"", b"x")
                     for i in range(256)]
            n = app.tx.push_many(batch)
            call_id += n
            if app.tx.should_wake_consumer():
                app.daemon_waker.signal()
            if n:
                stuck_since = None
            elif stuck_since is None:
                stuck_since = time.monotonic()
            elif time.monotonic() - stuck_since > 1.0:
                break
            if call_id > 200_000:
                break
            if not n:
                time.sleep(0.01)
        pending = _apps(d)["never-drains"]["pending"]
        from mrpcd.daemon.session import DRAIN_RECORDS, DRAIN_ROUNDS, TX_HOLD_FACTOR

        assert pending <= TX_HOLD_FACTOR * limit + DRAIN_RECORDS * DRAIN_ROUNDS, (pending, call_id)
        cpu = _cpu_seconds(d.pid)
        time.sleep(1.0)
        assert _cpu_seconds(d.pid) - cpu < 0.3  # waiting, not spinning
        # the app drains again: every refusal arrives, and the daemon takes its records again
        app._rx_lock.release()
        assert wait_until(lambda: _apps(d)["never-drains"]["pending"] == 0 and app.tx.empty(), timeout=30)
    finally:
        if app._rx_lock._is_owned():
            app._rx_lock.release()
        app.close()
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


def test_malformed_records_in_a_flood_are_logged_sparingly(daemon_factory):
    """Every malformed record an app sent was a WARNING line of its own: an app pushing
    garbage in a loop wrote ~19,000 lines in half a second to the daemon's log (the
    journal). They are counted (stats: malformed) and logged at the 1st, 2nd, 4th, ... one."""
    from mrpcd.marshal import records as R

    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="garbage")
    try:
        sent = 0
        gone = R.encode_record(R.GOAWAY, 0, 0, 1, 1, 0, 0, b"", b"")  # a kind an app may not send
        while sent < 5000:
            n = app.tx.push_many([gone] * min(256, 5000 - sent))
            sent += n
            if app.tx.should_wake_consumer():
                app.daemon_waker.signal()
            if not n:
                import time

                time.sleep(0.01)
        assert wait_until(lambda: _apps(d)["garbage"]["stats"]["malformed"] == sent, timeout=20)
        assert 1 <= d.log().count("malformed record rejected") <= 13  # 1, 2, 4, ..., 4096
    finally:
        app.close()
    assert d.alive()


def test_half_sent_control_messages_cannot_pile_up_in_the_daemon(daemon_factory):
    """A control message may be up to 4 MiB, and the daemon keeps what it has of one until
    the rest comes; control connections are only bounded by the daemon's descriptors. A
    local user opening connections that each send all but the end of a 4 MiB message held
    4 MiB of the daemon per connection (measured: +207 MB for 50 connections), without
    end. Now the bytes of unfinished messages one uid may have in the daemon are bounded:
    past that its connection gets a clear error and is closed; other connections go on."""
    import socket
    import time

    from mrpcd.ctl import Control
    from mrpcd.daemon.app_limits import CONTROL_BYTES_PER_UID

    d = daemon_factory()
    frame = (4 << 20) - 16
    part = struct.pack("<I", frame) + b"\x81" + b"\x00" * (frame - 64)
    conns: list[socket.socket] = []
    refused = []
    try:
        for _ in range(CONTROL_BYTES_PER_UID // len(part) + 4):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(d.socket)
            conns.append(s)
            try:
                s.sendall(part)
            except OSError:  # closed under our feet
                refused.append(s)
                continue
        time.sleep(0.5)
        for s in conns:
            s.setblocking(False)
            try:
                reply = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:  # reset: it was closed
                reply = b"closed"
            if reply and s not in refused:
                refused.append(s)
                assert reply == b"closed" or b"unfinished control messages" in reply
        assert 1 <= len(refused) <= 5, len(refused)  # those past the budget, not the others
        ctl = Control(d.socket)
        ctl.sock.settimeout(10)
        with ctl.sock:
            assert ctl.call("ping")["pid"] == d.pid
    finally:
        for s in conns:
            s.close()
    assert d.alive()
    assert "unfinished control messages" in d.log()


def test_an_app_cannot_bind_addresses_without_bound(daemon_factory):
    """Every `bind` of a new address was a listening socket of the daemon's: one app binding
    127.1.x.y:0 in a loop took all of the daemon's descriptors (19,978 binds, measured with a
    limit of 20,000; the next failed), which every other app needs too. An app now has at
    most MAX_APP_LISTENERS addresses; binding one it has again (new services) still works."""
    from mrpcd.daemon.app_limits import MAX_APP_LISTENERS

    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="binder")
    try:
        for i in range(MAX_APP_LISTENERS):
            app.call("bind", address=f"127.1.{i >> 8}.{i & 255}:0", services=[])
        with pytest.raises(RpcError, match="at most") as refused:
            app.call("bind", address="127.2.0.1:0", services=[])
        assert refused.value.code() == mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert app.call("bind", address="127.1.0.0:0", services=[])["address"]
    finally:
        app.close()
    assert d.alive()


def test_a_bind_the_daemon_has_no_descriptor_for_is_a_clear_error(tmp_path):
    """Out of descriptors, the listener came back without a socket and `bind` failed with
    'internal error: list index out of range'."""
    import resource
    import subprocess
    import sys

    path = str(tmp_path / "few.sock")
    log = open(tmp_path / "few.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mrpcd.daemon.main", "--socket", path], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)))
    try:
        import os

        assert wait_until(lambda: os.path.exists(path), timeout=20)
        app = mrpcd.connect(path, name="binder")
        try:
            with pytest.raises(RpcError) as failed:
                for i in range(48):
                    app.call("bind", address=f"127.1.0.{i + 1}:0", services=[])
            assert "list index" not in failed.value.details() and "internal error" not in failed.value.details()
            assert "cannot listen" in failed.value.details()
        finally:
            app.close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_an_error_reply_quoting_a_multi_mb_name_is_bounded(daemon_factory):
    """A schema refused for a multi-MB name quoted that name in its error reply: the reply
    passed the control protocol's 4 MiB frame limit, and the app got 'internal error: the
    reply cannot be encoded' instead of the reason. Every error reply is bounded now: the
    long name is cut with how much was left out, and the daemon serves on."""
    from mrpcd.control_proto import MAX_CONTROL_MESSAGE

    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="big-names")
    other = mrpcd.connect(d.socket, name="bystander")
    try:
        name = "\x01" * 1_200_000  # repr() makes each \x01 four characters: 4.8 MB quoted
        with pytest.raises(RpcError) as refused:
            app.call("schema", schema={"messages": [[name, []]]})
        text = str(refused.value)
        assert refused.value.code() == mrpcd.StatusCode.INVALID_ARGUMENT, text
        assert "invalid message name '\\x01\\x01" in text and "more chars)" in text, text[:300]
        assert len(text.encode()) < 64 << 10
        with pytest.raises(RpcError) as unknown:  # the op's name is echoed too
            app.call("x" * (MAX_CONTROL_MESSAGE - 4096))
        assert "unknown control op 'xxx" in str(unknown.value) and "more chars)" in str(unknown.value)
        assert len(str(unknown.value)) < 64 << 10
        assert app.call("ping")["pid"] == d.pid  # the same connection goes on
        assert other.call("ping")["pid"] == d.pid
    finally:
        other.close()
        app.close()
    assert d.alive()

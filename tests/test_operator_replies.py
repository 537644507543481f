"""Operator replies stay within one control message whatever apps register (reply_limits.py)."""
from __future__ import annotations

import subprocess
import sys

import mrpcd
from conftest import wait_until

LONG = "x" * 150


def _services(k: int, n: int, width: int = 150) -> dict:
    """n services with long names (and no methods) in package k."""
    pad = "x" * width
    return {"services": [[f"k{k}.{pad}{i}.Service", []] for i in range(n)]}


def _ctl(d, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, *argv], capture_output=True, text=True, timeout=60)


def test_apps_with_thousands_of_long_service_names_do_not_break_mrpcctl_apps(daemon_factory):
    """Two apps with ~16,000 long service names each made the `apps` reply 5,143,795 bytes,
    over the control protocol's 4 MiB: `mrpcctl apps` failed, and the operator could list
    no app at all. An app's service list now shows its first names and how many more."""
    from mrpcd.control_proto import MAX_CONTROL_MESSAGE
    from mrpcd.ctl import Control
    from mrpcd.daemon.reply_limits import LIST_SHOWN

    d = daemon_factory(config="ring_size: 65536\n")
    apps = [mrpcd.connect(d.socket, name=f"many{j}") for j in range(2)]
    try:
        for j, app in enumerate(apps):
            for k in range(4):
                app.call("schema", schema=_services(j * 10 + k, 4000))
        ctl = Control(d.socket)
        try:
            listed = ctl.call("apps")["apps"]
        finally:
            ctl.sock.close()
        assert [a["name"] for a in listed] == ["many0", "many1"]
        for a in listed:
            assert len(a["services"]) == LIST_SHOWN and a["services_more"] == 16000 - LIST_SHOWN
        done = _ctl(d, "apps")
        assert done.returncode == 0, done.stderr
        assert f"... and {16000 - LIST_SHOWN} more" in done.stdout and "many1" in done.stdout
        assert len(done.stdout) < MAX_CONTROL_MESSAGE
    finally:
        for app in apps:
            app.close()
    assert d.alive()


def test_more_apps_than_one_reply_holds_are_listed_in_pages(daemon_factory):
    """However small each app's entry, enough apps made any listing too big for one reply.
    `apps` and `policies` now send what fits with `more` and `next_after`; mrpcctl asks
    again from there and lists every app."""
    from mrpcd.ctl import Control

    d = daemon_factory(config="ring_size: 65536\n")
    apps = []
    try:
        for j in range(120):  # 120 apps x 64 names of ~480 bytes: ~3.7 MB, over one reply's budget
            app = mrpcd.connect(d.socket, name=f"app{j}")
            apps.append(app)
            app.call("schema", schema=_services(j, 64, 470))
        ctl = Control(d.socket)
        try:
            first = ctl.call("apps")
            assert first["more"] > 0 and len(first["apps"]) + first["more"] == 120, {k: v for k, v in first.items() if k != "apps"}
            rest = ctl.call("apps", after=first["next_after"])
            assert [a["app_id"] for a in first["apps"] + rest["apps"]] == sorted(a.app_id for a in apps)
            assert ctl.call("policies")["apps"]  # (small entries: one page)
        finally:
            ctl.sock.close()
        done = _ctl(d, "apps")
        assert done.returncode == 0, done.stderr
        names = {line.split()[1] for line in done.stdout.splitlines()[1:]}
        assert names == {f"app{j}" for j in range(120)}
        done = _ctl(d, "--json", "apps")
        assert done.returncode == 0 and '"more"' not in done.stdout and done.stdout.count('"app_id"') == 120
    finally:
        for app in apps:
            app.close()
    assert wait_until(lambda: d.alive())


def test_stats_keep_to_one_reply_and_say_what_they_cut():
    """`stats` lists a row per method called, of every app's schemas (names up to 512
    characters, thousands of methods): it could grow past one control message too. Each
    section now keeps what fits in its share and `truncated` says how many rows it left out."""
    import types

    from mrpcd import control_proto as cp
    from mrpcd.daemon.metrics import stats_snapshot
    from mrpcd.daemon.observe import CallStats

    stats = CallStats()
    for i in range(20000):
        stats.start("server", ("unary", f"pkg.{'s' * 400}{i}", "Method"))
    daemon = types.SimpleNamespace(call_stats=stats, sessions={}, stats=lambda: {"apps_connected": 0}, draining=False,
                                   metrics_server=None)
    snap = stats_snapshot(daemon)  # type: ignore[arg-type]
    assert 0 < len(snap["calls"]["server"]) < 20000
    assert snap["truncated"] == {"calls.server": 20000 - len(snap["calls"]["server"])}
    assert len(cp.encode(snap)) < cp.MAX_CONTROL_MESSAGE
    stats.started.clear()
    assert "truncated" not in stats_snapshot(daemon)  # type: ignore[arg-type]


def test_error_texts_and_ids_are_bounded_and_say_what_they_cut():
    """bounded_error: a long word (a quoted name) keeps its head and how many characters it
    lost, a long text too, short texts and names a schema may hold are kept whole, and an id
    too big to echo is replaced by null with a note; every result packs small."""
    from mrpcd.daemon.reply_limits import ERROR_TEXT, SHOWN_RUN, bounded_error, bounded_text, packed_size

    assert bounded_text("invalid message name 'a.b'") == "invalid message name 'a.b'"
    ok_name = "p." + "n" * 510
    assert bounded_text(f"invalid name {ok_name!r}: x") == f"invalid name {ok_name!r}: x"
    cut = bounded_text("invalid name '" + "z" * 3_000_000 + "': must be a full name")
    assert cut.startswith("invalid name 'zzz") and f"…({3_000_000 + 2 - (SHOWN_RUN - 1)} more chars)" in cut
    assert cut.endswith(" must be a full name")
    spaced = bounded_text("bad " + "a " * 2_000_000)
    assert len(spaced) < ERROR_TEXT + 40 and spaced.endswith(f"…({4 + 4_000_000 - ERROR_TEXT} more chars)")
    reply = bounded_error({"id": "i" * 3_000_000, "ok": False, "error": "nope " + "\u00e9" * 3_000_000, "code": 3})
    assert reply["id"] is None and "the request's id of" in reply["error"] and packed_size(reply) < 64 << 10
    assert bounded_error({"id": 7, "ok": False, "error": "short", "code": 3}) == {"id": 7, "ok": False, "error": "short", "code": 3}

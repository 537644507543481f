"""Daemon-to-daemon mutual TLS and the peer allow-list: transport level and end to end.

Certificates are made per test run with the `openssl` CLI (a throwaway CA, node
certificates naming 127.0.0.1 and ::1); nothing is read from or written to the system.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import uvloop

from mrpcd.ctl import Control
from mrpcd.daemon import config as cfgmod
from mrpcd.marshal import records as R
from mrpcd.transports import tcp
from mrpcd.transports.security import AllowList, parse_peers, parse_tls

from conftest import wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make test certificates")

SERVICES = {"helloworld.Greeter": "f" * 32}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (cert, key)."""
    d.mkdir(parents=True, exist_ok=True)
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return cert, key


def make_node(d: Path, name: str, ca: tuple[Path, Path], sans: str = "IP:127.0.0.1,IP:::1,DNS:localhost") -> tuple[Path, Path]:
    """A node certificate signed by `ca`, naming `sans`: (cert, key)."""
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(csr), cwd=d)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", str(cert), cwd=d)
    return cert, key


def tls_yaml(cert: Path, key: Path, ca: Path, require: bool = True) -> str:
    return f"tls:\n  cert: {cert}\n  key: {key}\n  ca: {ca}\n  require_client_cert: {'true' if require else 'false'}\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "ca")
    other_ca = make_ca(d, "other-ca")
    return {
        "dir": d,
        "ca": ca,
        "other_ca": other_ca,
        "a": make_node(d, "node-a", ca),
        "b": make_node(d, "node-b", ca),
        "rogue": make_node(d, "rogue", other_ca),
        "elsewhere": make_node(d, "elsewhere", ca, "IP:10.255.255.1"),
    }


def tls_for(pki, node: str, ca: str = "ca", require: bool = True):
    cert, key = pki[node]
    return parse_tls({"cert": str(cert), "key": str(key), "ca": str(pki[ca][0]), "require_client_cert": require})


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 30))


class Server:
    """A transport-level server that echoes every record back; counts refusals."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.server = None

    async def start(self, **kw) -> int:
        def on_conn(conn):
            conn.set_handlers(lambda recs: conn.send_batch([r.encode() for r in recs]), lambda exc: None)

        self.server = await tcp.serve("127.0.0.1", 0, lambda: SERVICES, on_conn,
                                      on_handshake_error=lambda peer, exc: self.errors.append(str(exc)), **kw)
        return self.server.sockets[0].getsockname()[1]

    async def wait_error(self, timeout: float = 5.0) -> str:
        end = time.monotonic() + timeout
        while not self.errors and time.monotonic() < end:
            await asyncio.sleep(0.01)
        assert self.errors, "the server reported no refusal"
        return self.errors[0]


async def echo_once(conn) -> R.Record:
    got: asyncio.Future = asyncio.get_running_loop().create_future()
    conn.set_handlers(lambda recs: got.done() or got.set_result(recs[0]), lambda exc: None)
    conn.send(R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 0, 7, 1, 0, b"", b"\x91\xa2hi"))
    return await asyncio.wait_for(got, 5)


# ---------------------------------------------------------------- config parsing


def test_config_validation_errors(tmp_path, pki):
    cert, key = pki["a"]
    with pytest.raises(ValueError, match="tls.cert: .* does not exist"):
        parse_tls({"cert": str(tmp_path / "nope.pem"), "key": str(key), "ca": str(pki["ca"][0])})
    with pytest.raises(ValueError, match="missing tls.ca"):
        parse_tls({"cert": str(cert), "key": str(key)})
    with pytest.raises(ValueError, match="unknown key"):
        parse_tls({"cert": str(cert), "key": str(key), "ca": str(pki["ca"][0]), "verify": 1})
    with pytest.raises(ValueError, match="cannot use cert"):  # key of another certificate
        parse_tls({"cert": str(cert), "key": str(pki["b"][1]), "ca": str(pki["ca"][0])})
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        parse_peers({"allow": ["10.0.0.0/33"]})
    with pytest.raises(ValueError, match="list"):
        parse_peers({"allow": "127.0.0.1"})
    assert parse_peers(None).allow is None


def test_daemon_config_refuses_bad_tls_with_line(tmp_path, pki):
    if "tls" not in cfgmod.VALIDATORS:
        pytest.fail("mrpcd/daemon/config.py has no tls key")
    p = tmp_path / "c.yaml"
    p.write_text(f"log_level: info\ntls:\n  cert: {tmp_path}/missing.pem\n  key: x\n  ca: y\n")
    # the line of the key inside tls: that is wrong (the section's own line before)
    with pytest.raises(cfgmod.ConfigError, match=r"c.yaml:3: tls: .*missing.pem does not exist"):
        cfgmod.load(str(p))
    p.write_text("peers:\n  allow: [\"127.0.0.1/32\", \"nonsense\"]\n")
    with pytest.raises(cfgmod.ConfigError, match=r"c.yaml:2: peers: .*'nonsense' is not an IP address"):
        cfgmod.load(str(p))
    c = cfgmod.load(None)
    assert c.tls is None and c.peers.allow is None


def test_allow_list_matching():
    allow = AllowList(["127.0.0.1/32", "::1", "10.1.0.0/16"])
    assert allow.permits("127.0.0.1") and allow.permits("::1") and allow.permits("10.1.200.3")
    assert allow.permits("::ffff:127.0.0.1")  # IPv4-mapped, as a dual-stack listener reports it
    assert not allow.permits("127.0.0.2") and not allow.permits("10.2.0.1") and not allow.permits("::2")
    assert not allow.permits("localhost")  # names are never matched, only addresses


# ---------------------------------------------------------------- transport level


def test_mutual_tls_round_trip(pki):
    async def main():
        srv = Server()
        port = await srv.start(tls=tls_for(pki, "b"))
        conn = await tcp.connect("127.0.0.1", port, SERVICES, tls=tls_for(pki, "a"))
        rec = await echo_once(conn)
        assert rec.call_id == 7 and rec.payload == b"\x91\xa2hi"
        assert conn.transport.get_extra_info("ssl_object") is not None  # really TLS
        peercert = conn.transport.get_extra_info("peercert")
        assert ("commonName", "node-b") in [x for rdn in peercert["subject"] for x in rdn]
        conn.close()
        srv.server.close()
        assert srv.errors == []

    run(main())


def test_wrong_ca_fails_clearly_on_both_sides(pki, caplog):
    async def main():
        srv = Server()
        port = await srv.start(tls=tls_for(pki, "b"))
        with caplog.at_level(logging.WARNING, "mrpcd.transports.tcp"):
            # the client trusts another CA: it refuses the server's certificate
            with pytest.raises(tcp.HandshakeError, match=r"TLS handshake with mrpcd at 127.0.0.1:\d+ failed: certificate verify failed"):
                await tcp.connect("127.0.0.1", port, SERVICES, tls=tls_for(pki, "rogue", ca="other_ca"), timeout=5)
            err = await srv.wait_error()
            assert "TLS handshake failed" in err
            srv.errors.clear()
            # the client trusts our CA but its own certificate is from another: the server refuses it
            with pytest.raises(tcp.HandshakeError, match=r"TLS handshake with mrpcd at 127.0.0.1:\d+ failed"):
                await tcp.connect("127.0.0.1", port, SERVICES, tls=tls_for(pki, "rogue", ca="ca"), timeout=5)
            err = await srv.wait_error()
            assert "TLS handshake failed: certificate verify failed" in err, err
        assert any("TLS handshake with 127.0.0.1:" in r.getMessage() and "certificate verify failed" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        srv.server.close()

    run(main())


def test_plain_client_against_tls_server_is_refused(pki):
    async def main():
        srv = Server()
        port = await srv.start(tls=tls_for(pki, "b"))
        with pytest.raises(ConnectionError):
            await tcp.connect("127.0.0.1", port, SERVICES, timeout=3)
        assert "TLS handshake failed" in await srv.wait_error()
        srv.server.close()

    run(main())


def test_server_certificate_must_name_the_dialled_address(pki):
    async def main():
        srv = Server()
        port = await srv.start(tls=tls_for(pki, "elsewhere"))  # names 10.255.255.1 only
        with pytest.raises(tcp.HandshakeError, match="certificate verify failed: .*(mismatch|match)"):
            await tcp.connect("127.0.0.1", port, SERVICES, tls=tls_for(pki, "a"), timeout=5)
        srv.server.close()

    run(main())


def test_allow_list_refuses_incoming_with_goaway():
    async def main():
        srv = Server()
        port = await srv.start(allow=AllowList(["10.9.9.0/24"]))
        with pytest.raises(tcp.HandshakeError, match=r"refused the connection: connection refused: address 127.0.0.1 is not in peers.allow"):
            await tcp.connect("127.0.0.1", port, SERVICES, timeout=3)
        assert "not in peers.allow" in await srv.wait_error()
        # allowed peers still get in
        srv2 = Server()
        port2 = await srv2.start(allow=AllowList(["127.0.0.0/8"]))
        conn = await tcp.connect("127.0.0.1", port2, SERVICES)
        assert (await echo_once(conn)).call_id == 7
        conn.close()
        srv.server.close()
        srv2.server.close()

    run(main())


def test_allow_list_refuses_outgoing_before_dialling():
    async def main():
        srv = Server()
        port = await srv.start()
        with pytest.raises(tcp.PeerNotAllowed, match=r"refusing to connect to mrpcd at 127.0.0.1:\d+: 127.0.0.1 is not in peers.allow \(::1/128\)"):
            await tcp.connect("127.0.0.1", port, SERVICES, allow=AllowList(["::1"]))
        await asyncio.sleep(0.1)
        assert srv.errors == []  # nothing reached the server
        conn = await tcp.connect("127.0.0.1", port, SERVICES, allow=AllowList(["127.0.0.1/32"]))
        conn.close()
        srv.server.close()

    run(main())


def test_allow_list_and_tls_together(pki):
    async def main():
        srv = Server()
        port = await srv.start(tls=tls_for(pki, "b"), allow=AllowList(["192.0.2.0/24"]))
        with pytest.raises(tcp.HandshakeError, match="TLS handshake .* failed"):
            await tcp.connect("127.0.0.1", port, SERVICES, tls=tls_for(pki, "a"), timeout=3)
        assert "not in peers.allow" in await srv.wait_error()
        srv.server.close()

    run(main())


# ---------------------------------------------------------------- two daemons, real apps




def test_greeter_over_mutual_tls_between_two_daemons(daemon_factory, app_factory, gen_dir, pki):
    a = daemon_factory("a", tls_yaml(*pki["a"], pki["ca"][0]) + "peers:\n  allow: [\"127.0.0.0/8\", \"::1\"]\n")
    b = daemon_factory("b", tls_yaml(*pki["b"], pki["ca"][0]) + "peers:\n  allow: [\"127.0.0.1/32\"]\n")
    address = app_factory("hello_server.py", b, gen=gen_dir).readline()
    code, out, err = app_factory("hello_client.py", a, address, "unary", "50", gen=gen_dir).wait()
    assert code == 0 and out.strip() == "ok 50", err
    code, out, err = app_factory("hello_client.py", a, address, "stream", "3", gen=gen_dir).wait()
    assert code == 0 and out.strip().endswith("ok stream"), err
    # big payloads: over TLS the daemon copies them instead of sending from the app's ring
    code, out, err = app_factory("hello_client.py", a, address, "bulk", "6", "4", gen=gen_dir).wait(120)
    assert code == 0 and out.strip().endswith("ok bulk 24"), err
    # ... and the receiving daemon reads them from TLS straight into the app's ring
    apps = Control(b.socket).call("stats")["apps"]
    assert sum(s.get("received_in_place", 0) for s in apps.values()) > 0, apps


def test_wrong_ca_between_daemons_fails_clearly_on_both_sides(daemon_factory, app_factory, gen_dir, pki):
    a = daemon_factory("a", tls_yaml(*pki["rogue"], pki["ca"][0]))  # trusts the CA, but its certificate is foreign
    b = daemon_factory("b", tls_yaml(*pki["b"], pki["ca"][0]))
    address = app_factory("hello_server.py", b, gen=gen_dir).readline()
    code, out, err = app_factory("hello_client.py", a, address, "status", "x", gen=gen_dir).wait()
    assert code == 0, err
    status, _, details = out.strip().partition("|")
    assert status == "FAILED_PRECONDITION", out
    assert "TLS handshake with mrpcd at 127.0.0.1:" in details and "refused our certificate" in details, details
    assert wait_until(lambda: "TLS handshake failed: certificate verify failed" in b.log(), 10.0), b.log()[-2000:]
    assert a.alive() and b.alive()


def test_allow_list_between_daemons(daemon_factory, app_factory, gen_dir):
    a = daemon_factory("a", "peers:\n  allow: [\"::1\"]\n")  # may not dial 127.0.0.1
    b = daemon_factory("b", "peers:\n  allow: [\"10.0.0.0/8\"]\n")  # accepts nobody on loopback
    c = daemon_factory("c")
    address = app_factory("hello_server.py", b, gen=gen_dir).readline()
    out = app_factory("hello_client.py", a, address, "status", "x", gen=gen_dir).wait()[1]
    assert out.startswith("UNAVAILABLE|") and "127.0.0.1 is not in peers.allow (::1/128)" in out, out
    assert "not in peers.allow" not in b.log()  # a never dialled
    out = app_factory("hello_client.py", c, address, "status", "x", gen=gen_dir).wait()[1]
    assert out.startswith("FAILED_PRECONDITION|") and "address 127.0.0.1 is not in peers.allow" in out, out
    assert wait_until(lambda: "connection refused: address 127.0.0.1 is not in peers.allow" in b.log(), 10.0)


def test_inbound_bound_under_tls_counts_handshakes_and_refuses_before_tls(pki):
    """limits.inbound_connections_per_listener under TLS: a connection still in its TLS
    handshake counts (a peer that never finishes it holds a descriptor too), the one past
    the bound is closed with no TLS work, and a closed one makes room again."""
    from mrpcd.daemon.inbound_limits import PRUNE_INTERVAL, InboundConnections

    async def main():
        counters: dict[str, int] = {}
        inbound = InboundConnections(lambda: {"inbound_connections_per_listener": 2, "inbound_connections": 100}, counters)
        listener = inbound.listener("tls-test")
        srv = Server()
        port = await srv.start(tls=tls_for(pki, "b"), admit=listener.admit)
        conn = await tcp.connect("127.0.0.1", port, SERVICES, tls=tls_for(pki, "a"))
        assert (await echo_once(conn)).call_id == 7
        _, silent = await asyncio.open_connection("127.0.0.1", port)  # TCP only: never starts TLS
        await asyncio.sleep(0.1)
        with pytest.raises((tcp.HandshakeError, ConnectionError)):
            await tcp.connect("127.0.0.1", port, SERVICES, tls=tls_for(pki, "a"), timeout=3)
        assert counters["inbound_connections_refused"] == 1 and srv.errors == []  # no TLS handshake was tried
        silent.close()
        await asyncio.sleep(0.1 + PRUNE_INTERVAL)
        again = await tcp.connect("127.0.0.1", port, SERVICES, tls=tls_for(pki, "a"))
        assert (await echo_once(again)).call_id == 7
        assert inbound.open_now() == 2
        conn.close()
        again.close()
        srv.server.close()
        listener.close()
        assert inbound.tracked == 0

    run(main())

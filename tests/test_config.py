"""Daemon configuration: embedded default, YAML overrides, refusals that say where and why."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mrpcd.daemon.config import ConfigError, default_text, load

from conftest import wait_until


def test_embedded_default_loads():
    cfg = load()
    assert cfg.transport == "tcp"
    assert cfg.ring_size & (cfg.ring_size - 1) == 0
    assert cfg.control_socket.endswith("control.sock")
    assert "ring_size" in default_text()


def test_file_overrides_default(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ring_size: 65536\nlog_format: json\n")
    cfg = load(str(p))
    assert cfg.ring_size == 65536 and cfg.log_format == "json" and cfg.source == str(p)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ring_size: 65536\nbogus: 1\n", ":2: unknown key 'bogus'"),
        ("transport: tcp\nring_size: 100000\n", ":2: ring_size: must be a power of two"),
        ("log_level: loud\n", ":1: log_level: must be one of"),
        ("max_pending_bytes: 1000\n", ":1: max_pending_bytes: must be"),
        ("max_peer_backlog: -1\n", ":1: max_peer_backlog: must be"),
        ("peer_stall_timeout: -1\n", ":1: peer_stall_timeout: must be"),
        ("max_record: [1]\n", ":1: max_record: must be an integer"),
        ("connect_timeout: 0\n", ":1: connect_timeout: must be a number of seconds"),
        ("ring_size: 65536\n  - x: [\n", "not valid YAML"),
        ("- a\n- b\n", ":1: the configuration must be a mapping"),
        ("admin_group: -5\n", ":1: admin_group: must be a group name, a gid"),
        ("control_socket: ''\n", ":1: control_socket: must be a socket path or null"),
        ("metrics: {address: '127.0.0.1:\u00b2'}\n", "must be host:port with port 0..65535"),
        ("admin_group: 4294967295\n", ":1: admin_group: must be a group name, a gid"),
    ],
)
def test_bad_config_refused_with_line_and_reason(tmp_path, text, expected):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(p))
    assert expected in str(err.value)
    assert str(p) in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        # a typo'd key names the key it most likely meant
        ("log_levle: debug\n", ":1: unknown key 'log_levle', did you mean 'log_level'? (known: "),
        ("metrics:\n  address: 127.0.0.1:9464\n  bukets: [1]\n", ":3: metrics: unknown key 'bukets', did you mean 'buckets'? (known: "),
        # a bad value inside a section points at its own line, not at the section's
        ("log_level: info\nmetrics:\n  buckets: [1, 2]\n  address: 127.0.0.1:notaport\n", ":4: metrics: address '127.0.0.1:notaport' must be"),
        ("metrics:\n  address: 127.0.0.1:9464\n  buckets: [2, 1]\n", ":3: metrics: buckets must be strictly increasing"),
        ("peers:\n\n  allow: [10.0.0.0/33]\n", ":3: peers: allow-list entry '10.0.0.0/33' is not an IP address"),
        ("tls:\n  cert: /nonexistent/cert.pem\n  key: /nonexistent/key.pem\n  ca: /nonexistent/ca.pem\n", ":2: tls: tls.cert: "),
        ("tls:\n  cert: a\n  kye: b\n", ":3: tls: unknown key(s) kye"),
        # a missing host was called a bad port
        ("metrics: {address: ':9464'}\n", ":1: metrics: address ':9464' names no host: e.g. \"127.0.0.1:9464\""),
    ],
)
def test_a_typo_or_a_bad_nested_value_says_its_own_line(tmp_path, text, expected):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(p))
    assert f"{p}{expected}" in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        # a message that quotes another key's name ('address') pointed at that key's line
        ("metrics:\n  address: 127.0.0.1:9464\n  buckets: [address]\n", ":3: metrics: buckets must be positive finite numbers, got 'address'"),
        # an unknown key whose name contains a known one ('ca' in 'ca-x') pointed at 'ca'
        ("tls:\n  cert: a\n  ca: b\n  ca-x: c\n", ":4: tls: unknown key(s) ca-x"),
        # an entry of a block list: its own line, not the list's
        ("peers:\n  allow:\n    - 10.0.0.0/8\n    - 10.0.0.0/33\n", ":4: peers: allow-list entry '10.0.0.0/33' is not an IP address"),
        ("metrics:\n  buckets:\n    - 0.1\n    - -1\n", ":4: metrics: buckets must be positive finite numbers, got -1"),
        ("peers:\n  allow: 5\n", ":2: peers: peers.allow must be null"),
        ("tls:\n  cert: a\n  require_client_cert: 1\n", ":1: tls: missing tls.key, tls.ca"),
        # a section given through an alias: the line of what the alias names
        ("base: &m\n  address: nohost\nmetrics: *m\n", ":2: metrics: address must be \"host:port\""),
    ],
)
def test_a_nested_error_points_at_the_key_path_it_is_about(tmp_path, text, expected):
    """The validators say which key (and list entry) an error is about; the line is that
    key's, found by its path, not guessed from the words of the message."""
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(p))
    assert f"{p}{expected}" in str(err.value), str(err.value)


def test_a_tls_file_error_points_at_its_own_key_whatever_the_path_says(tmp_path):
    """tls.key's path mentions 'tls.cert': the error about the key file pointed at cert."""
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    p = tmp_path / "bad.yaml"
    p.write_text(f"tls:\n  cert: {cert}\n  key: /nonexistent/tls.cert/key.pem\n  ca: {cert}\n")
    with pytest.raises(ConfigError) as err:
        load(str(p))
    assert f"{p}:3: tls: tls.key: /nonexistent/tls.cert/key.pem does not exist" in str(err.value), str(err.value)


def test_validators_name_the_key_path_of_their_error():
    from mrpcd.daemon.config import VALIDATORS
    from mrpcd.keypath import KeyPathError
    from mrpcd.transports.security import parse_peers

    with pytest.raises(KeyPathError) as info:
        parse_peers({"allow": ["10.0.0.0/8", "nope"]})
    assert info.value.path == ("allow", 1)
    with pytest.raises(KeyPathError) as info:
        VALIDATORS["metrics"]({"address": "127.0.0.1:99999"})
    assert info.value.path == ("address",)
    with pytest.raises(KeyPathError) as info:
        VALIDATORS["metrics"]({"adress": "x"})
    assert info.value.path == ("adress",)
    with pytest.raises(ValueError) as plain:  # about the value as a whole: no path, the key's own line
        VALIDATORS["metrics"](5)
    assert getattr(plain.value, "path", ()) == ()


def test_nested_and_top_level_errors_are_reported_at_once_each_on_its_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("metrics:\n  address: nohost\npeers:\n  allow:\n    - 10.0.0.1\n    - bad\nlog_level: loud\n")
    with pytest.raises(ConfigError) as err:
        load(str(p))
    assert [e.split(": ")[0] for e in err.value.errors] == [f"{p}:2", f"{p}:6", f"{p}:7"], err.value.errors


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "nope.yaml"))


def test_cli_refuses_bad_config(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("ring_size: 3\n")
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "-c", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert f"{p}:1: ring_size" in r.stderr


def test_every_bad_key_of_a_file_is_reported_at_once(tmp_path):
    """Only the first bad key was reported: an operator fixed one, restarted, met the next."""
    p = tmp_path / "bad.yaml"
    p.write_text("rign_size: 4096\npoll_us: -5\nlog_level: info\ntransport: carrier-pigeon\n")
    with pytest.raises(ConfigError) as err:
        load(str(p))
    assert [e.split(": ")[0] for e in err.value.errors] == [f"{p}:1", f"{p}:2", f"{p}:4"], err.value.errors
    assert "did you mean 'ring_size'" in err.value.errors[0] and "poll_us" in err.value.errors[1]
    assert str(err.value) == "; ".join(err.value.errors)  # one line for the log (a refused reload)
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "-c", str(p), "--check-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["mrpcd: bad configuration:", *(f"  {e}" for e in err.value.errors)], r.stderr


def test_cli_check_and_print_default(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--print-default-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "control_socket" in r.stdout
    p = tmp_path / "ok.yaml"
    p.write_text(r.stdout)
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "-c", str(p), "--check-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_a_file_that_is_not_utf8_is_refused_clearly(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("log_level: info  # réglé\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        load(str(p))
    assert str(p) in str(err.value)
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "-c", str(p), "--check-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not UTF-8" in r.stderr


def test_absurdly_deep_nesting_is_refused_clearly(tmp_path):
    p = tmp_path / "deep.yaml"
    p.write_text("metrics: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply") as err:
        load(str(p))
    assert str(p) in str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("metrics:\n  address: 127.0.0.1:9464\nlog_level: debug\nmetrics:\n  buckets: [1, 2]\n", ":4: duplicate key 'metrics' (first on line 1)"),
        ("metrics:\n  address: 127.0.0.1:9464\n  address: null\n", ":3: duplicate key 'address' (first on line 2)"),
    ],
)
def test_a_key_given_twice_is_refused_not_silently_overridden(tmp_path, text, expected):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(p))
    assert f"{p}{expected}" in str(err.value)


def test_cli_refuses_an_empty_socket_path(tmp_path):
    """`mrpcd --socket "$UNSET_VAR"` must not fall back to the default path without a word."""
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--socket", "", "--check-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "command line: control_socket: must be a socket path or null" in r.stderr


@pytest.mark.parametrize("path, expected", [
    ('"a\\0b"', ":2: control_socket: must not contain a NUL byte"),
    ("/tmp/" + "x" * 120 + ".sock", ":2: control_socket: is 130 bytes long; a Unix socket path holds at most 107 bytes"),
])
def test_a_socket_path_the_kernel_cannot_bind_is_refused_by_check_config(tmp_path, path, expected):
    """A NUL byte or a path past sun_path's 107 bytes passed --check-config, then the start
    died with a traceback (ValueError from chmod) and left a stray socket file behind."""
    p = tmp_path / "sock.yaml"
    p.write_text(f"log_level: info\ncontrol_socket: {path}\n")
    with pytest.raises(ConfigError) as err:
        load(str(p))
    assert f"{p}{expected}" in str(err.value)
    for args in (["--check-config"], []):
        r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "-c", str(p), *args], capture_output=True, text=True,
                           timeout=30, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr and f"{p}{expected}" in r.stderr, r.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sock.yaml"]  # no stray socket
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--socket", "x" * 108, "--check-config"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "command line: control_socket: is 108 bytes long" in r.stderr, r.stderr


def test_admin_group_is_resolved_when_the_config_is_read(tmp_path):
    """An unknown group name made nobody but root an admin, silently; "65534" (a quoted gid)
    was taken for a group *named* 65534, with the same effect."""
    import grp

    p = tmp_path / "admin.yaml"
    p.write_text("log_level: info\nadmin_group: no_such_group_here\n")
    with pytest.raises(ConfigError) as err:
        load(str(p))
    assert f"{p}:2: admin_group: no group named 'no_such_group_here'" in str(err.value)
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "-c", str(p), "--check-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no group named 'no_such_group_here'" in r.stderr, r.stderr
    p.write_text('admin_group: "65534"\n')
    assert load(str(p)).admin_group == 65534
    existing = grp.getgrgid(os.getgid()).gr_name
    p.write_text(f"admin_group: {existing}\n")
    assert load(str(p)).admin_group == existing


def test_mrpcd_help_says_how_apps_find_it_and_how_to_run_a_second_one():
    """`mrpcd --help` did not say where apps look for the daemon, nor how a second daemon on
    the same host is set apart (only its --socket), nor what the signals do."""
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--help"], capture_output=True, text=True, timeout=30)
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    for words in ("MRPCD_SOCKET", "/run/mrpcd/control.sock", "A second daemon on one host needs only its own --socket",
                  "SIGHUP re-reads --config", "--print-default-config shows every key"):
        assert words in text, (words, r.stdout)


def test_the_daemon_says_which_config_it_runs_with(daemon_factory):
    """Its first log line named the socket and transport but not the config file: an operator
    could not tell from the journal whether /etc/mrpcd/mrpcd.yaml was read at all."""
    d = daemon_factory(config="log_level: debug\n")
    assert wait_until(lambda: "listening on" in d.log())
    line = next(x for x in d.log().splitlines() if "listening on" in x)
    assert f"config {d.log_path.with_suffix('.yaml')})" in line, line
    d2 = daemon_factory()
    assert wait_until(lambda: "listening on" in d2.log())
    assert "config <embedded default>)" in d2.log()

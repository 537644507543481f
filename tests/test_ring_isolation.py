"""An app reaches only its own rings: memfds handed over the control socket, never a path.

The shared memory is a memfd passed with SCM_RIGHTS to the app that said hello on that
connection; there is no file in /dev/shm or elsewhere that another user could open, and
the daemon's descriptors under /proc/PID/fd are closed to other users.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mrpcd

from conftest import as_other_user

PROBE = textwrap.dedent('''
    import os, sys, mrpcd
    app = mrpcd.connect(sys.argv[1], name="other-user")
    daemon_pid, victim_ino = int(sys.argv[2]), int(sys.argv[3])
    mine = os.fstat(app.rings.fd).st_ino
    opened = []
    for fd in os.listdir(f"/proc/{daemon_pid}/fd") if os.access(f"/proc/{daemon_pid}/fd", os.R_OK) else []:
        try:
            with open(f"/proc/{daemon_pid}/fd/{fd}", "rb") as f:
                opened.append(os.fstat(f.fileno()).st_ino)
        except OSError:
            pass
    print("mine-differs" if mine != victim_ino else "SAME-MEMFD")
    print("victim-opened" if victim_ino in opened else "victim-closed")
    app.close()
''')


def test_each_app_gets_its_own_memfd_and_no_shm_file(daemon_factory):
    d = daemon_factory()
    before = set(os.listdir("/dev/shm"))
    a, b = mrpcd.connect(d.socket, name="a"), mrpcd.connect(d.socket, name="b")
    try:
        assert os.fstat(a.rings.fd).st_ino != os.fstat(b.rings.fd).st_ino
        assert os.readlink(f"/proc/self/fd/{a.rings.fd}").startswith("/memfd:")
        assert set(os.listdir("/dev/shm")) == before  # nothing another process could open by name
    finally:
        a.close()
        b.close()


def test_another_user_cannot_reach_an_apps_rings(shared_daemon, tmp_path):
    d = shared_daemon
    victim = mrpcd.connect(d.socket, name="victim")
    try:
        script = Path(d.socket).parent / "probe.py"
        script.write_text(PROBE)
        script.chmod(0o644)
        r = subprocess.run(as_other_user([sys.executable, str(script), d.socket, str(d.pid), str(os.fstat(victim.rings.fd).st_ino)]),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["mine-differs", "victim-closed"]
    finally:
        victim.close()

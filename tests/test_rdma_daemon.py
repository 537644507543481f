"""`transport: rdma` is the daemon's choice: it starts on a host with a device, refuses clearly without."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mrpcd.transports import rdma


def test_rdma_config_without_device_is_refused_with_the_reason(tmp_path):
    ok, why = rdma.available()
    if ok:
        pytest.skip(f"this host has RDMA ({why}); the refusal path cannot be shown here")
    cfg = tmp_path / "rdma.yaml"
    cfg.write_text("transport: rdma\n")
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "-c", str(cfg), "--socket", str(tmp_path / "r.sock")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "transport: rdma configured, but" in r.stderr and why.split(":")[0] in r.stderr

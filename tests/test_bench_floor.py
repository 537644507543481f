"""examples/bench/floor.py, the design floor: it moves checked bytes, and it fails loudly.

Not a speed test (no timing is asserted): the number it prints is only worth something if
every message made it through the four stages in order, so that is what is tested.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "bench"))

import floor  # noqa: E402


def test_pipeline_moves_every_message_in_order() -> None:
    r = floor.run(0.3, slots=4)
    assert r["messages"] > 0
    assert r["bytes"] == r["messages"] * floor.MSG  # the server checked each sequence number
    assert r["goodput_Bps"] > 0 and r["seconds"] > 0
    assert set(r["cpu_us_per_msg"]) == {"client", "daemon_A", "daemon_B", "server"}


def test_server_refuses_a_message_out_of_order() -> None:
    ring = floor.Slots(2)
    floor.SEQ.pack_into(ring.slot(1), 0, 7)  # the first message claims to be number 7
    slots_r, slots_w = os.pipe()
    credits_r, credits_w = os.pipe()
    result_r, result_w = os.pipe()
    os.write(slots_w, floor.IDX.pack(1))
    os.close(slots_w)
    try:
        with pytest.raises(SystemExit, match="message 7 .* expected 0"):
            floor.server(ring, slots_r, credits_w, result_w, start=0.0)
    finally:
        for fd in (slots_r, credits_r, credits_w, result_r, result_w):
            os.close(fd)


def test_indexes_reassemble_split_reads() -> None:
    r, w = os.pipe()
    os.write(w, floor.IDX.pack(3)[:2])
    rest = threading.Timer(0.05, lambda: (os.write(w, floor.IDX.pack(3)[2:] + floor.IDX.pack(9)), os.close(w)))
    rest.start()
    idx = floor.Indexes(r)
    got = idx.read()  # blocks on half an item until the rest arrives
    while len(got) < 2:
        got += idx.read()
    assert got == [3, 9]
    assert idx.read() is None
    rest.join()
    os.close(r)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        floor.run(0, slots=4)
    with pytest.raises(ValueError):
        floor.run(1.0, slots=0)


def test_free_port_never_hands_out_a_port_twice():
    """Deployments ask for many ports before any child binds one; the kernel may offer the
    same free port again (the hotel example's grpc search service once lost its port to a
    sidecar that way: 'Address already in use')."""
    import procs

    ports = [procs.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)

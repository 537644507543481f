"""The design floor for big messages: mrpcd's copies and hops, with no RPC in between.

Why: "1 MiB goodput >= 50% of a plain socket" compares a four-process pipeline (client app,
daemon A, daemon B, server app) with a two-process socket stream. Whether a shortfall is
this implementation or the architecture needs the architecture measured alone, on the same
machine in the same run. This script is that: four processes that do only the work the
mrpcd design cannot avoid for a one-way stream of 1 MiB messages:

    client   copies the message into a shared-memory slot            (mrpcd: into the tx ring)
    daemon A sends the slot over TCP, straight from shared memory    (mrpcd: zero-copy send)
    daemon B receives into its own buffer, copies into shared memory (mrpcd: into the rx ring)
    server   copies the slot out into a new bytes object             (mrpcd: the decoded field)

Slot numbers and credits travel over pipes (4 bytes each; with 1 MiB messages their cost is
noise). No framing, no headers, no policies, no replies: an upper bound for mrpcd's 1 MiB
goodput here, not a competitor. Each message carries its sequence number and the server
checks it, so a broken pipeline fails instead of reporting a number.

    python floor.py SECONDS [SLOTS]    # prints {"bytes", "seconds", "goodput_Bps", "messages"}
"""
from __future__ import annotations

import json
import mmap
import os
import socket
import stat
import struct
import sys
import time

MSG = 1 << 20
SEQ = struct.Struct("<Q")
IDX = struct.Struct("<I")


class Slots:
    """`count` message-sized slots in one shared mapping (created before fork)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.map = mmap.mmap(-1, count * MSG)  # MAP_SHARED | MAP_ANONYMOUS: shared across fork
        self.view = memoryview(self.map)

    def slot(self, i: int) -> memoryview:
        return self.view[i * MSG:(i + 1) * MSG]


class Indexes:
    """Slot numbers over a pipe: whole 4-byte items, however the reads split them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def read(self) -> list[int] | None:
        """The next slot numbers (blocking); None at EOF."""
        while len(self.buf) < IDX.size:
            more = os.read(self.fd, 4096)
            if not more:
                return None
            self.buf += more
        n = len(self.buf) // IDX.size * IDX.size
        items = [IDX.unpack_from(self.buf, k)[0] for k in range(0, n, IDX.size)]
        self.buf = self.buf[n:]
        return items


class FreeSlots:
    """The producer's side of a ring of slots: which are free, refilled from the credits
    the consumer sends back (blocking until one comes)."""

    def __init__(self, count: int, credits_fd: int, consumer: str) -> None:
        self.free = list(range(count))
        self.credits = Indexes(credits_fd)
        self.consumer = consumer

    def take(self) -> int:
        if not self.free:
            got = self.credits.read()
            if got is None:
                raise SystemExit(f"floor: the {self.consumer} went away")
            self.free.extend(got)
        return self.free.pop()


def _put(fd: int, i: int) -> None:
    os.write(fd, IDX.pack(i))


def _give_back(fd: int, i: int) -> None:
    """Return a slot credit; the stage upstream may have stopped already (end of the run)."""
    try:
        os.write(fd, IDX.pack(i))
    except BrokenPipeError:
        pass


def client(ring: Slots, to_a: int, credits_fd: int, seconds: float, start: float) -> None:
    payload = bytearray(b"x" * MSG)
    free = FreeSlots(ring.count, credits_fd, "daemon A")
    seq = 0
    end = start + seconds
    while time.monotonic() < end:
        i = free.take()
        SEQ.pack_into(payload, 0, seq)
        ring.slot(i)[:] = payload
        _put(to_a, i)
        seq += 1


def daemon_a(ring: Slots, from_client: int, credits_fd: int, sock: socket.socket) -> None:
    slots = Indexes(from_client)
    while (got := slots.read()) is not None:
        for i in got:
            sock.sendall(ring.slot(i))
            _give_back(credits_fd, i)
    sock.shutdown(socket.SHUT_WR)


def daemon_b(ring: Slots, sock: socket.socket, to_server: int, credits_fd: int) -> None:
    buf = bytearray(MSG)
    view = memoryview(buf)
    free = FreeSlots(ring.count, credits_fd, "server")
    while True:
        have = 0
        while have < MSG:
            n = sock.recv_into(view[have:])
            if not n:
                if have:
                    raise SystemExit(f"floor daemon B: stream ended mid-message ({have} bytes)")
                return
            have += n
        i = free.take()
        ring.slot(i)[:] = view
        _put(to_server, i)


def server(ring: Slots, from_b: int, credits_fd: int, result_fd: int, start: float) -> None:
    slots = Indexes(from_b)
    expect = 0
    total = 0
    while (got := slots.read()) is not None:
        for i in got:
            msg = bytes(ring.slot(i))  # the handler's own copy of the field
            _give_back(credits_fd, i)
            (seq,) = SEQ.unpack_from(msg)
            if seq != expect or len(msg) != MSG:
                raise SystemExit(f"floor server: message {seq} ({len(msg)} B), expected {expect}")
            expect += 1
            total += len(msg)
    elapsed = time.monotonic() - start
    os.write(result_fd, json.dumps({"bytes": total, "seconds": elapsed, "goodput_Bps": total / elapsed,
                                    "messages": expect}).encode())


def _fork(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except SystemExit as exc:
            print(exc, file=sys.stderr, flush=True)
            code = 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def run(seconds: float, slots: int = 32) -> dict:
    """Run the four-process pipeline for `seconds`; the server's count of checked bytes."""
    if seconds <= 0 or slots < 1:
        raise ValueError("need seconds > 0 and slots >= 1")
    tx, rx = Slots(slots), Slots(slots)
    c2a_r, c2a_w = os.pipe()
    a2c_r, a2c_w = os.pipe()
    b2s_r, b2s_w = os.pipe()
    s2b_r, s2b_w = os.pipe()
    res_r, res_w = os.pipe()
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        a_sock = socket.create_connection(ls.getsockname())
        b_sock, _ = ls.accept()
    for s in (a_sock, b_sock):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.monotonic() + 0.2  # every process is up before the clock starts
    pids = [
        _fork(_only, [c2a_w, a2c_r], client, tx, c2a_w, a2c_r, seconds, start),
        _fork(_only, [c2a_r, a2c_w, a_sock.fileno()], daemon_a, tx, c2a_r, a2c_w, a_sock),
        _fork(_only, [b_sock.fileno(), b2s_w, s2b_r], daemon_b, rx, b_sock, b2s_w, s2b_r),
        _fork(_only, [b2s_r, s2b_w, res_w], server, rx, b2s_r, s2b_w, res_w, start),
    ]
    for fd in (c2a_r, c2a_w, a2c_r, a2c_w, b2s_r, b2s_w, s2b_r, s2b_w, res_w):
        os.close(fd)
    a_sock.close()
    b_sock.close()
    failed = []
    cpu = {}
    for name, pid in zip(("client", "daemon_A", "daemon_B", "server"), pids):
        _, status, usage = os.wait4(pid, 0)
        cpu[name] = usage.ru_utime + usage.ru_stime
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(name)
    out = b""
    while chunk := os.read(res_r, 4096):
        out += chunk
    os.close(res_r)
    if failed or not out:
        raise RuntimeError(f"the floor pipeline failed in {failed or 'the server'} (see stderr)")
    result = json.loads(out)
    result["cpu_us_per_msg"] = {k: 1e6 * v / max(result["messages"], 1) for k, v in cpu.items()}
    return result


def _only(keep: list[int], fn, *args) -> None:
    """In a child: close every pipe and socket end this stage does not use, so EOF travels
    down the pipeline when the client stops, then run the stage."""
    keep_set = set(keep)
    for fd in os.listdir("/proc/self/fd"):
        n = int(fd)
        if n > 2 and n not in keep_set:
            try:
                mode = os.fstat(n).st_mode
            except OSError:  # the listing's own descriptor, closed by now
                continue
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                os.close(n)
    fn(*args)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        raise SystemExit(__doc__)
    print(json.dumps(run(float(argv[0]), int(argv[1]) if len(argv) > 1 else 32)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The goodput reference: a plain Python TCP stream on loopback, 1 MiB sendall / recv_into.

Why: "1 MiB goodput ≥ 50% of a plain socket" needs the socket measured on the same machine
in the same run, with the same language, in two processes like the RPC systems.

    python sockstream.py sink                 # prints its port, then the byte count at EOF
    python sockstream.py source PORT SECONDS MAX_BYTES   # prints {"bytes", "seconds", "goodput_Bps"}
"""
from __future__ import annotations

import json
import socket
import struct
import sys
import time

CHUNK = 1 << 20


def sink() -> None:
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        print(ls.getsockname()[1], flush=True)
        ls.settimeout(60)
        conn, _ = ls.accept()
        with conn:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            total = 0
            while True:
                n = conn.recv_into(view)
                if not n:
                    break
                total += n
            conn.sendall(struct.pack("<Q", total))


def source(port: int, seconds: float, max_bytes: int) -> None:
    if seconds <= 0 or max_bytes < CHUNK:
        raise SystemExit("source needs SECONDS > 0 and MAX_BYTES >= 1 MiB")
    data = b"x" * CHUNK
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        sent = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end and sent < max_bytes:
            s.sendall(data)
            sent += CHUNK
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            more = s.recv(8 - len(got))
            if not more:
                raise SystemExit("sink closed before acknowledging")
            got += more
        elapsed = time.perf_counter() - t0
    (received,) = struct.unpack("<Q", got)
    print(json.dumps({"bytes": received, "seconds": elapsed, "goodput_Bps": received / elapsed}), flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["sink"]:
        sink()
    elif argv[:1] == ["source"] and len(argv) == 4:
        source(int(argv[1]), float(argv[2]), int(argv[3]))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Control-socket message framing, shared by the daemon, the app library and mrpcctl.

A message is a u32 little-endian length and a msgpack map. File descriptors (the memfd
with the rings, the eventfds) ride on the same sendmsg with SCM_RIGHTS. The framing is
sans-I/O: `FrameBuffer` takes bytes and yields messages, so the daemon's asyncio side and
the apps' blocking side share it.
"""
from __future__ import annotations

import struct
from typing import Any, Callable

import msgpack

LENGTH = struct.Struct("<I")
MAX_CONTROL_MESSAGE = 4 << 20  # schemas can be large, but not unbounded
MAX_FDS = 8


class ControlError(Exception):
    """A control request failed; `code` is a grpc status number."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def encode(message: dict[str, Any], default: Callable[[Any], Any] | None = None) -> bytes:
    """Frame `message`; `default` turns values msgpack cannot pack into ones it can."""
    body = msgpack.packb(message, use_bin_type=True, default=default)
    if len(body) > MAX_CONTROL_MESSAGE:
        raise ControlError(f"control message of {len(body)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    return LENGTH.pack(len(body)) + body


class FrameBuffer:
    """Accumulates bytes from the socket and returns complete, validated messages.

    `strict` (the daemon's side, reading untrusted clients) admits only str/bytes map keys;
    clients reading the daemon's replies accept int keys too (e.g. per-app tables).

    A broken frame ends the stream, but the good messages that came before it in the same
    read are still returned: `feed` returns them and keeps the error in `error`; the next
    `feed` raises it. When nothing came before it, `feed` raises at once.
    """

    def __init__(self, strict: bool = True) -> None:
        self._buf = bytearray()
        self._strict = strict
        self.error: ControlError | None = None  # the stream broke after the messages last returned

    @property
    def buffered(self) -> int:
        """Bytes held of a message not yet complete (what the daemon accounts per uid)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self.error is not None:
            raise self.error
        self._buf += data
        out: list[dict[str, Any]] = []
        try:
            self._parse(out)
        except ControlError as exc:
            self._buf.clear()
            self.error = exc
            if not out:
                raise
        return out

    def _parse(self, out: list[dict[str, Any]]) -> None:
        while len(self._buf) >= 4:
            (n,) = LENGTH.unpack_from(self._buf)
            if n > MAX_CONTROL_MESSAGE:
                raise ControlError(f"control message of {n} bytes exceeds {MAX_CONTROL_MESSAGE}")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            try:
                msg = msgpack.unpackb(body, raw=False, strict_map_key=self._strict)
            except Exception as exc:  # msgpack raises several types for garbage, some with no text
                raise ControlError(f"malformed control message: {str(exc) or type(exc).__name__}") from None
            if not isinstance(msg, dict):
                raise ControlError("control message must be a map")
            out.append(msg)

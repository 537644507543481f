"""Where the local daemon's control socket lives, agreed by the daemon, apps and mrpcctl."""
from __future__ import annotations

import os


def default_runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/mrpcd when the session has one, else /tmp/mrpcd-$UID."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "mrpcd")
    return shared_tmp_runtime_dir()


def shared_tmp_runtime_dir() -> str:
    """The fallback folder in /tmp (where another user may have made it first: checked before use)."""
    return f"/tmp/mrpcd-{os.getuid()}"


def default_socket_path() -> str:
    """MRPCD_SOCKET overrides, so apps and tests can pick a daemon without code changes."""
    return os.environ.get("MRPCD_SOCKET") or os.path.join(default_runtime_dir(), "control.sock")


# Where the shipped systemd unit (mrpcd --print-unit) puts the daemon's socket.
SYSTEM_SOCKET = "/run/mrpcd/control.sock"


def client_socket_path() -> str:
    """The daemon an app or mrpcctl reaches when none is named: MRPCD_SOCKET, else the
    per-user default; when MRPCD_SOCKET is unset and no daemon's socket is at the per-user
    default, the system service's socket if it is there."""
    path = default_socket_path()
    if not os.environ.get("MRPCD_SOCKET") and not os.path.exists(path) and os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return path

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

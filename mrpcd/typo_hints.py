"""Hints for a misspelt configuration key: the daemon's YAML (mrpcd/daemon/config.py) and
the policies' configs (policies/base.py ConfigReader) suggest the key it likely meant."""
from __future__ import annotations

import difflib
from typing import Any, Iterable


def closest(key: Any, known: Iterable[str]) -> str | None:
    """The known key that `key` most likely misspells, or None."""
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return close[0] if close else None


def did_you_mean(key: Any, known: Iterable[str]) -> str:
    """", did you mean 'log_level'?" for a typo'd key, else nothing."""
    close = closest(key, known)
    return f", did you mean {close!r}?" if close else ""

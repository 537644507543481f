"""KeyPathError: a config validator's ValueError that says which key it is about.

A validator checks one value (a daemon config section such as `metrics: {...}`); when
what is wrong is one key or list entry inside it, it raises KeyPathError
with `path`, the keys (and list indexes) from that value down to it: ("address",) in the
metrics section, ("allow", 2) for the third allow-list entry. The config loader finds that
exact line in the YAML (mrpcd.daemon.config). A plain ValueError (or an empty path) is
about the value as a whole.
"""
from __future__ import annotations

from typing import Any

__all__ = ["KeyPathError", "KeyPathErrors"]


class KeyPathError(ValueError):
    def __init__(self, message: str, path: "tuple[Any, ...]" = ()) -> None:
        super().__init__(message)
        self.path: tuple[Any, ...] = tuple(path)

    def under(self, *prefix: Any) -> "KeyPathError":
        """The same error seen from an enclosing value: `prefix` + path."""
        return KeyPathError(str(self), (*prefix, *self.path))


class KeyPathErrors(ValueError):
    """Several KeyPathErrors in one value (entries of a list, each wrong in its own way),
    so the loader reports every one on its line at once rather than one per try."""

    def __init__(self, errors: "list[KeyPathError]") -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors: list[KeyPathError] = list(errors)

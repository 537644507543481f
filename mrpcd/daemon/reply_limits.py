"""Bounds on the operator's replies (`mrpcctl apps`, `stats`, `policy ...`).

Why: what those replies list comes from apps (their names, services, routes) and a control
message may not pass control_proto.MAX_CONTROL_MESSAGE (4 MiB). Two apps registering
~16,000 long service names each made the `apps` reply 5,143,795 bytes: it could not be
sent, and the operator could list no app at all. Now

* each list one app contributes (services, listening addresses, routes) shows its first
  LIST_SHOWN entries and says how many more there are (`services_more`: K);
* a whole reply holds what fits in REPLY_BUDGET bytes and says what it left out: listings
  of apps page (`more`: apps left, `next_after`: the app_id to ask again with `after`,
  which mrpcctl follows), the rest carry a count of what was cut.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import msgpack

from ..control_proto import MAX_CONTROL_MESSAGE

LIST_SHOWN = 64  # entries of one of an app's lists shown in `apps`
REPLY_BUDGET = MAX_CONTROL_MESSAGE - (512 << 10)  # room left for the reply's own keys


def plain(value: Any) -> Any:
    """A msgpack-able stand-in for what a policy's describe() may hold: sets as lists, the rest as text."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)


def packed_size(value: Any) -> int:
    return len(msgpack.packb(value, use_bin_type=True, default=plain))


def shown(out: dict[str, Any], key: str, items: Sequence[Any], limit: int = LIST_SHOWN) -> None:
    """out[key] = the first `limit` of `items`; out[key + "_more"] = how many were left out."""
    out[key] = list(items[:limit])
    if len(items) > limit:
        out[key + "_more"] = len(items) - limit


def fit(items: Sequence[Any], budget: int, too_big: Callable[[Any, int], Any] | None = None) -> tuple[list[Any], int]:
    """The leading `items` whose packed sizes add up to at most `budget` bytes, and how many
    were left out. An item too big for a budget of its own is replaced by too_big(item,
    size) when given (so a page always moves on), else cut with the rest."""
    out: list[Any] = []
    used = 0
    for i, item in enumerate(items):
        size = packed_size(item)
        if size > budget and too_big is not None:
            item = too_big(item, size)
            size = packed_size(item)
        if used + size > budget:
            return out, len(items) - i
        out.append(item)
        used += size
    return out, 0

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

Error replies (to every client) are bounded too (`bounded_error`): their texts quote what
the request held (a refused schema's names, an unknown op, a policy's config), and a
multi-MB name in a refused schema made its error reply bigger than a control message may
be; the app got "internal error: the reply cannot be encoded" instead of the reason.
"""
from __future__ import annotations

import re
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


# An error text shows of each word (a run of non-blank characters: a quoted name, a path)
# its first SHOWN_RUN characters, and of the whole text its first ERROR_TEXT characters;
# each cut says how much it left out. Names a schema may hold (512 characters) and the
# texts the daemon writes itself are never cut; an error reply then takes at most ~64 KiB
# (UTF-8) of the 4 MiB a control message may be.
SHOWN_RUN = 1024
ERROR_TEXT = 16384
# The request `id` an error reply echoes: an id bigger than this (packed) is not echoed
# (null instead), since it alone could make the reply too big.
ECHOED_ID = 1024
_LONG_RUN = re.compile(r"\S{%d,}" % (SHOWN_RUN + 1))


def _marker(left_out: int) -> str:
    return f"…({left_out} more chars)"


def bounded_text(text: str, run: int = SHOWN_RUN, limit: int = ERROR_TEXT) -> str:
    """`text` with every word longer than `run` characters cut to its first `run`, and then
    the whole cut to its first `limit`, each cut marked "…(N more chars)"."""
    if len(text) <= run:
        return text
    text = _LONG_RUN.sub(lambda m: m.group()[:run] + _marker(len(m.group()) - run), text)
    if len(text) > limit:
        text = text[:limit] + _marker(len(text) - limit)
    return text


def bounded_error(reply: dict[str, Any]) -> dict[str, Any]:
    """An error reply (`ok` false) that fits in a control message whatever the request
    held: its `error` text bounded (bounded_text), its `id` echoed only if small."""
    error = reply.get("error")
    if isinstance(error, str):
        reply["error"] = bounded_text(error)
    rid = reply.get("id")
    if rid is not None and not isinstance(rid, int):
        try:
            size = packed_size(rid)
        except (TypeError, ValueError, OverflowError):
            size = ECHOED_ID + 1
        if size > ECHOED_ID:
            reply["id"] = None
            reply["error"] = f"{reply.get('error', '')} (the request's id of {size} bytes is not echoed)"
    return reply

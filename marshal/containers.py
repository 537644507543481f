"""The lists and dicts of repeated and map fields whose values are messages.

protobuf's containers for them have `add(**kw)` (repeated) and create a value on `m[key]` /
`get_or_create(key)` (maps); code ported from grpcio uses both. Generated messages keep
plain `list` / `dict` semantics everywhere else, so these are small subclasses (C-level
construction, no per-instance state): one pair per message class, made on first use
(`repeated_type(Inner)`, `map_type(Inner)`), whose class attribute `_mrpc_type` is the element
class. The constructor, the decoder and the field defaults (`__mrpc_defaults__`, so
`Clear()` and `ClearField()`) all give them; a list or dict assigned to the field later is
kept as it is (it encodes the same, it only lacks these methods).

Copies (copy, deepcopy, CopyFrom, MergeFrom) keep the type; pickling rebuilds them from the
element class, which must itself be importable, as the messages must.
"""
from __future__ import annotations

import copy
import keyword
from typing import Any, Generic, Iterable, TypeVar

__all__ = ["MessageMap", "RepeatedMessages", "field_path", "from_dict", "map_type", "repeated_type"]

_T = TypeVar("_T")
_K = TypeVar("_K")


def from_dict(cls: type, value: dict[str, Any], where: str) -> Any:
    """`cls(**value)`: a dict given for a message field (protobuf's constructors take them),
    nested dicts converting in turn; a key that is not a field is a TypeError naming the
    field it was given for. Keys may be the .proto names of fields named like a Python
    keyword (`from`, as `to_dict()` gives them): the generated constructor calls them
    `from_`, so `Outer(one=inner.to_dict())` round-trips."""
    try:
        return cls(**value)
    except TypeError as exc:
        renamed = _keyword_params(cls, value)
        if renamed is not None:  # (only on this error path: the common case pays nothing)
            try:
                return cls(**renamed)
            except TypeError as exc2:
                exc = exc2
        raise TypeError(f"{where}: {exc}") from None


def _keyword_params(cls: type, value: dict[str, Any]) -> dict[str, Any] | None:
    """`value` with each key that is a Python keyword renamed to the constructor's name for
    that field (the generated `from_` property of the field `from`), or None if none is."""
    renamed, changed = {}, False
    for k, v in value.items():
        if k.__class__ is str and keyword.iskeyword(k):
            for alias in (k + "_", k + "__", k + "___"):
                if isinstance(getattr(cls, alias, None), property):
                    k, changed = alias, True
                    break
        renamed[k] = v
    return renamed if changed else None


class RepeatedMessages(list[_T], Generic[_T]):
    """A repeated message field: a list with protobuf's `add()`."""

    __slots__ = ()
    _mrpc_type: type

    def add(self, /, **kwargs: Any) -> _T:
        """Append a new element made from the keyword arguments and return it."""
        item = self._mrpc_type(**kwargs)
        self.append(item)
        return item  # type: ignore[no-any-return]

    @classmethod
    def _mrpc_of(cls, x: Any, owner: Any, i: int) -> Any:
        """What the constructor of `owner` keeps of the argument for its field `i`: a new
        container of its elements, dicts made into messages; None is empty; what is not a
        list-like (the encoder refuses it, naming the field) is kept as given."""
        if x.__class__ is not list:
            if x is None:
                return cls()
            if isinstance(x, (str, bytes, bytearray, dict)) or not hasattr(x, "__iter__"):
                return x
        out: RepeatedMessages[Any] = cls(x)
        for y in out:  # (cheaper than any C-level scan: a list of messages only reads classes)
            if y.__class__ is dict:
                for j, y in enumerate(out):
                    if y.__class__ is dict:
                        out[j] = from_dict(cls._mrpc_type, y, f"{field_path(owner, i)}[{j}]")
                break
        return out

    def __copy__(self) -> "RepeatedMessages[_T]":
        return type(self)(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> "RepeatedMessages[_T]":
        new: RepeatedMessages[_T] = type(self)()
        memo[id(self)] = new
        new.extend(copy.deepcopy(item, memo) for item in self)
        return new

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_list, (self._mrpc_type, list(self)))


class MessageMap(dict[_K, _T], Generic[_K, _T]):
    """A map field with message values: a dict whose `m[key]` creates a missing value (an
    empty message, stored), as protobuf's message maps do; `get()` and `in` do not."""

    __slots__ = ()
    _mrpc_type: type

    def __missing__(self, key: _K) -> _T:
        value = self._mrpc_type()
        self[key] = value
        return value  # type: ignore[no-any-return]

    def get_or_create(self, key: _K) -> _T:
        """The value at `key`, created (an empty message) if there is none."""
        return self[key]  # type: ignore[no-any-return]

    @classmethod
    def _mrpc_of(cls, x: Any, owner: Any, i: int) -> Any:
        """What the constructor of `owner` keeps of the argument for its field `i`: a new
        map, dict values made into messages; None is empty; what is not a mapping is kept as
        given (for the encoder to refuse, naming the field)."""
        if x.__class__ is not dict:
            if x is None:
                return cls()
            if not isinstance(x, dict):
                if not (hasattr(x, "keys") and hasattr(x, "__getitem__")):
                    return x
                x = {k: x[k] for k in x.keys()}
        out: MessageMap[Any, Any] = cls(x)
        for v in out.values():
            if v.__class__ is dict:
                for k, v in out.items():
                    if v.__class__ is dict:
                        out[k] = from_dict(cls._mrpc_type, v, f"{field_path(owner, i)}[{k!r}]")
                break
        return out

    def __copy__(self) -> "MessageMap[_K, _T]":
        return type(self)(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> "MessageMap[_K, _T]":
        new: MessageMap[_K, _T] = type(self)()
        memo[id(self)] = new
        for k, v in self.items():
            new[copy.deepcopy(k, memo)] = copy.deepcopy(v, memo)
        return new

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_map, (self._mrpc_type, dict(self)))


def field_path(owner: Any, i: int) -> str:
    """`pkg.Outer.items`: field `i` of message `owner`, for errors."""
    msg = getattr(type(owner), "__mrpc_message__", None)
    return f"{msg.full_name}.{msg.fields[i].name}" if msg is not None else type(owner).__qualname__


def repeated_type(cls: type) -> type[RepeatedMessages[Any]]:
    """The RepeatedMessages subclass for elements of class `cls` (made once, kept on it)."""
    made = cls.__dict__.get("__mrpc_repeated_type__")
    if made is None:
        made = type(f"Repeated[{cls.__qualname__}]", (RepeatedMessages,), {"__slots__": (), "_mrpc_type": cls})
        made.__module__ = __name__
        cls.__mrpc_repeated_type__ = made  # type: ignore[attr-defined]
    return made


def map_type(cls: type) -> type[MessageMap[Any, Any]]:
    """The MessageMap subclass for values of class `cls` (made once, kept on it)."""
    made = cls.__dict__.get("__mrpc_map_type__")
    if made is None:
        made = type(f"Map[{cls.__qualname__}]", (MessageMap,), {"__slots__": (), "_mrpc_type": cls})
        made.__module__ = __name__
        cls.__mrpc_map_type__ = made  # type: ignore[attr-defined]
    return made


def _rebuild_list(cls: type, items: Iterable[Any]) -> RepeatedMessages[Any]:
    return repeated_type(cls)(items)


def _rebuild_map(cls: type, items: dict[Any, Any]) -> MessageMap[Any, Any]:
    return map_type(cls)(items)

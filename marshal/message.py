"""Base class of generated message classes.

Generated classes (mrpcd-stubgen) declare `__slots__` with their field names and an
`__init__`; `mrpcd.marshal.codec.bind` attaches `SerializeToString`, `FromString`,
`__mrpc_schema__`, `__mrpc_message__` (the schema's Message), `__mrpc_fields__` (field
names in wire order) and `__mrpc_defaults__`.
"""
from __future__ import annotations

from typing import Any


class Message:
    __slots__ = ()

    __mrpc_schema__: Any = None
    __mrpc_message__: Any = None
    __mrpc_fields__: tuple[str, ...] = ()
    # (name, value, is_factory): factories (list, dict) give each instance its own object
    __mrpc_defaults__: tuple[tuple[str, Any, bool], ...] = ()

    def __init__(self, /, **kwargs: Any) -> None:
        """Every field set to its default, then to the keyword arguments given."""
        for name, value, factory in type(self).__mrpc_defaults__:
            if name in kwargs:
                setattr(self, name, kwargs.pop(name))
            else:
                setattr(self, name, value() if factory else value)
        if kwargs:
            raise TypeError(f"{type(self).__name__}() got unexpected field(s) {', '.join(sorted(kwargs))}")

    def _fields(self) -> tuple[str, ...]:
        names = type(self).__mrpc_fields__
        if names:
            return names
        # not bound: fall back to the declared slots
        out: list[str] = []
        for klass in reversed(type(self).__mro__):
            for name in getattr(klass, "__slots__", ()):
                if name not in out and not name.startswith("__"):
                    out.append(name)
        return tuple(out)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n, None) == getattr(other, n, None) for n in self._fields())

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        parts = []
        for n in self._fields():
            parts.append(f"{n}={getattr(self, n, '<unset>')!r}")
        return f"{type(self).__qualname__}({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """Plain data: nested messages become dicts (the shape codec.decode_plain returns)."""
        return {n: _plain(getattr(self, n, None)) for n in self._fields()}

    def ByteSize(self) -> int:
        """Length of the encoded message."""
        return len(self.SerializeToString())  # type: ignore[attr-defined]

    def SerializeToString(self) -> bytes:  # replaced by codec.bind
        raise TypeError(f"{type(self).__qualname__} is not bound to a schema (codec.bind)")

    @classmethod
    def FromString(cls, data: bytes) -> "Message":  # replaced by codec.bind
        raise TypeError(f"{cls.__qualname__} is not bound to a schema (codec.bind)")


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_dict()
    if type(value) is list:
        return [_plain(v) for v in value]
    if type(value) is dict:
        return {k: _plain(v) for k, v in value.items()}
    return value

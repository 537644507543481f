"""protobuf's enum API on generated enums.

protobuf's `_pb2` modules expose an enum as an `EnumTypeWrapper` (`Color.Name(1)`,
`Color.Value("GREEN")`, `Color.keys()`, ...). mrpcd-stubgen generates `enum.IntEnum`
classes (existing code compares, iterates and pickles them as such), so the wrapper's
methods are classmethods of this mixin instead: `class Color(_EnumWrapper, enum.IntEnum)`.

Names are the .proto names: `codec.bind` attaches the schema's enum as `__mrpc_enum__`, so a
value whose Python member is renamed (`from` -> `from_`) is still `Name()`d `"from"`, as
protobuf does. Before binding (or for a class made by hand) the member names are used.
"""
from __future__ import annotations

from typing import Any, TypeVar

__all__ = ["EnumWrapper"]

_E = TypeVar("_E", bound="EnumWrapper")


class EnumWrapper:
    """Mixin of generated IntEnums: protobuf's EnumTypeWrapper methods as classmethods."""

    __slots__ = ()
    __mrpc_enum__: Any = None  # the schema's Enum (name, values), set by codec.bind

    @classmethod
    def _mrpc_pairs(cls) -> list[tuple[str, int]]:
        """(.proto name, number) in declaration order, aliases included."""
        en = cls.__dict__.get("__mrpc_enum__")
        if en is not None:
            return [(str(name), int(number)) for name, number in en.values]
        return [(name, int(member)) for name, member in cls.__members__.items()]  # type: ignore[attr-defined]

    @classmethod
    def Name(cls, number: int) -> str:
        """The name of `number` (the first declared, for aliases); ValueError if none."""
        for name, n in cls._mrpc_pairs():
            if n == number:
                return name
        raise ValueError(f"Enum {cls.__qualname__} has no name defined for value {number!r}")

    @classmethod
    def Value(cls: type[_E], name: str) -> _E:
        """The member of the value called `name` (an int); ValueError if there is none."""
        for n_, number in cls._mrpc_pairs():
            if n_ == name:
                return cls._mrpc_member(number)
        raise ValueError(f"Enum {cls.__qualname__} has no value defined for name {name!r}")

    @classmethod
    def keys(cls) -> list[str]:
        """The value names, in declaration order."""
        return [name for name, _ in cls._mrpc_pairs()]

    @classmethod
    def values(cls: type[_E]) -> list[_E]:
        """The numbers, in declaration order (members of this enum: ints)."""
        return [cls._mrpc_member(n) for _, n in cls._mrpc_pairs()]

    @classmethod
    def items(cls: type[_E]) -> list[tuple[str, _E]]:
        """(name, number) pairs, in declaration order."""
        return [(name, cls._mrpc_member(n)) for name, n in cls._mrpc_pairs()]

    @classmethod
    def _mrpc_member(cls: type[_E], number: int) -> _E:
        """The member of `number` (every number of the .proto enum has one: an IntEnum)."""
        try:
            return cls(number)  # type: ignore[call-arg]
        except ValueError:  # a class made by hand without it: the number as it is
            return number  # type: ignore[return-value]

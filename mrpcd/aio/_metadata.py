"""grpc.aio.Metadata: an ordered multi-map of metadata, for code that builds call metadata
with it (`metadata=grpc.aio.Metadata(("k", "v"))`), and what an asyncio call's
initial_metadata() / trailing_metadata() return, as in grpc.aio (`md["key"]`). Iterating
gives (key, value) pairs in order, so it goes wherever metadata pairs go, and it equals
the tuple of its pairs."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from ..status import Metadatum


class Metadata:
    """Keys map to lists of values, in the order added; `m[key]` is the first value."""

    def __init__(self, *pairs: tuple[str, "str | bytes"]) -> None:
        self._by_key: dict[str, list] = {}
        for key, value in pairs:
            self.add(key, value)

    @classmethod
    def from_tuple(cls, pairs: Iterable[tuple[str, "str | bytes"]] | None) -> "Metadata":
        return cls(*(pairs or ()))

    def add(self, key: str, value: "str | bytes") -> None:
        self._by_key.setdefault(key, []).append(value)

    def get_all(self, key: str) -> list:
        return list(self._by_key.get(key, ()))

    def set_all(self, key: str, values: list) -> None:
        self._by_key[key] = list(values)

    def get(self, key: str, default: Any = None) -> Any:
        values = self._by_key.get(key)
        return values[0] if values else default

    def delete_all(self, key: str) -> None:
        del self._by_key[key]

    def __getitem__(self, key: str) -> "str | bytes":
        values = self._by_key.get(key)
        if not values:
            raise KeyError(key)
        return values[0]

    def __setitem__(self, key: str, value: "str | bytes") -> None:
        """Replace the first value of `key` (or add it)."""
        values = self._by_key.get(key)
        if values:
            values[0] = value
        else:
            self._by_key[key] = [value]

    def __delitem__(self, key: str) -> None:
        """Remove the first value of `key`."""
        values = self._by_key.get(key)
        if not values:
            raise KeyError(key)
        values.pop(0)
        if not values:
            del self._by_key[key]

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[tuple[str, "str | bytes"]]:
        """(key, value) pairs (with .key / .value, as the sync library's), in order."""
        for key, values in self._by_key.items():
            for value in values:
                yield Metadatum(key, value)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())

    def keys(self):
        return self._by_key.keys()

    def values(self):
        return self._by_key.values()

    def items(self):
        return self._by_key.items()

    def __add__(self, other: object) -> "Metadata":
        """A new Metadata with `other`'s pairs (a Metadata or a tuple of pairs) after these."""
        if isinstance(other, (Metadata, tuple)):
            return Metadata(*tuple(self), *tuple(other))
        return NotImplemented

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Metadata):
            return self._by_key == other._by_key
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Metadata({', '.join(repr(p) for p in self)})"

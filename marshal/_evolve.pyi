"""Types of the compiled `_evolve.pyx` (mypy does not read Cython)."""
from typing import Any, Sequence

K_INT: int
K_BOOL: int
K_FLOAT: int
K_STR: int
K_BYTES: int
C_SAME: int
C_TO_BOOL: int
C_TO_INT: int
C_TO_BIN: int
C_TO_STR: int

class Run:
    def __init__(self, messages: bool, specs: Sequence[tuple[int, bool, int, int]],
                 layout: tuple[Sequence[tuple[int, int, bytes | None]], bytes] | None = ...,
                 key: tuple[int, int, int] | None = ...) -> None: ...
    @property
    def reshaped(self) -> bool: ...
    def check(self, data: Any, start: int, end: int) -> bool: ...
    def reshape(self, data: Any, start: int, end: int) -> bytes | None: ...

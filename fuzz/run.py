"""Run one fuzz target under atheris (libFuzzer): `python fuzz/run.py TARGET [libFuzzer args]`.

`make fuzz` runs every target for a bounded time over fuzz/corpus/TARGET (new inputs that
add coverage are written back there; crashes land in fuzz/crashes/). A crash is a bug: fix
it in the owning module, keep the crashing input in the corpus so
tests/test_fuzz_regression.py replays it forever.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python fuzz/run.py {control,ring,wire} [libFuzzer args...]")
    name = sys.argv[1]
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris (it is in the 'fuzz' extra)")
    with atheris.instrument_imports(include=["mrpcd", "msgpack"]):
        from fuzz.targets import MAX_INPUT, TARGETS
    if name not in TARGETS:
        sys.exit(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    target = TARGETS[name]
    args = [sys.argv[0], *sys.argv[2:]]
    if not any(a.startswith("-max_len") for a in args):
        args.append(f"-max_len={MAX_INPUT}")
    atheris.Setup(args, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

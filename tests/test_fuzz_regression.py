"""Replay the stored fuzz corpus (fuzz/corpus/<target>/) through the fuzz targets, plus a
bounded burst of random and mutated inputs, so a parser regression on any input the fuzzer
once found is caught by the normal test run. `make fuzz` is the long, coverage-guided run.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fuzz.targets import MAX_INPUT, TARGETS  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
BUDGET_S = 4.0  # per target, for the random part


def corpus(name: str) -> list[Path]:
    d = CORPUS / name
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays_cleanly(name):
    files = corpus(name)
    assert len(files) >= 3, f"fuzz/corpus/{name} is (nearly) empty: run `python fuzz/seeds.py` and `make fuzz`"
    target = TARGETS[name]
    for path in files:
        data = path.read_bytes()[:MAX_INPUT]
        try:
            target(data)
        except Exception as exc:  # the message names the input to replay
            raise AssertionError(f"{name} target fails on {path.relative_to(ROOT)}: {exc!r}") from exc


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_random_and_mutated_inputs(name):
    """Bounded in count and time: byte flips, truncations and splices of corpus inputs."""
    rng = random.Random(f"mrpcd-{name}")
    target = TARGETS[name]
    seeds = [p.read_bytes()[:4096] for p in corpus(name)] or [b""]
    end = time.monotonic() + BUDGET_S
    for i in range(3000):
        if time.monotonic() > end:
            break
        data = bytearray(rng.choice(seeds))
        op = i % 4
        if op == 0 or not data:
            data = bytearray(os.urandom(rng.randrange(0, 300)))
        elif op == 1:
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 2:
            data = data[: rng.randrange(len(data) + 1)]
        else:
            other = rng.choice(seeds)
            data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]
        try:
            target(bytes(data))
        except Exception as exc:
            raise AssertionError(f"{name} target fails on input {bytes(data)!r:.400}: {exc!r}") from exc


def test_a_target_does_report_a_bug(monkeypatch):
    """The harness is not blind: a parser raising an undocumented exception fails the target."""
    from mrpcd.marshal import records as R

    def broken(data, max_record=0):
        raise KeyError("bug")

    import fuzz.targets as T

    monkeypatch.setattr(T.R, "parse_record", broken)
    with pytest.raises(KeyError):
        T.ring(b"\x02\xff\xff")  # two good records, no scribble
    assert R.parse_record is broken

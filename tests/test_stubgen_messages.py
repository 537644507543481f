"""Generated messages at run time: what their constructors keep, SerializeToString's
arguments, equality across modules."""
from __future__ import annotations

import os
import subprocess
import sys
from types import MappingProxyType
from pathlib import Path

import pytest
from conftest import load_generated

import mrpcd
from mrpcd.stubgen import cli

PROTOS = Path(__file__).resolve().parent / "protos"


def load(path: Path, tag: str = ""):
    """A generated module under a private name (other tests import their own)."""
    return load_generated(path, f"_stubgen_msg_{tag}")


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubgen_messages")
    assert cli.main([str(PROTOS / "scalars.proto"), "-o", str(out)]) == 0
    return load(out / "scalars_mrpc.py")


# -- B9: repeated and map arguments are copied, as protobuf does -------------------------------------


def test_repeated_and_map_arguments_are_copied(s):
    o = s.Outer(numbers=(x for x in [1, 2, 3]), words=("a", "b"), counts=MappingProxyType({"k": 1}))
    assert o.numbers == [1, 2, 3] and type(o.numbers) is list
    assert o.words == ["a", "b"] and type(o.words) is list
    assert o.counts == {"k": 1} and type(o.counts) is dict
    first, second = o.SerializeToString(), o.SerializeToString()
    assert first == second and s.Outer.FromString(second).numbers == [1, 2, 3]
    o.words.append("c")  # a tuple given: still a list to append to
    mine, theirs = [1], {"a": 1}
    o = s.Outer(numbers=mine, counts=theirs)
    o.numbers.append(2)
    o.counts["b"] = 2
    assert mine == [1] and theirs == {"a": 1}, "the caller's list and dict are not shared"
    # the base class's constructor (no generated __init__) copies too
    base = object.__new__(s.Outer)
    mrpcd.marshal.message.Message.__init__(base, numbers=(4, 5), counts={"z": 1}, inners=None)
    assert base.numbers == [4, 5] and type(base.numbers) is list and base.counts == {"z": 1} and base.inners == []
    # what the encoder refuses is kept for it to name the field
    with pytest.raises(mrpcd.marshal.codec.EncodeError, match="Outer.words: expected a list"):
        s.Outer(words="abc").SerializeToString()
    with pytest.raises(mrpcd.marshal.codec.EncodeError, match="Outer.counts: expected a dict"):
        s.Outer(counts=[("k", 1)]).SerializeToString()


# -- B10: SerializeToString(deterministic=...) -------------------------------------------------------


def test_serialize_deterministic_sorts_map_keys(s):
    inner_a = s.Outer.Inner(x=1)
    a = s.Outer(counts={"b": 2, "a": 1, "c": 3}, by_id={5: inner_a, -1: s.Outer.Inner()},
                inners=[s.Outer.Inner(x=2)], flags={True: s.Color.RED, False: s.Color.GREEN})
    b = s.Outer(counts={"c": 3, "a": 1, "b": 2}, by_id={-1: s.Outer.Inner(), 5: inner_a},
                inners=[s.Outer.Inner(x=2)], flags={False: s.Color.GREEN, True: s.Color.RED})
    assert a.SerializeToString() != b.SerializeToString()  # insertion order, as protobuf's default
    da, db = a.SerializeToString(deterministic=True), b.SerializeToString(deterministic=True)
    assert da == db and s.Outer.FromString(da) == a
    assert list(s.Outer.FromString(da).counts) == ["a", "b", "c"]
    assert a.SerializeToString(deterministic=False) == a.SerializeToString()
    assert s.Outer.SerializeToString(a, deterministic=True) == da  # unbound, as stubs call it
    assert s.Empty().SerializeToString(deterministic=True) == s.Empty().SerializeToString()


def test_pyi_serialize_deterministic(s, tmp_path):
    pytest.importorskip("mypy")
    out = Path(s.__file__).parent
    use = tmp_path / "use.py"
    use.write_text("import scalars_mrpc as s\n"
                   "a: bytes = s.Outer().SerializeToString(deterministic=True)\n"
                   "b: bytes = s.Outer.SerializeToString(s.Outer(), deterministic=False)\n")
    r = _mypy(tmp_path, out, out / "scalars_mrpc.pyi", use)
    assert r.returncode == 0, r.stdout + r.stderr


def _mypy(cwd: Path, path: Path, *files: Path):
    env = dict(os.environ, MYPYPATH=str(path))
    cmd = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-incremental",
           "--cache-dir", os.devnull, *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


# -- B11: the .pyi's constructor takes what the runtime takes ---------------------------------------


def test_pyi_constructor_takes_iterables_mappings_and_ints_for_enums(s, tmp_path):
    pytest.importorskip("mypy")
    out = Path(s.__file__).parent
    use = tmp_path / "use.py"
    use.write_text(
        "from collections.abc import Iterator\n"
        "import scalars_mrpc as s\n"
        "def gen() -> Iterator[int]:\n"
        "    yield 1\n"
        "o = s.Outer(numbers=gen(), words=('a', 'b'), colors={s.Color.RED, 2}, inners=(s.Outer.Inner(),),\n"
        "            counts={'a': 1}, flags={True: 1, False: s.Color.RED}, kind=1, by_id={1: s.Outer.Inner()})\n"
        "numbers: list[int] = o.numbers\n"  # attributes stay lists and dicts
        "counts: dict[str, int] = o.counts\n"
        "colors: list[s.Color] = o.colors\n"
    )
    r = _mypy(tmp_path, out, out / "scalars_mrpc.pyi", use)
    assert r.returncode == 0, r.stdout + r.stderr
    exec(compile(use.read_text().replace("import scalars_mrpc as s", ""), "use", "exec"), {"s": s})  # and it runs
    bad = tmp_path / "bad.py"
    bad.write_text("import scalars_mrpc as s\n"
                   "s.Outer(numbers=['x'])\n"
                   "s.Outer(counts={1: 1})\n"
                   "s.Outer(colors=['RED'])\n")
    r = _mypy(tmp_path, out, bad)
    assert r.returncode == 1 and r.stdout.count("error:") == 3, r.stdout


# -- B12: the same message generated into two modules ------------------------------------------------


def test_equality_of_one_message_generated_into_two_modules(tmp_path):
    out = tmp_path / "out"
    assert cli.main([str(PROTOS / "streaming.proto"), str(PROTOS / "common.proto"), "-o", str(out)]) == 0
    st, common = load(out / "streaming_mrpc.py", "eq"), load(out / "common_mrpc.py", "eq")
    assert st.Header is not common.Header
    a, b = st.Header(trace_id="t", priority=1), common.Header(trace_id="t", priority=1)
    assert a == b and b == a and not (a != b)
    assert a != common.Header(trace_id="u") and common.Header(trace_id="u") != a
    # inside a message too, and the runtime encodes either
    c1 = st.Chunk(header=a, data=b"x")
    c2 = st.Chunk(header=b, data=b"x")
    assert c1 == c2 and st.Chunk.FromString(c2.SerializeToString()) == c1
    # another message with the same fields is not equal
    assert a != st.Chunk() and st.Header() != object()

"""Generated messages at run time: what their constructors keep, SerializeToString's
arguments, equality across modules."""
from __future__ import annotations

import importlib.util
import sys
from types import MappingProxyType
from pathlib import Path

import pytest

import mrpcd
from mrpcd.stubgen import cli

PROTOS = Path(__file__).resolve().parent / "protos"


def load(path: Path, tag: str = ""):
    name = f"_stubgen_msg_{tag}{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    return mod


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

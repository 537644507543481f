"""The protobuf Python API that code ported from grpcio reaches for on generated messages:
enum wrappers and constants, repeated-message `add()`, dicts for message fields in
constructors, message-valued maps, Timestamp / Duration helpers (tests/protos/compat.proto)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_generated

from mrpcd.stubgen import cli

PROTOS = Path(__file__).resolve().parent / "protos"


def load(path: Path, tag: str = ""):
    """A generated module under a private name (other tests import their own)."""
    return load_generated(path, f"_stubgen_compat_{tag}")


def generate(tmp_path: Path, text: str, name: str = "t") -> Path:
    """Write `text` as NAME.proto, generate it into tmp_path/out; returns the .py's path."""
    proto = tmp_path / f"{name}.proto"
    proto.write_text(text)
    out = tmp_path / "out"
    assert cli.main([str(proto), "-o", str(out)]) == 0
    return out / f"{name}_mrpc.py"


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubgen_compat")
    assert cli.main([str(PROTOS / "compat.proto"), "-o", str(out)]) == 0
    return load(out / "compat_mrpc.py")


def _mypy(cwd: Path, path: Path, *files: Path):
    env = dict(os.environ, MYPYPATH=str(path))
    cmd = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-incremental",
           "--cache-dir", os.devnull, *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


# -- enums: protobuf's EnumTypeWrapper methods and value constants ------------------------------------


def test_enum_wrapper_methods(c):
    assert c.Color.Name(1) == "GREEN" and c.Color.Value("GREEN") == 1
    assert c.Color.Value("GREEN") is c.Color.GREEN  # a member: still an int
    assert c.Color.keys() == ["RED", "GREEN"] and c.Color.values() == [0, 1]
    assert c.Color.items() == [("RED", 0), ("GREEN", 1)]
    assert c.Outer.Kind.Name(0) == "K0" and c.Outer.Kind.Value("K1") == 1
    with pytest.raises(ValueError, match="Color has no name defined for value 5"):
        c.Color.Name(5)
    with pytest.raises(ValueError, match="Color has no value defined for name 'BLUE'"):
        c.Color.Value("BLUE")
    # still an IntEnum
    assert c.Color(1) is c.Color.GREEN and c.Color.GREEN == 1 and list(c.Color) == [c.Color.RED, c.Color.GREEN]


def test_enum_value_constants(c):
    assert c.RED is c.Color.RED and c.GREEN is c.Color.GREEN  # module level: top-level enums
    assert c.Outer.K0 is c.Outer.Kind.K0 and c.Outer.K1 is c.Outer.Kind.K1  # nested: the message class
    o = c.Outer(kind=c.Outer.K1, color=c.GREEN)
    assert c.Outer.FromString(o.SerializeToString()).kind is c.Outer.Kind.K1


def test_enum_names_are_the_proto_names(tmp_path):
    m = load(generate(tmp_path, """
syntax = "proto3";
package e;
enum Word { from = 0; to = 1; }
enum Aliased { option allow_alias = true; A = 0; B = 1; ALSO_B = 1; }
"""), "names")
    assert m.Word.Name(0) == "from" and m.Word.Value("from") is m.Word.from_ and m.Word.keys() == ["from", "to"]
    assert m.from_ is m.Word.from_  # the constant has the member's (Python) name
    assert m.Aliased.Name(1) == "B" and m.Aliased.Value("ALSO_B") == 1
    assert m.Aliased.keys() == ["A", "B", "ALSO_B"]


def test_enum_constants_never_replace_other_names(tmp_path):
    m = load(generate(tmp_path, """
syntax = "proto3";
package e;
enum Word { SCHEMA = 0; mrpcd = 1; OK = 2; }
message Msg {
  enum Kind { Clear = 0; from = 1; HasField = 3; DONE = 4; to_dict = 5; }
  int32 from_ = 1;
  Kind kind = 2;
}
"""), "clash")
    # a value named like a generated or imported name, a Message method, a field: no constant
    assert m.OK is m.Word.OK and not isinstance(m.SCHEMA, int) and m.mrpcd.StatusCode
    assert m.Msg.DONE is m.Msg.Kind.DONE
    assert callable(m.Msg.Clear) and callable(m.Msg.HasField) and callable(m.Msg.to_dict)
    msg = m.Msg(from_=3, kind=m.Msg.Kind.from_)
    assert msg.from_ == 3 and m.Msg.FromString(msg.SerializeToString()) == msg

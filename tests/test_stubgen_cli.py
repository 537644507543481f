"""mrpcd-stubgen's command line: include resolution, outputs of earlier runs."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_generated

from mrpcd.stubgen import cli


def load(path: Path):
    """A generated module under a private name (other tests import their own)."""
    return load_generated(path, "_stubgen_cli_")


@pytest.fixture
def tree(tmp_path):
    """a.proto, and sub/b.proto importing "c.proto" from its own directory."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.proto").write_text('syntax = "proto3";\nmessage A { int32 a = 1; }\n')
    (tmp_path / "sub" / "b.proto").write_text('syntax = "proto3";\nimport "c.proto";\nmessage B { C c = 1; }\n')
    (tmp_path / "sub" / "c.proto").write_text('syntax = "proto3";\nmessage C { int32 c = 1; }\n')
    return tmp_path


@pytest.mark.parametrize("order", [["a.proto", "sub/b.proto"], ["sub/b.proto", "a.proto"]])
@pytest.mark.parametrize("absolute", [False, True])
def test_imports_next_to_each_file_whatever_the_order(tree, monkeypatch, order, absolute):
    monkeypatch.chdir(tree)
    args = [str(tree / p) if absolute else p for p in order]
    assert cli.main([*args, "-o", "out"]) == 0
    b = load(tree / "out" / "b_mrpc.py")
    assert b.B(c=b.C(c=1)).c.c == 1
    assert load(tree / "out" / "a_mrpc.py").A(a=2).a == 2


def test_a_file_under_an_include_dir_keeps_its_name_there(tree, monkeypatch):
    # -I names sub/b.proto "sub/b.proto"; its import "c.proto" is then not found (as protoc)
    # unless sub/ is an include dir too
    monkeypatch.chdir(tree)
    assert cli.main(["sub/b.proto", "a.proto", "-I", ".", "-I", "sub", "-o", "out"]) == 0
    assert cli.main(["a.proto", "sub/b.proto", "-I", ".", "-I", "sub", "-o", "out2"]) == 0
    assert load(tree / "out2" / "b_mrpc.py").B().c is None


def test_no_pyi_removes_the_pyi_of_an_earlier_run(tree, monkeypatch):
    # a stale .pyi next to the new .py would type the module as it was
    monkeypatch.chdir(tree)
    assert cli.main(["a.proto", "-o", "out"]) == 0
    assert (tree / "out" / "a_mrpc.pyi").exists()
    (tree / "out" / "keep.pyi").write_text("")
    assert cli.main(["a.proto", "-o", "out", "--no-pyi"]) == 0
    assert sorted(p.name for p in (tree / "out").iterdir()) == ["a_mrpc.py", "keep.pyi"]

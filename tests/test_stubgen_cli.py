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


def test_an_import_not_found_says_how_imports_are_looked_up(tmp_path, capsys):
    # a service importing its types by their path from the repository's root (OpenTelemetry's
    # "opentelemetry/proto/trace/v1/trace.proto", googleapis' "google/api/..."), generated
    # without -I for that root: protoc's errors, then what to pass
    (tmp_path / "api" / "types" / "v1").mkdir(parents=True)
    (tmp_path / "api" / "types" / "v1" / "t.proto").write_text('syntax = "proto3";\npackage t;\nmessage T {}\n')
    svc = tmp_path / "api" / "svc" / "s.proto"
    svc.parent.mkdir()
    svc.write_text('syntax = "proto3";\nimport "api/types/v1/t.proto";\nservice S { rpc Get(t.T) returns (t.T); }\n')
    assert cli.main([str(svc), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "api/types/v1/t.proto: File not found." in err
    assert "hint: an import \"api/types/v1/t.proto\" is looked up as DIR/api/types/v1/t.proto for each -I DIR" in err
    assert "add -I with the directory that holds api/types/v1/t.proto" in err
    assert cli.main([str(svc), "-I", str(tmp_path), "-o", str(tmp_path / "out")]) == 0

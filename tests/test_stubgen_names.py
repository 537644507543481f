"""mrpcd-stubgen on protos whose names collide with what the generated code itself uses (a
review's findings): every generated module must import, and mean what the .proto says."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_generated

from mrpcd.stubgen import cli


def load(path: Path):
    """A generated module under a private name (other tests import their own)."""
    return load_generated(path, "_stubgen_names_")


def generate(tmp_path: Path, text: str, name: str = "t") -> Path:
    """Write `text` as NAME.proto, generate it into tmp_path/out; returns the .py's path."""
    proto = tmp_path / f"{name}.proto"
    proto.write_text(text)
    out = tmp_path / "out"
    assert cli.main([str(proto), "-o", str(out)]) == 0
    return out / f"{name}_mrpc.py"


def refused(tmp_path: Path, capsys, text: str, name: str = "t") -> str:
    proto = tmp_path / f"{name}.proto"
    proto.write_text(text)
    out = tmp_path / "out"
    assert cli.main([str(proto), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mrpcd-stubgen: error: ") and "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []
    return err


def mypy(cwd: Path, *files: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy")
    env = dict(os.environ, MYPYPATH=str(cwd / "out"))
    cmd = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-incremental",
           "--cache-dir", os.devnull, *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


class Channel:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def _make(self, kind):
        def make(method, request_type, response_type, **kw):
            self.calls.append((kind, method, request_type, response_type))
            return (kind, method, request_type, response_type)
        return make

    def __getattr__(self, kind: str):
        if kind not in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            raise AttributeError(kind)
        return self._make(kind)


class Server:
    def __init__(self) -> None:
        self.handlers: list = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.handlers.extend(handlers)


# -- B1: messages named like the parameters and locals of the service functions ---------------------

LOCALS = """
syntax = "proto3";
package loc;
message channel { int32 a = 1; }
message server { int32 a = 1; }
message servicer { int32 a = 1; }
message rpc_method_handlers { int32 a = 1; }
message generic_handler { int32 a = 1; }
message context { int32 a = 1; }
message request { int32 a = 1; }
service S {
  rpc A(channel) returns (channel);
  rpc B(server) returns (servicer);
  rpc C(rpc_method_handlers) returns (generic_handler);
  rpc D(request) returns (stream context);
}
"""


def test_messages_named_like_service_parameters_and_locals(tmp_path, fake_handlers):
    m = load(generate(tmp_path, LOCALS))
    ch = Channel()
    stub = m.SStub(ch)
    assert stub.A == ("unary_unary", "/loc.S/A", m.channel, m.channel)
    assert stub.B[2:] == (m.server, m.servicer)
    assert stub.C[2:] == (m.rpc_method_handlers, m.generic_handler)
    assert stub.D == ("unary_stream", "/loc.S/D", m.request, m.context)
    server = Server()
    m.add_SServicer_to_server(m.SServicer(), server)  # keyword names as grpcio's: servicer=, server=
    m.add_SServicer_to_server(servicer=m.SServicer(), server=server)
    assert server.handlers == [("generic", "loc.S")] * 2
    handlers = fake_handlers[0][1]
    assert handlers["A"][2:] == (m.channel, m.channel)
    assert handlers["B"][2:] == (m.server, m.servicer)
    assert handlers["C"][2:] == (m.rpc_method_handlers, m.generic_handler)
    assert handlers["D"][2:] == (m.request, m.context)
    assert m.SStub(channel=Channel()).A[2:] == (m.channel, m.channel)
    r = mypy(tmp_path, tmp_path / "out" / "t_mrpc.pyi")
    assert r.returncode == 0, r.stdout + r.stderr


def test_top_level_message_named_self(tmp_path, fake_handlers):
    m = load(generate(tmp_path, """
syntax = "proto3";
package s;
message self { int32 x = 1; }
message Other { int32 self = 1; }
service S { rpc Get(self) returns (Other); rpc Put(Other) returns (self); }
"""))
    stub = m.SStub(Channel())
    assert stub.Get[2:] == (m.self, m.Other) and stub.Put[2:] == (m.Other, m.self)
    m.add_SServicer_to_server(m.SServicer(), Server())
    assert fake_handlers[0][1]["Put"][2:] == (m.Other, m.self)
    assert m.Other(self=2).self == 2 and m.self(x=1).x == 1


# -- B2: generated names of two services -----------------------------------------------------------


def test_services_whose_generated_names_collide_are_refused(tmp_path, capsys):
    err = refused(tmp_path, capsys, """
syntax = "proto3";
package two;
message Req { int32 a = 1; }
service JobsAsync { rpc Submit(Req) returns (Req); }
service Jobs { rpc Run(Req) returns (Req); }
""")
    assert "JobsAsyncStub" in err and "two.JobsAsync" in err and "two.Jobs " in err


def test_a_message_named_like_a_generated_name_is_renamed(tmp_path):
    m = load(generate(tmp_path, """
syntax = "proto3";
package p;
message SStub { int32 a = 1; }
message add_SServicer_to_server { int32 b = 1; }
service S { rpc Get(SStub) returns (add_SServicer_to_server); }
"""))
    assert m.p_SStub.__mrpc_message__.full_name == "p.SStub"
    assert m.p_add_SServicer_to_server(b=1).b == 1
    assert m.SStub(Channel()).Get[2:] == (m.p_SStub, m.p_add_SServicer_to_server)


# -- B3: method names that become the same attribute; names Python gives a meaning ------------------


def test_methods_from_and_from_underscore_stay_apart(tmp_path, fake_handlers):
    m = load(generate(tmp_path, """
syntax = "proto3";
package dup;
message N { int32 from = 1; }
message O { int32 x = 1; }
service S {
  rpc from(N) returns (N);
  rpc from_(O) returns (O);
}
"""))
    stub = m.SStub(Channel())
    assert stub.from_ == ("unary_unary", "/dup.S/from_", m.O, m.O)  # the .proto's own name keeps it
    assert stub.from__ == ("unary_unary", "/dup.S/from", m.N, m.N)
    impl = m.SServicer()
    m.add_SServicer_to_server(impl, Server())
    handlers = fake_handlers[0][1]
    assert handlers["from"][1] == impl.from__ and handlers["from_"][1] == impl.from_
    r = mypy(tmp_path, tmp_path / "out" / "t_mrpc.pyi")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("text, words", [
    # (each named with its file:line:column, line 4 of the file below)
    ('service S { rpc __init__(M) returns (M); }', ["t.proto:4:13: method dup.S.__init__", "__"]),
    ('service S { rpc __call(M) returns (M); }', ["t.proto:4:13: method dup.S.__call"]),
    ('message __repr__ { int32 x = 1; }', ["t.proto:4:1: type dup.__repr__"]),
    ('message Outer { message __repr__ { int32 x = 1; } __repr__ r = 1; }', ["t.proto:4:17: type dup.Outer.__repr__"]),
    ('enum __builtins__ { A = 0; }', ["t.proto:4:1: type dup.__builtins__"]),
    ('enum E { _A_ = 0; }', ["t.proto:4:10: enum value dup.E._A_"]),
])
def test_dunder_method_and_type_names_are_refused(tmp_path, capsys, text, words):
    err = refused(tmp_path, capsys, f'syntax = "proto3";\npackage dup;\nmessage M {{ int32 x = 1; }}\n{text}\n')
    for w in words:
        assert w in err


# -- B4: the receiver of __init__; generated code that does not compile -----------------------------


def test_fields_named_like_every_receiver_candidate(tmp_path):
    m = load(generate(tmp_path, """
syntax = "proto2";
package dup;
message M { optional int32 self = 1; optional int32 _self_ = 2; optional int32 _self__ = 3; }
message self { optional M _self_ = 1; }
"""))
    x = m.M(self=1, _self_=2, _self__=3)
    assert (x.self, x._self_, x._self__) == (1, 2, 3)
    assert m.M.FromString(x.SerializeToString()) == x
    assert m.self(_self_=x)._self_ is x
    r = mypy(tmp_path, tmp_path / "out" / "t_mrpc.pyi")
    assert r.returncode == 0, r.stdout + r.stderr


def test_generated_code_that_does_not_compile_is_an_error_not_a_file(tmp_path, capsys, monkeypatch):
    from mrpcd.stubgen import generate as g

    real = g._Emitter.py
    monkeypatch.setattr(g._Emitter, "py", lambda self: real(self) + "def broken(a, a): pass\n")
    proto = tmp_path / "t.proto"
    proto.write_text('syntax = "proto3";\nmessage M { int32 x = 1; }\n')
    assert cli.main([str(proto), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "t_mrpc.py" in err and "duplicate argument" in err
    assert not (tmp_path / "out").exists()


# -- B5: an enum default resolved when __init__ runs -------------------------------------------------


def test_field_named_globals_next_to_a_lazily_resolved_enum_default(tmp_path):
    m = load(generate(tmp_path, """
syntax = "proto3";
package g;
message Response { enum Status { UNKNOWN = 0; DONE = 1; } }
message Holder {
  Response.Status Response = 1;
  int32 globals = 2;
  Later.Kind later = 3;
  int32 type = 4;
  int32 _builtins = 5;
  int32 getattr = 6;
}
message Later { enum Kind { K0 = 0; K1 = 1; } int32 globals = 1; Kind kind = 2; Response.Status Response = 3; }
"""))
    h = m.Holder()
    assert h.Response is m.Response.Status.UNKNOWN and h.later is m.Later.Kind.K0 and h.globals == 0
    h = m.Holder(Response=m.Response.Status.DONE, globals=3, later=1)
    assert (h.Response, h.globals, h.later) == (m.Response.Status.DONE, 3, 1)
    assert m.Holder.FromString(h.SerializeToString()) == h
    assert m.Later().kind is m.Later.Kind.K0


# -- B6: the .pyi's decorators and builtins under names a class or the module binds ------------------


def test_pyi_with_fields_and_messages_named_classmethod_and_builtins(tmp_path):
    generate(tmp_path, """
syntax = "proto2";
package cm;
message M {
  enum Kind { K0 = 0; K1 = 1; }
  message Sub { optional int32 x = 1; }
  optional int32 classmethod = 1;
  optional int32 enum = 2;
  optional Kind kind = 3;
  optional int32 _builtins = 5;
  optional int32 None_ = 6;
  optional Sub Sub_ = 8;
  optional int32 staticmethod = 9;
  optional bytes bytes = 10;
  repeated int32 list = 11;
  optional int32 int = 12;
}
message N { optional int32 _builtins = 1; optional int32 _builtins_ = 2; optional string str = 3; }
message classmethod { optional int32 y = 1; }
""")
    use = tmp_path / "use.py"
    use.write_text(
        "import t_mrpc as c\n"
        "y: c.classmethod = c.classmethod.FromString(b'')\n"
        "m: c.M = c.M.FromString(c.M(classmethod=1, bytes=b'x', list=[1]).SerializeToString())\n"
        "b: bytes | None = m.bytes\n"
        "i: int | None = m.classmethod\n"
        "j: list[int] = m.list\n"
        "n: c.N = c.N.FromString(c.N(str='s').SerializeToString())\n"
        "s: str | None = n.str\n"
    )
    r = mypy(tmp_path, tmp_path / "out" / "t_mrpc.pyi", use)
    assert r.returncode == 0, r.stdout + r.stderr
    m = load(tmp_path / "out" / "t_mrpc.py")
    assert m.M.FromString(m.M(classmethod=2).SerializeToString()).classmethod == 2


# -- B7: enum values named like attributes of IntEnum ------------------------------------------------


def test_enum_values_named_like_intenum_attributes(tmp_path):
    generate(tmp_path, """
syntax = "proto3";
enum Field { F0 = 0; name = 1; value = 2; real = 3; to_bytes = 4; bit_length = 5; denominator = 6; is_integer = 7; }
message M { Field f = 1; repeated Field fs = 2; }
""")
    use = tmp_path / "use.py"
    use.write_text("import t_mrpc as t\n"
                   "a: t.Field = t.Field.name\n"
                   "b: t.Field = t.Field.value\n"
                   "m = t.M(f=t.Field.to_bytes, fs=[t.Field.real])\n")
    r = mypy(tmp_path, tmp_path / "out" / "t_mrpc.pyi", use)
    assert r.returncode == 0, r.stdout + r.stderr
    m = load(tmp_path / "out" / "t_mrpc.py")
    assert [x.name for x in m.Field][1:3] == ["name", "value"] and m.Field.value == 2 and m.Field.name.value == 1
    x = m.M(f=m.Field.to_bytes, fs=[m.Field.real])
    assert m.M.FromString(x.SerializeToString()).f is m.Field.to_bytes


def test_nested_type_named_property_next_to_a_keyword_field(tmp_path):
    # the class body makes the keyword field's alias with property(): the nested class is renamed
    m = load(generate(tmp_path, """
syntax = "proto3";
package p;
message M { message property { int32 x = 1; } int32 from = 1; property p = 2; }
message N { message property { int32 y = 1; } property q = 1; }
"""))
    x = m.M(from_=3, p=m.M.property_(x=1))
    assert x.from_ == 3 and m.M.FromString(x.SerializeToString()) == x
    assert m.N(q=m.N.property(y=2)).q.y == 2  # no keyword field: the name stays
    r = mypy(tmp_path, tmp_path / "out" / "t_mrpc.pyi")
    assert r.returncode == 0, r.stdout + r.stderr

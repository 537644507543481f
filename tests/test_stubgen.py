"""mrpcd-stubgen: .proto -> <name>_mrpc.py / .pyi, checked by importing and using what it wrote."""
from __future__ import annotations

import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_generated

import mrpcd
from mrpcd.marshal.schema import Schema
from mrpcd.stubgen import cli
from mrpcd.stubgen.generate import module_name
from mrpcd.stubgen.parse import parse

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "tests" / "protos"
HELLO = ROOT / "examples" / "hello" / "hello.proto"
GOOD = ["scalars", "streaming", "collide", "legacy2", "names", "defaults2", "defaults2_wire"]


def stubgen(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI as users run it: `python -m mrpcd.stubgen ...` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "mrpcd.stubgen", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def load(path: Path):
    """A generated module under a private name (other tests import their own)."""
    return load_generated(path, "_stubgen_test_")


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubgen") / "gen"  # does not exist yet: the CLI creates it
    protos = [str(HELLO)] + [str(PROTOS / f"{n}.proto") for n in GOOD]
    r = stubgen(*protos, "-I", str(PROTOS), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return out


@pytest.fixture(scope="module")
def mods(gen):
    return {n: load(gen / f"{n}_mrpc.py") for n in ["hello"] + GOOD}


# -- files ---------------------------------------------------------------------------------------


def test_writes_py_and_pyi_per_input(gen):
    names = sorted(p.name for p in gen.iterdir())
    assert names == sorted(f"{n}_mrpc.{ext}" for n in ["hello"] + GOOD for ext in ("py", "pyi"))


def test_generated_files_compile(gen, tmp_path):
    for path in gen.iterdir():  # .pyi is Python syntax too
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + ".pyc")), doraise=True)


def test_module_name():
    assert module_name("a/b/hello.proto") == "hello_mrpc"
    assert module_name("my-api.v1.proto") == "my_api_v1_mrpc"
    assert module_name("1st.proto") == "_1st_mrpc"


def test_hello_module_shape(gen):
    src = (gen / "hello_mrpc.py").read_text()
    for line in [
        "import enum",
        "import mrpcd",
        "from mrpcd.marshal import codec as _codec",
        "from mrpcd.marshal.message import Message as _Message",
        "from mrpcd.marshal.schema import Schema as _Schema",
        "SCHEMA = _Schema.from_dict({",
        "class Mood(_EnumWrapper, enum.IntEnum):",
        "class HelloRequest(_Message):",
        "    class Address(_Message):",
        "_codec.bind(",
        "class GreeterStub:",
        "class GreeterServicer:",
        "def add_GreeterServicer_to_server(servicer, server):",
        "    server.add_generic_rpc_handlers((generic_handler,))",
    ]:
        assert line in src.splitlines(), line


# -- messages ------------------------------------------------------------------------------------


def test_hello_messages_and_defaults(mods):
    h = mods["hello"]
    r = h.HelloRequest()
    assert (r.name, r.count, r.address, r.tags, r.scores) == ("", 0, None, [], {})
    assert r.mood is h.Mood.MOOD_UNSPECIFIED and issubclass(h.Mood, int)
    assert h.HelloReply().message == ""
    # mutable defaults are per instance
    a, b = h.HelloRequest(), h.HelloRequest()
    a.tags.append("x")
    a.scores["k"] = 1
    assert b.tags == [] and b.scores == {}
    # __slots__, keyword-only, nested classes
    with pytest.raises(AttributeError):
        r.nope = 1
    with pytest.raises(TypeError):
        h.HelloRequest("positional")
    with pytest.raises(TypeError):
        h.HelloRequest(nope=1)
    assert h.HelloRequest.Address.__qualname__ == "HelloRequest.Address"
    assert issubclass(h.HelloRequest, mrpcd.marshal.message.Message)
    assert h.HelloRequest(name="n", tags=["t"]).tags == ["t"]


def test_schema_literal_is_the_parsed_schema(mods):
    [parsed] = parse([str(HELLO)])
    h = mods["hello"]
    assert isinstance(h.SCHEMA, Schema)
    assert h.SCHEMA.to_dict() == parsed.schema.to_dict()
    assert h.SCHEMA.fingerprints() == parsed.schema.fingerprints()
    assert set(h.SCHEMA.messages) == {"helloworld.HelloRequest", "helloworld.HelloRequest.Address", "helloworld.HelloReply"}
    svc = h.SCHEMA.services["helloworld.Greeter"]
    assert [(m.name, m.kind) for m in svc.methods] == [("SayHello", "unary_unary"), ("SayHelloStream", "unary_stream")]
    assert h.HelloRequest.__mrpc_message__ is h.SCHEMA.messages["helloworld.HelloRequest"]


def test_labels_maps_optional_oneof(mods):
    s = mods["scalars"].SCHEMA
    outer = {f.name: f for f in s.messages["mrpc.test.Outer"].fields}
    assert [f.number for f in s.messages["mrpc.test.Outer"].fields] == list(range(1, 19))
    assert outer["inners"].label == "repeated" and outer["inners"].type.ref == "mrpc.test.Outer.Inner"
    assert outer["colors"].label == "repeated" and outer["colors"].type.kind == "enum"
    assert (outer["counts"].label, outer["counts"].key.kind, outer["counts"].type.kind) == ("map", "string", "int32")
    assert (outer["by_id"].key.kind, outer["by_id"].type.ref) == ("int64", "mrpc.test.Outer.Inner")
    assert (outer["flags"].key.kind, outer["flags"].type.ref) == ("bool", "mrpc.test.Color")
    assert not any(name.endswith("Entry") for name in s.messages), "map entry types are not messages"
    for name in ("maybe", "maybe_text", "maybe_inner"):
        assert outer[name].label == "optional" and outer[name].oneof is None, "synthetic oneofs are dropped"
    for name in ("choice_text", "choice_number", "choice_inner"):
        assert outer[name].label == "single" and outer[name].oneof == "choice"
    assert outer["kind"].type.ref == "mrpc.test.Outer.Kind"
    assert outer["deep"].type.ref == "mrpc.test.Outer.Inner.Deepest"
    kinds = [f.type.kind for f in s.messages["mrpc.test.Scalars"].fields]
    assert kinds == ["double", "float", "int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32",
                     "fixed64", "sfixed32", "sfixed64", "bool", "string", "bytes", "enum"]
    old = {f.name: f.label for f in mods["legacy2"].SCHEMA.messages["mrpc.legacy.Old"].fields}
    assert old == {"maybe": "optional", "must": "single", "many": "repeated", "next": "optional",
                   "from": "optional", "from_": "optional"}


def test_scalars_defaults(mods):
    s = mods["scalars"]
    x = s.Scalars()
    assert [x.f_double, x.f_float, x.f_int32, x.f_uint64, x.f_sfixed64, x.f_bool, x.f_string, x.f_bytes] == \
        [0.0, 0.0, 0, 0, 0, False, "", b""]
    assert x.f_color is s.Color.COLOR_UNSPECIFIED
    o = s.Outer()
    assert o.kind is s.Outer.Kind.KIND_A
    assert s.Outer.Inner().kind is s.Outer.Kind.KIND_A  # an enum of the enclosing class
    assert (o.inner, o.maybe, o.maybe_text, o.choice_text, o.choice_inner, o.scalars) == (None,) * 6
    assert (o.inners, o.numbers, o.counts, o.by_id) == ([], [], {}, {})
    assert s.Outer.Inner.Deepest.__qualname__ == "Outer.Inner.Deepest"
    assert s.Empty().to_dict() == {}


def test_proto2_enum_default_is_its_first_value(mods):
    # proto2 enums need not have a 0 value: the default is the first value declared (as in protobuf)
    lg = mods["legacy2"]
    assert lg.Leveled().level is lg.Level.LOW
    assert lg.Leveled.FromString(lg.Leveled().SerializeToString()).level is lg.Level.LOW
    base = object.__new__(lg.Leveled)
    mrpcd.marshal.message.Message.__init__(base)  # the codec's defaults, used by the base class
    assert base.level is lg.Level.LOW and base.levels == []
    from mrpcd.marshal.codec import decode_plain, encode_plain
    assert decode_plain(lg.SCHEMA, "mrpc.legacy.Leveled", encode_plain(lg.SCHEMA, "mrpc.legacy.Leveled", {}))["level"] == 1


def test_keyword_names(mods):
    s = mods["scalars"]
    k = s.Keywords(from_=1, class_="c", import_=True, lambda_=[2], None_=3)
    assert (k.from_, k.class_, k.import_, k.lambda_, k.None_) == (1, "c", True, [2], 3)
    assert getattr(k, "from") == 1  # the slot keeps the .proto name (the codec reads it)
    k.from_ = 5
    assert getattr(k, "from") == 5
    assert [f.name for f in s.SCHEMA.messages["mrpc.test.Keywords"].fields] == ["from", "class", "import", "lambda", "None"]
    assert s.Keywords().lambda_ == [] and s.Keywords().lambda_ is not s.Keywords().lambda_
    assert [m.name for m in s.Reserved] == ["PASS", "None_", "True_", "mro_"]
    # `from` next to a real `from_` field: the property is `from__`
    old = mods["legacy2"].Old(from__=1, from_=2)
    assert (getattr(old, "from"), old.from_, old.from__) == (1, 2, 1)


def test_imported_and_well_known_types(mods):
    st = mods["streaming"]
    assert set(st.SCHEMA.messages) == {"mrpc.stream.Chunk", "mrpc.stream.Summary", "mrpc.common.Header",
                                       "google.protobuf.Timestamp", "google.protobuf.Empty"}
    assert set(st.SCHEMA.enums) == {"mrpc.common.Priority"}  # mrpc.common.Unused: not reached
    ts = st.Timestamp(seconds=1, nanos=2)
    assert ts.seconds == 1 and st.Empty().to_dict() == {}
    assert st.Header().priority is st.Priority.PRIORITY_LOW
    c = mods["collide"]
    assert c.Empty(mine=1).mine == 1  # the file's own type keeps the short name
    assert c.google_protobuf_Empty.__mrpc_message__.full_name == "google.protobuf.Empty"
    assert c.Box().wk is None


def test_colliding_python_names(mods):
    n = mods["names"]
    # types named like the module's own imports are renamed after their full name
    assert n.mrpc_names_enum.__mrpc_message__.full_name == "mrpc.names.enum"
    assert n.mrpc_names_mrpcd(y=1).y == 1
    assert n.enum.IntEnum and n.mrpcd.StatusCode  # the module's imports are intact
    r = n.Response()
    assert r.own is n.Response.Status.RESPONSE_UNKNOWN  # the nested enum
    assert r.top is n.Status.STATUS_OK  # the top-level enum it shadows in the class body
    assert n.Response(self=3).self == 3  # a field called `self`
    assert n.Holder().Response is n.Response.Status.RESPONSE_UNKNOWN  # a field hiding the class of its enum
    r = n.Response(Echo=n.Echo(text="e"), wrapped=n.mrpc_names_enum(x=2), top=n.Status.STATUS_FAILED)
    assert n.Response.FromString(r.SerializeToString()) == r
    # types and fields named like the builtins the module calls at run time
    assert n.mrpc_names_property(p=1).p == 1 and n.mrpc_names_NotImplementedError(e=2).e == 2
    st = n.Setter(from_=1, setattr=2, getattr=3)
    assert (getattr(st, "from"), st.from_, st.setattr, st.getattr) == (1, 1, 2, 3)
    assert n.Setter.FromString(st.SerializeToString()) == st
    ctx = FakeContext()
    with pytest.raises(NotImplementedError):
        n.NamesServicer().Echo(n.Echo(), ctx)
    assert ctx.code == mrpcd.StatusCode.UNIMPLEMENTED
    ch = FakeChannel()
    n.NamesStub(ch)
    assert [c[2:] for c in ch.calls] == [(n.Echo, n.Echo), (n.Echo, n.Response)]


# -- codec round trips -----------------------------------------------------------------------------


def test_round_trip_hello(mods):
    h = mods["hello"]
    r = h.HelloRequest(name="world", count=3, mood=h.Mood.HAPPY, address=h.HelloRequest.Address(city="Oslo", zip=150),
                       tags=["a", "b"], scores={"x": -1, "y": 2**40})
    data = r.SerializeToString()
    assert isinstance(data, bytes)
    back = h.HelloRequest.FromString(data)
    assert back == r and back.mood is h.Mood.HAPPY
    assert h.HelloReply.FromString(h.HelloReply(message="hi").SerializeToString()).message == "hi"
    assert h.HelloRequest.FromString(h.HelloRequest().SerializeToString()) == h.HelloRequest()


def test_round_trip_everything(mods):
    s = mods["scalars"]
    inner = s.Outer.Inner(x=-5, deepest=s.Outer.Inner.Deepest(leaf="leaf"), kind=s.Outer.Kind.KIND_B)
    o = s.Outer(
        inner=inner, inners=[inner, s.Outer.Inner()], numbers=[1, -2, 3], words=["w"], colors=[s.Color.RED, s.Color.GREEN],
        kind=s.Outer.Kind.KIND_B, counts={"a": 1}, by_id={2**62: inner}, flags={True: s.Color.GREEN, False: s.Color.RED},
        blobs={7: b"\x00\xff"}, maybe=0, maybe_text="", maybe_inner=s.Outer.Inner(), choice_number=-9,
        scalars=s.Scalars(f_double=1.5, f_float=0.25, f_int32=-2**31, f_int64=-2**63, f_uint32=2**32 - 1,
                          f_uint64=2**64 - 1, f_sint32=-1, f_sint64=-1, f_fixed32=1, f_fixed64=2**64 - 1,
                          f_sfixed32=-1, f_sfixed64=-1, f_bool=True, f_string="ünï", f_bytes=b"\x01",
                          f_color=s.Color.GREEN),
        deep=s.Outer.Inner.Deepest(leaf="d"),
    )
    back = s.Outer.FromString(o.SerializeToString())
    assert back == o
    assert back.maybe == 0 and back.maybe_text == "" and back.choice_text is None
    assert back.flags[True] is s.Color.GREEN and back.inner.kind is s.Outer.Kind.KIND_B
    k = s.Keywords(from_=1, class_="c", import_=True, lambda_=[1, 2], None_=-1)
    assert s.Keywords.FromString(k.SerializeToString()) == k
    r = s.Recursive(child=s.Recursive(child=s.Recursive(depth=2), depth=1), children=[s.Recursive(depth=9)])
    assert s.Recursive.FromString(r.SerializeToString()) == r
    st = mods["streaming"]
    chunk = st.Chunk(header=st.Header(trace_id="t", priority=st.Priority.PRIORITY_HIGH), data=b"xyz",
                     sent_at=st.Timestamp(seconds=1700000000, nanos=5), seq=4)
    assert st.Chunk.FromString(chunk.SerializeToString()) == chunk
    summary = st.Summary(total=1, times=[st.Timestamp(seconds=1), st.Timestamp(nanos=1)])
    assert st.Summary.FromString(summary.SerializeToString()) == summary
    old = mods["legacy2"].Old(must="m", next=mods["legacy2"].Old(maybe=1), from__=3, from_=4)
    assert mods["legacy2"].Old.FromString(old.SerializeToString()) == old


def test_oneof_and_type_errors_come_from_the_codec(mods):
    from mrpcd.marshal.codec import EncodeError

    s = mods["scalars"]
    # a constructor refuses two members (assigning one clears the others): only writing the
    # raw slots leaves two set, which the encoder refuses
    with pytest.raises(TypeError, match=r"^Outer\(\) got more than one member of oneof choice \(choice_text, choice_number\)"):
        s.Outer(choice_text="a", choice_number=1)
    o = s.Outer(choice_text="a")
    o._mrpc_raw_choice_number = 1
    with pytest.raises(EncodeError, match="oneof choice"):
        o.SerializeToString()
    with pytest.raises((EncodeError, TypeError)):
        s.Scalars(f_int32=2**31).SerializeToString()


# -- services --------------------------------------------------------------------------------------


class FakeChannel:
    KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, kind: str):
        if kind not in self.KINDS:
            raise AttributeError(kind)

        def make(method, request_type, response_type, **kw):
            self.calls.append((kind, method, request_type, response_type))
            return (kind, method)

        return make


class FakeContext:
    def __init__(self) -> None:
        self.code = self.details = None

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details) -> None:
        self.details = details


class FakeServer:
    def __init__(self) -> None:
        self.handlers: list = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.handlers.extend(handlers)


def test_stub_uses_the_channel_for_all_four_kinds(mods):
    st = mods["streaming"]
    ch = FakeChannel()
    stub = st.StreamerStub(ch)
    assert ch.calls == [
        ("unary_unary", "/mrpc.stream.Streamer/Unary", st.Chunk, st.Summary),
        ("unary_stream", "/mrpc.stream.Streamer/ServerStream", st.Chunk, st.Chunk),
        ("stream_unary", "/mrpc.stream.Streamer/ClientStream", st.Chunk, st.Summary),
        ("stream_stream", "/mrpc.stream.Streamer/BidiStream", st.Chunk, st.Chunk),
        ("unary_unary", "/mrpc.stream.Streamer/Ping", st.Empty, st.Empty),
        ("unary_unary", "/mrpc.stream.Streamer/import", st.Chunk, st.Chunk),
    ]
    assert stub.BidiStream == ("stream_stream", "/mrpc.stream.Streamer/BidiStream")
    assert stub.import_ == ("unary_unary", "/mrpc.stream.Streamer/import")  # keyword method name
    ch2 = FakeChannel()
    st.SecondStub(ch2)
    assert ch2.calls == [("unary_unary", "/mrpc.stream.Second/Get", st.Empty, st.Summary)]


def test_servicer_defaults_are_unimplemented(mods):
    st = mods["streaming"]
    servicer = st.StreamerServicer()
    for name in ("Unary", "ServerStream", "ClientStream", "BidiStream", "Ping", "import_"):
        ctx = FakeContext()
        with pytest.raises(NotImplementedError, match="Method not implemented!"):
            getattr(servicer, name)(None, ctx)
        assert ctx.code == mrpcd.StatusCode.UNIMPLEMENTED and ctx.details == "Method not implemented!"


def test_add_servicer_to_server_registers_every_method(mods, fake_handlers):
    st = mods["streaming"]

    class Impl(st.StreamerServicer):
        pass

    impl, server = Impl(), FakeServer()
    st.add_StreamerServicer_to_server(impl, server)
    assert server.handlers == [("generic", "mrpc.stream.Streamer")]
    [(service, handlers, schema)] = fake_handlers
    assert service == "mrpc.stream.Streamer" and schema is st.SCHEMA
    assert {name: h[0] for name, h in handlers.items()} == {
        "Unary": "unary_unary", "ServerStream": "unary_stream", "ClientStream": "stream_unary",
        "BidiStream": "stream_stream", "Ping": "unary_unary", "import": "unary_unary"}
    assert handlers["ClientStream"][1] == impl.ClientStream
    assert handlers["import"][1] == impl.import_
    assert handlers["Unary"][2:] == (st.Chunk, st.Summary)


def test_add_servicer_with_the_real_handlers(mods):
    if not hasattr(mrpcd, "GenericRpcHandler"):
        pytest.skip("mrpcd runtime handlers not available")
    h = mods["hello"]
    server = FakeServer()
    h.add_GreeterServicer_to_server(h.GreeterServicer(), server)
    [generic] = server.handlers
    assert generic.service == "helloworld.Greeter" and generic.schema is h.SCHEMA
    assert set(generic.handlers) == {"SayHello", "SayHelloStream"}
    assert generic.handlers["SayHelloStream"].response_streaming
    assert set(generic.by_id) == {m.method_id for m in h.SCHEMA.services["helloworld.Greeter"].methods}


# -- the CLI -------------------------------------------------------------------------------------


def test_syntax_error_is_reported_with_file_and_line(tmp_path):
    r = stubgen(str(PROTOS / "syntax_error.proto"), "-o", str(tmp_path / "out"))
    assert r.returncode == 1
    assert "syntax_error.proto:7:3" in r.stderr and 'Expected ";"' in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "syntax_error_mrpc.py").exists()


@pytest.mark.parametrize("proto, words", [
    # refused constructs are named with protoc's file:line:column, as its own errors are
    ("bad_group.proto", ["bad_group.proto:6:3: ", "groups are not supported", "WithGroup"]),
    ("bad_extension.proto", ["bad_extension.proto:11:3: ", "extensions are not supported", "Extendable.note"]),
    ("bad_edition.proto", ["bad_edition.proto:3:1: protobuf editions are not supported"]),
    ("bad_unknown_type.proto", ["bad_unknown_type.proto:6:3", "NoSuchType"]),
])
def test_unsupported_or_invalid_protos(tmp_path, capsys, proto, words):
    assert cli.main([str(PROTOS / proto), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mrpcd-stubgen: error: ")
    for w in words:
        assert w in err
    assert list(tmp_path.iterdir()) == []


def test_custom_options_are_not_refused(tmp_path):
    # a file declaring custom options (extensions of google.protobuf.*Options) generates:
    # options annotate the .proto, they add no field to any message
    r = stubgen(str(PROTOS / "options.proto"), "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    mod = load(tmp_path / "options_mrpc.py")
    assert set(mod.SCHEMA.messages) == {"mrpc.options.Login"}  # no google.protobuf.*Options
    login = mod.Login(user="u", password="p")
    assert mod.Login.FromString(login.SerializeToString()) == login
    assert [m.name for m in mod.SCHEMA.services["mrpc.options.Auth"].methods] == ["Check"]


def test_missing_file_and_usage_errors(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nope.proto"), "-o", str(tmp_path)]) == 1
    assert "nope.proto: no such file" in capsys.readouterr().err
    assert cli.main([str(HELLO), "-I", str(tmp_path / "nodir"), "-o", str(tmp_path)]) == 1
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "mrpcd-stubgen" in capsys.readouterr().out


def test_same_module_name_twice_is_refused(tmp_path, capsys):
    other = tmp_path / "x" / "hello.proto"
    other.parent.mkdir()
    shutil.copy(HELLO, other)
    assert cli.main([str(HELLO), str(other), "-o", str(tmp_path / "out")]) == 1
    assert "would both be generated as hello_mrpc.py" in capsys.readouterr().err


def test_imports_resolve_next_to_the_file_without_I(tmp_path):
    # streaming.proto imports "common.proto": found through the file's own directory
    r = stubgen(str(PROTOS / "streaming.proto"), "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "streaming_mrpc.py").exists() and (tmp_path / "streaming_mrpc.pyi").exists()


def test_relative_paths_and_default_output(tmp_path):
    shutil.copy(HELLO, tmp_path / "hello.proto")
    r = stubgen("hello.proto", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hello_mrpc.py").exists()
    assert cli.main([str(tmp_path / "hello.proto"), "-o", str(tmp_path / "o"), "--no-pyi"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["hello_mrpc.py"]


def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "mrpcd-stubgen"
    if not script.exists():
        pytest.skip("mrpcd-stubgen console script not installed next to this python")
    r = subprocess.run([str(script), str(HELLO), "-o", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hello_mrpc.py").exists()


def test_pyi_types_sync_and_asyncio_use(gen, tmp_path):
    # XStub works on both channels and XServicer is subclassed with def or async def
    # handlers (README): the .pyi must type both, as grpcio's stubs type grpc and grpc.aio
    pytest.importorskip("mypy")
    use = tmp_path / "use_both.py"
    use.write_text(
        "from collections.abc import AsyncIterator, Iterator\n"
        "import mrpcd\n"
        "import mrpcd.aio\n"
        "import streaming_mrpc as s\n"
        "def sync(ch: mrpcd.Channel) -> int:\n"
        "    stub = s.StreamerStub(ch)\n"
        "    one: s.Summary = stub.Unary(s.Chunk())\n"
        "    many: list[s.Chunk] = list(stub.ServerStream(s.Chunk()))\n"
        "    up: s.Summary = stub.ClientStream(iter([s.Chunk()]))\n"
        "    return len(many) + len(list(stub.BidiStream([s.Chunk()])))\n"
        "def sync_call_objects(ch: mrpcd.Channel) -> str:\n"
        "    stub = s.StreamerStub(ch)\n"
        "    fut = stub.Unary.future(s.Chunk(), timeout=1.0)\n"
        "    got: s.Summary = fut.result(timeout=2.0)\n"
        "    reply, call = stub.Unary.with_call(s.Chunk(), metadata=[('k', 'v')])\n"
        "    total: s.Summary = stub.ClientStream.future(iter([s.Chunk()])).result()\n"
        "    it = stub.ServerStream(s.Chunk())\n"
        "    first: s.Chunk = next(it)\n"
        "    it.cancel()\n"
        "    code: mrpcd.StatusCode = call.code()\n"
        "    return call.details() + str(fut.done())\n"
        "async def aio(ch: mrpcd.aio.Channel) -> int:\n"
        "    stub = s.StreamerStub(ch)\n"
        "    one: s.Summary = await stub.Unary(s.Chunk(), timeout=1.0)\n"
        "    c = stub.Unary(s.Chunk())\n"
        "    code: mrpcd.StatusCode = await c.code()\n"
        "    up_call = stub.ClientStream()\n"
        "    await up_call.write(s.Chunk())\n"
        "    await up_call.done_writing()\n"
        "    total: s.Summary = await up_call\n"
        "    bidi = stub.BidiStream()\n"
        "    await bidi.write(s.Chunk())\n"
        "    nxt = await bidi.read()\n"
        "    many = [c async for c in stub.ServerStream(s.Chunk())]\n"
        "    up: s.Summary = await stub.ClientStream([s.Chunk()])\n"
        "    async def gen() -> AsyncIterator[s.Chunk]:\n"
        "        yield s.Chunk()\n"
        "    return len(many) + len([c async for c in stub.BidiStream(gen())])\n"
        "class Sync(s.StreamerServicer):\n"
        "    def Unary(self, request: s.Chunk, context: mrpcd.ServicerContext) -> s.Summary:\n"
        "        return s.Summary()\n"
        "    def ServerStream(self, request: s.Chunk, context: mrpcd.ServicerContext) -> Iterator[s.Chunk]:\n"
        "        yield request\n"
        "    def ClientStream(self, request_iterator: Iterator[s.Chunk], context: mrpcd.ServicerContext) -> s.Summary:\n"
        "        return s.Summary()\n"
        "class Aio(s.StreamerServicer):\n"
        "    async def Unary(self, request: s.Chunk, context: mrpcd.aio.ServicerContext) -> s.Summary:\n"
        "        return s.Summary()\n"
        "    async def ServerStream(self, request: s.Chunk, context: mrpcd.aio.ServicerContext) -> AsyncIterator[s.Chunk]:\n"
        "        yield request\n"
        "    async def ClientStream(self, request_iterator: AsyncIterator[s.Chunk], context: mrpcd.aio.ServicerContext) -> s.Summary:\n"
        "        return s.Summary()\n"
    )
    # mrpcd's own types, from the source tree laid out as the package (an editable install
    # maps the folders with an import hook mypy does not see)
    pkg = tmp_path / "src" / "mrpcd"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "mrpcd").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for sub in ("marshal", "native", "policies", "stubgen", "transports"):
        (pkg / sub).symlink_to(ROOT / sub)
    env = dict(os.environ, MYPYPATH=os.pathsep.join([str(gen), str(tmp_path / "src")]))
    mypy = [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-incremental", "--cache-dir", os.devnull]
    r = subprocess.run([*mypy, str(gen / "streaming_mrpc.pyi"), str(use)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # and what it refuses: a wrong request type, a wrong use of the response
    bad = tmp_path / "bad_calls.py"
    bad.write_text(
        "import mrpcd\n"
        "import streaming_mrpc as s\n"
        "def f(ch: mrpcd.Channel) -> None:\n"
        "    stub = s.StreamerStub(ch)\n"
        "    stub.Unary.future(s.Summary())\n"
        "    n: int = stub.Unary.with_call(s.Chunk())[0]\n"
    )
    r = subprocess.run([*mypy, str(bad)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'Argument 1 to "future" of "_UnaryUnary" has incompatible type "Summary"; expected "Chunk"' in r.stdout, r.stdout
    assert 'expression has type "Summary", variable has type "int"' in r.stdout, r.stdout


def test_pyi_passes_mypy(gen, tmp_path):
    pytest.importorskip("mypy")
    use = tmp_path / "use.py"
    use.write_text(
        "import hello_mrpc as h\n"
        "import scalars_mrpc as s\n"
        "import names_mrpc as nm\n"
        "import defaults2_mrpc as d2\n"
        "i: int = d2.Conf().i\n"  # a proto2 field with a declared default reads it: never None
        "c: d2.Color = d2.Conf(color=None, req=None).color\n"
        "p: int | None = d2.Conf().plain\n"
        "r = h.HelloRequest(name='x', mood=h.Mood.HAPPY, tags=['a'], scores={'a': 1})\n"
        "n: str = r.name\n"
        "r2: h.HelloRequest = h.HelloRequest.FromString(r.SerializeToString())\n"
        "k: int = s.Keywords(from_=1).from_\n"
        "st: nm.Status = nm.Response().top\n"
        "own: nm.Response.Status = nm.Holder().Response\n"
        "e: nm.Echo | None = nm.Response().Echo\n"
        "bi = nm.Builtins(list=['a'], dict={'a': 1}, str='s', bytes=nm.bytes(n=1), int=2, float=1.5, bool=True, raw=b'r')\n"
        "li: list[str] = bi.list\n"
        "raw: bytes = bi.raw\n"
        "wire: bytes = bi.SerializeToString()\n"
        "def f(stub: h.GreeterStub) -> str:\n"
        "    return stub.SayHello(r, timeout=1.0).message + ''.join(x.message for x in stub.SayHelloStream(r))\n"
    )

    pyis = [str(gen / f"{n}_mrpc.pyi") for n in ["hello"] + GOOD]
    env = dict(os.environ, MYPYPATH=str(gen))
    mypy = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-incremental",
            "--cache-dir", os.devnull]
    # run outside the repo: mypy must not pick up the source tree's folders as packages
    r = subprocess.run([*mypy, *pyis, str(use)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("import hello_mrpc as h\nh.HelloRequest(name=3)\n")
    r = subprocess.run([*mypy, str(bad)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 1 and 'Argument "name" to "HelloRequest" has incompatible type "int"' in r.stdout


def test_protobuf_message_methods(mods):
    """HasField / WhichOneof / ClearField / Clear / CopyFrom / MergeFrom / ParseFromString /
    MergeFromString behave as protobuf's do for code written against grpcio's messages."""
    s = mods["scalars"]
    Outer, Inner = s.Outer, s.Outer.Inner
    o = Outer()
    assert not o.HasField("inner") and not o.HasField("maybe") and not o.HasField("choice")
    assert o.WhichOneof("choice") is None
    o.inner, o.maybe, o.choice_number = Inner(x=1), 0, 7
    assert o.HasField("inner") and o.HasField("maybe") and o.HasField("choice_number") and o.HasField("choice")
    assert not o.HasField("choice_text") and o.WhichOneof("choice") == "choice_number"
    for bad, words in [("numbers", "does not have presence"), ("kind", "does not have presence"),
                       ("nope", "has no field 'nope'")]:
        with pytest.raises(ValueError, match=words):
            o.HasField(bad)
    with pytest.raises(ValueError, match="has no oneof 'inner'"):
        o.WhichOneof("inner")
    o.ClearField("choice")
    assert o.WhichOneof("choice") is None and o.choice_number is None
    o.numbers.append(3)
    o.ClearField("numbers")
    assert o.numbers == [] and o.HasField("inner")
    with pytest.raises(ValueError, match="has no field 'zz'"):
        o.ClearField("zz")

    src = Outer(inner=Inner(x=5, deepest=Inner.Deepest(leaf="a")), numbers=[1, 2], counts={"a": 1},
                maybe_text="t", choice_text="c", kind=Outer.Kind.KIND_B)
    dst = Outer()
    dst.CopyFrom(src)
    assert dst == src and dst.inner is not src.inner and dst.numbers is not src.numbers
    dst.inner.deepest.leaf = "changed"
    assert src.inner.deepest.leaf == "a", "CopyFrom is a deep copy"
    with pytest.raises(TypeError, match="must be instance of same class"):
        dst.CopyFrom(Inner())

    # MergeFrom: set fields overwrite, messages merge, repeated append, maps update, a oneof
    # member set in the source clears the others; defaults of fields without presence do not
    into = Outer(inner=Inner(x=1, kind=Outer.Kind.KIND_B), numbers=[9], counts={"a": 0, "b": 2},
                 choice_number=4, kind=Outer.Kind.KIND_B, maybe=3)
    into.MergeFrom(src)
    assert (into.inner.x, into.inner.kind, into.inner.deepest.leaf) == (5, Outer.Kind.KIND_B, "a")
    assert into.numbers == [9, 1, 2] and into.counts == {"a": 1, "b": 2}
    assert into.WhichOneof("choice") == "choice_text" and into.choice_number is None
    assert into.maybe == 3 and into.maybe_text == "t" and into.kind == Outer.Kind.KIND_B
    into.MergeFrom(Outer())  # nothing set: nothing changes
    assert into.numbers == [9, 1, 2] and into.kind == Outer.Kind.KIND_B
    into.MergeFrom(into)
    assert into.numbers == [9, 1, 2, 9, 1, 2]

    data = src.SerializeToString()
    p = Outer(numbers=[7], maybe=1)
    assert p.ParseFromString(data) == len(data) and p == src
    m = Outer(numbers=[7], maybe=1)
    assert m.MergeFromString(data) == len(data)
    assert m.numbers == [7, 1, 2] and m.maybe == 1 and m.inner == src.inner
    before = Outer(numbers=[7])
    with pytest.raises(mrpcd.marshal.codec.DecodeError):
        before.ParseFromString(b"\xc1not msgpack")
    assert before.numbers == [7], "a failed parse changes nothing"
    before.Clear()
    assert before == Outer()

    k = s.Keywords(from_=1)
    k.ClearField("from")
    assert k.from_ == 0


def test_list_fields_and_is_initialized(mods):
    """ListFields: the set fields by number, as protobuf lists them; IsInitialized: every
    proto2 required field set, down through nested, repeated and map messages."""
    s = mods["scalars"]
    Outer, Inner = s.Outer, s.Outer.Inner
    assert Outer().ListFields() == []
    o = Outer(maybe=0, choice_number=5, numbers=[1], kind=Outer.Kind.KIND_B, counts={}, inner=Inner())
    listed = [(f.name, f.number, v) for f, v in o.ListFields()]
    assert listed == [("inner", 1, Inner()), ("numbers", 3, [1]), ("kind", 6, Outer.Kind.KIND_B),
                      ("maybe", 11, 0), ("choice_number", 15, 5)]
    o.ClearField("choice")
    o.kind = Outer.Kind.KIND_A  # back to its default: not set
    assert [f.name for f, _ in o.ListFields()] == ["inner", "numbers", "maybe"]
    assert o.IsInitialized()  # proto3: nothing is required

    lg = mods["legacy2"]
    assert not lg.Holder().IsInitialized()
    h = lg.Holder(old=lg.Old(must="m"))
    assert h.IsInitialized()
    h.spare = lg.Old(next=lg.Old(maybe=1))  # a required string always has a value to send
    assert h.IsInitialized() and lg.Holder.FromString(h.SerializeToString()) == h
    h.old.next = lg.Old()
    assert h.IsInitialized()
    assert [f.name for f, _ in h.ListFields()] == ["old", "spare"]
    for shelf in (lg.Shelf(holders=[h, lg.Holder()]), lg.Shelf(named={"a": lg.Holder()}), lg.Shelf(one=lg.Holder())):
        assert not shelf.IsInitialized()
        with pytest.raises(mrpcd.marshal.codec.EncodeError, match="missing required field old"):
            shelf.SerializeToString()
    assert lg.Shelf(holders=[h], named={"a": h}, one=h).IsInitialized()


@pytest.mark.parametrize("name", ["HasField", "CopyFrom", "to_dict", "ListFields", "IsInitialized"])
def test_a_field_named_like_a_message_method_is_refused(tmp_path, capsys, name):
    proto = tmp_path / "clash.proto"
    proto.write_text(f'syntax = "proto3";\npackage c;\nmessage M {{ int32 {name} = 1; }}\n')
    assert cli.main([str(proto), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"clash.proto:3:13: field c.M.{name}: the name clashes with a method of generated messages" in err


def test_proto2_required_message_field_is_enforced(mods):
    lg = mods["legacy2"]
    holder = {f.name: f for f in lg.SCHEMA.messages["mrpc.legacy.Holder"].fields}
    assert holder["old"].required and not holder["spare"].required
    assert not {f.name: f for f in lg.SCHEMA.messages["mrpc.legacy.Old"].fields}["must"].required  # a scalar
    with pytest.raises(mrpcd.marshal.codec.EncodeError, match="mrpc.legacy.Holder: missing required field old"):
        lg.Holder(spare=lg.Old(must="s")).SerializeToString()
    ok = lg.Holder(old=lg.Old(must="m"))
    assert lg.Holder.FromString(ok.SerializeToString()) == ok
    import msgpack
    with pytest.raises(mrpcd.marshal.codec.DecodeError, match="missing required field old"):
        lg.Holder.FromString(msgpack.packb([None, None]))
    # the daemon checks schemas it is given: `required` only on a single message field
    d = lg.SCHEMA.to_dict()
    fields = dict(d["messages"])["mrpc.legacy.Old"]
    fields[0] = fields[0] + [True]  # `maybe`, an optional int32, marked required
    with pytest.raises(mrpcd.marshal.schema.SchemaError, match="only a single message field"):
        Schema.from_dict(d)
    # schemas without required fields keep their fingerprints (and their wire form)
    assert all(len(f) == 6 for _, fs in mods["hello"].SCHEMA.to_dict()["messages"] for f in fs)

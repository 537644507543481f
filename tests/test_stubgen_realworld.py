"""The message API of a module generated from the kind of .proto inference servers and
microservices bring (tests/protos/serving.proto: oneofs, maps of messages, repeated bytes,
proto3 `optional`, keyword field names, nested enums) against protoc's own Python output
(`grpc_tools.protoc --python_out`) for the same file: defaults, HasField / WhichOneof, enum
values, and the values of messages built with every field kind, after a round trip through
mrpcd's codec. The documented differences (docs/PORTING.md) are what it skips: an unset
message field, optional scalar or oneof member reads None."""
from __future__ import annotations

import keyword
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_generated

from mrpcd.stubgen import cli

PROTOS = Path(__file__).resolve().parent / "protos"


@pytest.fixture(scope="module")
def mods(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubgen_realworld")
    assert cli.main([str(PROTOS / "serving.proto"), "-o", str(out)]) == 0
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={out}",
                    str(PROTOS / "serving.proto")], check=True, capture_output=True)
    return load_generated(out / "serving_mrpc.py", "_realworld_"), load_generated(out / "serving_pb2.py", "_realworld_")


# -- protoc's descriptors drive random messages of every field kind ----------------------------------


def _fd():
    from google.protobuf.descriptor import FieldDescriptor
    return FieldDescriptor


def _is_map(f) -> bool:
    return f.type == _fd().TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _scalar(rnd: random.Random, f):
    FD = _fd()
    t = f.type
    if t == FD.TYPE_INT64:
        return rnd.randint(-2**63, 2**63 - 1)
    if t in (FD.TYPE_UINT32,):
        return rnd.randint(0, 2**32 - 1)
    if t == FD.TYPE_UINT64:
        return rnd.randint(0, 2**64 - 1)
    if t == FD.TYPE_BOOL:
        return rnd.random() < 0.5
    if t == FD.TYPE_FLOAT:
        return _f32(rnd.uniform(-1e6, 1e6))
    if t == FD.TYPE_DOUBLE:
        return rnd.choice([0.0, -1.5, 2.0**60])  # (exact in float32 too: _norm)
    if t == FD.TYPE_STRING:
        return rnd.choice(["", "a", "héllo", "日本"])
    if t == FD.TYPE_BYTES:
        return bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 8)))
    if t == FD.TYPE_ENUM:
        return rnd.choice(f.enum_type.values).number
    raise AssertionError(f"no generator for {f.full_name}")


def _random(rnd: random.Random, desc, depth: int = 0) -> dict:
    FD = _fd()
    out = {}
    chosen = {o.name: rnd.choice(o.fields) for o in desc.oneofs}
    for f in desc.fields:
        if f.containing_oneof is not None and chosen[f.containing_oneof.name] is not f:
            continue
        if f.type == FD.TYPE_MESSAGE and depth > 2:
            continue

        def value(fd=f):
            return _random(rnd, fd.message_type, depth + 1) if fd.type == FD.TYPE_MESSAGE else _scalar(rnd, fd)

        if _is_map(f):
            k, v = (f.message_type.fields_by_name[n] for n in ("key", "value"))
            out[f.name] = {_scalar(rnd, k): value(v) for _ in range(rnd.randint(0, 3))}
        elif f.is_repeated:
            out[f.name] = [value() for _ in range(rnd.randint(0, 3))]
        elif not (f.has_presence and rnd.random() < 0.3):
            out[f.name] = value()
    return out


def _pb_build(pool, desc, d: dict):
    FD = _fd()
    m = pool(desc)()
    for k, v in d.items():
        f = desc.fields_by_name[k]
        if _is_map(f):
            vf = f.message_type.fields_by_name["value"]
            for mk, mv in v.items():
                if vf.type == FD.TYPE_MESSAGE:
                    getattr(m, k)[mk].CopyFrom(_pb_build(pool, vf.message_type, mv))
                else:
                    getattr(m, k)[mk] = mv
        elif f.is_repeated:
            for x in v:
                if f.type == FD.TYPE_MESSAGE:
                    getattr(m, k).add().CopyFrom(_pb_build(pool, f.message_type, x))
                else:
                    getattr(m, k).append(x)
        elif f.type == FD.TYPE_MESSAGE:
            getattr(m, k).CopyFrom(_pb_build(pool, f.message_type, v))
        else:
            setattr(m, k, v)
    return m


def _pb_plain(m) -> dict:
    """protobuf's message as mrpcd's to_dict() gives it (unset fields with presence: None)."""
    FD = _fd()
    out = {}
    for f in m.DESCRIPTOR.fields:
        v = getattr(m, f.name)
        if _is_map(f):
            vmsg = f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE
            out[f.name] = {k: _pb_plain(x) if vmsg else x for k, x in v.items()}
        elif f.is_repeated:
            out[f.name] = [_pb_plain(x) if f.type == FD.TYPE_MESSAGE else x for x in v]
        elif f.has_presence and not m.HasField(f.name):
            out[f.name] = None
        else:
            out[f.name] = _pb_plain(v) if f.type == FD.TYPE_MESSAGE else v
    return out


def _norm(x):
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_norm(v) for v in x]
    if isinstance(x, float):
        return _f32(x)
    if isinstance(x, int) and not isinstance(x, bool):
        return int(x)  # an IntEnum member as its number
    return x


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except ValueError:
        return ("ValueError", None)


def _classes(mods):
    mine, pb = mods
    from google.protobuf import symbol_database
    db = symbol_database.Default()

    def walk(desc, owner):
        cls = getattr(owner, desc.name)
        yield desc, cls
        for n in desc.nested_types:
            if not n.GetOptions().map_entry:
                yield from walk(n, cls)

    for desc in pb.DESCRIPTOR.message_types_by_name.values():
        yield from walk(desc, mine)
    return db


def _kwargs(d: dict) -> dict:
    return {f"{k}_" if keyword.iskeyword(k) else k: v for k, v in d.items()}


def test_enums_match_protoc(mods):
    mine, pb = mods
    for desc in pb.DESCRIPTOR.enum_types_by_name.values():
        assert [(v.name, v.number) for v in desc.values] == [(m.name, int(m)) for m in getattr(mine, desc.name)]
        for v in desc.values:
            assert getattr(mine, v.name) == getattr(pb, v.name) == v.number
    for desc, cls in _classes(mods):
        for e in desc.enum_types:
            assert [(v.name, v.number) for v in e.values] == [(m.name, int(m)) for m in getattr(cls, e.name)]


def test_fresh_messages_match_protoc(mods):
    from google.protobuf import symbol_database
    db = symbol_database.Default()
    FD = _fd()
    for desc, cls in _classes(mods):
        mine, theirs = cls(), db.GetSymbol(desc.full_name)()
        for f in desc.fields:
            attr = f"{f.name}_" if keyword.iskeyword(f.name) else f.name
            value = getattr(mine, attr)
            if f.has_presence:  # documented: unset reads None
                assert value is None, (desc.full_name, f.name)
            elif _is_map(f):
                assert value == {}
            elif f.is_repeated:
                assert value == []
            else:
                assert f.type != FD.TYPE_MESSAGE
                expected = getattr(theirs, f.name)  # an enum's: the IntEnum member, == its number
                assert value == expected and isinstance(value, type(expected)), f.full_name
            assert _outcome(mine.HasField, f.name) == _outcome(theirs.HasField, f.name), f.full_name
        for o in desc.oneofs:  # real ones and proto3 optional's synthetic `_name` ones
            assert _outcome(mine.WhichOneof, o.name) == _outcome(theirs.WhichOneof, o.name), o.full_name
            assert _outcome(mine.HasField, o.name) == _outcome(theirs.HasField, o.name), o.full_name


@pytest.mark.parametrize("seed", range(6))
def test_random_messages_match_protoc_after_a_round_trip(mods, seed):
    from google.protobuf import symbol_database
    db = symbol_database.Default()
    rnd = random.Random(seed)
    for desc, cls in _classes(mods):
        for _ in range(5):
            d = _random(rnd, desc)
            theirs = _pb_build(lambda x: db.GetSymbol(x.full_name), desc, d)
            mine = cls(**_kwargs(d))
            back = cls.FromString(mine.SerializeToString())
            assert back == mine
            assert _norm(back.to_dict()) == _norm(_pb_plain(theirs)), desc.full_name
            for f in desc.fields:
                assert _outcome(back.HasField, f.name) == _outcome(theirs.HasField, f.name), f.full_name
            for o in desc.oneofs:
                assert _outcome(back.WhichOneof, o.name) == _outcome(theirs.WhichOneof, o.name), o.full_name
                assert _outcome(back.HasField, o.name) == _outcome(theirs.HasField, o.name), o.full_name


def test_synthetic_oneof_of_proto3_optional(mods):
    # protobuf names the oneof of a proto3 `optional` field `_<field>`: WhichOneof, HasField
    # and ClearField take that name as they take a real oneof's
    mine, _ = mods
    r = mine.InferRequest(seed=0, group={})
    assert r.WhichOneof("_seed") == "seed" and r.HasField("_seed")
    assert r.WhichOneof("_adapter") is None and not r.HasField("_adapter")
    assert r.WhichOneof("_group") == "group"
    r.ClearField("_seed")
    assert r.seed is None and r.WhichOneof("_seed") is None
    with pytest.raises(ValueError, match="no oneof '_model'"):
        r.WhichOneof("_model")  # `model` is no optional field: no such oneof, as in protobuf


# -- Struct / ListValue: protobuf's mapping and sequence API over JSON-like values ------------------


def _python(x):
    """A Struct / ListValue (mrpcd's or protobuf's: the same API) as plain dicts and lists."""
    if hasattr(x, "keys"):
        return {k: _python(x[k]) for k in x.keys()}
    if hasattr(x, "add_struct"):
        return [_python(v) for v in x.items()]
    return x


def test_struct_and_list_value_work_as_protobufs(mods):
    from google.protobuf import struct_pb2

    mine, _ = mods
    doc = {"city": "Paris", "days": 3, "ok": True, "none": None, "nested": {"a": [1, "b", None, {"c": 2.5}]}}
    for s in (mine.InferRequest().tool_args or mine.InferRequest(tool_args={}).tool_args, struct_pb2.Struct()):
        s["first"] = 1
        s.update(doc)
        s.get_or_create_struct("made")["x"] = "y"
        lst = s.get_or_create_list("list")
        lst.append(1)
        lst.extend(["two", None])
        lst.add_struct()["k"] = False
        lst.add_list().append(3)
        lst[0] = 10
        del s["first"]
        assert "city" in s and "first" not in s and len(s) == 7
        assert s["days"] == 3.0 and s["none"] is None and s["nested"]["a"][3]["c"] == 2.5
        assert sorted(s.keys()) == ["city", "days", "list", "made", "nested", "none", "ok"]
        assert [k for k in s] == list(s.keys()) and dict(s.items()).keys() == set(s.keys())
        assert _python(s) == {**doc, "days": 3.0, "nested": {"a": [1.0, "b", None, {"c": 2.5}]},
                              "made": {"x": "y"}, "list": [10.0, "two", None, {"k": False}, [3.0]]}
        assert len(lst) == 5 and lst[1] == "two"
        del lst[1]
        assert len(lst) == 4
        with pytest.raises(ValueError):
            s["city"] = object()
        assert s["city"] == "Paris"  # unchanged
    # through the codec, in a message
    r = mine.InferRequest(tool_args=mine.InferRequest(tool_args={}).tool_args)
    r.tool_args.update(doc)
    r.stop = mine.InferRequest(stop={}).stop
    r.stop.extend(["\n\n", "</s>"])
    back = mine.InferRequest.FromString(r.SerializeToString())
    assert _python(back.tool_args) == {**doc, "days": 3.0, "nested": {"a": [1.0, "b", None, {"c": 2.5}]}}
    assert list(back.stop.items()) == ["\n\n", "</s>"] and back == r
    with pytest.raises(ValueError, match="Value not set"):
        mine.Struct(fields={"k": {}})["k"]


def test_assigning_a_oneof_member_clears_the_others_as_pb2(mods):
    # protobuf's "last assignment wins": the encoder sends the one set last
    mine, theirs = mods
    p, q = mine.Param(number=5), theirs.Param(number=5)
    p.text = q.text = "x"
    assert p.WhichOneof("choice") == q.WhichOneof("choice") == "text" and p.number is None
    assert not p.HasField("number") and not q.HasField("number")
    assert mine.Param.FromString(p.SerializeToString()) == mine.Param(text="x")


# -- over two daemons ---------------------------------------------------------------------------------


def test_serving_calls_over_two_daemons(mods, two_daemons):
    # what an inference client sends and gets back: maps of oneof parameters, raw tensors,
    # proto3 optional, Struct tool arguments, a bidi stream; unary and streaming, sync
    import mrpcd

    mine, _ = mods
    a, b = two_daemons

    class Inference(mine.InferenceServicer):
        def Infer(self, req, context):
            out = mine.InferResponse(model=req.model, tokens=len(req.raw_inputs) if req.HasField("seed") else None)
            for t in req.inputs:
                out.outputs.add(name=t.name + "_out", dtype=t.dtype, shape=list(t.shape), fp32=[x * 2 for x in t.fp32],
                                params=dict(t.params))
            out.outputs.add(name="echo", raw=list(req.raw_inputs))
            if req.tool_args is not None and "city" in req.tool_args:
                out.error = f"no weather for {req.tool_args['city']}"
            else:
                out.placed = req.group
            return out

        def InferStream(self, requests, context):
            for req in requests:
                yield mine.InferResponse(model=req.model, tokens=len(list(req.stop.items())) if req.stop is not None else None)

    srv_app = mrpcd.connect(b.socket, name="serving-server")
    cli_app = mrpcd.connect(a.socket, name="serving-client")
    try:
        server = mrpcd.server(app=srv_app)
        mine.add_InferenceServicer_to_server(Inference(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = mine.InferenceStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app))
        req = mine.InferRequest(model="m", seed=7, raw_inputs=[b"\x00\x01", b""],
                                params={"p": {"number": -1}, "t": {"tensor": {"name": "nested"}}},
                                inputs=[{"name": "x", "dtype": mine.DTYPE_FP32, "shape": [1, 2], "fp32": [1.5, -2.0],
                                         "params": {"binary": {"flag": True}}}],
                                group={"kind": mine.Group.KIND_GPU, "optional": True,
                                       "by_priority": {2**64 - 1: {"kind": mine.Group.Device.KIND_NVDLA, "limits": [{"global": True}]}}})
        r = stub.Infer(req, timeout=10)
        assert r.tokens == 2 and r.HasField("tokens") and r.WhichOneof("result") == "placed"
        assert r.outputs[0].fp32 == [3.0, -4.0] and r.outputs[0].dtype is mine.Dtype.DTYPE_FP32
        assert r.outputs[0].params["binary"].WhichOneof("choice") == "flag"
        assert r.outputs[1].raw == [b"\x00\x01", b""]
        assert r.placed.by_priority[2**64 - 1].limits[0].global_ is True and r.placed.optional is True
        req.tool_args = mine.Struct()
        req.tool_args.update({"city": "Paris", "days": 3})
        req.ClearField("_seed")
        r = stub.Infer(req, timeout=10)
        assert r.WhichOneof("result") == "error" and r.error == "no weather for Paris" and not r.HasField("tokens")
        stops = mine.ListValue()
        stops.extend(["\n", "</s>"])
        got = list(stub.InferStream(iter([mine.InferRequest(model="a", stop=stops), mine.InferRequest(model="b")]), timeout=10))
        assert [(g.model, g.tokens) for g in got] == [("a", 2), ("b", None)]
        server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()

"""Schema evolution, differential: protobuf's own evolution behaviour is the reference.
A random message of one version (tests/evolve/diff/v1 and v2/kinds.proto: every scalar
kind, enums with a value added, nested, recursive, repeated and map of messages, a oneof
with members added, proto3 optional, Timestamp, Struct, fields removed and added) is
serialized by protobuf and parsed with the other version's _pb2; mrpcd must make exactly
that of it: encode with the sender's schema, transcode (marshal/evolve.py), decode with the
receiver's. Message Widen changes each field's kind as protobuf allows (int32 -> int64,
string -> bytes, enum -> int64, bool -> int32, uint64 -> bool, ...): where the value fits the
receiving kind mrpcd must agree with protobuf; where it does not, mrpcd fails the call
(a deliberate difference: protobuf truncates, or reads non-zero as true, or refuses the
whole message for invalid UTF-8)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mrpcd.marshal import codec
from mrpcd.marshal.evolve import TranscodeError, closure_schema, compare, plan_service
from conftest import load_generated

grpc_tools = pytest.importorskip("grpc_tools")

HERE = Path(__file__).resolve().parent / "evolve" / "diff"
SVC = "kinds.K"
WKT = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    out = {}
    for v in ("v1", "v2"):
        d = tmp_path_factory.mktemp(f"diff_{v}")
        src = HERE / v
        subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(src / "kinds.proto"), "-I", str(src), "-o", str(d)],
                       check=True)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"-I{WKT}", f"--python_out={d}",
                        str(src / "kinds.proto")], check=True)
        mrpc = load_generated(d / "kinds_mrpc.py", f"diff_{v}_")
        # a private descriptor pool: the two versions define the same full names
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        from google.protobuf import struct_pb2, timestamp_pb2
        pool = descriptor_pool.DescriptorPool()
        for dep in (timestamp_pb2, struct_pb2):
            pool.AddSerializedFile(dep.DESCRIPTOR.serialized_pb)
        fds = d / "kinds.desc"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"-I{WKT}", f"--descriptor_set_out={fds}",
                        str(src / "kinds.proto")], check=True)
        fset = descriptor_pb2.FileDescriptorSet.FromString(fds.read_bytes())
        for fd in fset.file:
            pool.Add(fd)
        classes = {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"kinds.{n}")) for n in ("Top", "Tree", "Widen")}
        out[v] = (mrpc.SCHEMA, classes)
    return out


def fill(m, rnd: random.Random, depth: int) -> None:
    """Random values in protobuf message `m` (its descriptor says what)."""
    desc = m.DESCRIPTOR
    if desc.full_name == "google.protobuf.Timestamp":
        m.seconds, m.nanos = rnd.randrange(0, 2 << 30), rnd.randrange(0, 10**9)
        return
    chosen = {o.name: rnd.choice(list(o.fields) + [None]) for o in desc.oneofs}
    for fd in desc.fields:
        o = fd.containing_oneof
        if o is not None and chosen[o.name] is not fd:
            continue
        if rnd.random() < 0.35 and o is None:
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            kf, vf = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            mp = getattr(m, fd.name)
            for _ in range(rnd.randrange(3) if depth < 3 else 0):
                k = scalar(kf, rnd)
                if vf.message_type is not None:
                    fill(mp[k], rnd, depth + 1)
                else:
                    mp[k] = scalar(vf, rnd)
        elif fd.is_repeated:
            seq = getattr(m, fd.name)
            for _ in range(rnd.randrange(3) if depth < 3 else 0):
                if fd.message_type is not None:
                    fill(seq.add(), rnd, depth + 1)
                else:
                    seq.append(scalar(fd, rnd))
        elif fd.message_type is not None:
            if depth < 3:
                sub = getattr(m, fd.name)
                sub.SetInParent()
                fill(sub, rnd, depth + 1)
        else:
            setattr(m, fd.name, scalar(fd, rnd))


def scalar(fd, rnd: random.Random):
    t = fd.type
    if fd.enum_type is not None:
        return rnd.choice([v.number for v in fd.enum_type.values] + [7])  # 7: unknown to both (open enum)
    if t in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32):
        return rnd.choice([0, 1, -1, 2**31 - 1, -2**31, rnd.randrange(-2**31, 2**31)])
    if t in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
        return rnd.choice([0, -1, 2**63 - 1, -2**63, rnd.randrange(-2**63, 2**63)])
    if t in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
        return rnd.choice([0, 2**32 - 1, rnd.randrange(2**32)])
    if t in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
        return rnd.choice([0, 2**64 - 1, rnd.randrange(2**64)])
    if t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        return rnd.choice([0.0, -0.0, 1.5, rnd.randrange(-10**6, 10**6) / 8])
    if t == fd.TYPE_BOOL:
        return rnd.random() < 0.5
    if t == fd.TYPE_STRING:
        return "".join(rnd.choice("ab é€😀\x00") for _ in range(rnd.randrange(5)))
    if t == fd.TYPE_BYTES:
        return bytes(rnd.randrange(256) for _ in range(rnd.randrange(5)))
    raise AssertionError(t)


def plain(m, schema, name: str) -> dict:
    """A protobuf message as mrpcd's plain dict of message `name` (by field number)."""
    out = {}
    for f in schema.messages[name].fields:
        fd = m.DESCRIPTOR.fields_by_number[f.number]
        v = getattr(m, fd.name)
        msg = f.type.kind == "message"
        if f.label == "map":
            out[f.name] = {k: plain(x, schema, f.type.ref_name) if msg else x for k, x in v.items()}
        elif f.label == "repeated":
            out[f.name] = [plain(x, schema, f.type.ref_name) if msg else x for x in v]
        elif msg or f.nullable:
            out[f.name] = (plain(v, schema, f.type.ref_name) if msg else v) if m.HasField(fd.name) else None
        else:
            out[f.name] = v
    return out


@pytest.mark.parametrize("src, dst", [("v1", "v2"), ("v2", "v1")])
def test_transcoding_matches_protobuf(versions, src, dst):
    s_schema, s_pb = versions[src]
    d_schema, d_pb = versions[dst]
    peer, _ = closure_schema(s_schema.closure(SVC))
    assert compare(peer, d_schema, SVC) == [] and compare(d_schema, peer, SVC) == []
    plan = plan_service(peer, d_schema, SVC)
    assert plan is not None
    by_path = {mp.path: mp for mp in plan.methods.values()}
    rnd = random.Random(f"{src}{dst}")
    for i in range(300):
        root = rnd.choice(["Top", "Tree"])
        mp = by_path[f"/kinds.K/{'Call' if root == 'Top' else 'Node'}"]
        m = s_pb[root]()
        fill(m, rnd, 0)
        expect = plain(d_pb[root].FromString(m.SerializeToString()), d_schema, f"kinds.{root}")
        for tc in (mp.input, mp.output):
            got = codec.decode_plain(d_schema, f"kinds.{root}", tc(codec.encode_plain(s_schema, f"kinds.{root}", plain(m, s_schema, f"kinds.{root}"))))
            assert got == expect, (i, root, m)


def wscalar(fd, rnd: random.Random):
    """scalar(), with 0 and 1 often: values that fit every compatible kind (bool too)."""
    if fd.type not in (fd.TYPE_STRING, fd.TYPE_BYTES, fd.TYPE_BOOL, fd.TYPE_DOUBLE, fd.TYPE_FLOAT) and rnd.random() < 0.4:
        return rnd.choice([0, 1])
    if fd.type == fd.TYPE_BYTES and rnd.random() < 0.5:
        return "".join(rnd.choice("ab é€😀\x00") for _ in range(rnd.randrange(5))).encode()  # valid UTF-8
    return scalar(fd, rnd)


def set_one(m, fd, rnd: random.Random) -> None:
    """Give protobuf message `m` a random value in field `fd` (a scalar, repeated or map)."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        kf, vf = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        mp = getattr(m, fd.name)
        for _ in range(rnd.randrange(1, 4)):
            mp[wscalar(kf, rnd)] = wscalar(vf, rnd)
    elif fd.is_repeated:
        getattr(m, fd.name).extend(wscalar(fd, rnd) for _ in range(rnd.randrange(1, 4)))
    else:
        setattr(m, fd.name, wscalar(fd, rnd))


@pytest.mark.parametrize("src, dst", [("v1", "v2"), ("v2", "v1")])
def test_kind_changes_match_protobuf_or_fail_the_call(versions, src, dst):
    from google.protobuf.message import DecodeError as PbDecodeError

    s_schema, s_pb = versions[src]
    d_schema, d_pb = versions[dst]
    peer, _ = closure_schema(s_schema.closure(SVC))
    assert compare(peer, d_schema, SVC) == [] and compare(d_schema, peer, SVC) == []
    plan = plan_service(peer, d_schema, SVC)
    tc = {mp.path: mp for mp in plan.methods.values()}["/kinds.K/Convert"].input
    rnd = random.Random(f"widen{src}{dst}")
    fields = s_pb["Widen"].DESCRIPTOR.fields
    outcomes = {"agree": 0, "refused": 0}
    for i in range(600):
        fd = rnd.choice(fields)
        m = s_pb["Widen"]()
        set_one(m, fd, rnd)
        sent = plain(m, s_schema, "kinds.Widen")
        name = d_schema.messages["kinds.Widen"].fields[[f.number for f in d_schema.messages["kinds.Widen"].fields].index(fd.number)].name
        try:
            pb_got = plain(d_pb["Widen"].FromString(m.SerializeToString()), d_schema, "kinds.Widen")
        except PbDecodeError:
            pb_got = None  # protobuf refuses the whole message (a string that is not UTF-8)
        try:
            ours = codec.decode_plain(d_schema, "kinds.Widen", tc(codec.encode_plain(s_schema, "kinds.Widen", sent)))
        except TranscodeError as exc:
            # our deliberate difference: only where protobuf does not keep the value either
            assert f"kinds.Widen.{name}" in str(exc), (i, m, exc)
            assert pb_got is None or pb_got[name] != sent[fd.name], (i, m, exc, pb_got)
            outcomes["refused"] += 1
            continue
        assert pb_got is not None and ours == pb_got, (i, m, ours, pb_got)
        outcomes["agree"] += 1
    assert outcomes["agree"] > 200 and outcomes["refused"] > 20, outcomes

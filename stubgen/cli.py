"""`mrpcd-stubgen x.proto [y.proto ...] [-I DIR ...] -o OUT`: write OUT/x_mrpc.py and OUT/x_mrpc.pyi."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from mrpcd.marshal.schema import SchemaError

from .generate import generate, module_name
from .parse import StubgenError, parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mrpcd-stubgen",
        description="Generate mrpcd Python stubs (messages, XStub, XServicer, add_XServicer_to_server) "
                    "and type stubs (.pyi) from .proto files. protoc (from grpcio-tools) parses the files; "
                    "google/protobuf well-known types are always importable.",
        epilog="Each input x.proto gives OUT/x_mrpc.py and OUT/x_mrpc.pyi; types of imported files are "
               "generated into the importing module, so every module is self-contained.",
    )
    p.add_argument("protos", nargs="+", metavar="PROTO", help=".proto file(s) to compile")
    p.add_argument("-I", "--proto_path", "--include", dest="includes", action="append", default=[], metavar="DIR",
                   help="directory to search for imports (repeatable); a file outside every -I directory "
                        "is found through its own directory")
    p.add_argument("-o", "--out", default=".", metavar="OUT",
                   help="output directory, created if missing (default: the current directory)")
    p.add_argument("--no-pyi", action="store_true",
                   help="do not write the .pyi type stubs (and remove OUT/x_mrpc.pyi left by an earlier run: "
                        "it would type the new module as the old one was)")
    return p


def _write(path: str, text: str) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".mrpcd-stubgen-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(protos: list[str], includes: list[str], out: str, pyi: bool = True) -> list[str]:
    """Generate the modules; returns the files written. Raises StubgenError."""
    names: dict[str, str] = {}
    for p in protos:
        m = module_name(p)
        if m in names and os.path.realpath(names[m]) != os.path.realpath(p):
            raise StubgenError(f"{names[m]} and {p} would both be generated as {m}.py")
        names[m] = p
    protos = list(dict.fromkeys(protos))
    modules = parse(protos, includes)
    outputs = []
    stale = []  # .pyi of an earlier run, with --no-pyi
    for mod in modules:
        try:
            py, stub = generate(mod)
        except SchemaError as exc:
            raise StubgenError(f"{mod.path}: {exc}") from None
        base = os.path.join(out, module_name(mod.path))
        outputs.append((base + ".py", py))
        if pyi:
            outputs.append((base + ".pyi", stub))
        else:
            stale.append(base + ".pyi")
    try:
        os.makedirs(out, exist_ok=True)
        for path, text in outputs:
            _write(path, text)
        for path in stale:
            if os.path.isfile(path):
                os.unlink(path)
    except OSError as exc:
        raise StubgenError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return [path for path, _ in outputs]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args.protos, args.includes, args.out, pyi=not args.no_pyi)
    except StubgenError as exc:
        print(f"mrpcd-stubgen: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

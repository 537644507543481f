"""The generated stubs the greeter scripts use (hello_mrpc), or one line on how to make them:
they are generated from hello.proto, not shipped, and a newcomer running a script by hand
should not meet a ModuleNotFoundError traceback."""
from __future__ import annotations

import os
import sys
from types import ModuleType


def import_hello_stubs(script: str) -> ModuleType:
    """hello_mrpc, or exit naming the commands that generate it and run `script` with it."""
    try:
        import hello_mrpc
    except ModuleNotFoundError as exc:
        if exc.name != "hello_mrpc":
            raise
        name = os.path.basename(script)
        sys.exit(f"{name}: hello_mrpc is not importable; generate it, then run with it on PYTHONPATH:\n"
                 f"  .venv/bin/mrpcd-stubgen examples/hello/hello.proto -o gen/\n"
                 f"  PYTHONPATH=gen .venv/bin/python examples/hello/{name}")
    return hello_mrpc

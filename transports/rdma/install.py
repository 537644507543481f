"""Make Debian's pyverbs visible to this (virtual) environment.

PyPI's ``pyverbs`` needs rdma-core's headers and a matching libibverbs to build, and often
does not link. Debian ships it prebuilt (``python3-pyverbs``) for the system Python in
/usr/lib/python3/dist-packages. A venv built on a CPython of the same minor version can
load those extension modules; this links only the ``pyverbs`` package into the venv's
site-packages (not all of dist-packages, which would shadow the venv's own packages).

    python -m mrpcd.transports.rdma.install          # link, if python3-pyverbs is installed
    python -m mrpcd.transports.rdma.install --apt    # apt-get install it first (root)

Never fails the caller: it prints what it did or why it could not (exit status 0), so
``make test`` keeps working on hosts without it; RDMA tests then skip with the reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

DEBIAN_DIR = "/usr/lib/python3/dist-packages/pyverbs"


def link(apt: bool = False) -> str:
    if apt and not os.path.isdir(DEBIAN_DIR) and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "python3-pyverbs"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if not os.path.isdir(DEBIAN_DIR):
        return f"pyverbs: {DEBIAN_DIR} not found (apt-get install python3-pyverbs); RDMA tests will skip"
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    if not any(tag in f for f in os.listdir(DEBIAN_DIR)):
        return f"pyverbs: Debian's build is not for this Python ({tag}); RDMA tests will skip"
    target = os.path.join(sysconfig.get_paths()["purelib"], "pyverbs")
    if os.path.islink(target) or os.path.exists(target):
        return f"pyverbs: {target} already present"
    os.symlink(DEBIAN_DIR, target)
    return f"pyverbs: linked {target} -> {DEBIAN_DIR}"


if __name__ == "__main__":
    try:
        print(link(apt="--apt" in sys.argv[1:]))
    except Exception as exc:  # never break the build over an optional transport
        print(f"pyverbs: not linked ({exc})")

"""Build the compiled parts: Cython hot paths and the cffi-bound shared-memory rings.

Everything else lives in pyproject.toml; setup.py exists only because extension modules
(Cython's cythonize and cffi's `cffi_modules`) are declared in code.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# boundscheck stays ON: these modules parse bytes written by apps and peers (untrusted).
CYTHON_DIRECTIVES = {"language_level": "3", "boundscheck": True, "wraparound": False}

CYTHON_MODULES = {
    "mrpcd.marshal._framing": "marshal/_framing.pyx",
    "mrpcd.marshal._pack": "marshal/_pack.pyx",
    "mrpcd.marshal._evolve": "marshal/_evolve.pyx",
    "mrpcd.marshal._ringio": "marshal/_ringio.pyx",
    "mrpcd.transports._tcp": "transports/_tcp.pyx",
}
CFFI_MODULES = ["native/_ring_build.py:ffibuilder"]

extensions = cythonize(
    [Extension(name, [src]) for name, src in CYTHON_MODULES.items() if os.path.exists(src)],
    compiler_directives=CYTHON_DIRECTIVES,
)

setup(
    ext_modules=extensions,
    cffi_modules=[m for m in CFFI_MODULES if os.path.exists(m.split(":")[0])],
)

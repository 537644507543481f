"""Build the compiled parts: Cython hot paths and the cffi-bound shared-memory rings.

Everything else lives in pyproject.toml; setup.py exists only because extension modules
(Cython's cythonize and cffi's `cffi_modules`) are declared in code.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

# boundscheck stays ON: these modules parse bytes written by apps and peers (untrusted).
CYTHON_DIRECTIVES = {"language_level": "3", "boundscheck": True, "wraparound": False}

extensions = cythonize(
    [
        Extension("mrpcd.marshal._framing", ["marshal/_framing.pyx"]),
        Extension("mrpcd.transports._tcp", ["transports/_tcp.pyx"]),
    ],
    compiler_directives=CYTHON_DIRECTIVES,
)

setup(ext_modules=extensions, cffi_modules=["native/_ring_build.py:ffibuilder"])

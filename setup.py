"""Build of fastbp's compiled kernels. Compiler directives live here, in one place.

FASTBP_CYTHON_DEBUG=1 builds with boundscheck, wraparound and initializedcheck
on (for a test run) and sets ``fastbp._kernels.DEBUG_BUILD``.
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTBP_CYTHON_DEBUG") == "1"

directives = dict(
    language_level=3,
    boundscheck=DEBUG,
    wraparound=DEBUG,
    initializedcheck=DEBUG,
    cdivision=True,
    embedsignature=True,
)

extensions = [
    Extension(
        "fastbp._kernels",
        ["src/fastbp/_kernels.pyx"],
        define_macros=[("FASTBP_DEBUG", "1" if DEBUG else "0"),
                       ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        # NumPy's C API: the per-step path reads arrays without memoryview objects;
        # _vecmath.h: the loops compiled once per instruction-set level
        include_dirs=["src/fastbp", numpy.get_include()],
        depends=["src/fastbp/_vecmath.h", "src/fastbp/_smallgemm.h", "src/fastbp/_pool.h"],
        # No -ffast-math: it would let the compiler drop NaN/inf checks and
        # reassociate sums, and fastbp promises exact, checkable numerics.
        # -fno-trapping-math changes no result (we never enable FP traps); it
        # only lets GCC turn `a > 0 ? x : x * s` into branch-free vector code.
        # -fno-math-errno changes no result either (nothing reads errno): it lets
        # sqrt become one vector instruction instead of a libm call per element
        # (Adam's update: 4.5x faster).
        # -ffp-contract=off: the AVX2 and AVX-512 clones of _vecmath.h's loops
        # must not fuse a*b + c into an FMA, so that every clone rounds as the
        # baseline does and results are the same bits on every x86-64 CPU.
        # -pthread: _pool.h's worker threads (glibc before 2.34 keeps pthreads
        # in a library of its own).
        extra_compile_args=["-O3", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off",
                            "-pthread"],
        extra_link_args=["-pthread"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        # Separate generated C for the two modes: an in-tree rebuild that
        # switches modes must not reuse the other mode's C file.
        build_dir="build/cython-debug" if DEBUG else "build/cython",
    )
)

"""Benchmarks: run with `pytest bench --benchmark-only` (not part of the test suite).

Inputs are built outside the timed call; thread counts are recorded with each
result. Unset OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for the benchmark command
only if your environment sets them: they slow NumPy's BLAS.
"""

import os

import pytest


def blas_info():
    """Thread counts and BLAS libraries in use (threadpoolctl when installed)."""
    import fastbp._kernels  # noqa: F401  (loads scipy's BLAS, which the kernels call)

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"threadpoolctl": "not installed", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    return {f"{i['prefix']}:{i['filepath'].rsplit('/', 2)[-2]}": i["num_threads"] for i in threadpool_info()}


@pytest.fixture
def record_threads(benchmark):
    benchmark.extra_info.update(blas_info())
    return benchmark

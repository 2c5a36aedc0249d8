"""Benchmarks: run with `pytest bench --benchmark-only` (not part of the test suite).

Inputs are built outside the timed call; thread counts are recorded with each
result. Unset OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for the benchmark command
only if your environment sets them: they slow NumPy's BLAS.
"""

import pytest

from fastbp.bench import blas_info


@pytest.fixture
def record_threads(benchmark):
    benchmark.extra_info.update(blas_info())
    return benchmark

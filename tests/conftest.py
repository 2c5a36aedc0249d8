import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from fastbp import _kernels, reference

# The CI profile draws fewer examples: the debug build runs the suite a second time.
settings.register_profile("default", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

BACKENDS = [pytest.param(reference, id="numpy"), pytest.param(_kernels, id="cython")]
BACKEND_NAMES = ["numpy", "cython"]
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]

#: Agreement with the float64 reference: DESIGN.md, contract 3.
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}

#: (implementation, dtype) pairs checked against the float64 reference.
IMPLEMENTATIONS = [
    pytest.param(_kernels, np.float32, id="cython-float32"),
    pytest.param(_kernels, np.float64, id="cython-float64"),
    pytest.param(reference, np.float32, id="numpy-float32"),
]


def assert_close(actual, expected, scale=None):
    """`actual` agrees with the float64 `expected` to the tolerance of its dtype.

    The error is measured relative to `scale` (elementwise or scalar), by
    default the largest magnitude of `expected`: sums that cancel cannot be
    more accurate than the size of their terms.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    tol = TOL[actual.dtype] if actual.dtype in TOL else TOL[np.dtype(np.float64)]
    if scale is None:
        scale = np.max(np.abs(expected), initial=0.0)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = np.abs(actual.astype(np.float64) - expected)
    bound = tol * (np.abs(expected) + np.maximum(scale, 1e-300))
    bad = ~(error <= bound)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} elements differ beyond {tol:g} relative; "
                           f"worst error/bound {np.max(error / bound):.3g}\n"
                           f"actual {actual[bad][:5]}\nexpected {expected[bad][:5]}")

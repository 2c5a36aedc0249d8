"""Training-step throughput of fastbp on each backend (first measurements, issue 2)."""

import numpy as np
import pytest

import fastbp

WORKLOADS = {
    "tiny": ([64, 32, 10], 32),
    "mnist": ([784, 256, 128, 10], 128),
}


def setup(sizes, batch, dtype, backend):
    rng = np.random.default_rng(0)
    net = fastbp.MLP(sizes, activation="relu", loss="cross_entropy", dtype=dtype, seed=0,
                     backend=backend)
    X = rng.normal(size=(batch, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], size=batch)
    return net, fastbp.SGD(net.params, lr=0.01), X, y


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_step(record_threads, workload, dtype, backend):
    sizes, batch = WORKLOADS[workload]
    record_threads.group = f"step {workload} {np.dtype(dtype).name}"
    net, opt, X, y = setup(sizes, batch, dtype, backend)
    # the two backends compute the same step: check once before timing
    twin, twin_opt, _, _ = setup(sizes, batch, dtype, "numpy")
    assert np.isclose(net.step(X, y, opt), twin.step(X, y, twin_opt), rtol=1e-4)
    record_threads(net.step, X, y, opt)

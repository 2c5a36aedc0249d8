"""Memory: bytes allocated during a training step (target 0 for fastbp's compiled
step), and the peak memory of a fit, against the reference backend and the strong
NumPy step. Figures are tracemalloc's (which also sees NumPy's array buffers) and
land in each result's extra_info; the timed call is the measurement run itself.

Run: ``pytest bench --benchmark-only -k memory --benchmark-columns=rounds``
with ``--benchmark-json`` to keep the figures, or ``python -m fastbp bench --memory``.
"""

import numpy as np
import pytest

import fastbp
from fastbp.bench import WORKLOADS, NumpyStep, fit_peak_memory, make_batch, step_allocations


@pytest.mark.parametrize("peer", ["fastbp-cython", "fastbp-numpy", "numpy-strong"])
@pytest.mark.parametrize("workload", ["tiny", "small", "mnist"])
def test_memory_step(benchmark, workload, peer):
    sizes, batch, loss = WORKLOADS[workload]
    X, y = make_batch(sizes, batch, loss, np.float32)
    net = fastbp.MLP(sizes, loss=loss, seed=0, backend="numpy" if peer == "fastbp-numpy" else "cython")
    if peer == "numpy-strong":
        step, args = NumpyStep(net.weights, net.biases, loss, batch), (X, y)
    else:
        step, args = net.step, (X, y, fastbp.SGD(net.params, lr=0.01))
    benchmark.group = f"memory step {workload}"
    kept, peak = benchmark.pedantic(step_allocations, (step, args), rounds=1, iterations=1)
    benchmark.extra_info.update(step_peak_bytes=peak, kept_bytes_after_50_steps=kept)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_memory_fit(benchmark, backend):
    benchmark.group = "memory fit mnist-sized, one epoch"
    peak = benchmark.pedantic(fit_peak_memory, (backend,), rounds=1, iterations=1)
    benchmark.extra_info.update(fit_peak_bytes=peak)

"""Training-step throughput: fastbp against its peers, grouped by workload and dtype.

Run: ``pytest bench --benchmark-only -k "step and mnist"`` (the large workload
takes about a second a step). `python -m fastbp bench` prints the same
comparison as a table of ratios from interleaved rounds, which is the fairer
measurement on a noisy machine.
"""

import numpy as np
import pytest

import fastbp
from fastbp.bench import WORKLOADS, EpochSteps, GemmFloor, NumpyStep, make_batch, torch_step

PEERS = ["fastbp-cython", "fastbp-numpy", "fastbp-epoch", "numpy-strong", "gemm-floor", "torch"]
ROUNDS = 8  # batches per fastbp-epoch call: divide its times by this for a step's


def build(peer, sizes, batch, loss, dtype):
    X, y = make_batch(sizes, batch, loss, dtype)
    net = fastbp.MLP(sizes, activation="relu", loss=loss, dtype=dtype, seed=0,
                     backend="numpy" if peer == "fastbp-numpy" else "cython")
    if peer == "fastbp-epoch":
        return EpochSteps(net, X, y, ROUNDS), ()
    if peer.startswith("fastbp"):
        return net.step, (X, y, fastbp.SGD(net.params, lr=0.01))
    if peer == "numpy-strong":
        return NumpyStep(net.weights, net.biases, loss, batch), (X, y)
    if peer == "gemm-floor":
        return GemmFloor(net, batch), (X, y)
    step = torch_step(net.weights, net.biases, loss)
    if step is None:
        pytest.skip("torch is not installed (an optional peer)")
    import torch

    return step, (torch.from_numpy(X), torch.from_numpy(y))


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_step(record_threads, workload, dtype, peer):
    sizes, batch, loss = WORKLOADS[workload]
    record_threads.group = f"step {workload} {np.dtype(dtype).name}"
    fn, args = build(peer, sizes, batch, loss, dtype)
    record_threads(fn, *args)


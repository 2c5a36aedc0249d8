"""The kernels one by one, compiled against their NumPy specification, on the
mnist workload's shapes (784-256-128-10, batch 128).

Run: ``pytest bench --benchmark-only -k kernels``.
"""

import numpy as np
import pytest

from fastbp import _kernels, reference

IMPLS = {"cython": _kernels, "numpy": reference}
N, N_IN, N_OUT, P = 128, 784, 256, 235_146


def arrays(dtype, seed=0):
    rng = np.random.default_rng(seed)
    a = lambda *shape: rng.normal(size=shape).astype(dtype)
    return dict(X=a(N, N_IN), W=a(N_OUT, N_IN), b=a(N_OUT), Z=a(N, N_OUT), dZ=a(N, N_OUT),
                dW=a(N_OUT, N_IN), db=a(N_OUT), dX=a(N, N_IN), logits=a(N, 10), dlogits=a(N, 10),
                labels=rng.integers(0, 10, size=N), param=a(P), grad=a(P), buf=a(P), m=a(P),
                v=np.abs(a(P)), A=a(N * (256 + 128 + 10)), probs=a(N, 10))


CALLS = {
    "dense_forward relu": lambda k, d: (k.dense_forward, (d["X"], d["W"], d["b"], "relu", d["Z"])),
    "dense_forward sigmoid": lambda k, d: (k.dense_forward, (d["X"], d["W"], d["b"], "sigmoid", d["Z"])),
    "activation_backward tanh": lambda k, d: (k.activation_backward, (np.tanh(d["Z"]), d["dZ"], "tanh", d["dZ"])),
    "dense_backward": lambda k, d: (k.dense_backward, (d["dZ"], d["X"], d["W"], d["dW"], d["db"], d["dX"])),
    "softmax_cross_entropy": lambda k, d: (k.softmax_cross_entropy, (d["logits"], d["labels"], d["dlogits"])),
    "sgd_update momentum": lambda k, d: (k.sgd_update, (d["param"], d["grad"] * 1e-6, d["buf"], 0.01, 0.9)),
    "adam_update": lambda k, d: (k.adam_update, (d["param"], d["grad"] * 1e-6, d["m"], d["v"], None, 10, 1e-3)),
    "all_finite": lambda k, d: (k.all_finite, (d["param"],)),
    # the whole network's forward with its loss and probabilities (evaluate, predict)
    "mlp_forward": lambda k, d: (k.mlp_forward, (d["X"] * 0.05, d["labels"], None,
                                                 d["param"] * 0.05, (N_IN, N_OUT, 128, 10),
                                                 ("relu", "relu"), "cross_entropy", "identity",
                                                 d["A"], d["probs"])),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kernel", list(CALLS))
def test_kernels(record_threads, kernel, dtype, impl):
    record_threads.group = f"kernels {kernel} {np.dtype(dtype).name}"
    fn, args = CALLS[kernel](IMPLS[impl], arrays(dtype))
    record_threads(fn, *args)

"""Training steps in the steady state allocate no arrays (tracemalloc sees
NumPy's buffers too): the network's workspace is reused."""

import numpy as np
import pytest

import fastbp
from fastbp.bench import step_allocations


def setup(loss, dtype=np.float32):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 100)).astype(dtype)
    y = rng.integers(0, 10, size=64) if loss == "cross_entropy" else \
        rng.normal(size=(64, 10)).astype(dtype)
    return X, y, fastbp.MLP([100, 50, 10], loss=loss, dtype=dtype, seed=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_sgd_step_allocates_nothing(loss, momentum, nesterov, dtype):
    X, y, net = setup(loss, dtype)
    opt = fastbp.SGD(net.params, lr=0.01, momentum=momentum, nesterov=nesterov)
    kept, peak = step_allocations(net.step, (X, y, opt))
    # at most one Python number (the loss, or the optimizer's step count once
    # past the interpreter's cached small ints), kept or made during the step:
    # less than any ndarray, even a view, takes
    assert kept <= 32 and peak <= 32


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("optimizer", [fastbp.Adam, fastbp.AdamW])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_adam_step_allocates_nothing(loss, optimizer, amsgrad):
    X, y, net = setup(loss)
    kept, peak = step_allocations(net.step, (X, y, optimizer(net.params, lr=1e-3, amsgrad=amsgrad)))
    assert kept <= 32 and peak <= 32  # as for SGD


def test_the_measurement_sees_numpy_temporaries():
    X, y, _ = setup("cross_entropy")
    net = fastbp.MLP([100, 50, 10], seed=0, backend="numpy")
    kept, peak = step_allocations(net.step, (X, y, fastbp.SGD(net.params, lr=0.01)))
    assert peak > 64 * 50 * 4  # at least one (batch, hidden) temporary


def test_fit_with_diagnostics_holds_one_copy_of_the_parameters():
    # the diagnostics keep the parameters at each epoch's start (for the update
    # ratios) in one buffer for the whole fit, and compute their gradient in the
    # network's own scratch: one params-sized array beyond what a fit without
    # them holds (a copy per epoch, rebound, held two at once)
    import tracemalloc

    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 300)).astype(np.float32)
    y = rng.integers(0, 10, size=512)
    peaks = {}
    for diagnostics in (False, True):
        net = fastbp.MLP([300, 200, 10], seed=0)
        opt = fastbp.SGD(net.params, lr=0.01, momentum=0.9)
        net.fit(X, y, epochs=1, batch_size=64, optimizer=opt, progress=False,
                diagnostics=diagnostics)  # workspace and buffers made
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            history = net.fit(X, y, epochs=3, batch_size=64, optimizer=opt, progress=False,
                              diagnostics=diagnostics)
            peaks[diagnostics] = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert (history.records[-1]["diagnostics"] is not None) is diagnostics
    extra = peaks[True] - peaks[False]
    assert net.params.nbytes <= extra < 1.5 * net.params.nbytes, (extra, net.params.nbytes)

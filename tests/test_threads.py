"""fastbp.set_num_threads / get_num_threads, with and without threadpoolctl."""

import sys

import numpy as np
import pytest

import fastbp


@pytest.fixture(params=["threadpoolctl", "openblas"])
def thread_control(request, monkeypatch):
    """Each test runs through threadpoolctl (when installed) and through the
    OpenBLAS fallback, and leaves the thread count as it found it."""
    if request.param == "threadpoolctl":
        pytest.importorskip("threadpoolctl")
    else:
        monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    original = fastbp.get_num_threads()
    yield request.param
    fastbp.set_num_threads(original)


def test_set_and_get(thread_control):
    for n in (1, 2, 1):
        fastbp.set_num_threads(n)
        assert fastbp.get_num_threads() == n


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", True, None])
def test_bad_counts_change_nothing(thread_control, n):
    before = fastbp.get_num_threads()
    with pytest.raises(ValueError, match="positive integer"):
        fastbp.set_num_threads(n)
    assert fastbp.get_num_threads() == before


def test_training_gives_the_same_network_on_one_and_two_threads(thread_control):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(256, 64)), rng.integers(0, 10, size=256)
    params = []
    for n in (1, 2):
        fastbp.set_num_threads(n)
        net = fastbp.MLP([64, 300, 10], dtype=np.float64, seed=0)
        net.fit(X, y, epochs=2, batch_size=128, optimizer=fastbp.SGD(net.params, lr=0.1),
                progress=False, diagnostics=False)
        params.append(net.params)
    # BLAS may split its sums differently across threads: equal up to rounding
    np.testing.assert_allclose(params[0], params[1], rtol=0, atol=1e-12)

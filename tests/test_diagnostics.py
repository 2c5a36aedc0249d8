"""Per-layer statistics and the finite-difference gradient check."""

import numpy as np
import pytest

import fastbp
from fastbp import reference
from fastbp._checks import ACTIVATIONS

from conftest import BACKEND_NAMES

LOSS_CONFIGS = [
    dict(loss="cross_entropy"),
    dict(loss="binary_cross_entropy"),
    dict(loss="mse", output="identity"),
    dict(loss="mse", output="sigmoid"),
    dict(loss="mse", output="tanh"),
]


def batch(net, n=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, net.n_features))
    if net.loss == "cross_entropy":
        return X, rng.integers(0, net.n_outputs, size=n)
    return X, rng.uniform(size=(n, net.n_outputs))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=lambda c: "-".join(c.values()))
def test_gradcheck_passes_for_every_activation_and_loss(activation, config):
    net = fastbp.MLP([4, 5, 3], activation=activation, seed=1, **config)  # float32, cython
    X, y = batch(net)
    assert fastbp.gradcheck(net, X, y) < 1e-6


def test_gradcheck_catches_a_wrong_gradient(monkeypatch):
    net = fastbp.MLP([4, 5, 3], activation="tanh", seed=1, dtype=np.float64)
    X, y = batch(net)
    original = reference.activation_backward
    monkeypatch.setattr(reference, "activation_backward",
                        lambda A, dA, act, out: np.multiply(original(A, dA, act, out), 1.01, out=out))
    assert fastbp.gradcheck(net, X, y) > 1e-3


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gradient_norms_match_gradients(backend):
    net = fastbp.MLP([4, 6, 5, 3], activation=["relu", "sigmoid"], dtype=np.float64, seed=0,
                     backend=backend)
    X, y = batch(net, n=20)
    stats = fastbp.layer_statistics(net, *net._as_batch(X, y))
    _, dW, db = net.gradients(X, y)
    for l in range(3):
        assert stats["grad_norm"][l] == pytest.approx(np.sqrt((dW[l] ** 2).sum() + (db[l] ** 2).sum()))
    assert stats["update_ratio"] == [None] * 3
    assert all(type(v) is float for key in ("grad_norm", "saturated") for v in stats[key]
               if v is not None)  # plain floats: History records go to JSON
    assert stats["saturated"][0] is None and stats["saturated"][1] is not None
    assert stats["dead"][0] is not None and stats["dead"][1] is None and stats["dead"][2] is None


def test_saturation_and_dead_units_are_measured():
    X = np.random.default_rng(0).normal(size=(50, 4))
    y = np.zeros(50, int)
    sat = fastbp.MLP([4, 8, 2], activation="sigmoid", dtype=np.float64, seed=0)
    sat.weights[0][...] *= 1000  # pre-activations in the hundreds: the sigmoid is flat
    dead = fastbp.MLP([4, 8, 2], activation="relu", dtype=np.float64, seed=0)
    dead.biases[0][:6] = -1e3  # six of eight units never fire
    s = fastbp.layer_statistics(sat, *sat._as_batch(X, y))
    d = fastbp.layer_statistics(dead, *dead._as_batch(X, y))
    assert s["saturated"][0] > 0.95
    assert d["dead"][0] == pytest.approx(6 / 8)
    healthy = fastbp.MLP([4, 8, 2], activation="tanh", dtype=np.float64, seed=0)
    assert fastbp.layer_statistics(healthy, *healthy._as_batch(X, y))["saturated"][0] < 0.05


def test_history_records_diagnostics_and_update_ratio():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 4)), rng.integers(0, 2, size=64)
    net = fastbp.MLP([4, 8, 2], activation="tanh", dtype=np.float64, seed=0)
    before = net.params.copy()
    history = net.fit(X, y, epochs=1, optimizer=fastbp.SGD(net.params, lr=0.1))
    ratio = history.diagnostics[0]["update_ratio"]
    W0 = net._layer_views(before)[0]
    for l in range(2):
        assert ratio[l] == pytest.approx(np.linalg.norm(net.weights[l] - W0[l]) / np.linalg.norm(W0[l]))
    assert net.fit(X, y, epochs=1, diagnostics=False).diagnostics == [None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("moved", [True, False])
def test_compiled_layer_sums_match_their_numpy_specification(dtype, moved):
    from fastbp import _kernels
    from fastbp.diagnostics import SATURATION_FRACTION, _layer_sums_numpy

    rng = np.random.default_rng(5)
    sizes = (13, 37, 9, 21, 5, 3)
    activations = ("sigmoid", "relu", "tanh", "leaky_relu")  # the hidden layers
    n_params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    for n in (0, 1, 7, 40):
        params = rng.normal(size=n_params).astype(dtype)
        before = (params + rng.normal(scale=0.1, size=n_params)).astype(dtype)
        grad = rng.normal(size=n_params).astype(dtype)
        A = rng.normal(size=n * sum(sizes[1:]) + 3).astype(dtype)
        # saturated sigmoid and tanh outputs near 0 and +-1, a dead relu unit, and
        # a NaN (not dead: NumPy's max propagates it)
        A[:n * 37].reshape(-1)[::3] = np.array(1.0, dtype) - np.array(1e-4, dtype)
        A[:n * 37] = np.abs(A[:n * 37]) % 1
        # and sigmoid outputs whose derivative is exactly the threshold (not saturated)
        ints = np.int32 if dtype == np.float32 else np.int64
        root = (1 - np.sqrt(1 - 4 * SATURATION_FRACTION * 0.25)) / 2  # of a (1 - a) = threshold
        guess = (np.array([root], dtype).view(ints) + np.arange(-10**4, 10**4)).view(dtype)
        edge = guess[guess * (1 - guess) == dtype(SATURATION_FRACTION * 0.25)]
        assert edge.size
        A[1:n * 37:5] = edge[0]
        relu = A[n * 37:n * 46].reshape(n, 9)
        relu[...] = np.abs(relu) + 0.1
        relu[:, 2] = -relu[:, 2]
        relu[:, 4] = 0
        relu[:, 5] = -1
        if n:
            relu[n - 1, 5] = np.nan
        tanh = A[n * 46:n * 67].reshape(n, 21)
        tanh[:, :5] = np.array([0.9999, -0.9999, 0.995, 0.994, 0.5], dtype)
        args = (params, before, grad, A, n, sizes, activations, moved, SATURATION_FRACTION)
        compiled, spec = _kernels._layer_sums(*args), _layer_sums_numpy(*args)
        assert compiled.shape == spec.shape == (5, 5) and compiled.dtype == np.float64
        # counts exactly; sums of squares to float64 rounding (summed in another order)
        np.testing.assert_array_equal(compiled[:, 3:], spec[:, 3:])
        np.testing.assert_allclose(compiled[:, :3], spec[:, :3], rtol=1e-12)
        if n:
            assert compiled[1, 4] == 2 and compiled[0, 3] > 0 and compiled[2, 3] >= 2 * n
        assert (compiled[:, 2] > 0).all() if moved else (compiled[:, 2] == 0).all()
    # a wide relu layer: the dead-unit count runs over blocks of 256 columns and
    # stops a block early once every column in it is alive
    for rows in (1, 3, 40):
        wide = (4, 600, 2)
        n_wide = sum((a + 1) * b for a, b in zip(wide[:-1], wide[1:]))
        acts = np.full(rows * 602, 0.5, dtype)
        relu = acts[:rows * 600].reshape(rows, 600)
        relu[:, [0, 255, 256, 300, 511, 512, 599]] = -1.0  # dead units at block edges
        relu[:, 7] = 0.0
        relu[rows - 1, 300] = np.nan  # not dead
        if rows > 1:
            relu[:rows - 1, 400] = -2.0  # alive only on the last row
        g = rng.normal(size=n_wide).astype(dtype)
        args = (g, g, g, acts, rows, wide, ("relu",), moved, SATURATION_FRACTION)
        compiled, spec = _kernels._layer_sums(*args), _layer_sums_numpy(*args)
        np.testing.assert_array_equal(compiled[:, 3:], spec[:, 3:])
        assert compiled[0, 4] == 7
        np.testing.assert_allclose(compiled[:, :3], spec[:, :3], rtol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        _kernels._layer_sums(params[:-1], before, grad, A, n, sizes, activations, True, 0.01)
    with pytest.raises(ValueError, match="do not fit"):
        _kernels._layer_sums(params, before, grad, A[:10], n, sizes, activations, True, 0.01)
    with pytest.raises(ValueError, match="describe"):
        _kernels._layer_sums(params, before, grad, A, n, sizes, activations[:-1], True, 0.01)
    with pytest.raises(TypeError, match="one float type"):
        _kernels._layer_sums(params, before.astype(np.float64 if params.dtype == np.float32
                                                   else np.float32), grad, A, n, sizes,
                             activations, True, 0.01)
    with pytest.raises(TypeError, match="C-contiguous"):
        _kernels._layer_sums(params, before, grad, np.repeat(A, 2)[::2], n, sizes, activations,
                             True, 0.01)
    with pytest.raises(ValueError, match="activation"):
        _kernels._layer_sums(params, before, grad, A, n, sizes, ("softplus",) * 4, True, 0.01)

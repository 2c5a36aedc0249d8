"""The specification itself, against central finite differences in float64."""

import numpy as np
import pytest

from fastbp import reference
from fastbp._checks import ACTIVATIONS, OUTPUT_ACTIVATIONS

EPS = 1e-6


def numeric_gradient(f, x):
    """Central differences of the scalar f() with respect to every element of x (in place)."""
    g = np.empty_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + EPS
        up = f()
        flat[i] = old - EPS
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * EPS)
    return g


def relative_error(analytic, numeric):
    return np.max(np.abs(analytic - numeric)) / max(np.max(np.abs(analytic)), np.max(np.abs(numeric)), 1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_layer_gradients(activation):
    rng = np.random.default_rng(1)
    n, n_in, n_out = 5, 4, 3
    X, W, b = rng.normal(size=(n, n_in)), rng.normal(size=(n_out, n_in)), rng.normal(size=n_out)
    G = rng.normal(size=(n, n_out))  # weights of a linear read-out of the layer

    def f():
        return np.sum(G * reference.dense_forward(X, W, b, activation, np.empty((n, n_out))))

    A = reference.dense_forward(X, W, b, activation, np.empty((n, n_out)))
    # finite differences must not straddle the kink of relu / leaky_relu at 0
    assert np.min(np.abs(X @ W.T + b)) > 1e-3
    dZ = reference.activation_backward(A, G, activation, np.empty((n, n_out)))
    dW, db, dX = reference.dense_backward(dZ, X, W, np.empty((n_out, n_in)), np.empty(n_out),
                                          np.empty((n, n_in)))
    for analytic, x in ((dW, W), (db, b), (dX, X)):
        assert relative_error(analytic, numeric_gradient(f, x)) < 1e-6


def test_activation_values():
    z = np.array([[-2.0, -0.5, 0.0, 0.5, 2.0]])
    expected = {
        "identity": z,
        "sigmoid": 1 / (1 + np.exp(-z)),
        "tanh": np.tanh(z),
        "relu": np.array([[0, 0, 0, 0.5, 2.0]]),
        "leaky_relu": np.array([[-0.02, -0.005, 0, 0.5, 2.0]]),
    }
    for name, value in expected.items():
        out = reference.dense_forward(z.T, np.ones((1, 1)), np.zeros(1), name, np.empty((5, 1)))
        np.testing.assert_allclose(out.T, value, rtol=1e-15, atol=0, err_msg=name)


def test_sigmoid_derivative_is_at_most_a_quarter():
    z = np.linspace(-10, 10, 2001)[:, None]
    A = reference.dense_forward(z, np.ones((1, 1)), np.zeros(1), "sigmoid", np.empty_like(z))
    d = reference.activation_backward(A, np.ones_like(A), "sigmoid", np.empty_like(A))
    assert d.max() == pytest.approx(0.25) and d.min() > 0


def test_softmax_cross_entropy_gradient():
    rng = np.random.default_rng(2)
    Z, y = rng.normal(size=(6, 4)), np.array([0, 3, 1, 1, 2, 0])
    dZ = np.empty_like(Z)
    reference.softmax_cross_entropy(Z, y, dZ)
    numeric = numeric_gradient(lambda: reference.softmax_cross_entropy(Z, y), Z)
    assert relative_error(dZ, numeric) < 1e-6


def test_softmax_cross_entropy_value():
    Z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    y = np.array([2, 0])
    by_hand = (-np.log(np.exp(3) / np.exp([1, 2, 3]).sum()) + np.log(3)) / 2
    assert reference.softmax_cross_entropy(Z, y) == pytest.approx(by_hand, rel=1e-14)


@pytest.mark.parametrize("activation", OUTPUT_ACTIVATIONS)
def test_mean_squared_error_gradient(activation):
    rng = np.random.default_rng(3)
    Z, Y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))

    def loss():
        A = reference.dense_forward(Z, np.eye(3), np.zeros(3), activation, np.empty_like(Z))
        return reference.mean_squared_error(A, Y, activation)

    A = reference.dense_forward(Z, np.eye(3), np.zeros(3), activation, np.empty_like(Z))
    dZ = np.empty_like(Z)
    assert reference.mean_squared_error(A, Y, activation, dZ) == pytest.approx(np.mean((A - Y) ** 2))
    assert relative_error(dZ, numeric_gradient(loss, Z)) < 1e-6


def test_binary_cross_entropy_gradient_and_value():
    rng = np.random.default_rng(4)
    Z, Y = rng.normal(size=(5, 2)) * 3, rng.uniform(size=(5, 2))
    dZ = np.empty_like(Z)
    loss = reference.binary_cross_entropy_with_logits(Z, Y, dZ)
    p = 1 / (1 + np.exp(-Z))
    assert loss == pytest.approx(np.mean(-(Y * np.log(p) + (1 - Y) * np.log(1 - p))), rel=1e-12)
    numeric = numeric_gradient(lambda: reference.binary_cross_entropy_with_logits(Z, Y), Z)
    assert relative_error(dZ, numeric) < 1e-6


def test_sgd_momentum_worked_by_hand():
    param = np.array([1.0, -2.0])
    buf = np.zeros(2)
    reference.sgd_update(param, np.array([0.5, 0.25]), buf, lr=0.1, momentum=0.9, first_step=True)
    # first step: buf = g = [0.5, 0.25]; param -= 0.1 * buf
    np.testing.assert_allclose(buf, [0.5, 0.25], rtol=1e-15)
    np.testing.assert_allclose(param, [0.95, -2.025], rtol=1e-15)
    reference.sgd_update(param, np.array([0.1, -0.2]), buf, lr=0.1, momentum=0.9)
    # buf = 0.9 * [0.5, 0.25] + [0.1, -0.2] = [0.55, 0.025]; param -= 0.1 * buf
    np.testing.assert_allclose(buf, [0.55, 0.025], rtol=1e-14)
    np.testing.assert_allclose(param, [0.895, -2.0275], rtol=1e-14)


def test_sgd_all_options_worked_by_hand():
    param, buf = np.array([1.0]), np.zeros(1)
    opts = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)
    reference.sgd_update(param, np.array([0.5]), buf, first_step=True, **opts)
    # g = -0.5 + 0.1 * 1 = -0.4; buf = -0.4; nesterov g = -0.4 + 0.9 * -0.4 = -0.76
    assert buf[0] == pytest.approx(-0.4, rel=1e-14)
    assert param[0] == pytest.approx(1.076, rel=1e-14)
    param, buf = np.array([1.0]), np.array([2.0])
    reference.sgd_update(param, np.array([0.5]), buf, lr=0.1, momentum=0.5, dampening=0.5)
    # buf = 0.5 * 2 + (1 - 0.5) * 0.5 = 1.25; param = 1 - 0.125
    assert buf[0] == pytest.approx(1.25, rel=1e-14)
    assert param[0] == pytest.approx(0.875, rel=1e-14)


def test_adam_first_steps_worked_by_hand():
    param, m, v = np.array([1.0]), np.zeros(1), np.zeros(1)
    reference.adam_update(param, np.array([0.5]), m, v, None, 1, lr=0.1)
    # m = 0.1 * 0.5, v = 0.001 * 0.25; bias corrections 0.1 and 0.001:
    # param -= 0.1 / 0.1 * 0.05 / (sqrt(0.00025) / sqrt(0.001) + 1e-8)
    assert m[0] == pytest.approx(0.05, rel=1e-14) and v[0] == pytest.approx(0.00025, rel=1e-12)
    assert param[0] == pytest.approx(1 - 0.05 / (0.5 + 1e-8), rel=1e-14)
    reference.adam_update(param, np.array([-0.5]), m, v, None, 2, lr=0.1)
    m2, v2 = 0.9 * 0.05 - 0.1 * 0.5, 0.999 * 0.00025 + 0.001 * 0.25
    expected = 1 - 0.05 / (0.5 + 1e-8) - 0.1 / (1 - 0.81) * m2 / (np.sqrt(v2) / np.sqrt(1 - 0.998001) + 1e-8)
    assert param[0] == pytest.approx(expected, rel=1e-13)


def test_adamw_decays_before_the_step_and_amsgrad_keeps_the_maximum():
    param, m, v, vmax = np.array([2.0]), np.zeros(1), np.zeros(1), np.zeros(1)
    reference.adam_update(param, np.array([0.0]), m, v, vmax, 1, lr=0.1, weight_decay=0.5,
                          decoupled_weight_decay=True, amsgrad=True)
    assert param[0] == pytest.approx(2.0 * (1 - 0.1 * 0.5), rel=1e-15)  # zero gradient: decay only
    reference.adam_update(param, np.array([1.0]), m, v, vmax, 2, lr=0.1, amsgrad=True)
    high = vmax[0]
    reference.adam_update(param, np.array([0.0]), m, v, vmax, 3, lr=0.1, amsgrad=True)
    assert v[0] < high and vmax[0] == high

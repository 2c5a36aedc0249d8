"""fastbp.SGD: the torch.optim.SGD rule on a flat buffer, its checks and its state."""

import numpy as np
import pytest

import fastbp

from conftest import BACKEND_NAMES


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_momentum_step_worked_by_hand(backend, dtype):
    params = np.array([1.0, -2.0], dtype)
    opt = fastbp.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    opt.update([0.5, 0.25])
    np.testing.assert_allclose(params, [0.95, -2.025], rtol=1e-6)
    opt.update(np.array([0.1, -0.2]))
    # buf = 0.9 * [0.5, 0.25] + [0.1, -0.2] = [0.55, 0.025]
    np.testing.assert_allclose(opt.momentum_buffer, [0.55, 0.025], rtol=1e-6)
    np.testing.assert_allclose(params, [0.895, -2.0275], rtol=1e-6)
    assert opt.step_count == 2 and params.dtype == dtype


def test_plain_sgd_has_no_state_and_lr_can_change():
    params = np.array([1.0, 2.0])
    opt = fastbp.SGD(params, lr=0.5)
    assert opt.momentum_buffer is None
    opt.update([1.0, 1.0])
    opt.lr = 0.25
    opt.update([1.0, 1.0])
    np.testing.assert_array_equal(params, [0.25, 1.25])
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    assert opt.lr == 0.25


@pytest.mark.parametrize("kwargs, exc_type, message", [
    (dict(lr=-0.1), ValueError, "invalid lr"),
    (dict(lr=float("nan")), ValueError, "invalid lr"),
    (dict(lr="0.1"), TypeError, "lr must be a real number"),
    (dict(momentum=-0.5), ValueError, "invalid momentum"),
    (dict(weight_decay=-1e-4), ValueError, "invalid weight_decay"),
    (dict(dampening=float("inf")), ValueError, "invalid dampening"),
    (dict(nesterov=True), ValueError, "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "Nesterov"),
    (dict(nesterov=1), TypeError, "nesterov must be True or False"),
    (dict(maximize="yes"), TypeError, "maximize"),
    (dict(backend="fortran"), ValueError, "backend"),
])
def test_bad_hyper_parameters(kwargs, exc_type, message):
    with pytest.raises(exc_type, match=message):
        fastbp.SGD(np.zeros(3), **kwargs)


@pytest.mark.parametrize("params, exc_type, message", [
    ([1.0, 2.0], TypeError, "numpy.ndarray"),
    (np.zeros(3, np.int64), TypeError, "float32 or float64"),
    (np.zeros((2, 2)), ValueError, "1-D"),
    (np.zeros(6)[::2], ValueError, "C-contiguous"),
])
def test_bad_params(params, exc_type, message):
    with pytest.raises(exc_type, match=message):
        fastbp.SGD(params)


def test_read_only_params_are_refused():
    p = np.zeros(3)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        fastbp.SGD(p)


@pytest.mark.parametrize("grad, exc_type, message", [
    (np.ones(4), ValueError, r"shape \(4,\)"),
    (np.ones((3, 1)), ValueError, "shape"),
    (np.array([1.0, np.nan, 0.0]), ValueError, "NaN"),
    (np.array([1.0, np.inf, 0.0]), ValueError, "NaN or infinity"),
    (np.array(["a", "b", "c"]), TypeError, "dtype"),
])
def test_bad_gradient_changes_nothing(grad, exc_type, message):
    params = np.arange(3.0)
    opt = fastbp.SGD(params, lr=0.1, momentum=0.9)
    opt.update(np.ones(3))
    before, buf = params.copy(), opt.momentum_buffer.copy()
    with pytest.raises(exc_type, match=message):
        opt.update(grad)
    np.testing.assert_array_equal(params, before)
    np.testing.assert_array_equal(opt.momentum_buffer, buf)
    assert opt.step_count == 1


def test_gradient_of_another_dtype_is_converted():
    a, b = np.zeros(3, np.float32), np.zeros(3, np.float32)
    fastbp.SGD(a, lr=0.1).update(np.array([1, 2, 3]))
    fastbp.SGD(b, lr=0.1).update(np.array([1, 2, 3], np.float32))
    np.testing.assert_array_equal(a, b)


def test_backends_agree_over_many_steps():
    rng = np.random.default_rng(0)
    p1, p2 = rng.normal(size=50), None
    p2 = p1.copy()
    kw = dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.01, maximize=True)
    o1, o2 = fastbp.SGD(p1, backend="cython", **kw), fastbp.SGD(p2, backend="numpy", **kw)
    for _ in range(20):
        g = rng.normal(size=50)
        o1.update(g)
        o2.update(g)
    np.testing.assert_allclose(p1, p2, rtol=1e-12)


@pytest.mark.parametrize("cls", [fastbp.Adam, fastbp.AdamW])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_adam_state_and_defaults(cls, backend):
    params = np.ones(4)
    opt = cls(params, backend=backend)
    assert opt.weight_decay == (0.01 if cls is fastbp.AdamW else 0.0)
    assert opt.max_exp_avg_sq is None
    opt.update(np.full(4, 0.5))
    np.testing.assert_allclose(opt.exp_avg, 0.05)
    # the first Adam step moves every parameter by about lr, whatever the gradient's scale
    expected = 1 - 1e-3 if cls is fastbp.Adam else (1 - 1e-3 * 0.01) - 1e-3
    np.testing.assert_allclose(params, expected, rtol=1e-6)
    assert opt.step_count == 1


@pytest.mark.parametrize("kwargs, exc_type, message", [
    (dict(lr=-1.0), ValueError, "invalid lr"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (dict(betas=0.9), TypeError, "pair"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(amsgrad="no"), TypeError, "amsgrad"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
])
def test_bad_adam_hyper_parameters(kwargs, exc_type, message):
    with pytest.raises(exc_type, match=message):
        fastbp.Adam(np.zeros(3), **kwargs)


@pytest.mark.parametrize("cls", [fastbp.SGD, fastbp.Adam])
def test_gradient_clipping_by_global_norm(cls):
    params = np.zeros(2)
    opt = cls(params, lr=0.1, max_grad_norm=1.0)
    grad = np.array([3.0, 4.0])  # norm 5
    clipped = grad / (5 + 1e-6)
    twin = np.zeros(2)
    cls(twin, lr=0.1).update(clipped)
    opt.update(grad)
    np.testing.assert_allclose(params, twin, rtol=1e-15)
    np.testing.assert_array_equal(grad, [3.0, 4.0])  # the caller's gradient is not scaled
    small = np.array([0.3, 0.4])  # norm below the bound: unchanged
    p1, p2 = np.zeros(2), np.zeros(2)
    cls(p1, lr=0.1, max_grad_norm=1.0).update(small)
    cls(p2, lr=0.1).update(small)
    np.testing.assert_array_equal(p1, p2)

"""The compiled kernels against their NumPy specification, and both against bad input."""

import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastbp
from fastbp import _kernels, reference
from fastbp._checks import ACTIVATIONS, LEAKY_RELU_SLOPE, OUTPUT_ACTIVATIONS

from conftest import BACKENDS, DTYPES, IMPLEMENTATIONS, assert_close

PUBLIC = sorted(reference.__all__)


def test_same_public_names():
    assert sorted(_kernels.__all__) == PUBLIC
    for module in (reference, _kernels):
        public = {n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))
                  and getattr(getattr(module, n), "__module__", None) == module.__name__}
        assert public == set(PUBLIC), module.__name__


@pytest.mark.parametrize("name", PUBLIC)
def test_same_signature(name):
    assert inspect.signature(getattr(reference, name)) == inspect.signature(getattr(_kernels, name))


# ---------------------------------------------------------------------------
# Parity: hypothesis draws the shapes (batch 1 and width 1 included) and a seed.

sizes = st.integers(1, 9)
#: batch sizes that also cross the kernels' 64-row softmax chunks
batches = st.one_of(sizes, st.integers(60, 200))
seeds = st.integers(0, 2**32 - 1)
#: layer widths that also reach the small-layer forward kernel and softmax's row-wise
#: loop (both: more than 16 outputs), and the 10 to 16 classes of its blocked loop
widths = st.one_of(sizes, st.integers(10, 40))


def draw(rng, shape, dtype, low=None, high=None):
    """A random array in `dtype` and the same values in float64."""
    x = rng.uniform(low, high, size=shape) if low is not None else rng.normal(size=shape)
    x = x.astype(dtype)
    return x, x.astype(np.float64)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@given(n=sizes, n_in=sizes, n_out=widths, seed=seeds)
def test_dense_forward(impl, dtype, activation, n, n_in, n_out, seed):
    rng = np.random.default_rng(seed)
    X, X64 = draw(rng, (n, n_in), dtype)
    W, W64 = draw(rng, (n_out, n_in), dtype)
    b, b64 = draw(rng, (n_out,), dtype)
    out = np.full((n, n_out), np.nan, dtype)
    assert impl.dense_forward(X, W, b, activation, out) is out
    expected = reference.dense_forward(X64, W64, b64, activation, np.empty((n, n_out)))
    # error scale of the affine part: |X| @ |W|.T + |b|, elementwise
    scale = np.abs(X64) @ np.abs(W64).T + np.abs(b64)
    assert_close(out, expected, scale=scale)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@given(n=sizes, m=sizes, seed=seeds, in_place=st.booleans())
def test_activation_backward(impl, dtype, activation, n, m, seed, in_place):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, m))
    A64 = reference.dense_forward(Z, np.eye(m), np.zeros(m), activation, np.empty((n, m)))
    A = A64.astype(dtype)
    A64 = A.astype(np.float64)
    dA, dA64 = draw(rng, (n, m), dtype)
    expected = reference.activation_backward(A64, dA64, activation, np.empty((n, m)))
    out = dA if in_place else np.empty_like(dA)
    assert impl.activation_backward(A, dA, activation, out) is out
    assert_close(out, expected)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(n=sizes, n_in=sizes, n_out=sizes, seed=seeds, with_dX=st.booleans())
def test_dense_backward(impl, dtype, n, n_in, n_out, seed, with_dX):
    rng = np.random.default_rng(seed)
    dZ, dZ64 = draw(rng, (n, n_out), dtype)
    X, X64 = draw(rng, (n, n_in), dtype)
    W, W64 = draw(rng, (n_out, n_in), dtype)
    dW = np.full((n_out, n_in), np.nan, dtype)
    db = np.full(n_out, np.nan, dtype)
    dX = np.full((n, n_in), np.nan, dtype) if with_dX else None
    result = impl.dense_backward(dZ, X, W, dW, db, dX)
    assert result[0] is dW and result[1] is db and result[2] is dX
    eW, eb, eX = reference.dense_backward(dZ64, X64, W64, np.empty((n_out, n_in)), np.empty(n_out),
                                          np.empty((n, n_in)))
    assert_close(dW, eW, scale=np.abs(dZ64).T @ np.abs(X64))
    assert_close(db, eb, scale=np.abs(dZ64).sum(0))
    if with_dX:
        assert_close(dX, eX, scale=np.abs(dZ64) @ np.abs(W64))


def test_dense_backward_matches_numpy_matmul():
    # The reference itself, against the formulas written out once more.
    rng = np.random.default_rng(0)
    dZ, X, W = rng.normal(size=(5, 3)), rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    dW, db, dX = reference.dense_backward(dZ, X, W, np.empty((3, 4)), np.empty(3), np.empty((5, 4)))
    np.testing.assert_allclose(dW, sum(np.outer(dZ[i], X[i]) for i in range(5)), rtol=1e-12)
    np.testing.assert_allclose(db, [dZ[:, j].sum() for j in range(3)], rtol=1e-12)
    np.testing.assert_allclose(dX, [[sum(dZ[i, j] * W[j, c] for j in range(3)) for c in range(4)]
                                    for i in range(5)], rtol=1e-12)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(n=batches, k=widths, seed=seeds, in_place=st.booleans(), spread=st.sampled_from([1.0, 30.0]))
def test_softmax(impl, dtype, n, k, seed, in_place, spread):
    rng = np.random.default_rng(seed)
    Z, Z64 = draw(rng, (n, k), dtype)
    Z *= dtype(spread)
    Z64 = Z.astype(np.float64)
    expected = reference.softmax(Z64, np.empty((n, k)))
    out = Z if in_place else np.empty_like(Z)
    assert impl.softmax(Z, out) is out
    assert_close(out, expected, scale=1.0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=10 * np.finfo(dtype).eps * k)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(n=batches, k=widths, seed=seeds, mode=st.sampled_from(["out", "in_place", "loss_only"]))
def test_softmax_cross_entropy(impl, dtype, n, k, seed, mode):
    rng = np.random.default_rng(seed)
    Z, Z64 = draw(rng, (n, k), dtype)
    y = rng.integers(0, k, size=n)
    eloss = reference.softmax_cross_entropy(Z64, y, expected := np.empty((n, k)))
    dZ = {"out": np.empty_like(Z), "in_place": Z, "loss_only": None}[mode]
    loss = impl.softmax_cross_entropy(Z, y, dZ)
    assert isinstance(loss, float)
    assert_close(np.asarray(loss, dtype), eloss, scale=max(1.0, abs(eloss)))
    if dZ is not None:
        assert_close(dZ, expected, scale=1.0 / n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_loss_alone_has_the_bits_of_the_loss_with_its_gradient(dtype):
    # the loss alone runs the vectorised softmax on row blocks of a scratch
    # buffer (4096 elements), or one row at a time on wider rows and on fewer
    # than 16 rows of at most 16 classes
    rng = np.random.default_rng(3)
    for n, k in [(1, 1), (15, 16), (16, 16), (65, 10), (130, 64), (9, 100), (5, 1000), (3, 4096),
                 (2, 4097), (2, 9000)]:
        Z = (rng.normal(size=(n, k)) * 30).astype(dtype)
        y = rng.integers(0, k, size=n)
        alone = _kernels.softmax_cross_entropy(Z, y, None)
        assert alone == _kernels.softmax_cross_entropy(Z, y, np.empty_like(Z)), (n, k)
        expected = reference.softmax_cross_entropy(Z.astype(np.float64), y)
        assert_close(np.asarray(alone, dtype), expected, scale=abs(alone) + 1)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@pytest.mark.parametrize("activation", OUTPUT_ACTIVATIONS)
@given(n=sizes, k=sizes, seed=seeds, mode=st.sampled_from(["out", "in_place", "loss_only"]))
def test_mean_squared_error(impl, dtype, activation, n, k, seed, mode):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, k))
    A = reference.dense_forward(Z, np.eye(k), np.zeros(k), activation, np.empty((n, k))).astype(dtype)
    A64 = A.astype(np.float64)
    Y, Y64 = draw(rng, (n, k), dtype)
    eloss = reference.mean_squared_error(A64, Y64, activation, expected := np.empty((n, k)))
    dZ = {"out": np.empty_like(A), "in_place": A, "loss_only": None}[mode]
    loss = impl.mean_squared_error(A, Y, activation, dZ)
    assert_close(np.asarray(loss, dtype), eloss)
    if dZ is not None:
        assert_close(dZ, expected, scale=2 * (np.abs(A64) + np.abs(Y64)) / A.size)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(n=sizes, k=sizes, seed=seeds, mode=st.sampled_from(["out", "in_place", "loss_only"]),
       spread=st.sampled_from([1.0, 50.0]))
def test_binary_cross_entropy_with_logits(impl, dtype, n, k, seed, mode, spread):
    rng = np.random.default_rng(seed)
    Z = (rng.normal(size=(n, k)) * spread).astype(dtype)
    Z64 = Z.astype(np.float64)
    Y, Y64 = draw(rng, (n, k), dtype, 0.0, 1.0)
    eloss = reference.binary_cross_entropy_with_logits(Z64, Y64, expected := np.empty((n, k)))
    dZ = {"out": np.empty_like(Z), "in_place": Z, "loss_only": None}[mode]
    loss = impl.binary_cross_entropy_with_logits(Z, Y, dZ)
    assert_close(np.asarray(loss, dtype), eloss, scale=np.abs(Z64).mean() + 1)
    if dZ is not None:
        assert_close(dZ, expected, scale=1.0 / Z.size)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(p=st.integers(1, 40), seed=seeds, steps=st.integers(1, 4),
       momentum=st.sampled_from([0.0, 0.9]), dampening=st.sampled_from([0.0, 0.3]),
       nesterov=st.booleans(), weight_decay=st.sampled_from([0.0, 0.01]), maximize=st.booleans())
def test_sgd_update(impl, dtype, p, seed, steps, momentum, dampening, nesterov, weight_decay, maximize):
    if nesterov and (momentum == 0 or dampening != 0):
        nesterov = False
    rng = np.random.default_rng(seed)
    param, param64 = draw(rng, p, dtype)
    buf, buf64 = np.zeros(p, dtype), np.zeros(p)
    for t in range(steps):
        grad, grad64 = draw(rng, p, dtype)
        kwargs = dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov,
                      weight_decay=weight_decay, maximize=maximize, first_step=t == 0)
        assert impl.sgd_update(param, grad, buf if momentum else None, **kwargs) is None
        reference.sgd_update(param64, grad64, buf64 if momentum else None, **kwargs)
    assert_close(param, param64, scale=np.abs(param64) + 1)
    if momentum:
        assert_close(buf, buf64, scale=np.abs(buf64) + 1)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(p=st.integers(1, 40), seed=seeds, steps=st.integers(1, 4),
       betas=st.sampled_from([(0.9, 0.999), (0.3, 0.9)]), weight_decay=st.sampled_from([0.0, 0.1]),
       decoupled=st.booleans(), amsgrad=st.booleans(), maximize=st.booleans())
def test_adam_update(impl, dtype, p, seed, steps, betas, weight_decay, decoupled, amsgrad, maximize):
    rng = np.random.default_rng(seed)
    param, param64 = draw(rng, p, dtype)
    state = [np.zeros(p, dtype) for _ in range(3)]
    state64 = [np.zeros(p) for _ in range(3)]
    for t in range(1, steps + 1):
        grad, grad64 = draw(rng, p, dtype)
        kwargs = dict(lr=0.01, beta1=betas[0], beta2=betas[1], eps=1e-8, weight_decay=weight_decay,
                      decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize)
        assert impl.adam_update(param, grad, *state[:2], state[2] if amsgrad else None, t, **kwargs) is None
        reference.adam_update(param64, grad64, *state64[:2], state64[2] if amsgrad else None, t, **kwargs)
    assert_close(param, param64, scale=np.abs(param64) + 0.01)
    for a, e in zip(state, state64):
        # a moment is a sum of terms (grad + weight_decay * param) that can cancel:
        # its error scales with the largest of them, not with the sum
        assert_close(a, e, scale=np.abs(e).max() + 1e-3)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
def test_amsgrad_keeps_a_nan_maximum(impl, dtype):
    # torch.maximum (and np.maximum) propagate NaN from either side: a NaN in the
    # running maximum stays there and makes its parameter NaN, as in PyTorch; the
    # compiled loop had kept the new second moment instead
    param = np.full(40, 0.5, dtype)
    grad = np.linspace(-1, 1, 40).astype(dtype)
    m, v, vmax = np.zeros(40, dtype), np.zeros(40, dtype), np.full(40, 1e-3, dtype)
    vmax[[3, 21]] = np.nan
    impl.adam_update(param, grad, m, v, vmax, 1, 0.01, amsgrad=True)
    nan = np.isnan(param)
    assert nan.tolist() == np.isnan(vmax).tolist() == [i in (3, 21) for i in range(40)]
    expected = np.full(40, 0.5)
    expected64 = [np.zeros(40), np.zeros(40), np.full(40, 1e-3)]
    reference.adam_update(expected, grad.astype(np.float64), *expected64, 1, 0.01, amsgrad=True)
    assert_close(param[~nan], expected[~nan], scale=1.0)


def draw_network(rng, dtype, n, depth, width, n_in, n_out, loss, with_targets=True):
    """sizes, parameter count, (X, X64), (params, params64), labels, (targets,
    targets64) of a random network and batch (labels or targets None as the loss
    takes them, both None without targets)."""
    sizes = (n_in,) + (width,) * (depth - 1) + (n_out,)
    n_params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    X = draw(rng, (n, n_in), dtype)
    params = draw(rng, n_params, dtype)
    labels, targets = None, (None, None)
    if with_targets and loss == "cross_entropy":
        labels = rng.integers(0, n_out, size=n)
    elif with_targets:
        targets = draw(rng, (n, n_out), dtype, 0.0, 1.0)
    return sizes, n_params, X, params, labels, targets


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(n=sizes, depth=st.integers(1, 3), width=widths, n_in=sizes, n_out=sizes, seed=seeds,
       loss=st.sampled_from(["cross_entropy", "mse", "binary_cross_entropy"]),
       hidden=st.sampled_from(ACTIVATIONS), output=st.sampled_from(OUTPUT_ACTIVATIONS),
       slack=st.integers(0, 5))
def test_mlp_gradients(impl, dtype, n, depth, width, n_in, n_out, seed, loss, hidden, output, slack):
    if loss != "mse":
        output = "identity"
    rng = np.random.default_rng(seed)
    sizes, n_params, (X, X64), (params, params64), labels, (targets, targets64) = draw_network(
        rng, dtype, n, depth, width, n_in, n_out, loss)
    work = n * sum(sizes[1:]) + slack  # larger work buffers are fine
    acts = (hidden,) * (depth - 1)
    A, D, grad = np.empty(work, dtype), np.empty(work, dtype), np.full(n_params, np.nan, dtype)
    value = impl.mlp_gradients(X, labels, targets, params, sizes, acts, loss, output, A, D, grad)
    expected = np.empty(n_params)
    evalue = reference.mlp_gradients(X64, labels, targets64, params64, sizes, acts, loss, output,
                                     np.empty(work), np.empty(work), expected)
    # A gradient entry is a sum of products of inputs and deltas that may cancel
    # to far below its terms: measure the error against the size of the terms
    # (the inputs are O(1), the loss gradient's entries at most O(1) too).
    assert_close(np.asarray(value, dtype), evalue, scale=abs(evalue) + 1)
    assert_close(grad, expected, scale=np.abs(expected).max() + np.abs(X64).max())


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(n=sizes, depth=st.integers(1, 3), width=widths, n_in=sizes, n_out=sizes, seed=seeds,
       loss=st.sampled_from(["cross_entropy", "mse", "binary_cross_entropy"]),
       hidden=st.sampled_from(ACTIVATIONS), output=st.sampled_from(OUTPUT_ACTIVATIONS),
       mode=st.sampled_from(["both", "outputs", "loss"]), slack=st.integers(0, 5))
def test_mlp_forward(impl, dtype, n, depth, width, n_in, n_out, seed, loss, hidden, output, mode,
                     slack):
    if loss != "mse":
        output = "identity"
    rng = np.random.default_rng(seed)
    sizes, n_params, (X, X64), (params, params64), labels, (targets, targets64) = draw_network(
        rng, dtype, n, depth, width, n_in, n_out, loss, with_targets=mode != "outputs")
    acts = (hidden,) * (depth - 1)
    work = n * sum(sizes[1:]) + slack
    out = None if mode == "loss" else np.full((n, n_out), np.nan, dtype)
    value = impl.mlp_forward(X, labels, targets, params, sizes, acts, loss, output,
                             np.empty(work, dtype), out)
    expected = None if out is None else np.empty((n, n_out))
    evalue = reference.mlp_forward(X64, labels, targets64, params64, sizes, acts, loss, output,
                                   np.empty(work), expected)
    if mode == "outputs":
        assert value is None and evalue is None
    else:
        assert isinstance(value, float)
        assert_close(np.asarray(value, dtype), evalue, scale=abs(evalue) + 1)
    if out is not None:
        # an output is a sum of products that may cancel to far below its terms
        # (identity layers pass their sums on): measure against the largest
        assert_close(out, expected, scale=np.abs(expected).max() + 1)


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("loss, output", [("cross_entropy", "identity"), ("mse", "tanh"),
                                          ("binary_cross_entropy", "identity")])
def test_mlp_forward_is_the_composition_of_the_kernels(kernels, loss, output):
    # the outputs and loss, to the last bit, of the layer and loss kernels called
    # one by one (what the network's forward did before it was one call)
    rng = np.random.default_rng(1)
    net = __import__("fastbp").MLP([6, 5, 4, 3], activation=["sigmoid", "relu"], loss=loss,
                                   dtype=np.float32, seed=0,
                                   **({"output": output} if loss == "mse" else {}))
    X = rng.normal(size=(7, 6)).astype(np.float32)
    y = (rng.integers(0, 3, size=7) if loss == "cross_entropy"
         else rng.random((7, 3)).astype(np.float32))
    labels, targets = (y, None) if loss == "cross_entropy" else (None, y)
    out = np.empty((7, 3), np.float32)
    value = kernels.mlp_forward(X, labels, targets, net.params, net.sizes, net.activations, loss,
                                output, np.empty(7 * 12, np.float32), out)
    prev = X
    for l, act in enumerate(["sigmoid", "relu", output]):
        prev = kernels.dense_forward(prev, net.weights[l], net.biases[l], act,
                                     np.empty((7, net.sizes[l + 1]), np.float32))
    if loss == "cross_entropy":
        assert value == kernels.softmax_cross_entropy(prev, y, None)
        np.testing.assert_array_equal(out, kernels.softmax(prev, np.empty_like(prev)))
    elif loss == "mse":
        assert value == kernels.mean_squared_error(prev, y, output, None)
        np.testing.assert_array_equal(out, prev)
    else:
        assert value == kernels.binary_cross_entropy_with_logits(prev, y, None)
        sigmoid = kernels.dense_forward(prev, np.eye(3, dtype=np.float32), np.zeros(3, np.float32),
                                        "sigmoid", np.empty_like(prev))
        np.testing.assert_array_equal(out, sigmoid)


def test_mlp_gradients_is_the_composition_of_the_kernels():
    # the same numbers, to the last bit, as the layer kernels called one by one
    rng = np.random.default_rng(0)
    net = __import__("fastbp").MLP([6, 5, 4, 3], activation=["tanh", "relu"], dtype=np.float64, seed=0)
    X, y = rng.normal(size=(7, 6)), rng.integers(0, 3, size=7)
    fused = np.empty_like(net.params)
    loss = _kernels.mlp_gradients(X, y, None, net.params, net.sizes, net.activations, "cross_entropy",
                                  "identity", np.empty(7 * 12), np.empty(7 * 12), fused)
    acts = [np.empty((7, w)) for w in (5, 4, 3)]
    deltas = [np.empty((7, w)) for w in (5, 4, 3)]
    prev = X
    for l, act in enumerate(["tanh", "relu", "identity"]):
        _kernels.dense_forward(prev, net.weights[l], net.biases[l], act, acts[l])
        prev = acts[l]
    assert _kernels.softmax_cross_entropy(prev, y, deltas[2]) == loss
    stepwise = np.empty_like(net.params)
    dW, db = net._layer_views(stepwise)
    for l in (2, 1, 0):
        _kernels.dense_backward(deltas[l], acts[l - 1] if l else X, net.weights[l], dW[l], db[l],
                                deltas[l - 1] if l else None)
        if l:
            _kernels.activation_backward(acts[l - 1], deltas[l - 1], ["tanh", "relu"][l - 1], deltas[l - 1])
    np.testing.assert_array_equal(fused, stepwise)


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(n=st.integers(1, 30), batch_size=st.integers(1, 12), width=sizes, seed=seeds,
       loss=st.sampled_from(["cross_entropy", "mse"]), momentum=st.sampled_from([0.0, 0.9]),
       nesterov=st.booleans(), first_step=st.booleans())
def test_mlp_sgd_epoch(impl, dtype, n, batch_size, width, seed, loss, momentum, nesterov, first_step):
    nesterov = nesterov and momentum > 0
    rng = np.random.default_rng(seed)
    sizes = (3, width, 2)
    n_params = 4 * width + (width + 1) * 2
    X, X64 = draw(rng, (n, 3), dtype)
    labels = rng.integers(0, 2, size=n) if loss == "cross_entropy" else None
    targets, targets64 = draw(rng, (n, 2), dtype) if labels is None else (None, None)
    order = rng.permutation(n)[: max(1, n - 3)]
    results = []
    for mod, dt, Xa, Ta in ((impl, dtype, X, targets), (reference, np.float64, X64, targets64)):
        params = (rng.__class__(np.random.PCG64(seed)).normal(size=n_params) * 0.5).astype(dt)
        buf = np.zeros(n_params, dt) if momentum else None
        rows = min(batch_size, order.size)
        work = rows * (width + 2)
        out = mod.mlp_sgd_epoch(
            Xa, labels, Ta, order, batch_size, params, sizes, ("tanh",), loss, "identity",
            np.empty(work, dt), np.empty(work, dt), np.empty(n_params, dt), np.empty((rows, 3), dt),
            None if labels is None else np.empty(rows, np.int64),
            None if Ta is None else np.empty((rows, 2), dt), buf, np.zeros(1, np.int8), 0.1,
            momentum=momentum, nesterov=nesterov, first_step=first_step)
        results.append((out, params))
    (loss_sum, steps, status), params = results[0]
    (eloss_sum, esteps, estatus), eparams = results[1]
    assert (steps, status) == (esteps, estatus) == (-(-order.size // batch_size), 0)
    if dtype == np.float64:
        assert_close(np.asarray(loss_sum, dtype), eloss_sum, scale=abs(eloss_sum) + 1)
        assert_close(params, eparams, scale=np.abs(eparams).max() + 1)
    else:
        # up to 30 float32 steps: training feeds each step's rounding into the
        # next, so the trajectories drift further apart than one kernel call's
        np.testing.assert_allclose(loss_sum, eloss_sum, rtol=1e-3)
        np.testing.assert_allclose(params, eparams, rtol=0, atol=1e-3 * (np.abs(eparams).max() + 1))


def random_network(rng, n, depth, width, loss, mse_output, dtype):
    """A random 3-input, 2-output network and batch for the whole-step kernels:
    (sizes, activations, output, n_params, work size, X, X64, labels, targets,
    targets64, params, params64), the float64 twins beside their `dtype` arrays."""
    sizes = (3,) + (width,) * depth + (2,)
    acts = tuple(rng.choice(ACTIVATIONS, size=depth))
    output = mse_output if loss == "mse" else "identity"
    n_params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    work = n * sum(sizes[1:])
    X, X64 = draw(rng, (n, 3), dtype)
    labels = rng.integers(0, 2, size=n) if loss == "cross_entropy" else None
    targets, targets64 = draw(rng, (n, 2), dtype, 0, 1) if labels is None else (None, None)
    params, params64 = draw(rng, (n_params,), dtype)
    return sizes, acts, output, n_params, work, X, X64, labels, targets, targets64, params, params64


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(n=st.integers(1, 12), depth=st.integers(0, 3), width=widths, seed=seeds,
       loss=st.sampled_from(["cross_entropy", "mse", "binary_cross_entropy"]),
       momentum=st.sampled_from([0.0, 0.9]), dampening=st.sampled_from([0.0, 0.3]),
       nesterov=st.booleans(), weight_decay=st.sampled_from([0.0, 0.01]), maximize=st.booleans(),
       first_step=st.booleans())
def test_mlp_sgd_step(impl, dtype, n, depth, width, seed, loss, momentum, dampening, nesterov,
                      weight_decay, maximize, first_step):
    # every path of the compiled step (folded, momentum, unfolded) against
    # mlp_gradients then sgd_update in float64
    nesterov = nesterov and momentum > 0 and dampening == 0
    rng = np.random.default_rng(seed)
    sizes, acts, output, n_params, _, X, X64, labels, targets, targets64, params, params64 = \
        random_network(rng, n, depth, width, loss, "sigmoid", dtype)
    buf, buf64 = draw(rng, (n_params,), dtype)
    check_sgd_step(impl, (X, X64), labels, (targets, targets64), (params, params64),
                   (buf, buf64), sizes, acts, loss, output, momentum=momentum,
                   dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                   maximize=maximize, first_step=first_step)


def check_sgd_step(impl, X, labels, targets, params, buf, sizes, acts, loss, output, **kwargs):
    """impl.mlp_sgd_step against reference.mlp_gradients then sgd_update in float64;
    X, targets, params and buf are (array, its float64 twin) pairs (buf is used only
    with momentum: with it the step keeps a buffer, without it folds the update)."""
    (X, X64), (targets, targets64), (params, params64), (buf, buf64) = X, targets, params, buf
    dtype, momentum = params.dtype.type, kwargs.get("momentum", 0.0)
    n_params, work = params.size, X.shape[0] * sum(sizes[1:])
    value, status = impl.mlp_sgd_step(X, labels, targets, params, sizes, acts, loss, output,
                                      np.empty(work, dtype), np.empty(work, dtype),
                                      np.empty(n_params, dtype), buf, 0.1, **kwargs)
    grad = np.empty(n_params)
    evalue = reference.mlp_gradients(X64, labels, targets64, params64, sizes, acts, loss, output,
                                     np.empty(work), np.empty(work), grad)
    reference.sgd_update(params64, grad, buf64 if momentum else None, 0.1, **kwargs)
    assert status == 0
    slack = 1 if dtype == np.float64 else 10
    assert_close(np.asarray(value, dtype), evalue, scale=slack * (abs(evalue) + 1))
    scale = slack * (np.abs(params64).max() + np.abs(grad).max() + 1)
    assert_close(params, params64, scale=scale)
    if momentum:
        assert_close(buf, buf64, scale=scale)


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.5)])
@pytest.mark.parametrize("case, w0, status", [
    ("the loss is not finite", np.inf, 1),
    ("dW = dZ.T @ X overflows float32 (2e40)", 1e-20, 1),
    # beyond the bound the folded step can prove safe (2**128), yet finite (2e38)
    ("the gradient is finite but near the float32 limit", 1e-22, 0),
])
def test_mlp_sgd_step_refuses_non_finite_gradients(kernels, momentum, weight_decay, case, w0,
                                                   status):
    # (weight decay: the unfolded path; its w0 * 0.5 is lost beside dW)
    # one sample, one linear unit, mse: A = 1e30 * w0, dZ = 2 * A, dW = dZ * 1e30
    X = np.array([[1e30, 0.0]], np.float32)
    params = np.array([w0, 0.0, 0.0], np.float32)
    buf = np.full(3, 0.5, np.float32)
    before = params.copy(), buf.copy()
    with np.errstate(all="ignore"):
        value, got = kernels.mlp_sgd_step(X, None, np.zeros((1, 1), np.float32), params, (2, 1), (),
                                          "mse", "identity", np.empty(1, np.float32),
                                          np.empty(1, np.float32), np.empty(3, np.float32), buf,
                                          1e-30, momentum=momentum, weight_decay=weight_decay)
    assert got == status, case
    if status:
        np.testing.assert_array_equal(params, before[0])
        np.testing.assert_array_equal(buf, before[1])
    else:
        # W -= lr * (buf * momentum + dW), dW = 2e38
        expected = w0 - 1e-30 * (0.5 * momentum + 2 * (1e30 * np.float32(w0)) * 1e30)
        np.testing.assert_allclose(params[0], expected, rtol=1e-5)


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("case, a, c, status", [
    # 2-1-1, identity hidden unit, mse on one sample x = (1e30, 0), target 0:
    # A1 = a x, A2 = c A1, dZ2 = 2 A2, dW2 = dZ2 A1, dZ1 = c dZ2, dW1 = dZ1 x
    ("the hidden layer's dZ makes dW1 overflow (2e40)", 1e-30, 1e5, 1),
    ("the hidden layer's output makes dW2 overflow (1e39)", 1e5, 5e-32, 1),
    ("both finite (dW1 2e30, dW2 2)", 1e-30, 1.0, 0),
])
def test_mlp_sgd_step_refuses_overflow_behind_a_hidden_layer(kernels, momentum, case, a, c,
                                                             status):
    # a hidden layer's output and dZ enter the bound that decides whether the
    # update may be folded into the products (their exponents taken in the
    # activation's backward pass): a wrong bound would fold an infinite dW in
    X = np.array([[1e30, 0.0]], np.float32)
    params = np.array([a, 0.0, 0.0, c, 0.0], np.float32)
    buf = np.full(5, 0.5, np.float32)
    before = params.copy(), buf.copy()
    with np.errstate(all="ignore"):
        value, got = kernels.mlp_sgd_step(X, None, np.zeros((1, 1), np.float32), params,
                                          (2, 1, 1), ("identity",), "mse", "identity",
                                          np.empty(2, np.float32), np.empty(2, np.float32),
                                          np.empty(5, np.float32), buf, 1e-32,
                                          momentum=momentum)
    assert got == status, case
    if status:
        np.testing.assert_array_equal(params, before[0])
        np.testing.assert_array_equal(buf, before[1])
    else:
        assert np.all(np.isfinite(params)) and not np.array_equal(params, before[0])


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("case, w0, status", [
    ("the loss is not finite", np.inf, 1),
    ("dW = dZ.T @ X overflows float32 (2e40)", 1e-20, 1),
    # beyond the bound a step can prove safe without its own pass (2**128), yet finite
    ("the gradient is finite but near the float32 limit", 1e-22, 0),
])
def test_mlp_adam_step_refuses_non_finite_gradients(kernels, case, w0, status):
    # the network of the SGD test above: dW = 2 * (1e30 * w0) * 1e30
    X = np.array([[1e30, 0.0]], np.float32)
    params = np.array([w0, 0.0, 0.0], np.float32)
    m, v = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    before = params.copy(), m.copy(), v.copy()
    with np.errstate(all="ignore"):
        value, got = kernels.mlp_adam_step(X, None, np.zeros((1, 1), np.float32), params, (2, 1),
                                           (), "mse", "identity", np.empty(1, np.float32),
                                           np.empty(1, np.float32), np.empty(3, np.float32), m, v,
                                           None, 1, 1e-3)
    assert got == status, case
    if status:
        for array, old in zip((params, m, v), before):
            np.testing.assert_array_equal(array, old)
    else:
        # m = 0.9 * m + 0.1 * dW
        expected = 0.9 * 0.5 + 0.1 * (2 * (1e30 * np.float32(w0)) * 1e30)
        np.testing.assert_allclose(m[0], expected, rtol=1e-5)


ADAM = st.fixed_dictionaries(dict(
    beta1=st.sampled_from([0.9, 0.3]), beta2=st.sampled_from([0.999, 0.9]),
    weight_decay=st.sampled_from([0.0, 0.1]), decoupled_weight_decay=st.booleans(),
    amsgrad=st.booleans(), maximize=st.booleans()))


@pytest.mark.parametrize("impl, dtype", IMPLEMENTATIONS)
@given(n=st.integers(1, 12), depth=st.integers(0, 2), width=widths, seed=seeds,
       loss=st.sampled_from(["cross_entropy", "mse", "binary_cross_entropy"]), adam=ADAM,
       step=st.integers(1, 50))
def test_mlp_adam_step(impl, dtype, n, depth, width, seed, loss, adam, step):
    rng = np.random.default_rng(seed)
    sizes, acts, output, n_params, work, X, X64, labels, targets, targets64, params, params64 = \
        random_network(rng, n, depth, width, loss, "tanh", dtype)
    m, m64 = draw(rng, (n_params,), dtype)
    v, v64 = draw(rng, (n_params,), dtype, 0, 1)
    vmax, vmax64 = draw(rng, (n_params,), dtype, 0, 1)
    value, status = impl.mlp_adam_step(X, labels, targets, params, sizes, acts, loss, output,
                                       np.empty(work, dtype), np.empty(work, dtype),
                                       np.empty(n_params, dtype), m, v, vmax, step, 0.01, **adam)
    grad = np.empty(n_params)
    evalue = reference.mlp_gradients(X64, labels, targets64, params64, sizes, acts, loss, output,
                                     np.empty(work), np.empty(work), grad)
    reference.adam_update(params64, grad, m64, v64, vmax64, step, 0.01, **adam)
    assert status == 0
    slack = 1 if dtype == np.float64 else 10
    assert_close(np.asarray(value, dtype), evalue, scale=slack * (abs(evalue) + 1))
    # Adam divides by sqrt(v): the update's error grows where v is tiny
    assert_close(params, params64, scale=slack * 100 * (np.abs(params64).max() + 1))
    for a, e in ((m, m64), (v, v64), (vmax, vmax64)):
        assert_close(a, e, scale=slack * (np.abs(e).max() + np.abs(grad).max() ** 2 + 1))


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 30), batch_size=st.integers(1, 12), seed=seeds, adam=ADAM,
       loss=st.sampled_from(["cross_entropy", "mse"]))
def test_mlp_adam_epoch_is_its_steps_bit_for_bit(dtype, n, batch_size, seed, adam, loss):
    # the compiled epoch (what fit runs) and the compiled step (what net.step runs)
    # make the same updates, and agree with the reference epoch
    rng = np.random.default_rng(seed)
    sizes, acts = (3, 5, 2), ("relu",)
    n_params = 4 * 5 + 6 * 2
    X = rng.normal(size=(n, 3)).astype(dtype)
    labels = rng.integers(0, 2, size=n) if loss == "cross_entropy" else None
    targets = rng.normal(size=(n, 2)).astype(dtype) if labels is None else None
    order = rng.permutation(n)
    rows = min(batch_size, n)
    start = rng.normal(size=n_params).astype(dtype)
    runs = []
    for mod in (_kernels, reference):
        params = start.copy()
        state = [np.zeros(n_params, dtype) for _ in range(3)]
        work = [np.empty(rows * 7, dtype), np.empty(rows * 7, dtype), np.empty(n_params, dtype)]
        out = mod.mlp_adam_epoch(X, labels, targets, order, batch_size, params, sizes, acts, loss,
                                 "identity", *work, np.empty((rows, 3), dtype),
                                 None if labels is None else np.empty(rows, np.int64),
                                 None if targets is None else np.empty((rows, 2), dtype),
                                 *state, np.zeros(1, np.int8), 3, 0.01, **adam)
        runs.append((out, params, state))
    params = start.copy()
    state = [np.zeros(n_params, dtype) for _ in range(3)]
    total = 0.0
    for k, lo in enumerate(range(0, n, batch_size)):
        r = order[lo:lo + batch_size]
        value, status = _kernels.mlp_adam_step(
            X[r], None if labels is None else labels[r], None if targets is None else targets[r],
            params, sizes, acts, loss, "identity", np.empty(rows * 7, dtype),
            np.empty(rows * 7, dtype), np.empty(n_params, dtype), *state, 3 + k, 0.01, **adam)
        assert status == 0
        total += value * r.size
    (loss_sum, steps, status), eparams, estate = runs[0]
    assert (steps, status) == (-(-n // batch_size), 0) == runs[1][0][1:]
    np.testing.assert_array_equal(eparams, params)
    for a, b in zip(estate, state):
        np.testing.assert_array_equal(a, b)
    assert loss_sum == pytest.approx(total, rel=1e-12)
    np.testing.assert_allclose(runs[1][1], params, rtol=0,
                               atol=(1e-3 if dtype == np.float32 else 1e-9) * (np.abs(params).max() + 1))


def _epoch_arrays(dtype, loss, n=23, batch_size=5, seed=0):
    """A 3-7-2 network's epoch call: its arguments up to the optimizer's, beside
    the arrays it updates (params, then the workspace)."""
    rng = np.random.default_rng(seed)
    sizes, n_params, rows = (3, 7, 2), 4 * 7 + 8 * 2, batch_size
    X = rng.normal(size=(n, 3)).astype(dtype)
    labels = rng.integers(0, 2, size=n) if loss == "cross_entropy" else None
    targets = rng.normal(size=(n, 2)).astype(dtype) if labels is None else None
    params = rng.normal(size=n_params).astype(dtype)
    args = (X, labels, targets, rng.permutation(n), batch_size, params, sizes, ("tanh",), loss,
            "identity", np.empty(rows * 9, dtype), np.empty(rows * 9, dtype),
            np.empty(n_params, dtype), np.empty((rows, 3), dtype),
            None if labels is None else np.empty(rows, np.int64),
            None if targets is None else np.empty((rows, 2), dtype))
    return args, n_params


@pytest.mark.parametrize("kernels", BACKENDS)
def test_int64_arrays_made_as_longlong_are_int64(kernels):
    # np.longlong is np.int64 to NumPy (the dtypes compare equal) but has a type
    # number of its own: the compiled mlp_forward refused such labels with a bare
    # "invalid arguments". Every call that takes labels or an order gives the
    # same results with either.
    q = np.dtype(np.longlong)
    if q.itemsize != 8 or q != np.dtype(np.int64) or q.num == np.dtype(np.int64).num:
        pytest.skip("np.longlong is not a second int64 type here")
    args, n_params = _epoch_arrays(np.float64, "cross_entropy")
    X, labels, order, params, sizes, acts = args[0], args[1], args[3], args[5], args[6], args[7]
    net = (sizes, acts, "cross_entropy", "identity")
    results = []
    for as_type in (np.int64, np.longlong):
        y, o = labels.astype(as_type), order.astype(as_type)
        work = [np.zeros(X.shape[0] * 9) for _ in range(2)]
        grad = np.empty(n_params)
        forward = kernels.mlp_forward(X, y, None, params, *net, work[0], None)
        loss = kernels.mlp_gradients(X, y, None, params, *net, *work, grad)
        p = params.copy()
        step = kernels.mlp_sgd_step(X, y, None, p, *net, *work, np.empty(n_params), None, 0.1)
        pe = params.copy()
        epoch = kernels.mlp_sgd_epoch(X, y, None, o, 5, pe, *net, np.empty(45), np.empty(45),
                                      np.empty(n_params), np.empty((5, 3)),
                                      np.empty(5, as_type), None, None, np.zeros(1, np.int8), 0.1)
        results.append((forward, loss, grad, step, p, epoch, pe))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("batch_size", [1, 5, 8])
def test_compiled_epoch_reads_consecutive_rows_in_place(dtype, loss, batch_size):
    # a batch of consecutive rows (every batch of an epoch without shuffling) is
    # read where it is, the others gathered into X_batch first: the same epoch, bit
    # for bit, as on a copy of the data whose rows the order has to gather
    def epoch(order, perm=None):
        a = list(_epoch_arrays(dtype, loss, batch_size=batch_size)[0])
        if perm is not None:  # the same rows, stored in another order
            inverse = np.argsort(perm)
            a[0] = a[0][perm]
            a[1 if loss == "cross_entropy" else 2] = a[1 if loss == "cross_entropy" else 2][perm]
            order = inverse[order]
        a[3] = order
        a[13][:] = np.nan  # X_batch: scratch
        out = _kernels.mlp_sgd_epoch(*a, np.zeros(a[5].size, dtype), np.zeros(1, np.int8), 0.1,
                                     momentum=0.9)
        return out, a[5], a[13]

    n = 23
    perm = np.random.default_rng(1).permutation(n)
    mixed = np.concatenate([np.arange(10), 10 + perm[perm < 13]])  # in order, then shuffled
    for order, in_order in ((np.arange(n), True), (mixed, False)):
        (out, params, xb), (eout, eparams, exb) = epoch(order), epoch(order, perm)
        assert out == eout and out[1:] == (-(-n // batch_size), 0)
        np.testing.assert_array_equal(params, eparams)
        if batch_size > 1:  # (a batch of one row is always read in place)
            assert not np.isnan(exb).any()
        if in_order:  # X_batch never written
            assert np.isnan(xb).all()


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_compiled_epoch_call_allocates_nothing(loss, optimizer):
    # a fit calls it every epoch: no memoryview objects
    from fastbp.bench import step_allocations

    args, n_params = _epoch_arrays(np.float32, loss)
    stop = np.zeros(1, np.int8)
    if optimizer == "adam":
        state = [np.zeros(n_params, np.float32) for _ in range(2)]
        call, rest = _kernels.mlp_adam_epoch, (*state, None, stop, 1, 0.01)
    else:
        call, rest = _kernels.mlp_sgd_epoch, (np.zeros(n_params, np.float32), stop, 0.01, 0.9)
    kept, peak = step_allocations(call, args + rest)
    # the returned (loss_sum, steps, status) and its float at most (a former path
    # through typed memoryviews peaked at about 3 KB a call)
    assert kept <= 128 and peak <= 128, (kept, peak)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("kernels", BACKENDS)
def test_mlp_adam_refuses_non_finite_steps(kernels):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 3)), rng.integers(0, 2, size=20)
    params = np.zeros(8)
    params[0] = np.inf
    state = [np.full(8, 0.5) for _ in range(3)]
    before = params.copy(), [a.copy() for a in state]
    value, status = kernels.mlp_adam_step(X[:5], y[:5], None, params, (3, 2), (), "cross_entropy",
                                          "identity", np.empty(10), np.empty(10), np.empty(8),
                                          *state, 1, 0.1, amsgrad=True)
    assert status == 1
    out = kernels.mlp_adam_epoch(X, y, None, np.arange(20), 5, params, (3, 2), (), "cross_entropy",
                                 "identity", np.empty(10), np.empty(10), np.empty(8),
                                 np.empty((5, 3)), np.empty(5, np.int64), None, *state,
                                 np.zeros(1, np.int8), 1, 0.1, amsgrad=True)
    assert out[1:] == (0, 1)
    np.testing.assert_array_equal(params, before[0])
    for a, b in zip(state, before[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the reference computes inf - inf
@pytest.mark.parametrize("kernels", BACKENDS)
def test_mlp_sgd_epoch_stops_when_asked_and_at_non_finite_steps(kernels):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 3)), rng.integers(0, 2, size=20)
    args = lambda params, stop: (X, y, None, np.arange(20), 5, params, (3, 2), (), "cross_entropy",
                                 "identity", np.empty(10), np.empty(10), np.empty(8),
                                 np.empty((5, 3)), np.empty(5, np.int64), None, None, stop)
    params = np.zeros(8)
    assert kernels.mlp_sgd_epoch(*args(params, np.ones(1, np.int8)), 0.1)[1:] == (1, 2)
    params = np.zeros(8)
    params[0] = np.inf
    before = params.copy()
    loss_sum, steps, status = kernels.mlp_sgd_epoch(*args(params, np.zeros(1, np.int8)), 0.1)
    assert (steps, status) == (0, 1)
    np.testing.assert_array_equal(params, before)


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite(kernels, dtype):
    x = np.linspace(-1e3, 1e3, 37).astype(dtype)
    assert kernels.all_finite(x) is True
    assert kernels.all_finite(np.empty(0, dtype)) is True
    for bad in (np.nan, np.inf, -np.inf):
        for i in (0, 17, 36):
            y = x.copy()
            y[i] = bad
            assert kernels.all_finite(y) is False


# ---------------------------------------------------------------------------
# Edge cases both backends must agree on.

@pytest.mark.parametrize("kernels", BACKENDS)
def test_dense_zero_samples(kernels):
    X, W, b = np.empty((0, 3)), np.ones((2, 3)), np.ones(2)
    out = np.empty((0, 2))
    assert kernels.dense_forward(X, W, b, "relu", out).shape == (0, 2)
    dW, db = np.full((2, 3), np.nan), np.full(2, np.nan)
    kernels.dense_backward(np.empty((0, 2)), X, W, dW, db, np.empty((0, 3)))
    assert (dW == 0).all() and (db == 0).all()


@pytest.mark.parametrize("kernels", BACKENDS)
def test_losses_are_stable_for_extreme_logits(kernels):
    Z = np.array([[1e4, -1e4], [-1e4, 1e4]], np.float32)
    y = np.array([0, 0])
    dZ = np.empty_like(Z)
    loss = kernels.softmax_cross_entropy(Z, y, dZ)
    assert np.isclose(loss, 1e4)  # (0 + 2e4) / 2
    np.testing.assert_allclose(dZ, [[0, 0], [-0.5, 0.5]], atol=1e-7)
    Y = np.array([[1, 0], [1, 0]], np.float32)
    loss = kernels.binary_cross_entropy_with_logits(Z, Y, dZ)
    assert np.isclose(loss, (0 + 0 + 1e4 + 1e4) / 4)
    np.testing.assert_allclose(dZ, [[0, 0], [-0.25, 0.25]], atol=1e-7)
    A = np.empty_like(Z)
    kernels.dense_forward(Z, np.eye(2, dtype=np.float32), np.zeros(2, np.float32), "sigmoid", A)
    np.testing.assert_array_equal(A, [[1, 0], [0, 1]])


@pytest.mark.parametrize("kernels", BACKENDS)
def test_read_only_inputs_are_accepted(kernels):
    X, W, b = np.ones((2, 3)), np.ones((4, 3)), np.ones(4)
    for a in (X, W, b):
        a.flags.writeable = False
    out = kernels.dense_forward(X, W, b, "identity", np.empty((2, 4)))
    np.testing.assert_array_equal(out, 4.0)
    # a whole network's inputs too (the compiled mlp_gradients had asked for a
    # writable params, which it only reads)
    params, y = _read_only(np.zeros(14)), _read_only(np.array([0, 1]))
    net = ((3, 2, 2), ("relu",), "cross_entropy", "identity")
    assert kernels.mlp_gradients(X, y, None, params, *net, np.zeros(8), np.zeros(8),
                                 np.zeros(14)) == pytest.approx(np.log(2))
    assert kernels.mlp_forward(X, y, None, params, *net, np.zeros(8), None) == pytest.approx(np.log(2))


# ---------------------------------------------------------------------------
# Bad input: both backends raise the same exception with the same message, and
# write nothing.

def _read_only(a):
    a.flags.writeable = False
    return a


def _bad_calls():
    f8, f4 = np.float64, np.float32
    X, W, b, out = np.ones((4, 3)), np.ones((2, 3)), np.ones(2), np.zeros((4, 2))
    ro = np.zeros((4, 2))
    ro.flags.writeable = False
    strided = np.zeros((4, 4))[:, ::2]
    y = np.array([0, 1, 1, 0])
    Z = np.ones((4, 2))
    p = np.zeros(5)
    # the other byte order than the machine's (the kernels read plain arrays
    # through NumPy's C API, where its type number is the native type's)
    def swapped(a):
        return a.astype(a.dtype.newbyteorder())
    return {
        "forward: W wrong width": (lambda k: k.dense_forward(X, np.ones((2, 4)), b, "relu", out), ValueError, "W"),
        "forward: b wrong size": (lambda k: k.dense_forward(X, W, np.ones(3), "relu", out), ValueError, "b"),
        "forward: out wrong shape": (lambda k: k.dense_forward(X, W, b, "relu", np.zeros((4, 3))), ValueError, "out"),
        "forward: mixed dtypes": (lambda k: k.dense_forward(X, W.astype(f4), b, "relu", out), TypeError, "W"),
        "forward: float32 out": (lambda k: k.dense_forward(X, W, b, "relu", out.astype(f4)), TypeError, "out"),
        "forward: integer X": (lambda k: k.dense_forward(np.ones((4, 3), int), W, b, "relu", out), TypeError, "X"),
        "forward: list X": (lambda k: k.dense_forward([[1.0, 2.0, 3.0]], W, b, "relu", out), TypeError, "X"),
        "forward: 1-D X": (lambda k: k.dense_forward(np.ones(3), W, b, "relu", out), ValueError, "X"),
        "forward: read-only out": (lambda k: k.dense_forward(X, W, b, "relu", ro), ValueError, "out"),
        "forward: strided out": (lambda k: k.dense_forward(X, W, b, "relu", strided), ValueError, "out"),
        "forward: Fortran X": (lambda k: k.dense_forward(np.asfortranarray(X), W, b, "relu", out), ValueError, "X"),
        "forward: unknown activation": (lambda k: k.dense_forward(X, W, b, "swish", out), ValueError, "swish"),
        "forward: out is X": (lambda k: k.dense_forward(Z, np.ones((2, 2)), b, "relu", Z), ValueError, "out"),
        "act backward: dA shape": (lambda k: k.activation_backward(Z, np.ones((4, 3)), "tanh", Z.copy()), ValueError, "dA"),
        "act backward: partial overlap": (lambda k: k.activation_backward(
            np.ones((2, 2)), (buf := np.ones(6))[:4].reshape(2, 2), "tanh", buf[2:].reshape(2, 2)), ValueError, "out"),
        "backward: X rows": (lambda k: k.dense_backward(Z, np.ones((3, 3)), W, np.zeros((2, 3)), np.zeros(2)), ValueError, "X"),
        "backward: dW shape": (lambda k: k.dense_backward(Z, X, W, np.zeros((3, 2)), np.zeros(2)), ValueError, "dW"),
        "backward: dX shape": (lambda k: k.dense_backward(Z, X, W, np.zeros((2, 3)), np.zeros(2), np.zeros((4, 2))), ValueError, "dX"),
        "backward: dW is W": (lambda k: k.dense_backward(Z, X, (w := np.ones((2, 3))), w, np.zeros(2)), ValueError, "dW"),
        "backward: reversed db": (lambda k: k.dense_backward(Z, X, W, np.zeros((2, 3)), np.zeros(2)[::-1]), ValueError, "db"),
        "softmax: out shape": (lambda k: k.softmax(Z, np.zeros((4, 3))), ValueError, "out"),
        "softmax: no classes": (lambda k: k.softmax(np.ones((4, 0)), np.ones((4, 0))), ValueError, "Z"),
        "ce: label too large": (lambda k: k.softmax_cross_entropy(Z, np.array([0, 1, 2, 0]), np.zeros((4, 2))), ValueError, "y[2] = 2"),
        "ce: negative label": (lambda k: k.softmax_cross_entropy(Z, np.array([0, -1, 1, 0]), np.zeros((4, 2))), ValueError, "y[1] = -1"),
        "ce: int32 labels": (lambda k: k.softmax_cross_entropy(Z, y.astype(np.int32), None), TypeError, "y"),
        "ce: float labels": (lambda k: k.softmax_cross_entropy(Z, y.astype(f8), None), TypeError, "y"),
        "ce: label count": (lambda k: k.softmax_cross_entropy(Z, y[:3], None), ValueError, "y"),
        "ce: empty batch": (lambda k: k.softmax_cross_entropy(np.ones((0, 2)), y[:0], None), ValueError, "no samples"),
        "mse: Y shape": (lambda k: k.mean_squared_error(Z, np.ones((4, 1)), "identity", None), ValueError, "Y"),
        "mse: bad activation": (lambda k: k.mean_squared_error(Z, Z, "relu", None), ValueError, "relu"),
        "mse: empty batch": (lambda k: k.mean_squared_error(np.ones((0, 2)), np.ones((0, 2)), "identity"), ValueError, "no samples"),
        "bce: dZ shape": (lambda k: k.binary_cross_entropy_with_logits(Z, Z, np.zeros((2, 4))), ValueError, "dZ"),
        "bce: mixed dtypes": (lambda k: k.binary_cross_entropy_with_logits(Z, Z.astype(f4)), TypeError, "Y"),
        "sgd: grad size": (lambda k: k.sgd_update(p, np.ones(4), None, 0.1), ValueError, "grad"),
        "sgd: missing buffer": (lambda k: k.sgd_update(p, np.ones(5), None, 0.1, momentum=0.9), ValueError, "momentum_buffer"),
        "sgd: buffer size": (lambda k: k.sgd_update(p, np.ones(5), np.zeros(4), 0.1, momentum=0.9), ValueError, "momentum_buffer"),
        "sgd: grad is param": (lambda k: k.sgd_update(p, p, None, 0.1), ValueError, "param"),
        "sgd: reversed param": (lambda k: k.sgd_update(np.zeros(5)[::-1], np.ones(5), None, 0.1), ValueError, "param"),
        "sgd: read-only param": (lambda k: k.sgd_update(ro.reshape(-1), np.ones(8), None, 0.1), ValueError, "param"),
        "all_finite: 2-D": (lambda k: k.all_finite(Z), ValueError, "x"),
        "step: missing buffer": (lambda k: k.mlp_sgd_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), None, 0.1, momentum=0.9), ValueError, "momentum_buffer"),
        "step: buffer size": (lambda k: k.mlp_sgd_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), np.zeros(13), 0.1, momentum=0.9), ValueError, "momentum_buffer"),
        "step: float32 buffer": (lambda k: k.mlp_sgd_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), np.zeros(14, f4), 0.1, momentum=0.9), TypeError, "momentum_buffer"),
        "step: buffer is grad": (lambda k: k.mlp_sgd_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), (g := np.zeros(14)), g, 0.1, momentum=0.9), ValueError, "overlaps"),
        "step: nesterov without momentum": (lambda k: k.mlp_sgd_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), None, 0.1, nesterov=True), ValueError, "Nesterov"),
        "step: bad label": (lambda k: k.mlp_sgd_step(X, np.array([0, 1, 2, 0]), None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), None, 0.1), ValueError, "y[2] = 2"),
        "step: small work buffer": (lambda k: k.mlp_sgd_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(15), np.zeros(16), np.zeros(14), None, 0.1), ValueError, "at least 16"),
        "adam step: state size": (lambda k: k.mlp_adam_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), np.zeros(13), np.zeros(14), None, 1, 0.1), ValueError, "exp_avg"),
        "adam step: state is A": (lambda k: k.mlp_adam_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", (aa := np.zeros(16)), np.zeros(16), np.zeros(14), aa[:14], np.zeros(14), None, 1, 0.1), ValueError, "overlaps"),
        "adam step: step 0": (lambda k: k.mlp_adam_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), np.zeros(14), np.zeros(14), None, 0, 0.1), ValueError, "step"),
        "adam step: missing max": (lambda k: k.mlp_adam_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), np.zeros(14), np.zeros(14), None, 1, 0.1, amsgrad=True), ValueError, "max_exp_avg_sq"),
        "adam step: float32 state": (lambda k: k.mlp_adam_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), np.zeros(14, f4), np.zeros(14), None, 1, 0.1), TypeError, "exp_avg"),
        "adam step: bad label": (lambda k: k.mlp_adam_step(X, np.array([0, 1, 2, 0]), None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), np.zeros(14), np.zeros(14), None, 1, 0.1), ValueError, "y[2] = 2"),
        "adam epoch: state is X_batch": (lambda k: k.mlp_adam_epoch(X, y, None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), (xb := np.zeros((5, 3))), np.zeros(5, np.int64), None, xb.reshape(-1)[:14], np.zeros(14), None, np.zeros(1, np.int8), 1, 0.1), ValueError, "overlaps"),
        "adam epoch: step True": (lambda k: k.mlp_adam_epoch(X, y, None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, np.zeros(14), np.zeros(14), None, np.zeros(1, np.int8), True, 0.1), ValueError, "step"),
        "adam epoch: order out of range": (lambda k: k.mlp_adam_epoch(X, y, None, np.array([0, 9]), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, np.zeros(14), np.zeros(14), None, np.zeros(1, np.int8), 1, 0.1), ValueError, "order[1] = 9"),
        "adam: grad size": (lambda k: k.adam_update(p, np.ones(4), np.zeros(5), np.zeros(5), None, 1, 0.1), ValueError, "grad"),
        "adam: exp_avg size": (lambda k: k.adam_update(p, np.ones(5), np.zeros(4), np.zeros(5), None, 1, 0.1), ValueError, "exp_avg"),
        "adam: float32 state": (lambda k: k.adam_update(p, np.ones(5), np.zeros(5, f4), np.zeros(5), None, 1, 0.1), TypeError, "exp_avg"),
        "adam: missing max": (lambda k: k.adam_update(p, np.ones(5), np.zeros(5), np.zeros(5), None, 1, 0.1, amsgrad=True), ValueError, "max_exp_avg_sq"),
        "adam: shared moments": (lambda k: k.adam_update(p, np.ones(5), (m := np.zeros(5)), m, None, 1, 0.1), ValueError, "overlaps"),
        "mlp: unknown loss": (lambda k: k.mlp_gradients(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "hinge", "identity", np.zeros(16), np.zeros(16), np.zeros(14)), ValueError, "hinge"),
        "mlp: params size": (lambda k: k.mlp_gradients(X, y, None, np.zeros(13), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14)), ValueError, "params"),
        "mlp: small work buffer": (lambda k: k.mlp_gradients(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(15), np.zeros(16), np.zeros(14)), ValueError, "at least 16"),
        "mlp: activation count": (lambda k: k.mlp_gradients(X, y, None, np.zeros(14), (3, 2, 2), (), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14)), ValueError, "hidden layers"),
        "mlp: targets for ce": (lambda k: k.mlp_gradients(X, None, Z, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14)), ValueError, "labels"),
        "mlp: softmax after sigmoid": (lambda k: k.mlp_gradients(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "sigmoid", np.zeros(16), np.zeros(16), np.zeros(14)), ValueError, "logits"),
        "mlp: grad is A": (lambda k: k.mlp_gradients(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", (w := np.zeros(16)), np.zeros(16), w[:14]), ValueError, "overlaps"),
        "mlp: bad label": (lambda k: k.mlp_gradients(X, np.array([0, 1, 2, 0]), None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14)), ValueError, "y[2] = 2"),
        "forward all: unknown loss": (lambda k: k.mlp_forward(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "hinge", "identity", np.zeros(16), None), ValueError, "hinge"),
        "forward all: params size": (lambda k: k.mlp_forward(X, None, None, np.zeros(13), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros((4, 2))), ValueError, "params"),
        "forward all: small work buffer": (lambda k: k.mlp_forward(X, None, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(15), None), ValueError, "at least 16"),
        "forward all: out shape": (lambda k: k.mlp_forward(X, None, None, np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", np.zeros(16), np.zeros((4, 3))), ValueError, "out"),
        "forward all: float32 out": (lambda k: k.mlp_forward(X, None, None, np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", np.zeros(16), np.zeros((4, 2), f4)), TypeError, "out"),
        "forward all: read-only out": (lambda k: k.mlp_forward(X, None, None, np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", np.zeros(16), ro[:, :2]), ValueError, "out"),
        "forward all: out in A": (lambda k: k.mlp_forward(X, None, None, np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", (wa := np.zeros(24)), wa[16:].reshape(4, 2)), ValueError, "overlaps"),
        "forward all: A is X": (lambda k: k.mlp_forward((xa := np.zeros((4, 5))), None, None, np.zeros(18), (5, 2, 2), ("relu",), "mse", "identity", xa.reshape(-1), None), ValueError, "overlaps"),
        "forward all: labels for mse": (lambda k: k.mlp_forward(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", np.zeros(16), None), ValueError, "labels=None"),
        "forward all: targets for ce": (lambda k: k.mlp_forward(X, None, Z, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), None), ValueError, "targets=None"),
        "forward all: targets shape": (lambda k: k.mlp_forward(X, None, np.zeros((4, 3)), np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", np.zeros(16), None), ValueError, "targets"),
        "forward all: int32 labels": (lambda k: k.mlp_forward(X, y.astype(np.int32), None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), None), TypeError, "labels"),
        "forward all: bad label": (lambda k: k.mlp_forward(X, np.array([0, 1, 2, 0]), None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), None), ValueError, "y[2] = 2"),
        "forward all: empty batch": (lambda k: k.mlp_forward(np.zeros((0, 3)), None, None, np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", np.zeros(16), np.zeros((0, 2))), ValueError, "no samples"),
        "forward all: softmax after tanh": (lambda k: k.mlp_forward(X, None, None, np.zeros(14), (3, 2, 2), ("relu",), "binary_cross_entropy", "tanh", np.zeros(16), None), ValueError, "logits"),
        "mlp: float32 grad": (lambda k: k.mlp_gradients(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14, f4)), TypeError, "grad"),
        "epoch: order out of range": (lambda k: k.mlp_sgd_epoch(X, y, None, np.array([0, 4]), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, None, np.zeros(1, np.int8), 0.1), ValueError, "order[1] = 4"),
        "epoch: small X_batch": (lambda k: k.mlp_sgd_epoch(X, y, None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((1, 3)), np.zeros(1, np.int64), None, None, np.zeros(1, np.int8), 0.1), ValueError, "X_batch"),
        "epoch: int32 stop": (lambda k: k.mlp_sgd_epoch(X, y, None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, None, np.zeros(1, np.int32), 0.1), TypeError, "stop"),
        "epoch: missing buffer": (lambda k: k.mlp_sgd_epoch(X, y, None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, None, np.zeros(1, np.int8), 0.1, momentum=0.9), ValueError, "momentum_buffer"),
        "epoch: X_batch is X": (lambda k: k.mlp_sgd_epoch((xb := np.zeros((4, 3))), y, None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), xb[:2], np.zeros(2, np.int64), None, None, np.zeros(1, np.int8), 0.1), ValueError, "overlaps"),
        "epoch: batch_size 0": (lambda k: k.mlp_sgd_epoch(X, y, None, np.arange(4), 0, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, None, np.zeros(1, np.int8), 0.1), ValueError, "batch_size"),
        "epoch: batch_size True": (lambda k: k.mlp_sgd_epoch(X, y, None, np.arange(4), True, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, None, np.zeros(1, np.int8), 0.1), ValueError, "batch_size"),
        "epoch: labels_batch size": (lambda k: k.mlp_sgd_epoch(X, y, None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(3, np.int64), None, None, np.zeros(1, np.int8), 0.1), ValueError, "labels_batch"),
        "epoch: buffer overlaps params": (lambda k: k.mlp_sgd_epoch(X, y, None, np.arange(4), 2, (pp := np.zeros(14)), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, pp, np.zeros(1, np.int8), 0.1, momentum=0.9), ValueError, "overlaps"),
        "epoch: bad label": (lambda k: k.mlp_sgd_epoch(X, np.array([0, 1, 0, 7]), None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, None, np.zeros(1, np.int8), 0.1), ValueError, "y[3] = 7"),
        "adam: step 0": (lambda k: k.adam_update(p, np.ones(5), np.zeros(5), np.zeros(5), None, 0, 0.1), ValueError, "step"),
        "forward: memoryview X": (lambda k: k.dense_forward(memoryview(X), W, b, "relu", out), TypeError, "X must be a numpy.ndarray"),
        "act backward: memoryview out": (lambda k: k.activation_backward(Z, Z, "tanh", memoryview(np.zeros((4, 2)))), TypeError, "out must be a numpy.ndarray"),
        "backward: memoryview db": (lambda k: k.dense_backward(Z, X, W, np.zeros((2, 3)), memoryview(np.zeros(2))), TypeError, "db must be a numpy.ndarray"),
        "softmax: memoryview Z": (lambda k: k.softmax(memoryview(Z), np.zeros((4, 2))), TypeError, "Z must be a numpy.ndarray"),
        "ce: memoryview labels": (lambda k: k.softmax_cross_entropy(Z, memoryview(y.astype(np.int64)), None), TypeError, "y must be a numpy.ndarray"),
        "mse: memoryview Y": (lambda k: k.mean_squared_error(Z, memoryview(Z), "identity"), TypeError, "Y must be a numpy.ndarray"),
        "bce: memoryview dZ": (lambda k: k.binary_cross_entropy_with_logits(Z, Z, memoryview(np.zeros((4, 2)))), TypeError, "dZ must be a numpy.ndarray"),
        "sgd: memoryview param": (lambda k: k.sgd_update(memoryview(np.zeros(5)), np.ones(5), None, 0.1), TypeError, "param must be a numpy.ndarray"),
        "all_finite: memoryview": (lambda k: k.all_finite(memoryview(np.ones(5))), TypeError, "x must be a numpy.ndarray"),
        "mlp: memoryview grad": (lambda k: k.mlp_gradients(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), memoryview(np.zeros(14))), TypeError, "grad must be a numpy.ndarray"),
        "step: memoryview params": (lambda k: k.mlp_sgd_step(X, y, None, memoryview(np.zeros(14)), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), None, 0.1), TypeError, "params must be a numpy.ndarray"),
        "step: read-only params": (lambda k: k.mlp_sgd_step(X, y, None, _read_only(np.zeros(14)), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), None, 0.1), ValueError, "params is read-only"),
        "adam step: memoryview X": (lambda k: k.mlp_adam_step(memoryview(X), y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), np.zeros(14), np.zeros(14), None, 1, 0.1), TypeError, "X must be a numpy.ndarray"),
        "epoch: memoryview order": (lambda k: k.mlp_sgd_epoch(X, y, None, memoryview(np.arange(4, dtype=np.int64)), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, None, np.zeros(1, np.int8), 0.1), TypeError, "order must be a numpy.ndarray"),
        "epoch: read-only targets_batch": (lambda k: k.mlp_sgd_epoch(X, None, Z, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), None, _read_only(np.zeros((2, 2))), None, np.zeros(1, np.int8), 0.1), ValueError, "targets_batch is read-only"),
        "adam epoch: memoryview exp_avg": (lambda k: k.mlp_adam_epoch(X, y, None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, memoryview(np.zeros(14)), np.zeros(14), None, np.zeros(1, np.int8), 1, 0.1), TypeError, "exp_avg must be a numpy.ndarray"),
        "epoch: params None": (lambda k: k.mlp_sgd_epoch(X, y, None, np.arange(4), 2, None, (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, None, np.zeros(1, np.int8), 0.1), TypeError, "params must be a numpy.ndarray, got NoneType"),
        "sgd: param None": (lambda k: k.sgd_update(None, np.ones(5), None, 0.1), TypeError, "param must be a numpy.ndarray, got NoneType"),
        "all_finite: None": (lambda k: k.all_finite(None), TypeError, "x must be a numpy.ndarray, got NoneType"),
        "all_finite: byte-swapped": (lambda k: k.all_finite(swapped(np.ones(5))), TypeError, "x has dtype"),
        "forward all: byte-swapped X": (lambda k: k.mlp_forward(swapped(X), None, None, np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", np.zeros(16), np.zeros((4, 2))), TypeError, "X has dtype"),
        "forward all: byte-swapped out": (lambda k: k.mlp_forward(X, None, None, np.zeros(14), (3, 2, 2), ("relu",), "mse", "identity", np.zeros(16), swapped(np.zeros((4, 2)))), TypeError, "out has dtype"),
        "mlp: byte-swapped params": (lambda k: k.mlp_gradients(X, y, None, swapped(np.zeros(14)), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14)), TypeError, "params has dtype"),
        "step: byte-swapped labels": (lambda k: k.mlp_sgd_step(X, swapped(y.astype(np.int64)), None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), None, 0.1), TypeError, "labels has dtype"),
        "step: byte-swapped buffer": (lambda k: k.mlp_sgd_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), swapped(np.zeros(14)), 0.1, momentum=0.9), TypeError, "momentum_buffer has dtype"),
        "adam step: byte-swapped state": (lambda k: k.mlp_adam_step(X, y, None, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(16), np.zeros(16), np.zeros(14), swapped(np.zeros(14)), np.zeros(14), None, 1, 0.1), TypeError, "exp_avg has dtype"),
        "epoch: byte-swapped order": (lambda k: k.mlp_sgd_epoch(X, y, None, swapped(np.arange(4, dtype=np.int64)), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, None, np.zeros(1, np.int8), 0.1), TypeError, "order has dtype"),
        "adam epoch: byte-swapped X": (lambda k: k.mlp_adam_epoch(swapped(X), y, None, np.arange(4), 2, np.zeros(14), (3, 2, 2), ("relu",), "cross_entropy", "identity", np.zeros(8), np.zeros(8), np.zeros(14), np.zeros((2, 3)), np.zeros(2, np.int64), None, np.zeros(14), np.zeros(14), None, np.zeros(1, np.int8), 1, 0.1), TypeError, "X has dtype"),
        "adam: read-only param": (lambda k: k.adam_update(ro.reshape(-1), np.ones(8), np.zeros(8), np.zeros(8), None, 1, 0.1), ValueError, "param"),
    }


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_same_error_on_both_backends(case):
    call, exc_type, fragment = BAD_CALLS[case]
    messages = []
    for kernels in (reference, _kernels):
        with pytest.raises(exc_type) as info:
            call(kernels)
        assert fragment in str(info.value), (kernels.__name__, str(info.value))
        messages.append(str(info.value))
    assert messages[0] == messages[1]


# One argument of a valid whole-network call changed at a time (byte order,
# dtype, layout, writability, kind, shape, alignment, values): both backends must
# agree, on the error (its type and message, nothing written to the parameters or
# the optimizer state) or on the result. The compiled calls read plain arrays
# through NumPy's C API and check them in C, the reference in Python: this found
# byte-swapped and np.longlong arrays read wrongly, memoryviews taken where the
# reference refuses them, and read-only outputs named late or not at all.

def _misaligned(a):
    raw = np.zeros(a.nbytes + 1, np.uint8)
    m = np.frombuffer(raw.data, np.uint8, a.nbytes, 1).view(a.dtype).reshape(a.shape)
    m[...] = a
    return m


def _read_only_copy(a):
    return _read_only(a.copy())


ONE_CHANGE = {
    "byte-swapped": lambda a: a.astype(a.dtype.newbyteorder()),
    "float32": lambda a: a.astype(np.float32),
    "float64": lambda a: a.astype(np.float64),
    "int64": lambda a: a.astype(np.int64),
    "int32": lambda a: a.astype(np.int32),
    "longlong": lambda a: a.astype(np.longlong),
    "uint64": lambda a: a.astype(np.uint64),
    "bool": lambda a: a.astype(bool),
    "reversed": lambda a: np.asfortranarray(a) if a.ndim == 2 else a[::-1],
    "strided": lambda a: np.repeat(a, 2, axis=-1)[..., ::2],
    "read-only": _read_only_copy,
    "None": lambda a: None,
    "list": lambda a: a.tolist(),
    "memoryview": memoryview,
    "0-d": lambda a: a.reshape(-1)[:1].reshape(()),
    "one more": lambda a: np.concatenate([a, a[:1]]),
    "one fewer": lambda a: a[:-1],
    "empty": lambda a: a[:0],
    "misaligned": _misaligned,
    "NaN": lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a).astype(a.dtype)
    if a.dtype.kind == "f" else a,
    "large": lambda a: a + np.iinfo(a.dtype).max // 2 if a.dtype.kind == "i" else a * 1e30,
}


def _one_change_calls(dtype, loss, option):
    """{kernel: (arrays, call(kernels, arrays), names of the state it updates)}
    for the whole-network kernels on one small valid batch (6 rows, 3-4-2 tanh);
    option: momentum (SGD), amsgrad (Adam), an out array (mlp_forward)."""
    rng = np.random.default_rng(0)
    n, sizes, n_params = 6, (3, 4, 2), 3 * 4 + 4 + 4 * 2 + 2
    net = (sizes, ("tanh",), loss, "identity")
    data = dict(X=rng.normal(size=(n, 3)).astype(dtype),
                labels=rng.integers(0, 2, n) if loss == "cross_entropy" else None,
                targets=rng.normal(size=(n, 2)).astype(dtype) if loss == "mse" else None,
                params=(rng.normal(size=n_params) * 0.3).astype(dtype))
    work = lambda rows: dict(A=np.zeros(rows * 6, dtype), D=np.zeros(rows * 6, dtype),
                             grad=np.zeros(n_params, dtype))
    batch = dict(order=rng.permutation(n), X_batch=np.zeros((3, 3), dtype),
                 labels_batch=np.zeros(3, np.int64) if loss == "cross_entropy" else None,
                 targets_batch=np.zeros((3, 2), dtype) if loss == "mse" else None,
                 stop=np.zeros(1, np.int8))
    buf = dict(momentum_buffer=np.zeros(n_params, dtype) if option else None)
    adam = dict(m=np.zeros(n_params, dtype), v=np.zeros(n_params, dtype),
                vmax=np.zeros(n_params, dtype) if option else None)
    mom = 0.9 if option else 0.0
    first = lambda a: (a["X"], a["labels"], a["targets"])
    return {
        "mlp_forward": (dict(data, A=np.zeros(n * 6, dtype),
                             out=np.zeros((n, 2), dtype) if option else None),
                        lambda k, a: k.mlp_forward(*first(a), a["params"], *net, a["A"], a["out"]),
                        ("params",)),
        "mlp_gradients": (dict(data, **work(n)),
                          lambda k, a: k.mlp_gradients(*first(a), a["params"], *net, a["A"],
                                                       a["D"], a["grad"]),
                          ("params",)),
        "mlp_sgd_step": (dict(data, **work(n), **buf),
                         lambda k, a: k.mlp_sgd_step(*first(a), a["params"], *net, a["A"], a["D"],
                                                     a["grad"], a["momentum_buffer"], 0.1,
                                                     momentum=mom),
                         ("params", "momentum_buffer")),
        "mlp_adam_step": (dict(data, **work(n), **adam),
                          lambda k, a: k.mlp_adam_step(*first(a), a["params"], *net, a["A"],
                                                       a["D"], a["grad"], a["m"], a["v"],
                                                       a["vmax"], 1, 0.01, amsgrad=option),
                          ("params", "m", "v", "vmax")),
        "mlp_sgd_epoch": (dict(data, **work(3), **batch, **buf),
                          lambda k, a: k.mlp_sgd_epoch(*first(a), a["order"], 3, a["params"], *net,
                                                       a["A"], a["D"], a["grad"], a["X_batch"],
                                                       a["labels_batch"], a["targets_batch"],
                                                       a["momentum_buffer"], a["stop"], 0.1,
                                                       momentum=mom),
                          ("params", "momentum_buffer")),
        "mlp_adam_epoch": (dict(data, **work(3), **batch, **adam),
                           lambda k, a: k.mlp_adam_epoch(*first(a), a["order"], 3, a["params"],
                                                         *net, a["A"], a["D"], a["grad"],
                                                         a["X_batch"], a["labels_batch"],
                                                         a["targets_batch"], a["m"], a["v"],
                                                         a["vmax"], a["stop"], 1, 0.01,
                                                         amsgrad=option),
                           ("params", "m", "v", "vmax")),
    }


def _outcome(kernels, call, arrays, state):
    """("ok", result, state arrays) or ("error", type and message, names of the
    state arrays the failed call changed)."""
    before = {s: arrays[s].copy() for s in state if isinstance(arrays.get(s), np.ndarray)}
    try:
        result = call(kernels, arrays)
    except (TypeError, ValueError, FloatingPointError) as exc:
        changed = [s for s in before
                   if not np.array_equal(before[s], arrays[s], equal_nan=True)]
        return "error", f"{type(exc).__name__}: {exc}", changed
    return "ok", result, {s: arrays[s] for s in before}


def _one_change_disagreements(arrays, call, state):
    """Where the two backends disagree on `call` with one of `arrays` changed."""
    disagreements = []
    for name, value in arrays.items():
        if value is None:
            continue
        for change, how in ONE_CHANGE.items():
            outcomes = []
            for kernels in (reference, _kernels):
                a = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
                a[name] = how(a[name])
                outcomes.append(_outcome(kernels, call, a, state))
            (kind, result, extra), (kkind, kresult, kextra) = outcomes
            where = f"{name} {change}"
            if kind != kkind:
                disagreements.append(f"{where}: reference {kind} {result if kind == 'error' else ''}"
                                     f" / compiled {kkind} {kresult if kkind == 'error' else ''}")
            elif kind == "error":
                if result != kresult or extra or kextra:
                    disagreements.append(f"{where}: {result!r} (changed {extra}) / {kresult!r} "
                                         f"(changed {kextra})")
            else:
                values = result if isinstance(result, tuple) else (result,)
                kvalues = kresult if isinstance(kresult, tuple) else (kresult,)
                for v, kv in zip(values, kvalues):
                    if (v is None) != (kv is None) or v is not None and not np.allclose(
                            np.asarray(v, float), np.asarray(kv, float), rtol=1e-4, atol=1e-6,
                            equal_nan=True):
                        disagreements.append(f"{where}: results {result} / {kresult}")
                for s in extra:
                    if not np.allclose(extra[s].astype(float), kextra[s].astype(float), rtol=1e-3,
                                       atol=1e-5, equal_nan=True):
                        disagreements.append(f"{where}: {s} differs")
    return disagreements


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kernel", ["mlp_forward", "mlp_gradients", "mlp_sgd_step",
                                    "mlp_adam_step", "mlp_sgd_epoch", "mlp_adam_epoch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("option", [False, True])
def test_one_changed_argument_same_outcome_on_both_backends(kernel, dtype, loss, option):
    disagreements = _one_change_disagreements(*_one_change_calls(dtype, loss, option)[kernel])
    assert not disagreements, "\n".join(disagreements)


def _one_change_kernel_calls(dtype):
    """The same for the single kernels: {kernel: (arrays, call, state names)}."""
    rng = np.random.default_rng(1)
    X, W, b = (rng.normal(size=s).astype(dtype) for s in ((5, 3), (4, 3), 4))
    Z, P = rng.normal(size=(5, 4)).astype(dtype), rng.uniform(0.1, 0.9, (5, 4)).astype(dtype)
    p, g = rng.normal(size=7).astype(dtype), rng.normal(size=7).astype(dtype)
    out = lambda *shape: np.zeros(shape, dtype)
    return {
        "dense_forward": (dict(X=X, W=W, b=b, out=out(5, 4)),
                          lambda k, a: k.dense_forward(a["X"], a["W"], a["b"], "relu", a["out"]),
                          ()),
        "activation_backward": (dict(A=P, dA=Z, out=out(5, 4)),
                                lambda k, a: k.activation_backward(a["A"], a["dA"], "sigmoid",
                                                                   a["out"]), ()),
        "dense_backward": (dict(dZ=Z, X=X, W=W, dW=out(4, 3), db=out(4), dX=out(5, 3)),
                           lambda k, a: k.dense_backward(a["dZ"], a["X"], a["W"], a["dW"],
                                                         a["db"], a["dX"]), ()),
        "softmax": (dict(Z=Z, out=out(5, 4)), lambda k, a: k.softmax(a["Z"], a["out"]), ()),
        "softmax_cross_entropy": (dict(Z=Z, y=rng.integers(0, 4, 5), dZ=out(5, 4)),
                                  lambda k, a: k.softmax_cross_entropy(a["Z"], a["y"], a["dZ"]),
                                  ()),
        "mean_squared_error": (dict(A=P, Y=Z, dZ=out(5, 4)),
                               lambda k, a: k.mean_squared_error(a["A"], a["Y"], "sigmoid",
                                                                 a["dZ"]), ()),
        "binary_cross_entropy_with_logits": (
            dict(Z=Z, Y=P, dZ=out(5, 4)),
            lambda k, a: k.binary_cross_entropy_with_logits(a["Z"], a["Y"], a["dZ"]), ()),
        "sgd_update": (dict(param=p, grad=g, buf=out(7)),
                       lambda k, a: k.sgd_update(a["param"], a["grad"], a["buf"], 0.1,
                                                 momentum=0.9), ("param", "buf")),
        "adam_update": (dict(param=p, grad=g, m=out(7), v=out(7), vmax=out(7)),
                        lambda k, a: k.adam_update(a["param"], a["grad"], a["m"], a["v"],
                                                   a["vmax"], 1, 0.01, amsgrad=True),
                        ("param", "m", "v", "vmax")),
        "all_finite": (dict(x=p), lambda k, a: k.all_finite(a["x"]), ()),
    }


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kernel", sorted(_one_change_kernel_calls(np.float64)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_changed_argument_of_a_kernel_same_outcome_on_both_backends(kernel, dtype):
    disagreements = _one_change_disagreements(*_one_change_kernel_calls(dtype)[kernel])
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.parametrize("kernels", BACKENDS)
def test_bad_labels_write_nothing(kernels):
    Z = np.ones((3, 2))
    dZ = np.full((3, 2), 7.0)
    with pytest.raises(ValueError):
        kernels.softmax_cross_entropy(Z, np.array([0, 1, 5]), dZ)
    assert (dZ == 7.0).all()


@pytest.mark.parametrize("kernels", BACKENDS)
def test_bad_sgd_call_writes_nothing(kernels):
    p = np.arange(5.0)
    buf = np.arange(4.0)
    with pytest.raises(ValueError):
        kernels.sgd_update(p, np.ones(5), buf, 0.1, momentum=0.9)
    np.testing.assert_array_equal(p, np.arange(5.0))
    np.testing.assert_array_equal(buf, np.arange(4.0))


#: Per dtype, for the accuracy tests of fastbp's own exp and tanh (_vecmath.h):
#: the wider float the reference is computed in, and the inputs: the range the
#: exp-based kernels are drawn from with the points where exp under- and
#: overflows, the range tanh is drawn from with the points where its series
#: meets its formula and where it rounds to 1, and the smallest magnitudes.
ACCURACY = {
    np.float32: dict(reference=np.float64, exp_range=(-120, 100),
                     exp_edges=[-103.97, -87.34, -87.33, 0.0, 88.72, 88.73, 1e30, -1e30],
                     tanh_range=(-20, 20),
                     tanh_edges=[0.5499999, 0.55, 0.5500001, 9.09, 9.1, 9.11, 1e30, -1e30],
                     smallest=1e-30),
    np.float64: dict(reference=np.longdouble, exp_range=(-750, 712),
                     exp_edges=[-745.2, -708.4, -708.3, 0.0, 709.7, 709.8, 1e300, -1e300],
                     tanh_range=(-25, 25),
                     tanh_edges=[0.5499999999, 0.55, 0.5500000001, 19.0, 19.1, 1e300, -1e300],
                     smallest=1e-300),
}


def accuracy_case(dtype):
    """ACCURACY[dtype] and 3 ulp of dtype; skips where the reference float is not
    at least 8 bits wider (a long double that is only a double)."""
    case = ACCURACY[dtype]
    if np.finfo(case["reference"]).nmant < np.finfo(dtype).nmant + 8:
        pytest.skip("needs an extended-precision long double for the reference")
    return case, 3 * np.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_is_accurate_to_a_few_ulp(dtype):
    # The compiled tanh is fastbp's own (series below 0.55, exp above): hold it to
    # 3 ulp against a wider float, across its branches and in the tails.
    case, bound = accuracy_case(dtype)
    rng = np.random.default_rng(0)
    tiny = case["smallest"]
    x = np.concatenate([rng.uniform(*case["tanh_range"], 200_000), rng.uniform(-0.6, 0.6, 200_000),
                        np.geomspace(tiny, 1e-2, 20_000), -np.geomspace(tiny, 1e-2, 20_000),
                        case["tanh_edges"]]).astype(dtype)
    out = _kernels.dense_forward(x[:, None], np.ones((1, 1), dtype), np.zeros(1, dtype), "tanh",
                                 np.empty((x.size, 1), dtype))[:, 0]
    expected = np.tanh(x.astype(case["reference"]))
    assert float(np.max(np.abs(out.astype(case["reference"]) - expected) / np.abs(expected))) < bound
    special = np.array([[np.nan], [np.inf], [-np.inf], [0.0], [-0.0]], dtype)
    result = _kernels.dense_forward(special, np.ones((1, 1), dtype), np.zeros(1, dtype), "tanh",
                                    np.empty_like(special))[:, 0]
    assert np.isnan(result[0]) and result[1:].tolist() == [1.0, -1.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_softmax_are_accurate_to_a_few_ulp(dtype):
    # Both run on fastbp's own vectorised exp (_vecmath.h), not libm's: hold them
    # to 3 ulp against a wider float over the whole range, overflow and underflow
    # included (below the smallest normal, to 2 subnormal steps).
    case, bound = accuracy_case(dtype)
    ref, info = case["reference"], np.finfo(dtype)
    rng = np.random.default_rng(1)
    tiny = case["smallest"]
    x = np.concatenate([rng.uniform(*case["exp_range"], 300_000), rng.uniform(-2, 2, 100_000),
                        np.geomspace(tiny, 1, 1000), -np.geomspace(tiny, 1, 1000),
                        case["exp_edges"]]).astype(dtype)
    wide = x.astype(ref)
    with np.errstate(over="ignore"):
        expected = 1 / (1 + np.exp(-wide)), 1 / (1 + np.exp(wide))

    def check(actual, expected):
        error = np.abs(actual.astype(ref) - expected)
        normal = expected >= info.tiny
        assert float(np.max(error[normal] / expected[normal])) < bound
        assert float(np.max(error[~normal], initial=0)) <= 2 * info.smallest_subnormal

    out = _kernels.dense_forward(x[:, None], np.ones((1, 1), dtype), np.zeros(1, dtype), "sigmoid",
                                 np.empty((x.size, 1), dtype))
    check(out[:, 0], expected[0])
    # softmax of rows [x, 0] is [sigmoid(x), sigmoid(-x)]
    Z = np.stack([x, np.zeros_like(x)], axis=1)
    P = _kernels.softmax(Z, np.empty_like(Z))
    check(P[:, 0], expected[0])
    check(P[:, 1], expected[1])
    special = np.array([[np.nan], [np.inf], [-np.inf]], dtype)
    result = _kernels.dense_forward(special, np.ones((1, 1), dtype), np.zeros(1, dtype), "sigmoid",
                                    np.empty_like(special))
    assert np.isnan(result[0, 0]) and result[1:, 0].tolist() == [1.0, 0.0]
    rows = np.array([[-np.inf, 0.0], [np.nan, 0.0]], dtype)
    P = _kernels.softmax(rows, np.empty_like(rows))
    assert P[0].tolist() == [0.0, 1.0] and np.isnan(P[1]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binary_cross_entropy_is_accurate_to_a_few_ulp(dtype):
    # Its log(1 + exp(-|z|)) is fastbp's own (a vectorised series in double on
    # _vecmath.h's exp), not libm's log1p: with target 1 for z >= 0 and 0 below,
    # the loss of one element is that term alone. 3 ulp against a wider float,
    # over the whole range and at the subnormal end of exp.
    case, bound = accuracy_case(dtype)
    ref, info = case["reference"], np.finfo(dtype)
    rng = np.random.default_rng(2)
    z = np.concatenate([rng.uniform(*case["exp_range"], 6000), rng.uniform(-3, 3, 3000),
                        np.geomspace(case["smallest"], 1, 300), -np.geomspace(case["smallest"], 1, 300),
                        [0.0, -0.0, 1e30, -1e30]]).astype(dtype)
    wide = np.abs(z.astype(ref))
    expected = np.log1p(np.exp(-wide))
    Z, Y = np.empty((1, 1), dtype), np.empty((1, 1), dtype)
    actual = np.empty(z.size, ref)
    for i, v in enumerate(z):
        Z[0, 0], Y[0, 0] = v, 1.0 if v >= 0 else 0.0
        actual[i] = _kernels.binary_cross_entropy_with_logits(Z, Y)
    error = np.abs(actual - expected)
    normal = expected >= info.tiny
    assert float(np.max(error[normal] / expected[normal])) < bound
    assert float(np.max(error[~normal], initial=0)) <= 2 * info.smallest_subnormal
    # infinite and NaN logits, each alone: what the reference gives (inf * 0 is NaN)
    for v in (np.inf, -np.inf, np.nan):
        for t in (0.0, 1.0):
            Z, Y = np.array([[v]], dtype), np.array([[t]], dtype)
            expected = reference.binary_cross_entropy_with_logits(Z, Y)
            np.testing.assert_array_equal(_kernels.binary_cross_entropy_with_logits(Z, Y), expected)


def test_type_stubs_match_the_kernels():
    import ast
    import pathlib

    stub = pathlib.Path(_kernels.__file__).with_name("_kernels.pyi")
    functions = {node.name: [a.arg for a in node.args.args]
                 for node in ast.parse(stub.read_text()).body if isinstance(node, ast.FunctionDef)}
    assert sorted(functions) == PUBLIC
    for name, params in functions.items():
        assert params == list(inspect.signature(getattr(_kernels, name)).parameters), name


# ---------------------------------------------------------------------------
# The forward product of small layers (_smallgemm.h): its own kernel, not BLAS.

SMALL_ON = _kernels._small_gemm()
needs_small_kernel = pytest.mark.skipif(not SMALL_ON, reason="the CPU has no AVX-512: BLAS does "
                                        "every product")
# (n, n_in, n_out): row blocks of 8 and 12 and every tail, n_in across the 8 x 8
# (4 x 4) transposes of the packing and its edges, panels of 1 and 2 vectors and
# partly filled ones, for both dtypes' vector widths
SMALL_SHAPES = [(n, n_in, n_out) for n in (1, 5, 6, 7, 10, 11, 12, 13, 32)
                for n_in in (1, 7, 8, 9, 64, 128)
                for n_out in (17, 24, 31, 32, 33, 40, 64, 100)]
SMALL_SHAPES += [(n, n_in, n_out) for n in (128, 131, 140) for n_in in (3, 36, 128)
                 for n_out in (1, 5, 8, 9, 16)]


@pytest.fixture
def small_kernel():
    """Restores the small-product setting after a test that switches it."""
    yield
    _kernels._small_gemm(SMALL_ON)


def test_small_product_takes_the_shapes_it_measured_faster_on():
    takes = _kernels._small_gemm_takes
    # the test shapes above reach the kernel whatever BLAS's thread count (0: unknown)
    for threads in (0, 1, 2, 4):
        for f64 in (False, True):
            assert all(takes(*shape, threads, f64) for shape in SMALL_SHAPES), threads
    # BLAS on several threads: the kernel takes deeper inputs on small batches onto
    # 128 outputs or more, and onto 17-32 outputs; BLAS keeps wider products on 64
    # rows or more, large products, narrow last layers on small batches, < 8 rows
    several = {(32, 784, 128): True, (16, 2048, 256): True, (128, 784, 32): True,
               (64, 784, 128): False, (128, 784, 256): False, (32, 129, 64): False,
               (32, 4096, 1024): False, (4, 784, 256): False, (512, 128, 128): False,
               (32, 128, 10): False, (64, 32, 16): False, (32, 0, 64): False}
    for threads in (0, 2, 4):
        for shape, want in several.items():
            assert takes(*shape, threads) is want, (shape, threads)
            # float64: not the deeper inputs onto 128 outputs or more (dgemm wins)
            want64 = want and not (shape[0] <= 32 and shape[1] > 128 and shape[2] >= 128)
            assert takes(*shape, threads, True) is want64, (shape, threads)
    # BLAS on one thread: the kernel takes more, up to 2^20 outputs
    one = {(128, 784, 256): True, (64, 784, 128): True, (512, 256, 1024): True,
           (4096, 784, 64): True, (16, 784, 256): True, (16, 784, 64): False,
           (4096, 64, 1024): False, (512, 2048, 256): False, (4, 784, 256): False,
           (32, 128, 10): False, (32, 0, 64): False}
    for shape, want in one.items():
        assert takes(*shape, 1) is want and takes(*shape, 1, True) is want, shape


def test_small_product_follows_the_blas_thread_count():
    # The kernel runs on one thread, so where it beats BLAS depends on how many BLAS
    # runs on; it reads that at every product, as set_num_threads leaves it.
    original = fastbp.get_num_threads()
    assert _kernels._blas_threads() == original
    try:
        for n in (1, 2, 1):
            fastbp.set_num_threads(n)
            assert _kernels._blas_threads() == n
            assert _kernels._small_gemm_takes(128, 784, 256) is (n == 1)
    finally:
        fastbp.set_num_threads(original)


def test_small_product_switch(small_kernel):
    assert _kernels._small_gemm(False) is SMALL_ON
    assert _kernels._small_gemm() is False
    for bad in (1, 0, "on"):
        with pytest.raises(ValueError, match="False, True or 'always'"):
            _kernels._small_gemm(bad)
        assert _kernels._small_gemm() is False
    if SMALL_ON:
        assert _kernels._small_gemm(True) is False and _kernels._small_gemm() is True
        assert _kernels._small_gemm("always") is True and _kernels._small_gemm() == "always"
        assert _kernels._small_gemm_takes(4096, 4096, 4096)  # every shape
        assert _kernels._small_gemm(True) == "always"
        assert not _kernels._small_gemm_takes(4096, 4096, 4096)
    else:
        for on in (True, "always"):
            with pytest.raises(ValueError, match="needs AVX-512"):
                _kernels._small_gemm(on)
            assert _kernels._small_gemm() is False


# Inputs deeper than one packed panel of W (128): several panels, the partial sums
# kept in Z between them, and more than one sweep of 256 rows; taken by the kernel
# where its rule says so, and by every test here ("always").
DEEP_SHAPES = [(1, 129, 17), (8, 200, 32), (13, 256, 33), (12, 300, 16), (261, 385, 40),
               (9, 785, 100)]


needs_fma_emulation = pytest.mark.skipif(np.finfo(np.longdouble).nmant < 63,
                                         reason="needs an 80-bit long double (x86-64) to "
                                         "emulate an FMA")


def fma_chain(a, b):
    """float32 (m, n): each element fma(a[i, k], b[k, j], z) for k = 0, 1, ... from
    z = 0, for float32 a (m, K) and b (K, n). An FMA of float32s is emulated in long
    double: the product is exact there, and the sum is rounded once to 64 bits
    before float32 (a second rounding that changes the float32 result with
    probability about 2^-39 per operation)."""
    a, b = a.astype(np.longdouble), b.astype(np.longdouble)
    z = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for k in range(a.shape[1]):
        z = (a[:, k, None] * b[None, k, :] + z).astype(np.float32)
    return z


@needs_small_kernel
@needs_fma_emulation
def test_deep_product_sums_each_element_in_one_chain_of_fmas(small_kernel):
    # However deep the input, every element must be z = fma(x[k], w[k], z) for
    # k = 0, 1, ..., n_in - 1 from z = 0, as on a shallow one.
    rng = np.random.default_rng(5)
    _kernels._small_gemm("always")
    for n, n_in, n_out in DEEP_SHAPES:
        X = rng.normal(size=(n, n_in)).astype(np.float32)
        W = rng.normal(size=(n_out, n_in)).astype(np.float32)
        Z = _kernels.dense_forward(X, W, np.full(n_out, -0.0, np.float32), "identity",
                                   np.full((n, n_out), np.nan, np.float32))
        assert Z.tobytes() == fma_chain(X, W.T).tobytes(), (n, n_in, n_out)


@needs_small_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_product_is_accurate(small_kernel, dtype):
    rng = np.random.default_rng(7)
    tol = np.finfo(dtype).eps
    for n, n_in, n_out in SMALL_SHAPES + DEEP_SHAPES:
        X, W = rng.normal(size=(n, n_in)).astype(dtype), rng.normal(size=(n_out, n_in)).astype(dtype)
        b = rng.normal(size=n_out).astype(dtype)
        exact = X.astype(np.longdouble) @ W.T.astype(np.longdouble)
        scale = np.abs(X.astype(np.float64)) @ np.abs(W.T.astype(np.float64))
        for on in ("always", False):
            _kernels._small_gemm(on)
            Z = _kernels.dense_forward(X, W, b, "identity", np.full((n, n_out), np.nan, dtype))
            # minus the bias, as the kernel adds it: a sum of n_in rounded products
            # is within n_in units of rounding of the scale
            error = np.abs((Z - b).astype(np.longdouble) - exact)
            assert (error <= (n_in + 2) * tol * (scale + np.abs(b))).all(), (on, n, n_in, n_out)
            relu = _kernels.dense_forward(X, W, b, "relu", np.empty((n, n_out), dtype))
            assert relu.tobytes() == np.maximum(Z, 0).tobytes()


@needs_small_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_product_adds_bias_and_activation_as_the_separate_pass_does(small_kernel, dtype):
    # The kernel applies the bias and relu / leaky relu as it stores: the bits must
    # be those of the product followed by `z = act(z + b)`. The product alone is
    # dense_forward with a bias of -0.0 (x + -0.0 is x for every x, -0.0 included).
    rng = np.random.default_rng(11)
    slope = dtype(LEAKY_RELU_SLOPE)
    _kernels._small_gemm("always")  # (the bias comes with a deep input's last panel)
    shapes = SMALL_SHAPES[::7] + [(32, 64, 128), (13, 9, 33), (140, 36, 9)] + DEEP_SHAPES
    for n, n_in, n_out in shapes:
        X, W = rng.normal(size=(n, n_in)).astype(dtype), rng.normal(size=(n_out, n_in)).astype(dtype)
        b = rng.normal(size=n_out).astype(dtype)
        X[0] = 0  # exact zeros, and -0.0 where the bias is -0.0
        b[::5] = -0.0
        if n > 2 and n_out > 4:
            X[1, 0] = np.nan
            b[1], b[2], b[3] = np.inf, -np.inf, np.nan
        product = _kernels.dense_forward(X, W, np.full(n_out, -0.0, dtype), "identity",
                                         np.empty((n, n_out), dtype))
        z = product + b
        expected = {"identity": z, "relu": np.where(z < 0, dtype(0), z),
                    "leaky_relu": np.where(z > 0, z, z * slope)}
        for act, want in expected.items():
            got = _kernels.dense_forward(X, W, b, act, np.full((n, n_out), 7, dtype))
            assert got.tobytes() == want.tobytes(), (act, n, n_in, n_out)
        # sigmoid and tanh: the bias in the kernel, then fastbp's loops over Z (a few
        # units of rounding from the exact functions of the same z, or one step of the
        # subnormals: deep inputs reach sigmoid(z) < 1e-38)
        z64 = z.astype(np.float64)
        with np.errstate(over="ignore"):
            exact = {"sigmoid": 1 / (1 + np.exp(-z64)), "tanh": np.tanh(z64)}
        for act, want in exact.items():
            got = _kernels.dense_forward(X, W, b, act, np.empty((n, n_out), dtype))
            np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps,
                                       atol=np.finfo(dtype).smallest_subnormal)


@needs_small_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_product_propagates_nan_and_inf_like_blas(small_kernel, dtype):
    # (13, 300, 33): the NaN and infinities of the first panel of a deep input
    # must come through the partial sums kept in Z to the end
    for n, n_in, n_out in [(13, 9, 33), (13, 300, 33)]:
        X = np.ones((n, n_in), dtype)
        W = np.ones((n_out, n_in), dtype)
        X[0, 3], X[1, 8], X[2, 0] = np.inf, np.nan, -np.inf
        W[5, 3] = 0.0  # inf * 0: NaN
        W[7, 0] = -1.0  # -inf * -1: +inf
        out = {}
        for on in ("always", False):
            _kernels._small_gemm(on)
            out[on] = _kernels.dense_forward(X, W, np.zeros(n_out, dtype), "identity",
                                             np.empty((n, n_out), dtype))
        assert np.isnan(out["always"][0, 5]) and out["always"][0, 4] == np.inf
        assert np.isnan(out["always"][1]).all() and out["always"][2, 7] == np.inf
        np.testing.assert_array_equal(out["always"], out[False])  # NaNs in the same places


# The backward products on the same kernel: dW = dZ.T @ X (dZ read down its columns,
# X's rows copied into the panels) and dX = dZ @ W (W's rows copied). (n, n_in, n_out):
# every row tail of dW (n_out) and of dX (n), panels of 1 and 2 vectors and partly
# filled ones, and inner dimensions past a panel's 128 (n for dW, n_out for dX).
GRAD_SHAPES = [(n, n_in, n_out) for n in (1, 7, 13, 130) for n_in in (1, 9, 17, 33, 40)
               for n_out in (1, 5, 12, 19, 24)]
GRAD_SHAPES += [(261, 33, 20), (9, 17, 300), (140, 70, 131), (300, 100, 9)]


def test_gradient_products_take_the_shapes_they_measured_faster_on():
    takes = _kernels._gradient_product_takes
    for product in ("weights", "inputs"):
        # below 2^20 multiply-adds OpenBLAS's small-matrix path wins: the tiny and
        # digits networks' products, and the mnist network's last layer, keep to BLAS
        for shape in [(32, 64, 32), (128, 128, 10), (64, 128, 64)]:
            assert not any(takes(product, *shape, t) for t in (0, 1, 2)), (product, shape)
        # BLAS on one thread: from 2^20 to 2^26 in float32, to 2^24 in float64
        # (and not on batches of fewer than 32 rows there: (8, 1024, 128))
        for shape, want, want64 in [((128, 784, 256), True, False), ((128, 256, 128), True, True),
                                    ((8, 1024, 128), True, False), ((256, 1024, 256), True, False),
                                    ((256, 1024, 1024), False, False)]:
            assert takes(product, *shape, 1) is want, (product, shape)
            assert takes(product, *shape, 1, True) is want64, (product, shape)
        # BLAS on several threads (or unknown): float32 from 2^20 to below 2^22
        for threads in (0, 2, 4):
            assert takes(product, 64, 256, 64, threads)
            assert not takes(product, 64, 256, 256, threads)
            assert not takes(product, 64, 256, 64, threads, True)
        # on fastbp's own threads each part must pass 2^20
        assert takes(product, 64, 256, 64, 1) and not takes(product, 64, 256, 64, 1, parts=2)
    # ... from 32 rows (the layers split by units: 784-128-10 on 32 rows)
    for product in ("weights", "inputs"):
        assert takes(product, 32, 784, 128, 1, parts=2)
        assert not takes(product, 16, 784, 128, 1, parts=2)  # 2^19.6 per part
    # with SGD's momentum folded in: where the plain product goes, on a batch that
    # fits one panel (128 rows)
    for shape in [(128, 784, 256), (64, 256, 64), (8, 1024, 128), (128, 256, 128),
                  (32, 784, 128), (16, 784, 128)]:
        for threads, parts in ((0, 1), (1, 1), (2, 1), (1, 2)):
            assert takes("momentum", *shape, threads, parts=parts) \
                is takes("weights", *shape, threads, parts=parts), shape
    assert not takes("momentum", 256, 1024, 256, 1)  # two panels: a pass of its own
    assert takes("weights", 256, 1024, 256, 1)
    # ... and below 2^20, where BLAS makes the plain product, on one thread where the
    # pass the fold saves is large beside it: float32 batches of up to 16 rows onto
    # 64 units or more from 2^16 multiply-adds, of up to 32 rows onto 128 or more
    # from 2^17, such as the digits network's first layer
    for shape in [(32, 64, 128), (32, 32, 128), (32, 128, 128), (16, 64, 64), (8, 32, 256)]:
        assert all(takes("momentum", *shape, t) for t in (0, 1, 2)), shape
        assert not any(takes("weights", *shape, t) for t in (0, 1, 2)), shape
        assert not takes("momentum", *shape, 1, True), shape  # float64: a pass of its own
        assert not takes("momentum", *shape, 1, parts=2), shape
    for shape in [(32, 64, 32), (32, 64, 64), (32, 256, 64), (16, 32, 64), (16, 64, 32),
                  (32, 128, 10), (64, 64, 128), (128, 64, 64)]:
        assert not any(takes("momentum", *shape, t) for t in (0, 1, 2)), shape
    with pytest.raises(ValueError, match="'weights', 'momentum' or 'inputs'"):
        takes("bias", 128, 784, 256, 1)


@needs_small_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_products_are_accurate(small_kernel, dtype):
    rng = np.random.default_rng(13)
    tol = np.finfo(dtype).eps
    for n, n_in, n_out in GRAD_SHAPES:
        dZ = rng.normal(size=(n, n_out)).astype(dtype)
        X, W = rng.normal(size=(n, n_in)).astype(dtype), rng.normal(size=(n_out, n_in)).astype(dtype)
        L = np.longdouble
        exact = {"dW": dZ.T.astype(L) @ X.astype(L), "dX": dZ.astype(L) @ W.astype(L)}
        scale = {"dW": np.abs(dZ.T.astype(np.float64)) @ np.abs(X.astype(np.float64)),
                 "dX": np.abs(dZ.astype(np.float64)) @ np.abs(W.astype(np.float64))}
        for on in ("always", False):
            _kernels._small_gemm(on)
            dW, db, dX = _kernels.dense_backward(
                dZ, X, W, np.full((n_out, n_in), np.nan, dtype), np.empty(n_out, dtype),
                np.full((n, n_in), np.nan, dtype))
            for name, got, depth in (("dW", dW, n), ("dX", dX, n_out)):
                error = np.abs(got.astype(L) - exact[name])
                assert (error <= (depth + 1) * tol * scale[name]).all(), (name, on, n, n_in, n_out)


@needs_small_kernel
@needs_fma_emulation
def test_gradient_products_sum_each_element_in_one_chain_of_fmas(small_kernel):
    # As the forward product: however deep the inner dimension (the batch for dW,
    # n_out for dX), each element is fma(a[k], b[k], z) for k = 0, 1, ... from z = 0,
    # the partial sums of one panel going on from C in the next
    rng = np.random.default_rng(17)
    _kernels._small_gemm("always")
    for n, n_in, n_out in [(261, 33, 20), (9, 17, 300), (140, 70, 131)]:
        dZ = rng.normal(size=(n, n_out)).astype(np.float32)
        X, W = rng.normal(size=(n, n_in)).astype(np.float32), rng.normal(size=(n_out, n_in)).astype(np.float32)
        dW, _, dX = _kernels.dense_backward(dZ, X, W, np.empty((n_out, n_in), np.float32),
                                            np.empty(n_out, np.float32),
                                            np.empty((n, n_in), np.float32))
        assert dW.tobytes() == fma_chain(dZ.T, X).tobytes(), (n, n_in, n_out)
        assert dX.tobytes() == fma_chain(dZ, W).tobytes(), (n, n_in, n_out)


@needs_small_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 61, 300])  # 300 rows: dW's inner dimension in three panels
@pytest.mark.parametrize("momentum", [0.0, 0.9])  # plain SGD: W -= lr * dZ.T @ X in the product
def test_sgd_step_with_every_product_on_the_kernel(small_kernel, dtype, n, momentum):
    # the step's dW with alpha = -lr and beta = 1 (the update folded in: each panel's
    # sum added to W), or alpha = 1 and beta = 0 (momentum), and its dX, against the
    # float64 reference
    _kernels._small_gemm("always")
    rng = np.random.default_rng(n)
    sizes, acts = (37, 150, 33, 3), ("relu", "tanh")  # dX through W2: 150 deep
    n_params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    X, X64 = draw(rng, (n, sizes[0]), dtype)
    labels = rng.integers(0, sizes[-1], size=n)
    params, params64 = draw(rng, (n_params,), dtype)
    params *= dtype(0.2)
    params64 = params.astype(np.float64)
    buf, buf64 = draw(rng, (n_params,), dtype)
    check_sgd_step(_kernels, (X, X64), labels, (None, None), (params, params64),
                   (buf if momentum else None, buf64), sizes, acts, "cross_entropy", "identity",
                   momentum=momentum)


@needs_small_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 61, 300])  # 300 rows: dW's inner dimension in three panels
@pytest.mark.parametrize("first_step, dampening", [(True, 0.0), (False, 0.0), (False, 0.3)])
def test_momentum_folded_into_the_weight_gradient_has_the_bits_of_the_update(
        small_kernel, dtype, n, first_step, dampening):
    # With momentum, the kernel applies buf = momentum * buf + (1 - dampening) * dW and
    # W -= lr * buf to each element of dW as it is made (the gradient never stored):
    # the same bits as the gradient (on the same kernel) followed by sgd_update.
    _kernels._small_gemm("always")
    rng = np.random.default_rng(n)
    sizes, acts = (37, 150, 33, 3), ("relu", "tanh")
    n_params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    labels = rng.integers(0, sizes[-1], size=n)
    params = (rng.normal(size=n_params) * 0.2).astype(dtype)
    buf = rng.normal(size=n_params).astype(dtype)
    work = sum(n * b for b in sizes[1:])
    A, D, grad = np.empty(work, dtype), np.empty(work, dtype), np.empty(n_params, dtype)
    lr, momentum = 0.05, 0.9
    _kernels.mlp_gradients(X, labels, None, params, sizes, acts, "cross_entropy", "identity", A,
                           D, grad)
    expected_params, expected_buf = params.copy(), buf.copy()
    _kernels.sgd_update(expected_params, grad, expected_buf, lr, momentum, dampening,
                        first_step=first_step)
    unfolded_params, unfolded_buf = params.copy(), buf.copy()
    _kernels.mlp_sgd_step(X, labels, None, params, sizes, acts, "cross_entropy", "identity", A, D,
                          grad, buf, lr, momentum, dampening, first_step=first_step)
    assert params.tobytes() == expected_params.tobytes()
    assert buf.tobytes() == expected_buf.tobytes()
    assert _kernels._fold_momentum(False) is True
    try:
        _kernels.mlp_sgd_step(X, labels, None, unfolded_params, sizes, acts, "cross_entropy",
                              "identity", A, D, grad, unfolded_buf, lr, momentum, dampening,
                              first_step=first_step)
    finally:
        _kernels._fold_momentum(True)
    assert unfolded_params.tobytes() == params.tobytes()
    assert unfolded_buf.tobytes() == buf.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 10, 16, 17, 33])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 32, 37, 130])
def test_cross_entropy_gradient_is_the_softmax_minus_one_hot_over_n(dtype, k, n):
    # Rows of up to 16 classes take a fused path in C; its gradient must be the
    # bits of the compiled softmax, minus 1 at the label, times 1/n in the dtype.
    rng = np.random.default_rng(n * 100 + k)
    Z = (rng.normal(size=(n, k)) * 5).astype(dtype)
    y = rng.integers(0, k, size=n)
    expected = _kernels.softmax(Z, np.empty_like(Z))
    expected[np.arange(n), y] -= dtype(1)
    expected *= dtype(1) / dtype(n)
    for in_place in (False, True):
        Zc = Z.copy()
        dZ = Zc if in_place else np.empty_like(Z)
        loss = _kernels.softmax_cross_entropy(Zc, y, dZ)
        np.testing.assert_array_equal(dZ, expected)
        eloss = reference.softmax_cross_entropy(Z.astype(np.float64), y)
        assert_close(np.asarray(loss, dtype), eloss, scale=max(1.0, abs(eloss)))


VECTOR_LOSS = _kernels._vector_loss()


@pytest.fixture
def vector_loss():
    """Restores the vector-loss setting after a test that switches it."""
    yield
    _kernels._vector_loss(VECTOR_LOSS)


@pytest.mark.skipif(not VECTOR_LOSS, reason="the CPU has no AVX-512: one version only")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_has_the_same_bits_on_avx512(dtype, vector_loss):
    # The AVX-512 version of the narrow rows' loss (gathers and scatters, every
    # lane one row) must give the portable version's bits: every block tail of
    # both lane counts, every width up to 16, NaN and infinities, in place too.
    rng = np.random.default_rng(7)
    for n in (1, 7, 8, 9, 15, 16, 17, 33, 130):
        for k in (1, 2, 9, 10, 16):
            Z = (rng.normal(size=(n, k)) * rng.choice([1.0, 30.0, 300.0])).astype(dtype)
            if n >= 4:
                Z[1, 0], Z[2, k - 1], Z[3, 0] = np.nan, np.inf, -np.inf
            y = rng.integers(0, k, size=n)
            results = []
            for on in (False, True):
                _kernels._vector_loss(on)
                for in_place in (False, True):
                    Zc = Z.copy()
                    dZ = Zc if in_place else np.empty_like(Z)
                    loss = _kernels.softmax_cross_entropy(Zc, y, dZ)
                    results.append((np.float64(loss).tobytes(), dZ.tobytes()))
            assert results[1:] == results[:1] * 3, (n, k)


@pytest.mark.parametrize("switch, what", [(_kernels._fold_momentum, "fold-momentum"),
                                          (_kernels._split_by_units, "split-by-units")])
def test_on_off_switches(switch, what):
    before = switch()
    try:
        assert before is True  # both on by default
        assert switch(False) is True and switch() is False
        for bad in (1, 0, "on", None.__class__):
            with pytest.raises(ValueError, match=f"the {what} setting is True or False"):
                switch(bad)
            assert switch() is False
        assert switch(True) is False and switch() is True
    finally:
        switch(before)


def test_vector_loss_switch(vector_loss):
    assert _kernels._vector_loss(False) is VECTOR_LOSS
    assert _kernels._vector_loss() is False
    for bad in (1, "on", "always"):
        with pytest.raises(ValueError, match="True or False"):
            _kernels._vector_loss(bad)
        assert _kernels._vector_loss() is False
    if VECTOR_LOSS:
        assert _kernels._vector_loss(True) is False and _kernels._vector_loss() is True

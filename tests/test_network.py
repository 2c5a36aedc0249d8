"""fastbp.MLP: structure, forward, gradients, step, input conversion and bad input."""

import numpy as np
import pytest

import fastbp
from fastbp import reference

from conftest import BACKEND_NAMES, TOL

CONFIGS = {
    "ce-relu": dict(sizes=[5, 7, 4], activation="relu", loss="cross_entropy"),
    "ce-deep-mixed": dict(sizes=[5, 6, 4, 3], activation=["tanh", "leaky_relu"], loss="cross_entropy"),
    "mse-sigmoid-textbook": dict(sizes=[5, 6, 2], activation="sigmoid", loss="mse", output="sigmoid"),
    "mse-tanh": dict(sizes=[5, 3, 2], activation="identity", loss="mse", output="tanh"),
    "mse-linear": dict(sizes=[5, 2], activation="relu", loss="mse"),
    "bce": dict(sizes=[5, 8, 3], activation="sigmoid", loss="binary_cross_entropy"),
}


def make_data(config, n=9, seed=0):
    rng = np.random.default_rng(seed)
    sizes = config["sizes"]
    X = rng.normal(size=(n, sizes[0]))
    if config["loss"] == "cross_entropy":
        y = rng.integers(0, sizes[-1], size=n)
    elif config["loss"] == "mse":
        y = rng.normal(size=(n, sizes[-1])) * 0.5
    else:
        y = rng.uniform(size=(n, sizes[-1]))
    return X, y


def make_net(name, dtype=np.float64, backend="cython", seed=0):
    return fastbp.MLP(**CONFIGS[name], dtype=dtype, seed=seed, backend=backend)


# ---------------------------------------------------------------------------
# Structure

def test_params_layout_and_views():
    net = fastbp.MLP([3, 4, 2], seed=0)
    assert net.params.shape == (3 * 4 + 4 + 4 * 2 + 2,) == (net.n_params,)
    assert [W.shape for W in net.weights] == [(4, 3), (2, 4)]
    assert [b.shape for b in net.biases] == [(4,), (2,)]
    np.testing.assert_array_equal(net.params[:12], net.weights[0].ravel())
    np.testing.assert_array_equal(net.params[12:16], net.biases[0])
    np.testing.assert_array_equal(net.params[16:24], net.weights[1].ravel())
    net.weights[1][1, 3] = 42.0
    assert net.params[23] == 42.0
    net.params[-1] = -7.0
    assert net.biases[1][1] == -7.0
    for a in net.weights + net.biases:
        assert np.shares_memory(a, net.params)
    assert net.params.dtype == np.float32  # the default, as PyTorch's


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_buffers_start_on_a_cache_line(dtype, optimizer):
    # Parameters, optimizer state and every work buffer the compiled loops
    # stream through start on a 64-byte boundary, whatever NumPy's allocator
    # returned (AVX-512 accesses that straddle two lines cost about two).
    for seed in range(5):
        net = fastbp.MLP([7, 33, 5], seed=seed, dtype=dtype)
        opt = (fastbp.SGD(net.params, lr=0.1, momentum=0.9) if optimizer == "sgd"
               else fastbp.Adam(net.params, lr=0.01, amsgrad=True))
        rng = np.random.default_rng(seed)
        net.fit(rng.normal(size=(50, 7)), rng.integers(0, 5, 50), epochs=1, batch_size=9,
                optimizer=opt)
        state = [opt.momentum_buffer] if optimizer == "sgd" else \
            [opt.exp_avg, opt.exp_avg_sq, opt.max_exp_avg_sq]
        for a in [net.params, net._grad, net._A, net._D, net._X_batch] + state:
            assert a.ctypes.data % 64 == 0
            assert a.dtype == np.dtype(dtype) and a.flags.c_contiguous and a.flags.writeable
        assert np.any(state[0] != 0)  # the state is in use (zeroed at first)
        for W in net.weights:
            assert np.shares_memory(W, net.params)


def test_torch_default_init_bounds_and_seed():
    net = fastbp.MLP([100, 50, 10], seed=3, dtype=np.float64)
    for W, b in zip(net.weights, net.biases):
        bound = 1 / np.sqrt(W.shape[1])
        assert np.abs(W).max() <= bound and np.abs(b).max() <= bound
        assert np.abs(W).max() > 0.9 * bound  # really uniform over the whole range
    same = fastbp.MLP([100, 50, 10], seed=3, dtype=np.float64)
    np.testing.assert_array_equal(net.params, same.params)
    other = fastbp.MLP([100, 50, 10], seed=4, dtype=np.float64)
    assert not np.array_equal(net.params, other.params)
    single = fastbp.MLP([100, 50, 10], seed=3, dtype=np.float32)
    np.testing.assert_array_equal(single.params, net.params.astype(np.float32))


@pytest.mark.parametrize("init, std_of", [
    ("glorot_normal", lambda i, o: np.sqrt(2 / (i + o))),
    ("he_normal", lambda i, o: np.sqrt(2 / i)),
    ("he", lambda i, o: np.sqrt(2 / i)),
    ("lecun_normal", lambda i, o: np.sqrt(1 / i)),
    ("glorot_uniform", lambda i, o: np.sqrt(6 / (i + o)) / np.sqrt(3)),
    ("glorot", lambda i, o: np.sqrt(6 / (i + o)) / np.sqrt(3)),
    ("he_uniform", lambda i, o: np.sqrt(6 / i) / np.sqrt(3)),
])
def test_named_initialisers(init, std_of):
    net = fastbp.MLP([400, 300, 200], init=init, seed=0, dtype=np.float64)
    for W, b in zip(net.weights, net.biases):
        n_out, n_in = W.shape
        assert W.std() == pytest.approx(std_of(n_in, n_out), rel=0.03)
        assert abs(W.mean()) < 0.01 * std_of(n_in, n_out) * 10
        np.testing.assert_array_equal(b, 0)


def test_callable_initialiser():
    def ones(n_in, n_out, rng):
        return np.full((n_out, n_in), 0.5), np.arange(n_out, dtype=float)

    net = fastbp.MLP([2, 3, 1], init=ones)
    np.testing.assert_array_equal(net.weights[0], 0.5)
    np.testing.assert_array_equal(net.biases[0], [0, 1, 2])
    with pytest.raises(ValueError, match="expected"):
        fastbp.MLP([2, 3], init=lambda i, o, rng: (np.zeros((i, o)), np.zeros(o)))
    # finite in float64 but not in float32: refused, not a network of infinities
    huge = lambda i, o, rng: (np.zeros((o, i)), np.full(o, 1e39))
    with pytest.raises(ValueError, match="too large for float32"):
        fastbp.MLP([2, 3], init=huge)
    assert fastbp.MLP([2, 3], init=huge, dtype=np.float64).biases[0][0] == 1e39


# ---------------------------------------------------------------------------
# Forward

@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_forward_outputs(backend):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(7, 5))
    ce = make_net("ce-relu", backend=backend)
    P = ce.forward(X)
    assert P.shape == (7, 4) and P.dtype == np.float64
    np.testing.assert_allclose(P.sum(axis=1), 1, rtol=1e-12)
    # by hand: softmax(relu(X W0.T + b0) W1.T + b1)
    H = np.maximum(X @ ce.weights[0].T + ce.biases[0], 0)
    Z = H @ ce.weights[1].T + ce.biases[1]
    np.testing.assert_allclose(P, np.exp(Z) / np.exp(Z).sum(1, keepdims=True), rtol=1e-10)
    bce = make_net("bce", backend=backend)
    H = 1 / (1 + np.exp(-(X @ bce.weights[0].T + bce.biases[0])))
    np.testing.assert_allclose(bce.forward(X), 1 / (1 + np.exp(-(H @ bce.weights[1].T + bce.biases[1]))),
                               rtol=1e-10)
    mse = make_net("mse-tanh", backend=backend)
    H = X @ mse.weights[0].T + mse.biases[0]
    np.testing.assert_allclose(mse.forward(X), np.tanh(H @ mse.weights[1].T + mse.biases[1]), rtol=1e-10)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_forward_zero_samples(backend):
    net = make_net("ce-relu", backend=backend)
    out = net.forward(np.empty((0, 5)))
    assert out.shape == (0, 4) and out.dtype == np.float64


def test_forward_large_batch_in_chunks(monkeypatch):
    import fastbp.network as network

    monkeypatch.setattr(network, "_FORWARD_CHUNK", 4)
    net = make_net("ce-deep-mixed")
    X = np.random.default_rng(1).normal(size=(11, 5))
    chunked = net.forward(X)
    monkeypatch.setattr(network, "_FORWARD_CHUNK", 4096)
    np.testing.assert_allclose(chunked, make_net("ce-deep-mixed").forward(X), rtol=1e-13)
    assert net._capacity == 4


# ---------------------------------------------------------------------------
# Gradients and steps

def net_loss(net, X, y):
    """The network's loss computed by hand from forward(), in float64."""
    out = net.forward(X).astype(np.float64)
    if net.loss == "cross_entropy":
        return -np.mean(np.log(out[np.arange(len(y)), y]))
    if net.loss == "mse":
        return np.mean((out - y) ** 2)
    return -np.mean(y * np.log(out) + (1 - y) * np.log(1 - out))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gradients_against_finite_differences(name, backend):
    net = make_net(name, backend=backend)
    X, y = make_data(CONFIGS[name])
    before = net.params.copy()
    loss, dW, db = net.gradients(X, y)
    np.testing.assert_array_equal(net.params, before)
    assert loss == pytest.approx(net_loss(net, X, y), rel=1e-12)
    flat = np.concatenate([np.concatenate([w.ravel(), b]) for w, b in zip(dW, db)])
    numeric = np.empty_like(flat)
    eps = 1e-6
    for i in range(net.n_params):
        old = net.params[i]
        net.params[i] = old + eps
        up = net_loss(net, X, y)
        net.params[i] = old - eps
        down = net_loss(net, X, y)
        net.params[i] = old
        numeric[i] = (up - down) / (2 * eps)
    assert np.max(np.abs(flat - numeric)) / np.max(np.abs(numeric)) < 1e-6


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_same_on_both_backends(name, dtype):
    X, y = make_data(CONFIGS[name], n=16)
    nets = [make_net(name, dtype=dtype, backend=b) for b in BACKEND_NAMES]
    opts = [fastbp.SGD(net.params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
            for net in nets]
    for _ in range(5):
        losses = [net.step(X, y, opt) for net, opt in zip(nets, opts)]
        assert losses[0] == pytest.approx(losses[1], rel=20 * TOL[np.dtype(dtype)])
    np.testing.assert_allclose(nets[1].params, nets[0].params, rtol=0,
                               atol=50 * TOL[np.dtype(dtype)] * np.abs(nets[0].params).max())


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_step_is_gradients_then_update(backend):
    net, twin = make_net("ce-deep-mixed", backend=backend), make_net("ce-deep-mixed", backend=backend)
    X, y = make_data(CONFIGS["ce-deep-mixed"])
    opt = fastbp.SGD(net.params, lr=0.1, momentum=0.5)
    twin_opt = fastbp.SGD(twin.params, lr=0.1, momentum=0.5, backend=backend)
    for _ in range(3):
        loss, dW, db = twin.gradients(X, y)
        twin_opt.update(np.concatenate([np.concatenate([w.ravel(), b]) for w, b in zip(dW, db)]))
        assert net.step(X, y, opt) == loss
        np.testing.assert_array_equal(net.params, twin.params)


OPTIMIZERS = {
    "sgd": lambda p: fastbp.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: fastbp.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: fastbp.Adam(p, lr=0.01),
    "adamw-amsgrad": lambda p: fastbp.AdamW(p, lr=0.01, amsgrad=True),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", ["ce-deep-mixed", "mse-tanh", "bce"])
def test_step_one_call_path_gives_the_general_paths_bits(name, optimizer):
    # MLP.step hands its common case to the compiled backend's _net_step, which
    # reads the arguments in C; it must be taken from the second step of a batch
    # size on (the first sets up the workspace) and change nothing in the result
    X, y = make_data(CONFIGS[name], n=12)
    X = X.astype(np.float32)
    y = y.astype(np.float32) if y.dtype.kind == "f" else y
    fast, slow = make_net(name, dtype=np.float32), make_net(name, dtype=np.float32)
    slow._net_step = None  # the general path only
    returned = []
    one_call = fast._net_step
    fast._net_step = lambda *args: returned.append(one_call(*args)) or returned[-1]
    opt_fast, opt_slow = OPTIMIZERS[optimizer](fast.params), OPTIMIZERS[optimizer](slow.params)
    for _ in range(4):
        assert fast.step(X, y, opt_fast) == slow.step(X, y, opt_slow)
    assert fast.params.tobytes() == slow.params.tobytes()
    state = lambda opt: {k: v.tobytes() if isinstance(v, np.ndarray) else v
                         for k, v in opt.state().items()}
    assert state(opt_fast) == state(opt_slow) and opt_fast.step_count == 4
    assert returned[0] is None and None not in returned[1:] and len(returned) == 4
    # a batch the kernel refuses: the one-call step declines, changing nothing, and
    # the general path says why
    X_bad = X.copy()
    X_bad[3, 1] = np.nan
    bad = [(X_bad, y, "NaN")]
    if name == "ce-deep-mixed":
        y_bad = y.copy()
        y_bad[5] = 3  # and out of range, alone
        bad.append((X, y_bad, r"y\[5\] = 3"))
    elif name == "bce":  # targets outside [0, 1], which only the network checks
        for value in (1.5, -0.25, np.nan):
            y_bad = y.copy()
            y_bad[5, 0] = value
            bad.append((X, y_bad, r"\[0, 1\]" if value == value else "NaN"))
    before, before_state = fast.params.tobytes(), state(opt_fast)
    for k, (Xb, yb, message) in enumerate(bad):
        with pytest.raises(ValueError, match=message):
            fast.step(Xb, yb, opt_fast)
        assert fast.params.tobytes() == before and state(opt_fast) == before_state
        assert returned[-1] is None and len(returned) == 5 + k


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
def test_step_one_call_path_takes_1d_targets_of_one_output(loss, optimizer, monkeypatch):
    # y of shape (n,) for a one-output network, as fit and scikit-learn take it:
    # the one-call step reads it as a column, with the bits of the general path
    # given the (n, 1) column (and no refused kernel call on the way); for wider
    # networks it declines and the general path names the shape
    from fastbp import _kernels
    refused = []
    for name in ("check_step_call", "check_adam_step_call"):
        monkeypatch.setattr(_kernels, name, lambda *args: refused.append(args))
    rng = np.random.default_rng(3)
    X = rng.normal(size=(10, 4)).astype(np.float32)
    y = (rng.random(10) < 0.5).astype(np.float32)
    fast = fastbp.MLP([4, 6, 1], loss=loss, dtype=np.float32, seed=1)
    slow = fastbp.MLP([4, 6, 1], loss=loss, dtype=np.float32, seed=1)
    slow._net_step = None
    returned = []
    one_call = fast._net_step
    fast._net_step = lambda *args: returned.append(one_call(*args)) or returned[-1]
    opt_fast, opt_slow = OPTIMIZERS[optimizer](fast.params), OPTIMIZERS[optimizer](slow.params)
    for _ in range(3):
        assert fast.step(X, y, opt_fast) == slow.step(X, y[:, None].copy(), opt_slow)
    assert fast.params.tobytes() == slow.params.tobytes()
    assert returned[0] is None and None not in returned[1:] and refused == []
    monkeypatch.undo()
    wide = fastbp.MLP([4, 6, 2], loss=loss, dtype=np.float32, seed=1)
    opt = OPTIMIZERS[optimizer](wide.params)
    wide.step(X, np.zeros((10, 2), np.float32), opt)
    before = wide.params.tobytes()
    with pytest.raises(ValueError, match=r"shape \(n_samples, 2\)"):
        wide.step(X, y, opt)
    assert wide.params.tobytes() == before


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_training_reduces_the_loss(backend):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR of signs: needs the hidden layer
    net = fastbp.MLP([4, 16, 2], activation="tanh", seed=0, backend=backend)
    opt = fastbp.SGD(net.params, lr=0.2, momentum=0.9)
    first = net.step(X, y, opt)
    for _ in range(300):
        last = net.step(X, y, opt)
    assert last < 0.3 * first
    assert np.mean(net.forward(X).argmax(1) == y) > 0.9


# ---------------------------------------------------------------------------
# Input conversion at the boundary: same result as the network's own dtype.

@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_inputs_are_converted_once_and_exactly(backend):
    net = fastbp.MLP([6, 5, 3], dtype=np.float32, seed=0, backend=backend)
    rng = np.random.default_rng(0)
    X = rng.integers(-3, 4, size=(8, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=8)
    loss, dW, db = net.gradients(X, y)
    out = net.forward(X)
    big = np.zeros((16, 12), np.float32)
    big[::2, ::2] = X
    ro = X.copy()
    ro.flags.writeable = False
    variants = {
        "float64": X.astype(np.float64),
        "int": X.astype(np.int16),
        "list": X.tolist(),
        "fortran": np.asfortranarray(X),
        "strided": big[::2, ::2],
        "read-only": ro,
    }
    for name, Xv in variants.items():
        np.testing.assert_array_equal(net.forward(Xv), out, err_msg=name)
        lv, dWv, dbv = net.gradients(Xv, y)
        assert lv == loss, name
        for a, b in zip(dWv + dbv, dW + db):
            np.testing.assert_array_equal(a, b, err_msg=name)
    for labels in (y.astype(np.int8), y.astype(np.uint16), y.astype(np.int32), y.tolist()):
        assert net.gradients(X, labels)[0] == loss


def test_targets_may_be_one_column_vector_and_any_float():
    net = fastbp.MLP([3, 1], loss="mse", dtype=np.float64, seed=0)
    X, Y = np.ones((4, 3)), np.arange(4.0)
    assert net.gradients(X, Y)[0] == net.gradients(X, Y.reshape(4, 1).astype(np.float32))[0]


# ---------------------------------------------------------------------------
# Bad input: a clear error, and the network and optimizer left byte-identical.

def _bad_steps():
    X = np.ones((4, 5))
    y = np.array([0, 1, 2, 3])
    Xnan = X.copy()
    Xnan[2, 1] = np.nan
    Xinf = X.copy()
    Xinf[0, 0] = np.inf
    return {
        "wrong feature count": (np.ones((4, 6)), y, ValueError, "6 features"),
        "1-D X": (np.ones(5), y[:1], ValueError, "2-D"),
        "3-D X": (np.ones((4, 5, 1)), y, ValueError, "2-D"),
        "NaN in X": (Xnan, y, ValueError, "NaN"),
        "inf in X": (Xinf, y, ValueError, "NaN or infinity"),
        "label too large": (X, np.array([0, 1, 4, 3]), ValueError, r"y\[2\] = 4"),
        "negative label": (X, np.array([0, -1, 2, 3]), ValueError, r"y\[1\] = -1"),
        "float labels": (X, y.astype(float), TypeError, "integer class labels"),
        "2-D labels": (X, y.reshape(4, 1), ValueError, "1-D"),
        "sample counts differ": (X, y[:3], ValueError, "4 samples but y has 3"),
        "empty batch": (np.ones((0, 5)), y[:0], ValueError, "no samples"),
        "string X": (np.array([["a"] * 5] * 4), y, TypeError, "dtype"),
        "object X": (np.array([[object()] * 5] * 4), y, TypeError, "dtype"),
        "ragged X": ([[1.0, 2.0], [1.0]], y, ValueError, "X"),
        "string labels": (X, np.array(["a", "b", "c", "d"]), TypeError, "integer"),
    }


@pytest.mark.parametrize("case", sorted(_bad_steps()))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("rows", [2, 4])
def test_bad_step_changes_nothing(case, backend, optimizer, rows):
    X, y, exc_type, message = _bad_steps()[case]
    net = fastbp.MLP([5, 3, 4], seed=0, backend=backend)
    opt = (fastbp.SGD(net.params, lr=0.1, momentum=0.9) if optimizer == "sgd"
           else fastbp.Adam(net.params, lr=0.1, amsgrad=True))
    # optimizer state exists; with 4 rows the workspace fits the bad batches, so
    # they reach the one-call step first
    net.step(np.ones((rows, 5)), [0, 1] * (rows // 2), opt)
    state_bytes = lambda: {k: v.tobytes() if isinstance(v, np.ndarray) else v
                           for k, v in opt.state().items()}
    before, state = net.params.tobytes(), state_bytes()
    with pytest.raises(exc_type, match=message):
        net.step(X, y, opt)
    with pytest.raises(exc_type, match=message):
        net.gradients(X, y)
    assert net.params.tobytes() == before and state_bytes() == state
    assert opt.step_count == 1


@pytest.mark.parametrize("case", sorted(_bad_steps()))
def test_bad_first_step_changes_nothing(case):
    # no workspace yet: the arrays-straight-to-the-kernel path must not trip on that
    X, y, exc_type, message = _bad_steps()[case]
    net = fastbp.MLP([5, 3, 4], seed=0, dtype="float32")
    opt = fastbp.SGD(net.params, lr=0.1)
    before = net.params.tobytes()
    with pytest.raises(exc_type, match=message):
        net.step(X, y, opt)
    assert net.params.tobytes() == before and opt.step_count == 0


def test_step_converts_what_the_kernel_refuses(monkeypatch):
    # float64 X, int32 labels, a Fortran-ordered X and lists take a float32
    # network's step through conversion, to the same result as its own layout,
    # converted before any kernel call (a refused call builds an error message
    # first, which cost four tiny steps)
    from fastbp import _kernels
    refused = []
    monkeypatch.setattr(_kernels, "check_step_call", lambda *args: refused.append(args))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 5)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    nets = [fastbp.MLP([5, 3, 4], seed=0, dtype="float32") for _ in range(5)]
    batches = [(X, y), (X.astype(np.float64), y), (X, y.astype(np.int32)),
               (np.asfortranarray(X), y), (X.tolist(), y.tolist())]
    losses = [net.step(Xb, yb, fastbp.SGD(net.params, lr=0.1)) for net, (Xb, yb) in zip(nets, batches)]
    assert losses == [losses[0]] * 5
    assert refused == []
    for net in nets[1:]:
        np.testing.assert_array_equal(net.params, nets[0].params)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("swap", ["X", "y"])
def test_step_reads_byte_swapped_arrays_by_value(optimizer, swap):
    # arrays in the other byte order than the machine's share the native type's
    # NumPy type number: from the second step on (the workspace allocated) the
    # one-call path had read a byte-swapped X's bytes as native floats and
    # trained on garbage. They are converted instead, as any other dtype.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 5)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    swapped = {"X": (X.astype(X.dtype.newbyteorder()), y),
               "y": (X, y.astype(y.dtype.newbyteorder()))}[swap]
    runs = []
    for Xb, yb in ((X, y), swapped):
        net = fastbp.MLP([5, 3, 4], seed=0, dtype="float32")
        opt = (fastbp.SGD(net.params, lr=0.1, momentum=0.9) if optimizer == "sgd"
               else fastbp.Adam(net.params, lr=0.01))
        runs.append(([net.step(Xb, yb, opt) for _ in range(4)], net.params.copy()))
    (losses, params), (swapped_losses, swapped_params) = runs
    assert swapped_losses == losses
    np.testing.assert_array_equal(swapped_params, params)


@pytest.mark.parametrize("loss, y, message", [
    ("mse", np.full((2, 3), np.nan), "NaN"),
    ("mse", np.ones((2, 2)), r"shape \(n_samples, 3\)"),
    ("binary_cross_entropy", np.full((2, 3), 1.5), r"\[0, 1\]"),
    ("binary_cross_entropy", np.full((2, 3), -0.1), r"\[0, 1\]"),
])
def test_bad_targets(loss, y, message):
    net = fastbp.MLP([2, 3], loss=loss, seed=0)
    before = net.params.tobytes()
    with pytest.raises(ValueError, match=message):
        net.step(np.ones((2, 2)), y, fastbp.SGD(net.params))
    assert net.params.tobytes() == before


def test_optimizer_of_another_network_is_refused():
    net, other = fastbp.MLP([2, 2], seed=0), fastbp.MLP([2, 2], seed=1)
    before = net.params.tobytes(), other.params.tobytes()
    for opt in (fastbp.SGD(other.params), fastbp.SGD(net.params.copy())):
        with pytest.raises(ValueError, match="another parameter array"):
            net.step(np.ones((1, 2)), [0], opt)
    with pytest.raises(TypeError, match="fastbp optimizer"):
        net.step(np.ones((1, 2)), [0], "sgd")
    assert (net.params.tobytes(), other.params.tobytes()) == before


def test_divergence_raises_and_leaves_the_network_whole():
    net = fastbp.MLP([2, 1], loss="mse", dtype=np.float32, seed=0)
    opt = fastbp.SGD(net.params, lr=0.1)
    before = net.params.tobytes()
    with pytest.raises(FloatingPointError, match="not updated"):
        net.step(np.ones((2, 2)), np.full((2, 1), 1e30), opt)  # (A - Y)**2 overflows float32
    assert net.params.tobytes() == before and opt.step_count == 0


@pytest.mark.parametrize("kwargs, exc_type, message", [
    (dict(sizes=[3]), ValueError, "at least an input and an output"),
    (dict(sizes=[3, 0, 2]), ValueError, "positive integers"),
    (dict(sizes=[3, 2.5]), ValueError, "positive integers"),
    (dict(sizes=[3, True]), ValueError, "positive integers"),
    (dict(sizes=5), TypeError, "sequence"),
    (dict(sizes=[3] * 514), ValueError, "513 weight layers; a network has at most 512"),
    (dict(sizes=[3, 4, 2], activation="swish"), ValueError, "'swish'.*'relu'"),
    (dict(sizes=[3, 4, 2], activation=["relu", "tanh"]), ValueError, "2 names for 1 hidden"),
    (dict(sizes=[3, 2], loss="hinge"), ValueError, "'hinge'.*'cross_entropy'"),
    (dict(sizes=[3, 2], loss="mse", output="relu"), ValueError, "'relu'.*'sigmoid'"),
    (dict(sizes=[3, 2], output="sigmoid"), ValueError, "only to loss='mse'"),
    (dict(sizes=[3, 2], init="zeros"), ValueError, "'zeros'.*'glorot_uniform'"),
    (dict(sizes=[3, 2], dtype=np.int32), ValueError, "float32 or float64"),
    (dict(sizes=[3, 2], dtype="float16"), ValueError, "float32 or float64"),
    (dict(sizes=[3, 2], dtype="nonsense"), TypeError, "float32 or float64"),
    (dict(sizes=[3, 2], backend="torch"), ValueError, "'torch'.*'cython'"),
])
def test_bad_construction(kwargs, exc_type, message):
    with pytest.raises(exc_type, match=message):
        fastbp.MLP(**kwargs)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_the_deepest_network_trains_and_predicts(backend):
    # 512 weight layers, the most the compiled kernels (and checkpoints) take
    net = fastbp.MLP([3] * 512 + [2], activation="identity", seed=0, backend=backend)
    X = np.ones((2, 3), np.float32)
    assert net.predict_proba(X).shape == (2, 2)
    assert np.isfinite(net.step(X, np.array([0, 1]), fastbp.SGD(net.params, lr=1e-3)))


def test_repr_names_the_configuration():
    text = repr(fastbp.MLP([3, 4, 2], activation="tanh", loss="mse", output="sigmoid", backend="numpy"))
    assert text == "MLP([3, 4, 2], activation='tanh', loss='mse', output='sigmoid', dtype=float32, backend='numpy')"


def test_kernels_module_is_the_reference_for_numpy_backend():
    assert fastbp.MLP([2, 2], backend="numpy")._kernels is reference


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pickled_and_copied_buffers_start_on_a_cache_line(how, optimizer):
    # NumPy restores an array on a 16-byte boundary; fastbp's parameters and
    # optimizer state come back on a 64-byte one, still shared by the network
    # and its optimizer (a restored digits network otherwise trained about 2% slower)
    import copy
    import pickle

    for sizes in ([7, 33, 5], [3, 4, 2], [10, 17, 9, 4], [64, 128, 10]):
        net = fastbp.MLP(sizes, seed=0)
        opt = (fastbp.SGD(net.params, lr=0.1, momentum=0.9) if optimizer == "sgd"
               else fastbp.Adam(net.params, lr=0.01, amsgrad=True))
        rng = np.random.default_rng(0)
        net.fit(rng.normal(size=(20, sizes[0])), rng.integers(0, sizes[-1], 20), epochs=1,
                batch_size=8, optimizer=opt)
        twin, twin_opt = (pickle.loads(pickle.dumps((net, opt))) if how == "pickle"
                          else copy.deepcopy((net, opt)))
        assert twin_opt.params is twin.params and twin.params is not net.params
        names = ["momentum_buffer"] if optimizer == "sgd" else ["exp_avg", "exp_avg_sq",
                                                                  "max_exp_avg_sq"]
        for a, original in [(twin.params, net.params)] + [(getattr(twin_opt, n), getattr(opt, n))
                                                          for n in names]:
            assert a.ctypes.data % 64 == 0
            np.testing.assert_array_equal(a, original)
            assert a.dtype == original.dtype and a.flags.c_contiguous and a.flags.writeable
        for W in twin.weights:
            assert np.shares_memory(W, twin.params)
    # an optimizer pickled on its own keeps its values, on its own aligned copy
    alone = pickle.loads(pickle.dumps(opt))
    assert alone.params.ctypes.data % 64 == 0 and alone.params is not opt.params
    np.testing.assert_array_equal(alone.params, opt.params)
    # a shallow copy still shares the arrays themselves
    assert copy.copy(net).params is net.params and copy.copy(opt).params is net.params
    state = names[0]
    assert getattr(copy.copy(opt), state) is getattr(opt, state)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_network_and_its_optimizer_survive_pickle_and_deepcopy(backend, how):
    import copy
    import pickle

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
    net = fastbp.MLP([4, 5, 3], seed=0, backend=backend)
    opt = fastbp.SGD(net.params, lr=0.1, momentum=0.9, backend=backend)
    net.fit(X, y, epochs=2, batch_size=8, optimizer=opt)
    twin, twin_opt = (pickle.loads(pickle.dumps((net, opt))) if how == "pickle"
                      else copy.deepcopy((net, opt)))
    assert twin.params is not net.params and twin_opt.params is twin.params
    np.testing.assert_array_equal(twin.params, net.params)
    np.testing.assert_array_equal(twin_opt.momentum_buffer, opt.momentum_buffer)
    for W, b in zip(twin.weights, twin.biases):  # views of the restored params again
        assert np.shares_memory(W, twin.params) and np.shares_memory(b, twin.params)
    twin.weights[0][0, 0] = 5.0
    assert twin.params[0] == 5.0 and net.params[0] != 5.0
    twin.params[0] = net.params[0]
    # both go on training the same way, and neither touches the other
    before = net.params.copy()
    h_twin = twin.fit(X, y, epochs=2, batch_size=8, optimizer=twin_opt)
    np.testing.assert_array_equal(net.params, before)
    h_net = net.fit(X, y, epochs=2, batch_size=8, optimizer=opt)
    np.testing.assert_array_equal(twin.params, net.params)
    assert h_twin.loss == h_net.loss and twin.epoch_ == net.epoch_ == 4
    np.testing.assert_array_equal(twin.predict(X), net.predict(X))

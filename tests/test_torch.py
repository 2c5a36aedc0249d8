"""Cross-checks against PyTorch autograd and torch.optim.SGD (run when torch is installed)."""

import numpy as np
import pytest

import fastbp

from conftest import BACKEND_NAMES

torch = pytest.importorskip("torch")
F = torch.nn.functional

ACT = {"identity": lambda z: z, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
       "relu": torch.relu, "leaky_relu": F.leaky_relu}

CONFIGS = [
    dict(sizes=[6, 8, 5], activation="relu", loss="cross_entropy"),
    dict(sizes=[6, 7, 5, 3], activation=["leaky_relu", "tanh"], loss="cross_entropy"),
    dict(sizes=[6, 8, 2], activation="sigmoid", loss="mse", output="sigmoid"),
    dict(sizes=[6, 4, 2], activation="identity", loss="mse", output="tanh"),
    dict(sizes=[6, 5, 3], activation="relu", loss="mse"),
    dict(sizes=[6, 8, 3], activation="tanh", loss="binary_cross_entropy"),
]


def torch_loss(net, params, X, y):
    """The same network and loss in torch, on torch tensors `params` (W0, b0, W1, ...)."""
    a = X
    for l in range(net.n_layers):
        z = a @ params[2 * l].T + params[2 * l + 1]
        a = ACT[net.activations[l]](z) if l < net.n_layers - 1 else z
    if net.loss == "cross_entropy":
        return F.cross_entropy(a, y)
    if net.loss == "mse":
        return F.mse_loss(ACT[net.output](a), y)
    return F.binary_cross_entropy_with_logits(a, y)


def data(net, n=10, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, net.sizes[0]))
    if net.loss == "cross_entropy":
        y = rng.integers(0, net.n_outputs, size=n)
    elif net.loss == "mse":
        y = rng.normal(size=(n, net.n_outputs))
    else:
        y = rng.uniform(size=(n, net.n_outputs))
    return X, y


def as_torch(net):
    return [torch.tensor(a.copy(), requires_grad=True)
            for pair in zip(net.weights, net.biases) for a in pair]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['loss']}-{c['activation']}")
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_loss_and_gradients_match_autograd(config, backend):
    net = fastbp.MLP(**config, dtype=np.float64, seed=1, backend=backend)
    X, y = data(net)
    loss, dW, db = net.gradients(X, y)
    params = as_torch(net)
    tloss = torch_loss(net, params, torch.tensor(X), torch.tensor(y))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    for ours, theirs in zip([g for pair in zip(dW, db) for g in pair], params):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['loss']}-{c['activation']}")
def test_forward_matches_torch(config):
    net = fastbp.MLP(**config, dtype=np.float64, seed=2)
    X, _ = data(net)
    params = [torch.tensor(a) for pair in zip(net.weights, net.biases) for a in pair]
    a = torch.tensor(X)
    for l in range(net.n_layers):
        a = a @ params[2 * l].T + params[2 * l + 1]
        if l < net.n_layers - 1:
            a = ACT[net.activations[l]](a)
    expected = {"cross_entropy": lambda z: torch.softmax(z, 1), "binary_cross_entropy": torch.sigmoid,
                "mse": ACT[net.output or "identity"]}[net.loss](a)
    np.testing.assert_allclose(net.forward(X), expected.numpy(), rtol=1e-12, atol=1e-15)


SGD_OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.8, dampening=0.3),
    dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    dict(lr=0.01, momentum=0.5, weight_decay=0.1, maximize=True),
]


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sgd_steps_match_torch_optim(options, backend, dtype):
    net = fastbp.MLP([6, 7, 5, 3], activation=["tanh", "relu"], dtype=dtype, seed=3, backend=backend)
    params = as_torch(net)
    train_side_by_side(net, fastbp.SGD(net.params, **options), params,
                       torch.optim.SGD(params, **options), steps=6)


def train_side_by_side(net, opt, params, topt, steps):
    """`steps` training steps of net/opt and of the torch twin; both must agree throughout."""
    tol = 1e-10 if net.dtype == np.float64 else 1e-5
    for step in range(steps):
        X, y = data(net, seed=step)
        loss = net.step(X, y, opt)
        topt.zero_grad()
        tloss = torch_loss(net, params, torch.tensor(X.astype(net.dtype)), torch.tensor(y))
        tloss.backward()
        topt.step()
        assert loss == pytest.approx(tloss.item(), rel=tol)
    ours = [a for pair in zip(net.weights, net.biases) for a in pair]
    for a, t in zip(ours, params):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=tol, atol=tol * np.abs(a).max())

ADAM_OPTIONS = [
    (fastbp.Adam, torch.optim.Adam, dict(lr=0.01)),
    (fastbp.Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    (fastbp.Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True, maximize=True)),
    (fastbp.AdamW, torch.optim.AdamW, dict(lr=0.01)),
    (fastbp.AdamW, torch.optim.AdamW, dict(lr=0.02, weight_decay=0.3, amsgrad=True, eps=1e-6)),
]


@pytest.mark.parametrize("ours, theirs, options", ADAM_OPTIONS,
                         ids=lambda x: x.__name__ if isinstance(x, type) else ",".join(map(str, x.values())))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adam_steps_match_torch_optim(ours, theirs, options, backend, dtype):
    net = fastbp.MLP([6, 7, 5, 3], activation=["tanh", "relu"], dtype=dtype, seed=4, backend=backend)
    params = as_torch(net)
    train_side_by_side(net, ours(net.params, **options), params, theirs(params, **options), steps=8)

def test_clipping_matches_clip_grad_norm():
    net = fastbp.MLP([6, 7, 3], dtype=np.float64, seed=5)
    params = as_torch(net)
    opt = fastbp.SGD(net.params, lr=0.5, momentum=0.9, max_grad_norm=0.05)
    topt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    for step in range(4):
        X, y = data(net, seed=step)
        net.step(X, y, opt)
        topt.zero_grad()
        torch_loss(net, params, torch.tensor(X), torch.tensor(y)).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        topt.step()
    ours_params = [a for pair in zip(net.weights, net.biases) for a in pair]
    for a, t in zip(ours_params, params):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-10, atol=1e-12)

"""Pretrained weights: MLP.from_torch / to_torch and MLP.from_sklearn give the
same predictions as the model they came from."""

import sys
import warnings

import numpy as np
import pytest

import fastbp


def blobs(n=120, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3, size=(k, d))
    y = rng.integers(0, k, size=n)
    return centers[y] + rng.normal(size=(n, d)), y


# -- PyTorch -----------------------------------------------------------------

torch_cases = {
    # name: (modules after each Linear, loss, output)
    "relu ce": (["ReLU", None], "cross_entropy", None),
    "tanh leaky ce softmax": (["Tanh", "LeakyReLU", "Softmax"], "cross_entropy", None),
    "sigmoid bce": (["Sigmoid", "Sigmoid"], "binary_cross_entropy", None),
    "relu mse tanh": (["ReLU", "Tanh"], "mse", "tanh"),
    "identity mse": (["Identity", None], "mse", None),
}


def torch_model(torch, acts, dtype):
    nn = torch.nn
    torch.manual_seed(0)
    widths = [6, 9, 7, 3] if len(acts) == 3 else [6, 9, 3]  # one Linear per entry of acts
    mods = []
    for l, act in enumerate(acts):
        mods.append(nn.Linear(widths[l], widths[l + 1], dtype=dtype))
        if act == "LeakyReLU":
            mods.append(nn.LeakyReLU(0.01))
        elif act == "Softmax":
            mods.append(nn.Softmax(dim=1))
        elif act is not None:
            mods.append(getattr(nn, act)())
    return nn.Sequential(*mods)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(torch_cases))
def test_torch_round_trip_gives_the_same_outputs(case, dtype):
    torch = pytest.importorskip("torch")
    acts, loss, output = torch_cases[case]
    tdtype = getattr(torch, dtype)
    model = torch_model(torch, acts, tdtype)
    net = fastbp.MLP.from_torch(model, loss=loss, output=output)
    assert net.dtype == np.dtype(dtype)
    X = np.random.default_rng(1).normal(size=(20, 6)).astype(dtype)
    with torch.no_grad():
        theirs = model(torch.from_numpy(X)).numpy()
    ours = net.forward(X)
    if loss == "binary_cross_entropy" or acts[-1] == "Softmax" or loss == "mse":
        expected = theirs  # the module already ends in its output activation
    else:
        expected = torch.softmax(torch.from_numpy(theirs), dim=1).numpy()
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(ours, expected, rtol=tol, atol=tol)
    # and back: to_torch reproduces the network (logits for the classification losses)
    back = net.to_torch()
    with torch.no_grad():
        again = back(torch.from_numpy(X)).numpy()
    if loss == "cross_entropy":
        again = torch.softmax(torch.from_numpy(again), dim=1).numpy()
    elif loss == "binary_cross_entropy":
        again = torch.sigmoid(torch.from_numpy(again)).numpy()
    np.testing.assert_allclose(again, ours, rtol=tol, atol=tol)


def test_from_a_state_dict_needs_the_activations_and_no_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    model = torch_model(torch, ["Tanh", None], torch.float64)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    monkeypatch.setitem(sys.modules, "torch", None)  # a state_dict of arrays needs no torch
    with pytest.raises(ValueError, match="activation="):
        fastbp.MLP.from_torch(state)
    net = fastbp.MLP.from_torch(state, activation="tanh")
    X = np.random.default_rng(1).normal(size=(5, 6))
    with pytest.raises(ImportError, match="pip install torch"):
        net.to_torch()
    monkeypatch.undo()
    with torch.no_grad():
        logits = model(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(net.forward(X), torch.softmax(torch.from_numpy(logits), 1).numpy(),
                               rtol=1e-12, atol=1e-12)


def test_a_bfloat16_state_dict_loads_as_float32():
    """NumPy has no bfloat16 (the tensors' .numpy() raised TypeError); float32 holds
    every bfloat16 exactly."""
    torch = pytest.importorskip("torch")
    model = torch_model(torch, ["Tanh", None], torch.float32).to(torch.bfloat16)
    net = fastbp.MLP.from_torch(model.state_dict(), activation="tanh")
    assert net.dtype == np.float32
    for W, (name, t) in zip(net.weights, [(k, v) for k, v in model.state_dict().items()
                                          if k.endswith("weight")]):
        np.testing.assert_array_equal(W, t.float().numpy())
    assert fastbp.MLP.from_torch(model).dtype == np.float32


def test_unsupported_torch_models_are_refused():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    with pytest.raises(ValueError, match="Dropout"):
        fastbp.MLP.from_torch(nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="slope"):
        fastbp.MLP.from_torch(nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="does not fit loss"):
        fastbp.MLP.from_torch(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh()))
    with pytest.raises(ValueError, match="layer 1 takes 5 inputs"):
        fastbp.MLP.from_torch(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match="does not follow"):
        fastbp.MLP.from_torch(nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(TypeError, match="nn.Sequential"):
        fastbp.MLP.from_torch("model.pt")


def test_fine_tuning_a_torch_model():
    torch = pytest.importorskip("torch")
    model = torch_model(torch, ["ReLU", None], torch.float32)
    X, y = blobs()
    net = fastbp.MLP.from_torch(model)
    before = net.evaluate(X, y)
    net.fit(X, y, epochs=5, optimizer=fastbp.SGD(net.params, lr=0.05, momentum=0.9), progress=False)
    assert net.evaluate(X, y) < before


# -- scikit-learn ------------------------------------------------------------


def fitted(kind, **kwargs):
    sk = pytest.importorskip("sklearn.neural_network")
    X, y = blobs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "regressor":
            rng = np.random.default_rng(0)
            Y = X @ rng.normal(size=(6, 2))
            return sk.MLPRegressor(hidden_layer_sizes=(8, 5), max_iter=50, random_state=0,
                                   **kwargs).fit(X, Y), X
        if kind == "binary":
            y = (y > 0).astype(int)
        if kind == "multilabel":
            y = np.stack([y == 0, y == 2], axis=1).astype(int)
        return sk.MLPClassifier(hidden_layer_sizes=(8,), max_iter=50, random_state=0,
                                **kwargs).fit(X, y), X


@pytest.mark.parametrize("activation", ["relu", "tanh", "logistic", "identity"])
def test_sklearn_multiclass(activation):
    clf, X = fitted("multiclass", activation=activation)
    net = fastbp.MLP.from_sklearn(clf, dtype=np.float64)
    assert net.loss == "cross_entropy" and net.sizes == (6, 8, 3)
    np.testing.assert_allclose(net.predict_proba(X), clf.predict_proba(X), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(clf.classes_[net.predict(X)], clf.predict(X))


def test_sklearn_binary_and_multilabel():
    clf, X = fitted("binary")
    net = fastbp.MLP.from_sklearn(clf, dtype=np.float64)
    assert net.loss == "binary_cross_entropy" and net.n_outputs == 1
    np.testing.assert_allclose(net.predict_proba(X)[:, 0], clf.predict_proba(X)[:, 1], rtol=1e-10)
    clf, X = fitted("multilabel")
    net = fastbp.MLP.from_sklearn(clf, dtype=np.float64)
    np.testing.assert_allclose(net.predict_proba(X), clf.predict_proba(X), rtol=1e-10)
    np.testing.assert_array_equal(net.predict(X), clf.predict(X))


def test_sklearn_regressor():
    reg, X = fitted("regressor")
    net = fastbp.MLP.from_sklearn(reg)  # dtype None: the coefficients' (float64)
    assert net.loss == "mse" and net.dtype == np.float64
    np.testing.assert_allclose(net.predict(X), reg.predict(X), rtol=1e-10, atol=1e-10)


def test_sklearn_refusals(monkeypatch):
    pytest.importorskip("sklearn")
    from sklearn.neural_network import MLPClassifier

    with pytest.raises(ValueError, match="not fitted"):
        fastbp.MLP.from_sklearn(MLPClassifier())
    with pytest.raises(TypeError, match="MLPClassifier"):
        fastbp.MLP.from_sklearn(object())
    monkeypatch.setitem(sys.modules, "sklearn.neural_network", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        fastbp.MLP.from_sklearn(object())

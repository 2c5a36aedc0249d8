"""Weights from and to PyTorch and scikit-learn: `MLP.from_torch`, `MLP.to_torch`,
`MLP.from_sklearn`. Both packages are optional; each function imports what it
needs when called."""

from collections.abc import Mapping

import numpy as np

from ._checks import LEAKY_RELU_SLOPE

# torch.nn module class name -> fastbp activation
_TORCH_ACTIVATIONS = {"ReLU": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Identity": "identity",
                      "LeakyReLU": "leaky_relu"}
_SKLEARN_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}


def _import_torch(what):
    try:
        import torch
    except ImportError:
        raise ImportError(f"{what} needs PyTorch: pip install torch") from None
    return torch


def _as_array(t, name):
    """A tensor (detached, on the CPU) or array as a NumPy array."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # (NumPy has no bfloat16; float32 holds it exactly)
            t = t.float()
        t = t.numpy()
    a = np.asarray(t)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} holds {a.dtype}; expected numbers")
    return a


def layers_from_torch(source):
    """(weights, biases, hidden activations or None, output activation or None)
    from an nn.Sequential (or its state_dict)."""
    if isinstance(source, Mapping):
        weights, biases = [], []
        keys = list(source)
        prefixes = []
        for k in keys:
            if k.endswith(".weight") or k == "weight":
                prefixes.append(k[:-len("weight")])
        if not prefixes:
            raise ValueError("the state_dict holds no '<layer>.weight' entries")
        for p in prefixes:
            W = _as_array(source[p + "weight"], p + "weight")
            if W.ndim != 2:
                raise ValueError(f"{p}weight has shape {W.shape}; a Linear layer's is (out, in)")
            b = source.get(p + "bias")
            weights.append(W)
            biases.append(np.zeros(W.shape[0], W.dtype) if b is None else _as_array(b, p + "bias"))
        unknown = [k for k in keys if not any(k in (p + "weight", p + "bias") for p in prefixes)]
        if unknown:
            raise ValueError(f"the state_dict has entries that are not Linear weights or biases: "
                             f"{', '.join(unknown[:5])}")
        return weights, biases, None, None
    torch = _import_torch("MLP.from_torch with a module")
    nn = torch.nn
    if not isinstance(source, nn.Module):
        raise TypeError("from_torch takes an nn.Sequential of nn.Linear and activation modules, "
                        f"or its state_dict; got {type(source).__name__}")
    modules = list(source.children()) if isinstance(source, nn.Sequential) else [source]
    weights, biases, activations = [], [], []
    pending = None  # the activation after the latest Linear
    for i, m in enumerate(modules):
        kind = type(m).__name__
        if isinstance(m, nn.Linear):
            if weights:
                activations.append(pending or "identity")
            pending = None
            weights.append(_as_array(m.weight, f"layer {i} weight"))
            biases.append(np.zeros(m.out_features, weights[-1].dtype) if m.bias is None
                          else _as_array(m.bias, f"layer {i} bias"))
        elif kind in _TORCH_ACTIVATIONS or kind in ("Softmax", "LogSoftmax"):
            if not weights or pending is not None:
                raise ValueError(f"module {i} ({kind}) does not follow an nn.Linear")
            if kind == "LeakyReLU" and m.negative_slope != LEAKY_RELU_SLOPE:
                raise ValueError(f"module {i}: LeakyReLU with slope {m.negative_slope}; fastbp's "
                                 f"leaky_relu has slope {LEAKY_RELU_SLOPE}")
            pending = kind if kind in ("Softmax", "LogSoftmax") else _TORCH_ACTIVATIONS[kind]
        else:
            raise ValueError(f"module {i} ({kind}) is not supported: fastbp takes nn.Linear and "
                             "ReLU, Sigmoid, Tanh, Identity, LeakyReLU(0.01) between them")
    if not weights:
        raise ValueError("the module holds no nn.Linear layer")
    return weights, biases, activations, pending


def from_torch(cls, source, activation=None, loss="cross_entropy", *, output=None, dtype=None,
               seed=None, backend="cython"):
    weights, biases, acts, last = layers_from_torch(source)
    if acts is None:  # a state_dict: the activations must be given
        if activation is None:
            raise ValueError("a state_dict carries no activations: pass activation=")
        acts = activation
    elif activation is not None:
        raise ValueError("the module fixes its activations; activation= applies to a state_dict")
    if last is not None:
        # a final activation must be the one the loss implies or the mse output given
        fits = {"cross_entropy": ("Softmax", "LogSoftmax", "identity"),
                "binary_cross_entropy": ("sigmoid", "identity"),
                "mse": ("sigmoid", "tanh", "identity")}[loss]
        if last not in fits:
            raise ValueError(f"the module ends in {last}, which does not fit loss {loss!r}")
        if loss == "mse":
            if output not in (None, last):
                raise ValueError(f"the module ends in {last} but output={output!r}")
            output = last
    return cls.from_arrays(weights, biases, activation=acts, loss=loss, output=output, dtype=dtype,
                           seed=seed, backend=backend)


def to_torch(net):
    torch = _import_torch("MLP.to_torch")
    nn = torch.nn
    dtype = torch.float32 if net.dtype == np.float32 else torch.float64
    modules = []
    for l, (W, b) in enumerate(zip(net.weights, net.biases)):
        linear = nn.Linear(W.shape[1], W.shape[0], dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(W.copy()))
            linear.bias.copy_(torch.from_numpy(b.copy()))
        modules.append(linear)
        act = net.activations[l] if l < len(net.activations) else net.output
        if act is not None and act != "identity":
            modules.append({"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                            "leaky_relu": lambda: nn.LeakyReLU(LEAKY_RELU_SLOPE)}[act]())
    return nn.Sequential(*modules)


def from_sklearn(cls, estimator, *, dtype=None, seed=None, backend="cython"):
    try:
        from sklearn.neural_network import MLPClassifier, MLPRegressor
    except ImportError:
        raise ImportError("MLP.from_sklearn needs scikit-learn: pip install scikit-learn") from None
    if not isinstance(estimator, (MLPClassifier, MLPRegressor)):
        raise TypeError(f"from_sklearn takes a fitted MLPClassifier or MLPRegressor, got "
                        f"{type(estimator).__name__}")
    if not hasattr(estimator, "coefs_"):
        raise ValueError("the estimator is not fitted (no coefs_)")
    activation = _SKLEARN_ACTIVATIONS[estimator.activation]
    out = estimator.out_activation_
    if out == "softmax":
        loss, output = "cross_entropy", None
    elif out == "logistic":
        loss, output = "binary_cross_entropy", None  # binary or multi-label classification
    elif out == "identity":
        loss, output = "mse", "identity"
    else:
        raise ValueError(f"output activation {out!r} has no fastbp counterpart")
    # scikit-learn stores coefs_[l] as (n_in, n_out); fastbp (as PyTorch) as (n_out, n_in)
    weights = [np.asarray(W).T for W in estimator.coefs_]
    biases = [np.asarray(b) for b in estimator.intercepts_]
    return cls.from_arrays(weights, biases, activation=activation, loss=loss, output=output,
                           dtype=dtype, seed=seed, backend=backend)

"""The kernels of fastbp in plain NumPy: the specification.

Every public function here has a compiled twin in `fastbp._kernels` with the
same name and signature; the tests compare the two, and this module is checked
against central finite differences. It is written to be read: one formula a
line, shapes in every docstring.

Conventions shared by both backends
-----------------------------------
* Float arrays are float32 or float64, C-contiguous, and all float arguments
  of one call share one dtype. Class labels are int64. Nothing is cast or
  copied: a wrong argument raises TypeError/ValueError naming it.
* Outputs (`out`, `dZ`, `dW`, ...) are overwritten, never accumulated into,
  must have exactly the documented shape and be writable, and must not share
  memory with another argument. Elementwise kernels (`activation_backward`,
  `softmax` and the losses) may write in place over their input of the same
  shape.
* Shapes: ``n`` samples, a layer maps ``n_in`` features to ``n_out``; a weight
  matrix ``W`` is ``(n_out, n_in)`` (PyTorch's `nn.Linear` layout).
"""

import numpy as np

from ._checks import (
    ACTIVATIONS,
    LEAKY_RELU_SLOPE,
    OUTPUT_ACTIVATIONS,
    check_adam_epoch_call,
    check_adam_state,
    check_adam_step_call,
    check_call,
    check_choice,
    check_epoch_call,
    check_forward_call,
    check_mlp_call,
    check_no_overlap,
    check_step_call,
    check_shape,
    empty_batch_error,
    label_error,
)
from ._layout import mlp_views

__all__ = [
    "dense_forward",
    "activation_backward",
    "dense_backward",
    "softmax",
    "softmax_cross_entropy",
    "mean_squared_error",
    "binary_cross_entropy_with_logits",
    "sgd_update",
    "adam_update",
    "all_finite",
    "mlp_forward",
    "mlp_gradients",
    "mlp_sgd_step",
    "mlp_sgd_epoch",
    "mlp_adam_step",
    "mlp_adam_epoch",
]


def _sigmoid(Z):
    # exp(-|z|) never overflows; pick the algebraically equal form per sign.
    e = np.exp(-np.abs(Z))
    return np.where(Z >= 0, 1 / (1 + e), e / (1 + e))


def _activate(Z, activation):
    """act(Z) as a new array."""
    if activation == "identity":
        return Z.copy()
    if activation == "sigmoid":
        return _sigmoid(Z)
    if activation == "tanh":
        return np.tanh(Z)
    if activation == "relu":
        return np.maximum(Z, 0)
    return np.where(Z > 0, Z, Z * Z.dtype.type(LEAKY_RELU_SLOPE))  # leaky_relu


def _derivative_from_output(A, activation):
    """act'(z) written in terms of a = act(z)."""
    one = A.dtype.type(1)
    if activation == "identity":
        return np.ones_like(A)
    if activation == "sigmoid":
        return A * (one - A)
    if activation == "tanh":
        return one - A * A
    if activation == "relu":
        return (A > 0).astype(A.dtype)
    # leaky_relu keeps the sign of z, so a > 0 exactly when z > 0. At z = 0 the
    # slope is the negative one, as in PyTorch.
    return np.where(A > 0, one, A.dtype.type(LEAKY_RELU_SLOPE))


def dense_forward(X, W, b, activation, out):
    """Dense layer with bias and activation: ``out = act(X @ W.T + b)``.

    Parameters
    ----------
    X : ndarray, shape (n, n_in)
        Input batch.
    W : ndarray, shape (n_out, n_in)
        Weights.
    b : ndarray, shape (n_out,)
        Bias.
    activation : {"identity", "sigmoid", "tanh", "relu", "leaky_relu"}
        ``leaky_relu`` has negative slope 0.01.
    out : ndarray, shape (n, n_out)
        Overwritten with the activations; must not overlap X, W or b.

    Returns
    -------
    out : ndarray, shape (n, n_out)
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_call("dense_forward", X=X, W=W, b=b, out=out)
    n, n_in = X.shape
    check_shape("W", W, (None, n_in))
    n_out = W.shape[0]
    check_shape("b", b, (n_out,))
    check_shape("out", out, (n, n_out))
    check_no_overlap("out", out, [("X", X), ("W", W), ("b", b)])
    out[...] = _activate(X @ W.T + b, activation)
    return out


def activation_backward(A, dA, activation, out):
    """Gradient through an activation, from its output: ``out = dA * act'(A)``.

    The derivative is computed from ``A = act(Z)``, so Z need not be kept.

    Parameters
    ----------
    A : ndarray, shape (n, m)
        Output of the activation.
    dA : ndarray, shape (n, m)
        Gradient of the loss with respect to A.
    activation : {"identity", "sigmoid", "tanh", "relu", "leaky_relu"}
    out : ndarray, shape (n, m)
        Overwritten with the gradient with respect to Z; may be `dA` itself.

    Returns
    -------
    out : ndarray, shape (n, m)
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_call("activation_backward", A=A, dA=dA, out=out)
    check_shape("dA", dA, A.shape)
    check_shape("out", out, A.shape)
    check_no_overlap("out", out, [("A", A), ("dA", dA)], allow_identical=True)
    out[...] = dA * _derivative_from_output(A, activation)
    return out


def dense_backward(dZ, X, W, dW, db, dX=None):
    """Gradients of a dense layer: ``dW = dZ.T @ X``, ``db = dZ.sum(0)``, ``dX = dZ @ W``.

    Parameters
    ----------
    dZ : ndarray, shape (n, n_out)
        Gradient with respect to the layer's pre-activation.
    X : ndarray, shape (n, n_in)
        The layer's input.
    W : ndarray, shape (n_out, n_in)
        The layer's weights.
    dW : ndarray, shape (n_out, n_in)
        Overwritten with the weight gradient.
    db : ndarray, shape (n_out,)
        Overwritten with the bias gradient.
    dX : ndarray, shape (n, n_in), optional
        Overwritten with the gradient with respect to X; pass None for the
        first layer, where it is not needed.

    Returns
    -------
    (dW, db, dX)
    """
    check_call("dense_backward", dZ=dZ, X=X, W=W, dW=dW, db=db, dX=dX)
    n, n_out = dZ.shape
    check_shape("X", X, (n, None))
    n_in = X.shape[1]
    check_shape("W", W, (n_out, n_in))
    check_shape("dW", dW, (n_out, n_in))
    check_shape("db", db, (n_out,))
    if dX is not None:
        check_shape("dX", dX, (n, n_in))
    inputs = [("dZ", dZ), ("X", X), ("W", W)]
    check_no_overlap("dW", dW, inputs + [("db", db), ("dX", dX)])
    check_no_overlap("db", db, inputs + [("dX", dX)])
    check_no_overlap("dX", dX, inputs)
    np.matmul(dZ.T, X, out=dW)
    np.sum(dZ, axis=0, out=db)
    if dX is not None:
        np.matmul(dZ, W, out=dX)
    return dW, db, dX


def softmax(Z, out):
    """Row-wise softmax, computed stably: ``out = exp(Z - max) / sum(exp(Z - max))``.

    Parameters
    ----------
    Z : ndarray, shape (n, k)
        Logits; k >= 1.
    out : ndarray, shape (n, k)
        Overwritten with probabilities; may be `Z` itself.

    Returns
    -------
    out : ndarray, shape (n, k)
    """
    check_call("softmax", Z=Z, out=out)
    _check_classes(Z)
    check_shape("out", out, Z.shape)
    check_no_overlap("out", out, [("Z", Z)], allow_identical=True)
    E = np.exp(Z - Z.max(axis=1, keepdims=True))
    out[...] = E / E.sum(axis=1, keepdims=True)
    return out


def _check_classes(Z):
    if Z.shape[1] == 0:
        raise ValueError(f"Z has shape {Z.shape}; expected at least one column")


def softmax_cross_entropy(Z, y, dZ=None):
    """Softmax cross-entropy of integer labels, mean over samples, and its gradient.

    ``loss = mean_i(logsumexp(Z[i]) - Z[i, y[i]])``, as
    ``torch.nn.functional.cross_entropy(Z, y)``;
    ``dZ = (softmax(Z) - onehot(y)) / n``.

    Parameters
    ----------
    Z : ndarray, shape (n, k)
        Logits of the output layer; n >= 1.
    y : ndarray of int64, shape (n,)
        Class labels in [0, k).
    dZ : ndarray, shape (n, k), optional
        Overwritten with the gradient of the loss with respect to Z; may be
        `Z` itself. None computes the loss only.

    Returns
    -------
    float
        The mean loss.
    """
    check_call("softmax_cross_entropy", Z=Z, y=y, dZ=dZ)
    n, k = Z.shape
    _check_classes(Z)
    check_shape("y", y, (n,))
    if dZ is not None:
        check_shape("dZ", dZ, (n, k))
    check_no_overlap("dZ", dZ, [("Z", Z)], allow_identical=True)
    if n == 0:
        raise empty_batch_error("Z")
    bad = np.flatnonzero((y < 0) | (y >= k))
    if bad.size:
        raise label_error(bad[0], y[bad[0]], k)
    m = Z.max(axis=1, keepdims=True)
    E = np.exp(Z - m)
    s = E.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    # float64 accumulation of the mean, as the compiled kernel does
    loss = np.mean((np.log(s[:, 0]) + m[:, 0] - Z[rows, y]).astype(np.float64))
    if dZ is not None:
        G = E / s
        G[rows, y] -= 1
        dZ[...] = G / Z.dtype.type(n)
    return float(loss)


def _check_elementwise_loss(kernel, name, P, Y, dZ):
    """Checks shared by the two elementwise losses; P (named `name`) is A or Z."""
    check_call(kernel, **{name: P, "Y": Y, "dZ": dZ})
    check_shape("Y", Y, P.shape)
    if dZ is not None:
        check_shape("dZ", dZ, P.shape)
    check_no_overlap("dZ", dZ, [(name, P), ("Y", Y)], allow_identical=True)
    if P.shape[0] == 0:
        raise empty_batch_error(name)


def mean_squared_error(A, Y, activation, dZ=None):
    """Mean squared error over all elements, and the gradient before the output activation.

    ``loss = mean((A - Y) ** 2)``, as ``torch.nn.functional.mse_loss(A, Y)``;
    ``dZ = 2 * (A - Y) / A.size * act'(A)`` where ``A = act(Z)``.

    Parameters
    ----------
    A : ndarray, shape (n, k)
        Output of the network, after its output activation; n >= 1.
    Y : ndarray, shape (n, k)
        Targets.
    activation : {"identity", "sigmoid", "tanh"}
        The output activation that produced A.
    dZ : ndarray, shape (n, k), optional
        Overwritten with the gradient with respect to the output layer's
        pre-activation Z; may be A or Y itself. None computes the loss only.

    Returns
    -------
    float
        The mean loss.
    """
    check_choice("activation", activation, OUTPUT_ACTIVATIONS)
    _check_elementwise_loss("mean_squared_error", "A", A, Y, dZ)
    R = A - Y
    loss = np.mean((R * R).astype(np.float64))
    if dZ is not None:
        dZ[...] = R * A.dtype.type(2.0 / A.size) * _derivative_from_output(A, activation)
    return float(loss)


def binary_cross_entropy_with_logits(Z, Y, dZ=None):
    """Binary cross-entropy from logits, mean over all elements, and its gradient.

    ``loss = mean(max(Z, 0) - Z * Y + log1p(exp(-|Z|)))``, as
    ``torch.nn.functional.binary_cross_entropy_with_logits(Z, Y)``;
    ``dZ = (sigmoid(Z) - Y) / Z.size``.

    Parameters
    ----------
    Z : ndarray, shape (n, k)
        Logits; n >= 1.
    Y : ndarray, shape (n, k)
        Targets (probabilities of the positive class).
    dZ : ndarray, shape (n, k), optional
        Overwritten with the gradient with respect to Z; may be Z or Y itself.
        None computes the loss only.

    Returns
    -------
    float
        The mean loss.
    """
    _check_elementwise_loss("binary_cross_entropy_with_logits", "Z", Z, Y, dZ)
    terms = np.maximum(Z, 0) - Z * Y + np.log1p(np.exp(-np.abs(Z)))
    loss = np.mean(terms.astype(np.float64))
    if dZ is not None:
        dZ[...] = (_sigmoid(Z) - Y) / Z.dtype.type(Z.size)
    return float(loss)


def sgd_update(param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0,
               nesterov=False, weight_decay=0.0, maximize=False, first_step=False):
    """One in-place step of ``torch.optim.SGD`` on a flat parameter buffer.

    With ``g = -grad if maximize else grad`` and ``g += weight_decay * param``;
    if momentum is not 0: ``buf = g`` on the first step, else
    ``buf = momentum * buf + (1 - dampening) * g``, and ``g = g + momentum * buf``
    (nesterov) or ``g = buf``; finally ``param -= lr * g``.

    Parameters
    ----------
    param : ndarray, shape (p,)
        Parameters, updated in place.
    grad : ndarray, shape (p,)
        Gradient of the loss with respect to param.
    momentum_buffer : ndarray, shape (p,), or None
        Momentum state, updated in place; required when momentum is not 0.
    lr, momentum, dampening, weight_decay : float
    nesterov, maximize : bool
    first_step : bool
        True on the optimizer's first step: the buffer is set to the gradient.
    """
    check_call("sgd_update", param=param, grad=grad, momentum_buffer=momentum_buffer)
    check_shape("grad", grad, param.shape)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum is not 0")
        check_shape("momentum_buffer", momentum_buffer, param.shape)
    check_no_overlap("param", param, [("grad", grad), ("momentum_buffer", momentum_buffer)])
    check_no_overlap("momentum_buffer", momentum_buffer, [("grad", grad)])
    t = param.dtype.type
    g = -grad if maximize else grad.copy()
    if weight_decay != 0:
        g += t(weight_decay) * param
    if momentum != 0:
        if first_step:
            momentum_buffer[...] = g
        else:
            momentum_buffer *= t(momentum)
            momentum_buffer += t(1 - dampening) * g
        g = g + t(momentum) * momentum_buffer if nesterov else momentum_buffer
    param -= t(lr) * g


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                amsgrad=False, maximize=False):
    """One in-place step of ``torch.optim.Adam`` (or ``AdamW``) on a flat parameter buffer.

    With ``g = -grad if maximize else grad``: weight decay either scales the
    parameters, ``param *= 1 - lr * weight_decay`` (decoupled, AdamW), or is
    added to the gradient, ``g += weight_decay * param`` (Adam); then
    ``exp_avg += (1 - beta1) * (g - exp_avg)``,
    ``exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g``, with amsgrad
    ``max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq)`` used in its place, and
    ``param -= lr / (1 - beta1**step) * exp_avg / (sqrt(v) / sqrt(1 - beta2**step) + eps)``.

    Parameters
    ----------
    param : ndarray, shape (p,)
        Parameters, updated in place.
    grad : ndarray, shape (p,)
    exp_avg, exp_avg_sq : ndarray, shape (p,)
        First and second moment estimates, updated in place (zeros before the
        first step).
    max_exp_avg_sq : ndarray, shape (p,), or None
        Running maximum of exp_avg_sq; required with amsgrad.
    step : int
        The number of this update, counting from 1 (bias correction).
    lr, beta1, beta2, eps, weight_decay : float
    decoupled_weight_decay, amsgrad, maximize : bool
    """
    check_call("adam_update", param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
               max_exp_avg_sq=max_exp_avg_sq if amsgrad else None)
    check_adam_state(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad)
    t = param.dtype.type
    g = -grad if maximize else grad.copy()
    if weight_decay != 0:
        if decoupled_weight_decay:
            param *= t(1 - lr * weight_decay)
        else:
            g += t(weight_decay) * param
    # torch's lerp: the form that stays exact near its weight's end
    w = t(1 - beta1)
    if w < 0.5:
        exp_avg += w * (g - exp_avg)
    else:
        exp_avg[...] = g - (g - exp_avg) * (t(1) - w)
    exp_avg_sq *= t(beta2)
    exp_avg_sq += t(1 - beta2) * g * g
    if amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    v = max_exp_avg_sq if amsgrad else exp_avg_sq
    step_size = lr / (1 - beta1 ** step)
    denom = np.sqrt(v) / t((1 - beta2 ** step) ** 0.5) + t(eps)
    param += t(-step_size) * (exp_avg / denom)


def all_finite(x):
    """True if no element of `x` (shape (p,)) is NaN or infinite."""
    check_call("all_finite", x=x)
    return bool(np.isfinite(x).all())


def _forward_layers(X, params, sizes, activations, output, A, D, grad):
    """`dense_forward` layer by layer into A's blocks; returns the last block and
    `mlp_views` of the arguments."""
    views = mlp_views(tuple(int(s) for s in sizes), X.shape[0], params, A, D, grad)
    Ws, bs, As = views[0], views[1], views[4]
    prev = X
    for W, b, act, Al in zip(Ws, bs, tuple(activations) + (output,), As):
        prev = dense_forward(prev, W, b, act, Al)
    return prev, views


def _loss(Z, labels, targets, loss, output, dZ):
    """The loss kernel of `loss` on the last layer's block Z."""
    if loss == "cross_entropy":
        return softmax_cross_entropy(Z, labels, dZ)
    if loss == "mse":
        return mean_squared_error(Z, targets, output, dZ)
    return binary_cross_entropy_with_logits(Z, targets, dZ)


def mlp_forward(X, labels, targets, params, sizes, activations, loss, output, A, out):
    """A whole multi-layer perceptron's outputs and/or mean loss on a batch, in one
    call (no gradient): `dense_forward` layer by layer, then the loss kernel
    without dZ, then the outputs a user sees.

    Parameters
    ----------
    X, params, sizes, activations, loss, output
        As `mlp_gradients`.
    labels : ndarray of int64, shape (n,), or None
        Class labels, for loss "cross_entropy"; None computes no loss.
    targets : ndarray, shape (n, sizes[-1]), or None
        Targets, for "mse" and "binary_cross_entropy"; None computes no loss.
    A : ndarray, shape (>= n * sum(sizes[1:]),)
        Work buffer, overwritten (laid out as in `mlp_gradients`).
    out : ndarray, shape (n, sizes[-1]), or None
        Overwritten with the network's outputs: the softmax of the logits for
        "cross_entropy", their sigmoid for "binary_cross_entropy", the output
        layer's activations for "mse".

    Returns
    -------
    float or None
        The mean loss, when labels or targets are given.
    """
    check_forward_call(X, labels, targets, params, sizes, activations, loss, output, A, out)
    prev, _ = _forward_layers(X, params, sizes, activations, output, A, None, None)
    value = None
    if labels is not None or targets is not None:
        value = _loss(prev, labels, targets, loss, output, None)
    if out is not None:
        if loss == "cross_entropy":
            softmax(prev, out)
        elif loss == "binary_cross_entropy":
            out[...] = _sigmoid(prev)
        else:
            out[...] = prev
    return value


def mlp_gradients(X, labels, targets, params, sizes, activations, loss, output, A, D, grad):
    """Loss and gradient of a whole multi-layer perceptron on a batch, in one call.

    The composition of the kernels above: `dense_forward` layer by layer, the
    loss kernel, then `dense_backward` and `activation_backward` back to the
    first layer.

    Parameters
    ----------
    X : ndarray, shape (n, sizes[0])
        The batch; n >= 1.
    labels : ndarray of int64, shape (n,), or None
        Class labels, for loss "cross_entropy" (else None).
    targets : ndarray, shape (n, sizes[-1]), or None
        Targets, for "mse" and "binary_cross_entropy" (else None).
    params : ndarray, shape (p,)
        Every layer's W (n_out, n_in) then b (n_out,), layer after layer.
    sizes : sequence of int
        Layer widths, input first.
    activations : sequence of str
        One activation per hidden layer (len(sizes) - 2 names).
    loss : {"cross_entropy", "mse", "binary_cross_entropy"}
    output : {"identity", "sigmoid", "tanh"}
        The output layer's activation; "identity" (logits) unless loss is "mse".
    A, D : ndarray, shape (>= n * sum(sizes[1:]),)
        Work buffers, overwritten: layer l's activations (and their gradients)
        are the (n, sizes[l + 1]) block at offset n * sum(sizes[1:l + 1]).
    grad : ndarray, shape (p,)
        Overwritten with the gradient of the mean loss, laid out like params.

    Returns
    -------
    float
        The mean loss.
    """
    check_mlp_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad)
    prev, views = _forward_layers(X, params, sizes, activations, output, A, D, grad)
    Ws, bs, dWs, dbs, As, Ds = views
    value = _loss(prev, labels, targets, loss, output, Ds[-1])
    for l in range(len(Ws) - 1, -1, -1):
        if l == 0:
            dense_backward(Ds[0], X, Ws[0], dWs[0], dbs[0], None)
        else:
            dense_backward(Ds[l], As[l - 1], Ws[l], dWs[l], dbs[l], Ds[l - 1])
            activation_backward(As[l - 1], Ds[l - 1], activations[l - 1], Ds[l - 1])
    return value


def mlp_sgd_step(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                 momentum_buffer, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 maximize=False, first_step=False):
    """One SGD training step of a whole network: `mlp_gradients`, then, if the loss
    and every gradient are finite, `sgd_update`.

    Parameters
    ----------
    X, labels, targets, params, sizes, activations, loss, output, A, D, grad
        As `mlp_gradients`. The compiled kernel may skip `grad` (leaving it
        undefined) by folding the update into the weight-gradient product
        (``W -= lr * dZ.T @ X`` in one GEMM) where that is exact up to rounding.
    momentum_buffer : ndarray, shape (p,), or None
        Needed when momentum is not 0.
    lr, momentum, dampening, nesterov, weight_decay, maximize, first_step
        As `sgd_update`.

    Returns
    -------
    (loss, status)
        The mean loss before the update; status 0 when the update was made,
        1 when the loss or a gradient is not finite: then neither params nor
        momentum_buffer changed.
    """
    check_step_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                    momentum_buffer, momentum, nesterov, dampening)
    value = mlp_gradients(X, labels, targets, params, sizes, activations, loss, output, A, D, grad)
    if not (np.isfinite(value) and all_finite(grad)):
        return value, 1
    sgd_update(params, grad, momentum_buffer if momentum else None, lr, momentum, dampening,
               nesterov, weight_decay, maximize, first_step)
    return value, 0


def mlp_sgd_epoch(X, labels, targets, order, batch_size, params, sizes, activations, loss, output,
                  A, D, grad, X_batch, labels_batch, targets_batch, momentum_buffer, stop, lr,
                  momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
                  first_step=False):
    """One epoch of mini-batch SGD on a whole network: for each batch of `order`,
    gather its rows, `mlp_gradients`, then `sgd_update`.

    Parameters
    ----------
    X, labels, targets : the training set, as `mlp_gradients` takes a batch
        (labels (N,) for cross_entropy, else targets (N, sizes[-1])).
    order : ndarray of int64, shape (m,)
        Rows of X in the order they are used; batch k is
        ``order[k * batch_size:(k + 1) * batch_size]`` (the last may be smaller).
    batch_size : int
    params, sizes, activations, loss, output, A, D, grad
        As `mlp_gradients` (work buffers sized for batch_size rows).
    X_batch : ndarray, shape (>= min(batch_size, m), sizes[0])
    labels_batch : ndarray of int64, shape (X_batch rows,), or None
    targets_batch : ndarray, shape (X_batch rows, sizes[-1]), or None
        Scratch buffers the batch rows are gathered into (the compiled kernel
        reads a batch of consecutive rows, as every batch without shuffling, in
        place instead: the same results).
    momentum_buffer : ndarray, shape (p,), or None
    stop : ndarray of int8, shape (1,)
        Checked after every step: non-zero ends the epoch there (set it from
        a signal handler to stop after the current batch).
    lr, momentum, dampening, nesterov, weight_decay, maximize, first_step
        As `sgd_update`; first_step applies to the epoch's first step only.

    Returns
    -------
    (loss_sum, steps, status)
        loss_sum: the batches' mean losses weighted by their sizes; steps: the
        updates made; status: 0 when the epoch is complete, 1 when it stopped
        at a batch whose loss or gradient is not finite (that batch was not
        applied), 2 when `stop` was set.
    """
    check_epoch_call(X, labels, targets, order, batch_size, params, sizes, activations, loss, output,
                     A, D, grad, X_batch, labels_batch, targets_batch, momentum_buffer, momentum,
                     nesterov, dampening, stop)
    return _epoch(X, labels, targets, order, batch_size, params, sizes, activations, loss, output,
                  A, D, grad, X_batch, labels_batch, targets_batch, stop,
                  lambda k: sgd_update(params, grad, momentum_buffer if momentum else None, lr,
                                       momentum, dampening, nesterov, weight_decay, maximize,
                                       first_step and k == 0))


def _epoch(X, labels, targets, order, batch_size, params, sizes, activations, loss, output, A, D,
           grad, X_batch, labels_batch, targets_batch, stop, update):
    """The batch loop of both epochs, on checked arguments: gather each batch's
    rows, `mlp_gradients`, and if the loss and gradient are finite `update(k)` for
    the epoch's k-th step (from 0). Returns (loss_sum, steps, status)."""
    loss_sum, steps = 0.0, 0
    for lo in range(0, order.shape[0], batch_size):
        rows = order[lo:lo + batch_size]
        nb = rows.shape[0]
        Xb = np.take(X, rows, axis=0, out=X_batch[:nb])
        lb = None if labels is None else np.take(labels, rows, out=labels_batch[:nb])
        tb = None if targets is None else np.take(targets, rows, axis=0, out=targets_batch[:nb])
        value = mlp_gradients(Xb, lb, tb, params, sizes, activations, loss, output, A, D, grad)
        if not (np.isfinite(value) and all_finite(grad)):
            return loss_sum, steps, 1
        update(steps)
        loss_sum += value * nb
        steps += 1
        if stop[0]:
            return loss_sum, steps, 2
    return loss_sum, steps, 0


def mlp_adam_step(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                  exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False):
    """One Adam (or AdamW) training step of a whole network: `mlp_gradients`, then,
    if the loss and every gradient are finite, `adam_update`.

    Parameters as `mlp_gradients` and `adam_update` (`step`: the number of this
    update, counting from 1).

    Returns
    -------
    (loss, status)
        As `mlp_sgd_step`: status 1 (nothing changed) when the loss or a
        gradient is not finite.
    """
    check_adam_step_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                         exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad)
    value = mlp_gradients(X, labels, targets, params, sizes, activations, loss, output, A, D, grad)
    if not (np.isfinite(value) and all_finite(grad)):
        return value, 1
    adam_update(params, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,
                weight_decay, decoupled_weight_decay, amsgrad, maximize)
    return value, 0


def mlp_adam_epoch(X, labels, targets, order, batch_size, params, sizes, activations, loss, output,
                   A, D, grad, X_batch, labels_batch, targets_batch, exp_avg, exp_avg_sq,
                   max_exp_avg_sq, stop, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False):
    """One epoch of mini-batch Adam (or AdamW): `mlp_sgd_epoch` with `mlp_adam_step`
    for each batch; `step` is the number of the epoch's first update (from 1).

    Returns (loss_sum, steps, status) as `mlp_sgd_epoch`.
    """
    check_adam_epoch_call(X, labels, targets, order, batch_size, params, sizes, activations, loss,
                          output, A, D, grad, X_batch, labels_batch, targets_batch, exp_avg,
                          exp_avg_sq, max_exp_avg_sq, stop, step, amsgrad)
    return _epoch(X, labels, targets, order, batch_size, params, sizes, activations, loss, output,
                  A, D, grad, X_batch, labels_batch, targets_batch, stop,
                  lambda k: adam_update(params, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step + k,
                                        lr, beta1, beta2, eps, weight_decay,
                                        decoupled_weight_decay, amsgrad, maximize))

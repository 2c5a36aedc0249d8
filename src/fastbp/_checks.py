"""Argument checks shared by the two kernel backends.

`fastbp.reference` runs these checks on every call. The compiled kernels make
the same checks where they are free (typed memoryviews; the whole-network calls
read plain ndarrays through NumPy's C API) and call these only after a refusal,
to replace a generic message with one that names the argument; an argument that
is not an ndarray (a memoryview, any other buffer) goes to them first. Both
backends therefore raise the same exception types with the same messages for the
same bad input.
"""

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
LABEL_DTYPE = np.dtype(np.int64)

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu")
OUTPUT_ACTIVATIONS = ("identity", "sigmoid", "tanh")

LOSSES = ("cross_entropy", "mse", "binary_cross_entropy")

#: The most weight layers a network may have (the compiled kernels keep per-layer
#: offsets on the stack; _kernels.pyx's MAX_LAYERS is the same number).
MAX_LAYERS = 512

#: Negative slope of ``leaky_relu`` (PyTorch's default).
LEAKY_RELU_SLOPE = 0.01


def check_choice(name, value, choices):
    """Raise unless `value` is one of the strings in `choices`."""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {name} {value!r}; expected one of {valid}")
    return value


def _check_array(name, a, ndim, dtype, writable):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if dtype is None:
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {a.dtype}; expected float32 or float64")
    elif a.dtype != dtype:
        hint = " (all float arguments of a call share one dtype)" if dtype in FLOAT_DTYPES else ""
        raise TypeError(f"{name} has dtype {a.dtype}; expected {dtype}{hint}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {a.ndim}-D with shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; an output must be writable")


#: The array arguments of each kernel, in signature order: (name, ndim, role).
#: role is "in" (read), "out" (written) or "labels" (int64 class labels); a
#: trailing "?" lets an argument be None (an optional output, or one a setting
#: leaves out).
KERNEL_ARRAYS = {
    "dense_forward": (("X", 2, "in"), ("W", 2, "in"), ("b", 1, "in"), ("out", 2, "out")),
    "activation_backward": (("A", 2, "in"), ("dA", 2, "in"), ("out", 2, "out")),
    "dense_backward": (("dZ", 2, "in"), ("X", 2, "in"), ("W", 2, "in"),
                       ("dW", 2, "out"), ("db", 1, "out"), ("dX", 2, "out?")),
    "softmax": (("Z", 2, "in"), ("out", 2, "out")),
    "softmax_cross_entropy": (("Z", 2, "in"), ("y", 1, "labels"), ("dZ", 2, "out?")),
    "mean_squared_error": (("A", 2, "in"), ("Y", 2, "in"), ("dZ", 2, "out?")),
    "binary_cross_entropy_with_logits": (("Z", 2, "in"), ("Y", 2, "in"), ("dZ", 2, "out?")),
    "sgd_update": (("param", 1, "out"), ("grad", 1, "in"), ("momentum_buffer", 1, "out?")),
    "adam_update": (("param", 1, "out"), ("grad", 1, "in"), ("exp_avg", 1, "out"),
                    ("exp_avg_sq", 1, "out"), ("max_exp_avg_sq", 1, "out?")),
    "all_finite": (("x", 1, "in"),),
    "mlp_sgd_epoch": (("X", 2, "in"), ("labels", 1, "labels?"), ("targets", 2, "in?"),
                      ("order", 1, "labels"), ("params", 1, "out"), ("A", 1, "out"),
                      ("D", 1, "out"), ("grad", 1, "out"), ("X_batch", 2, "out"),
                      ("labels_batch", 1, "out_labels?"), ("targets_batch", 2, "out?"),
                      ("momentum_buffer", 1, "out?"), ("stop", 1, "flag")),
    "mlp_gradients": (("X", 2, "in"), ("labels", 1, "labels?"), ("targets", 2, "in?"),
                      ("params", 1, "in"), ("A", 1, "out"), ("D", 1, "out"), ("grad", 1, "out")),
    "mlp_forward": (("X", 2, "in"), ("labels", 1, "labels?"), ("targets", 2, "in?"),
                    ("params", 1, "in"), ("A", 1, "out"), ("out", 2, "out?")),
    "mlp_sgd_step": (("params", 1, "out"), ("momentum_buffer", 1, "out?")),
    "mlp_adam": (("params", 1, "out"), ("grad", 1, "out"), ("exp_avg", 1, "out"),
                 ("exp_avg_sq", 1, "out"), ("max_exp_avg_sq", 1, "out?")),
}


def check_call(kernel, **arrays):
    """Check kind, dtype, dimensions, layout and writability of a kernel's array arguments.

    Arguments are checked in signature order; the first float array fixes the
    dtype that all others must share. Returns that dtype.
    """
    dtype = None
    for name, ndim, role in KERNEL_ARRAYS[kernel]:
        a = arrays[name]
        if a is None and role.endswith("?"):
            continue
        if role.startswith("labels") or role.startswith("out_labels"):
            _check_array(name, a, ndim, LABEL_DTYPE, role.startswith("out"))
        elif role == "flag":
            _check_array(name, a, ndim, np.dtype(np.int8), False)
        else:
            _check_array(name, a, ndim, dtype, role.rstrip("?") == "out")
            dtype = a.dtype
    return dtype


def shape_error(name, expected, actual):
    """The error for an argument of the wrong shape (`expected` may hold None for 'any')."""
    shown = "(" + ", ".join("n" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
    return ValueError(f"{name} has shape {tuple(actual)}; expected {shown}")


def check_shape(name, a, expected):
    """Raise unless ``a.shape`` matches `expected` (None entries match any size)."""
    if len(a.shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, a.shape)):
        raise shape_error(name, expected, a.shape)


def overlap_error(out_name, other_name):
    return ValueError(f"{out_name} overlaps {other_name} in memory; outputs must not alias other arguments")


def _bounds(a):
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def check_no_overlap(out_name, out, others, allow_identical=False):
    """Raise if `out` shares memory with any array of `others` ((name, array) pairs).

    Memory bounds decide (as `np.may_share_memory` does by default). With
    `allow_identical`, an argument that is exactly the same memory as `out`
    (same start and size) is allowed: elementwise kernels can run in place.
    """
    if out is None or out.nbytes == 0:
        return
    for name, a in others:
        if a is None or a.nbytes == 0:
            continue
        if np.may_share_memory(out, a):
            if allow_identical and _bounds(a) == _bounds(out):
                continue
            raise overlap_error(out_name, name)


def check_adam_state(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad):
    """Sizes, aliasing and step of an Adam update (the dtypes are checked by check_call)."""
    size = param.shape
    check_shape("grad", grad, size)
    check_shape("exp_avg", exp_avg, size)
    check_shape("exp_avg_sq", exp_avg_sq, size)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("max_exp_avg_sq is required with amsgrad")
        check_shape("max_exp_avg_sq", max_exp_avg_sq, size)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (the count including this update), got {step!r}")
    arrays = [("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
              ("max_exp_avg_sq", max_exp_avg_sq if amsgrad else None)]
    for k, (name, a) in enumerate(arrays):
        if name != "grad":
            check_no_overlap(name, a, arrays[:k] + arrays[k + 1:])


def _check_network(sizes, activations, loss, output):
    """The checks of a network's description; returns sizes as a tuple."""
    check_choice("loss", loss, LOSSES)
    check_choice("output", output, OUTPUT_ACTIVATIONS)
    if loss != "mse" and output != "identity":
        raise ValueError(f"loss {loss!r} works on logits: output must be 'identity', got {output!r}")
    sizes = tuple(sizes)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                             for s in sizes):
        raise ValueError(f"sizes must be at least two positive integers, got {sizes}")
    activations = tuple(activations)
    if len(activations) != len(sizes) - 2:
        raise ValueError(f"activations has {len(activations)} names for {len(sizes) - 2} hidden layers")
    for a in activations:
        check_choice("activation", a, ACTIVATIONS)
    return sizes


def _check_network_call(kernel, X, labels, targets, params, sizes, activations, loss, output,
                        written, loss_optional):
    """The checks of `mlp_gradients` and `mlp_forward`, in the order both backends
    apply them. written: the arrays the call writes, by name, in signature order
    (work buffers "A" and "D", the gradient "grad", the outputs "out", which may be
    None); loss_optional: labels and targets may both be None (no loss)."""
    sizes = _check_network(sizes, activations, loss, output)
    check_call(kernel, X=X, labels=labels, targets=targets, params=params, **written)
    if loss == "cross_entropy":
        if targets is not None or labels is None and not loss_optional:
            raise ValueError("cross_entropy takes labels, and targets=None")
    elif labels is not None or targets is None and not loss_optional:
        raise ValueError(f"{loss} takes targets, and labels=None")
    n = X.shape[0]
    check_shape("X", X, (None, sizes[0]))
    n_params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    check_shape("params", params, (n_params,))
    if "grad" in written:
        check_shape("grad", written["grad"], (n_params,))
    work = n * sum(sizes[1:])
    for name in ("A", "D"):
        size = written[name].shape[0] if name in written else work
        if size < work:
            raise ValueError(f"{name} has {size} elements; a batch of {n} needs at least {work}")
    if written.get("out") is not None:
        check_shape("out", written["out"], (n, sizes[-1]))
    if labels is not None:
        check_shape("labels", labels, (n,))
    if targets is not None:
        check_shape("targets", targets, (n, sizes[-1]))
    arrays = [("X", X), ("labels", labels), ("targets", targets), ("params", params)]
    arrays += list(written.items())
    for k, (name, a) in enumerate(arrays):
        if name in written:
            check_no_overlap(name, a, arrays[:k] + arrays[k + 1:])
    if n == 0:
        raise empty_batch_error("X")
    if labels is not None:
        bad = np.flatnonzero((labels < 0) | (labels >= sizes[-1]))
        if bad.size:
            raise label_error(bad[0], labels[bad[0]], sizes[-1])


def check_mlp_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad):
    """Every check of `mlp_gradients`, in the order both backends apply them."""
    _check_network_call("mlp_gradients", X, labels, targets, params, sizes, activations, loss,
                        output, {"A": A, "D": D, "grad": grad}, loss_optional=False)


def check_forward_call(X, labels, targets, params, sizes, activations, loss, output, A, out):
    """Every check of `mlp_forward`, in the order both backends apply them."""
    _check_network_call("mlp_forward", X, labels, targets, params, sizes, activations, loss,
                        output, {"A": A, "out": out}, loss_optional=True)


def check_sgd_momentum(momentum_buffer, params, momentum, nesterov, dampening):
    """The momentum checks shared by `mlp_sgd_step` and `mlp_sgd_epoch`."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    if momentum and momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum is not 0")
    if momentum:
        if momentum_buffer.dtype != params.dtype:
            raise TypeError(f"momentum_buffer has dtype {momentum_buffer.dtype}; expected "
                            f"{params.dtype} (all float arguments of a call share one dtype)")
        check_shape("momentum_buffer", momentum_buffer, params.shape)


def check_step_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                    momentum_buffer, momentum, nesterov, dampening):
    """Every check of `mlp_sgd_step`, in the order both backends apply them."""
    check_mlp_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad)
    buf = momentum_buffer if momentum else None
    check_call("mlp_sgd_step", params=params, momentum_buffer=buf)
    check_sgd_momentum(buf, params, momentum, nesterov, dampening)
    if buf is not None:
        check_no_overlap("momentum_buffer", buf, [("X", X), ("labels", labels), ("targets", targets),
                                                  ("params", params), ("A", A), ("D", D),
                                                  ("grad", grad)])


def check_adam_with(others, params, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad):
    """Adam's state in a whole-network call: as `adam_update` checks it, and no
    state array may overlap the call's other arrays (`others`: (name, array) pairs)."""
    vmax = max_exp_avg_sq if amsgrad else None
    check_call("mlp_adam", params=params, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
               max_exp_avg_sq=vmax)
    check_adam_state(params, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad)
    for name, a in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", vmax)):
        check_no_overlap(name, a, others)


def check_adam_step_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                         exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad):
    """Every check of `mlp_adam_step`, in the order both backends apply them."""
    check_mlp_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad)
    check_adam_with([("X", X), ("labels", labels), ("targets", targets), ("A", A), ("D", D)],
                    params, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad)


def check_adam_epoch_call(X, labels, targets, order, batch_size, params, sizes, activations, loss,
                          output, A, D, grad, X_batch, labels_batch, targets_batch, exp_avg,
                          exp_avg_sq, max_exp_avg_sq, stop, step, amsgrad):
    """Every check of `mlp_adam_epoch`, in the order both backends apply them."""
    check_epoch_call(X, labels, targets, order, batch_size, params, sizes, activations, loss,
                     output, A, D, grad, X_batch, labels_batch, targets_batch, None, 0.0, False,
                     0.0, stop)
    check_adam_with([("X", X), ("labels", labels), ("targets", targets), ("order", order),
                     ("A", A), ("D", D), ("X_batch", X_batch), ("labels_batch", labels_batch),
                     ("targets_batch", targets_batch), ("stop", stop)],
                    params, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad)


def check_epoch_call(X, labels, targets, order, batch_size, params, sizes, activations, loss,
                     output, A, D, grad, X_batch, labels_batch, targets_batch, momentum_buffer,
                     momentum, nesterov, dampening, stop):
    """Every check of `mlp_sgd_epoch`, in the order both backends apply them."""
    check_call("mlp_sgd_epoch", X=X, labels=labels, targets=targets, order=order, params=params,
               A=A, D=D, grad=grad, X_batch=X_batch, labels_batch=labels_batch,
               targets_batch=targets_batch, momentum_buffer=momentum_buffer if momentum else None,
               stop=stop)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    if momentum and momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum is not 0")
    check_shape("stop", stop, (1,))
    n = X.shape[0]
    check_shape("order", order, (None,))
    bad = np.flatnonzero((order < 0) | (order >= n))
    if bad.size:
        raise ValueError(f"order[{bad[0]}] = {order[bad[0]]} is not a row of X (n = {n})")
    rows = min(batch_size, order.shape[0])
    if order.shape[0] == 0:
        raise ValueError("order is empty: an epoch needs at least one sample")
    check_shape("X_batch", X_batch, (None, X.shape[1]))
    if X_batch.shape[0] < rows:
        raise ValueError(f"X_batch has {X_batch.shape[0]} rows; batches of {rows} need that many")
    if (labels is None) != (labels_batch is None) or (targets is None) != (targets_batch is None):
        raise ValueError("labels_batch goes with labels, targets_batch with targets")
    if labels is not None:
        check_shape("labels", labels, (n,))
        check_shape("labels_batch", labels_batch, (X_batch.shape[0],))
    if targets is not None:
        check_shape("targets", targets, (n, None))
        check_shape("targets_batch", targets_batch, (X_batch.shape[0], targets.shape[1]))
    if momentum:
        check_shape("momentum_buffer", momentum_buffer, params.shape)
    arrays = [("X", X), ("labels", labels), ("targets", targets), ("order", order),
              ("params", params), ("A", A), ("D", D), ("grad", grad), ("X_batch", X_batch),
              ("labels_batch", labels_batch), ("targets_batch", targets_batch),
              ("momentum_buffer", momentum_buffer if momentum else None), ("stop", stop)]
    writable = ("params", "A", "D", "grad", "X_batch", "labels_batch", "targets_batch", "momentum_buffer")
    for k, (name, a) in enumerate(arrays):
        if name in writable:
            check_no_overlap(name, a, arrays[:k] + arrays[k + 1:])
    # the network part, as mlp_gradients checks it, on a full batch
    check_mlp_call(X_batch[:rows], None if labels is None else labels[order[:rows]],
                   None if targets is None else targets_batch[:rows], params, sizes, activations,
                   loss, output, A, D, grad)
    if labels is not None:
        bad = np.flatnonzero((labels < 0) | (labels >= sizes[-1]))
        if bad.size:
            raise label_error(bad[0], labels[bad[0]], sizes[-1])


def empty_batch_error(name):
    return ValueError(f"{name} has no samples; a loss needs at least one")


def label_error(index, value, n_classes):
    return ValueError(f"y[{index}] = {value} is not a class label in [0, {n_classes})")

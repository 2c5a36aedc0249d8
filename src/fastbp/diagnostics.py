"""What happens inside a network: per-layer gradient norms, update sizes, saturated
and dead units, and a finite-difference check of the gradients."""

import math

import numpy as np

#: A sigmoid or tanh unit counts as saturated where its derivative is below
#: this fraction of its maximum (1/4 for sigmoid, 1 for tanh).
SATURATION_FRACTION = 0.01


def layer_statistics(net, X, y, before=None):
    """Per-layer statistics of `net` on a batch (validated arrays of its dtype).

    Returns a dict of lists, one entry per weight layer (input side first):

    ``grad_norm``
        L2 norm of the layer's gradient (weights and bias) on the batch.
    ``update_ratio``
        ``||W - W_before|| / ||W_before||`` when `before` (a copy of
        ``net.params`` taken earlier) is given, else None.
    ``saturated``
        For sigmoid and tanh hidden layers, the fraction of (sample, unit)
        activations whose derivative is below 1% of its maximum; None for
        other layers.
    ``dead``
        For relu hidden layers, the fraction of units that output 0 for every
        sample of the batch; None for other layers.
    """
    grad = net._grad  # the network's gradient scratch (fit's steps are done with it)
    net._loss_and_gradients(X, y, grad)  # leaves the batch's activations in net._A
    n = X.shape[0]
    # the compiled backend sums everything in one call (fit runs this every epoch)
    layer_sums = getattr(net._kernels, "_layer_sums", _layer_sums_numpy)
    sums = layer_sums(net.params, net.params if before is None else before, grad, net._A, n,
                      net.sizes, net.activations, before is not None, SATURATION_FRACTION)
    stats = {"grad_norm": [], "update_ratio": [], "saturated": [], "dead": []}
    for l, (grad_sq, base, moved, saturated, dead) in enumerate(sums.tolist()):
        stats["grad_norm"].append(math.sqrt(grad_sq))
        stats["update_ratio"].append(None if before is None or not base > 0
                                     else math.sqrt(moved / base))
        act = net.activations[l] if l < net.n_layers - 1 else None
        n_out = net.sizes[l + 1]
        stats["saturated"].append(saturated / (n * n_out) if act in ("sigmoid", "tanh") else None)
        stats["dead"].append(dead / n_out if act == "relu" else None)
    return stats


def _layer_sums_numpy(params, before, grad, A, n, sizes, activations, moved,
                      saturation_fraction):
    """The specification of `fastbp._kernels._layer_sums`: per layer l, row l of a
    (n_layers, 5) float64 array holds the sum of squares of its gradient (W and b),
    of its W in `before`, of its W's change ``params - before`` (if `moved`, else
    0), the number of saturated activations (sigmoid, tanh hidden layers) and of
    dead units (relu hidden layers: 0 or less on all n rows). A is the flat
    activation workspace in `mlp_gradients`' layout."""
    out = np.zeros((len(sizes) - 1, 5))
    start = a_start = 0
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        # a layer's W and b are one contiguous span of the flat layout
        w_end, end = start + n_out * n_in, start + (n_in + 1) * n_out
        g, w0 = grad[start:end].astype(np.float64), before[start:w_end].astype(np.float64)
        out[l, 0], out[l, 1] = np.dot(g, g), np.dot(w0, w0)
        if moved:
            dw = (params[start:w_end] - before[start:w_end]).astype(np.float64)
            out[l, 2] = np.dot(dw, dw)
        act = activations[l] if l < len(sizes) - 2 else None
        acts = A[a_start:a_start + n * n_out].reshape(n, n_out)
        if act == "sigmoid":
            out[l, 3] = np.count_nonzero(acts * (1 - acts) < saturation_fraction * 0.25)
        elif act == "tanh":
            out[l, 3] = np.count_nonzero(1 - acts * acts < saturation_fraction)
        elif act == "relu" and n:
            out[l, 4] = np.count_nonzero(acts.max(axis=0) <= 0)
        start, a_start = end, a_start + n * n_out
    return out


def gradcheck(net, X, y, eps=1e-6):
    """Largest relative error between `net`'s analytic gradients and central finite differences.

    The check runs on a float64 copy of the network with the NumPy backend
    (whatever `net`'s dtype and backend), so it measures the mathematics, not
    float32 rounding: a correct network gives about 1e-7 or less. Every
    parameter is perturbed: keep the network and batch small.

    The relative error of one parameter is ``|analytic - numeric|`` divided by
    ``max(|analytic|, |numeric|, 0.01 * largest)``, where largest is the
    largest gradient magnitude: central differences carry an absolute error of
    about 1e-10 (float64 rounding of the loss, divided by eps), which would
    read as a large relative error on gradients a thousand times smaller than
    the others. Errors in the mathematics show as 1e-3 and more.
    """
    from .network import MLP

    twin = MLP.from_arrays([W.astype(np.float64) for W in net.weights],
                           [b.astype(np.float64) for b in net.biases],
                           activation=list(net.activations), loss=net.loss, output=net.output,
                           dtype=np.float64, backend="numpy")
    X, y = twin._as_batch(X, y)
    analytic = np.empty_like(twin.params)
    twin._loss_and_gradients(X, y, analytic)
    numeric = np.empty_like(analytic)
    p = twin.params
    for i in range(p.size):
        old = p[i]
        p[i] = old + eps
        up = twin._evaluate_checked(X, y)
        p[i] = old - eps
        down = twin._evaluate_checked(X, y)
        p[i] = old
        numeric[i] = (up - down) / (2 * eps)
    floor = 1e-2 * max(np.max(np.abs(analytic)), np.max(np.abs(numeric)), 1e-300)
    return float(np.max(np.abs(analytic - numeric) / np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)))

"""The memory layout of a network: one flat parameter buffer, one flat work buffer."""

import numpy as np

#: Where fastbp's own buffers start: a cache line. An AVX-512 load or store that
#: straddles two lines costs about two; NumPy only promises 16 bytes.
ALIGNMENT = 64


def aligned_empty(shape, dtype, fill=None):
    """An uninitialised array (filled with `fill` if given) whose data starts on a
    64-byte boundary: a view into a slightly larger buffer."""
    dtype = np.dtype(dtype)
    nbytes = _size(shape if isinstance(shape, tuple) else (shape,)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    out = raw[start:start + nbytes].view(dtype).reshape(shape)
    if fill is not None:
        out[...] = fill
    return out


def mlp_views(sizes, n, params, A, D, grad):
    """Views of a flat MLP for a batch of n rows.

    Returns lists, one entry per layer: W (n_out, n_in) and b (n_out,) into
    `params`, dW and db into `grad` (the same layout: layer after layer, W then
    b), and the (n, n_out) blocks of the work buffers A (activations) and D
    (their gradients), layer l's block at offset n * sum(sizes[1:l + 1]).
    Any of params, A, D, grad may be None (its lists are then None too).
    """
    Ws, bs, As = [], [], []
    p = a = 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        Ws.append((p, (n_out, n_in)))
        p += n_out * n_in
        bs.append((p, (n_out,)))
        p += n_out
        As.append((a, (n, n_out)))
        a += n * n_out

    def views(flat, spans):
        if flat is None:
            return None
        return [flat[o:o + _size(shape)].reshape(shape) for o, shape in spans]

    return (views(params, Ws), views(params, bs), views(grad, Ws), views(grad, bs),
            views(A, As), views(D, As))


def _size(shape):
    size = 1
    for s in shape:
        size *= s
    return size

"""The memory layout of a network: one flat parameter buffer, one flat work buffer."""

import weakref

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


class _AlignedOnLoad:
    """Stands for an array in a state being pickled or deep-copied, which then comes
    back as an aligned copy (`aligned_empty`; NumPy's own unpickling gives 16 bytes)."""

    __slots__ = ("array", "__weakref__")

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return _aligned_copy, (self.array,)


# id(array) -> its stand-in, while a pickling or a deepcopy holds the stand-in
_STAND_INS = weakref.WeakValueDictionary()


def aligned_on_load(array):
    """What to put in a `__getstate__` for `array` (None passes through) so that it
    is restored 64-byte aligned. An array that two objects share (a network's
    params and its optimizer's) gets one stand-in for as long as the pickling
    holds it, so pickle's and deepcopy's memo restore it once, still shared."""
    if array is None:
        return None
    stand_in = _STAND_INS.get(id(array))
    if stand_in is None or stand_in.array is not array:
        stand_in = _STAND_INS[id(array)] = _AlignedOnLoad(array)
    return stand_in


def _aligned_copy(array):
    return aligned_empty(array.shape, array.dtype, fill=array)


def restored(value):
    """In a `__setstate__`: the array itself where `copy.copy` (which copies no
    state) hands back the stand-in of `aligned_on_load`; else `value`."""
    return value.array if isinstance(value, _AlignedOnLoad) else value


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

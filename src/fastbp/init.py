"""Weight initialisers: the standard schemes, or a callable of the user's.

Every scheme draws in float64 from the network's own random generator, so a
float32 and a float64 network built with the same seed start from the same
weights (up to rounding).
"""

import math

import numpy as np

INITIALIZERS = ("torch", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal")

#: Short names, as the papers used them: Glorot & Bengio (2010) drew uniformly,
#: He et al. (2015) from a Gaussian.
ALIASES = {"glorot": "glorot_uniform", "he": "he_normal"}


def _draw(scheme, n_in, n_out, rng):
    if scheme == "torch":
        # torch.nn.Linear's default: U(-1/sqrt(n_in), 1/sqrt(n_in)) for W and b.
        bound = 1 / math.sqrt(n_in)
        W = rng.uniform(-bound, bound, size=(n_out, n_in))
        return W, rng.uniform(-bound, bound, size=n_out)
    if scheme == "glorot_uniform":
        limit = math.sqrt(6 / (n_in + n_out))
        W = rng.uniform(-limit, limit, size=(n_out, n_in))
    elif scheme == "glorot_normal":
        W = rng.normal(0, math.sqrt(2 / (n_in + n_out)), size=(n_out, n_in))
    elif scheme == "he_uniform":
        limit = math.sqrt(6 / n_in)
        W = rng.uniform(-limit, limit, size=(n_out, n_in))
    elif scheme == "he_normal":
        W = rng.normal(0, math.sqrt(2 / n_in), size=(n_out, n_in))
    else:  # lecun_normal
        W = rng.normal(0, math.sqrt(1 / n_in), size=(n_out, n_in))
    return W, np.zeros(n_out)


def check_init(init):
    """Resolve an initialiser name (or alias) or accept a callable; raise on anything else."""
    if callable(init):
        return init
    if isinstance(init, str):
        init = ALIASES.get(init, init)
        if init in INITIALIZERS:
            return init
    valid = ", ".join(repr(name) for name in INITIALIZERS + tuple(ALIASES))
    raise ValueError(f"unknown init {init!r}; expected one of {valid}, or a callable")


def initial_parameters(init, sizes, rng):
    """Initial (W, b) of every layer, as float64 arrays.

    Parameters
    ----------
    init : str or callable
        A name of `INITIALIZERS` (or `ALIASES`), or ``init(n_in, n_out, rng)``
        returning ``(W, b)`` with W of shape (n_out, n_in) and b of shape (n_out,).
    sizes : sequence of int
        Layer widths, input first.
    rng : numpy.random.Generator
    """
    init = check_init(init)
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        if callable(init):
            result = init(n_in, n_out, rng)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError("an init callable must return a tuple (W, b)")
            W, b = (np.asarray(a, dtype=np.float64) for a in result)
            if W.shape != (n_out, n_in) or b.shape != (n_out,):
                raise ValueError(f"init returned W of shape {W.shape} and b of shape {b.shape}; "
                                 f"expected {(n_out, n_in)} and {(n_out,)}")
            if not (np.isfinite(W).all() and np.isfinite(b).all()):
                raise ValueError("init returned NaN or infinite values")
        else:
            W, b = _draw(init, n_in, n_out, rng)
        layers.append((W, b))
    return layers

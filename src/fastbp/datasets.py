"""Real data sets and readers: scikit-learn's digits, MNIST's IDX files, splitting
and standardising."""

import gzip
import numbers
import struct

import numpy as np

# IDX type codes (the third byte of the magic number) and their big-endian dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_digits():
    """scikit-learn's bundled 8x8 handwritten digits (1797 samples, 10 classes).

    Returns
    -------
    X : ndarray of float64, shape (1797, 64)
        Pixel intensities 0..16.
    y : ndarray of int64, shape (1797,)

    Needs scikit-learn (an optional extra: ``pip install "fastbp[datasets]"``
    or ``pip install scikit-learn``); the data ship with it, nothing is downloaded.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        raise ImportError("load_digits needs scikit-learn, which ships the data: "
                          "pip install scikit-learn (or fastbp[datasets])") from None
    data = sklearn_load_digits()
    return data.data.astype(np.float64), data.target.astype(np.int64)


def load_idx(path):
    """Read an IDX file (the format of MNIST), raw or gzip-compressed.

    Returns an ndarray of the file's dtype (native byte order) and shape.
    Raises ValueError for a file that is not valid IDX (bad magic number,
    unknown type, truncated or over-long data).
    """
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        raw = gzip.decompress(f.read()) if head == b"\x1f\x8b" else f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[code])
    count = int(np.prod(shape, dtype=object))
    expected = 4 + 4 * ndim + count * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX data is {len(raw)} bytes, expected {expected} for shape {shape}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=4 + 4 * ndim)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def train_test_split(X, y, test_size=0.25, *, stratify=False, seed=None):
    """Split arrays into random train and test parts.

    Parameters
    ----------
    X, y : array_like with the same number of samples
    test_size : float in (0, 1) or int
        Fraction or number of test samples.
    stratify : bool
        Keep each class's share (y must be class labels) in both parts.
    seed : int, Generator or None

    Returns
    -------
    X_train, X_test, y_train, y_test
    """
    X, y = np.asarray(X), np.asarray(y)
    for name, a in (("X", X), ("y", y)):
        if a.ndim == 0:  # (y=None had raised IndexError)
            raise ValueError(f"{name} must be an array of samples, got {a.item()!r}")
    n = X.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"X has {n} samples but y has {y.shape[0]}")
    if isinstance(test_size, numbers.Integral) and not isinstance(test_size, bool):
        n_test = int(test_size)
    elif isinstance(test_size, numbers.Real) and 0 < test_size < 1:
        n_test = int(np.ceil(test_size * n))
    else:
        raise ValueError(f"test_size must be a fraction in (0, 1) or a sample count, got {test_size!r}")
    if not 0 < n_test < n:
        raise ValueError(f"test_size={test_size!r} leaves {n_test} test samples of {n}")
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(n)
        test = order[:n_test]
    else:
        classes, y_index = np.unique(y, return_inverse=True)
        counts = np.bincount(y_index)
        # each class's share of the test set, rounded so that the total is n_test
        quota = counts * n_test / n
        take = np.floor(quota).astype(int)
        rest = n_test - take.sum()
        take[np.argsort(-(quota - take), kind="stable")[:rest]] += 1
        test = np.concatenate([rng.permutation(np.flatnonzero(y_index == c))[:take[c]]
                               for c in range(len(classes))])
        test = rng.permutation(test)
    mask = np.zeros(n, bool)
    mask[test] = True
    train = rng.permutation(np.flatnonzero(~mask))
    return X[train], X[test], y[train], y[test]


def standardize(X, mean=None, std=None):
    """Zero mean and unit variance per feature: ``(X - mean) / std``.

    With mean and std None, they are computed from X (constant features get
    std 1). Pass the training set's to transform a test set the same way.

    Returns
    -------
    X_standardized, mean, std
    """
    X = np.asarray(X, dtype=np.float64)
    # (NaN had spread over its whole feature, no rows gave NaN statistics with a
    # RuntimeWarning, a std of 0 given gave infinities)
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinity")
    if (mean is None or std is None) and X.shape[0] == 0:
        raise ValueError("X has no samples to take the mean and std from")
    given = mean is not None, std is not None
    with np.errstate(over="ignore", invalid="ignore"):
        if mean is None:
            mean = X.mean(axis=0)
        if std is None:
            std = X.std(axis=0)
            std = np.where(std > 0, std, 1.0)
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    for name, value, was_given in (("mean", mean, given[0]), ("std", std, given[1])):
        if np.isfinite(value).all() and (name == "mean" or (value > 0).all()):
            continue
        if was_given:
            raise ValueError(f"the given {name} must be finite"
                             + (" and positive" if name == "std" else ""))
        raise ValueError(f"X's {name} overflows (values of X near 1e308)")
    with np.errstate(over="ignore"):
        Z = (X - mean) / std
    if not np.isfinite(Z).all():
        raise ValueError("the standardized X overflows (values of X near 1e308?)")
    return Z, mean, std

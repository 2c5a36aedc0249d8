"""Data sets and readers: IDX files written here, digits from scikit-learn, splits."""

import builtins
import gzip
import struct

import numpy as np
import pytest

from fastbp import datasets


def write_idx(path, array, code, compress=False):
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(dtype).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)
    return raw


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("code, values", [
    (0x08, np.arange(2 * 3 * 4).reshape(2, 3, 4) * 10),  # images, as MNIST's
    (0x0C, np.array([-5, 0, 70000])),
    (0x0D, np.array([[1.5, -2.25]])),
    (0x0E, np.array([np.pi, -1e300])),
])
def test_load_idx_round_trip(tmp_path, compress, code, values):
    path = tmp_path / "data.idx"
    write_idx(path, values, code, compress)
    loaded = datasets.load_idx(path)
    np.testing.assert_array_equal(loaded, values)
    assert loaded.dtype.isnative


def test_load_idx_rejects_bad_files(tmp_path):
    path = tmp_path / "bad"
    raw = write_idx(path, np.arange(10), 0x08)
    cases = {
        b"\x01\x00" + raw[2:]: "magic",
        raw[:2] + b"\x07" + raw[3:]: "type",
        raw[:-1]: "bytes, expected",
        raw + b"\x00": "bytes, expected",
        raw[:6]: "truncated",
        b"": "magic",
    }
    for content, message in cases.items():
        path.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            datasets.load_idx(path)


def test_train_test_split_stratified():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    X = np.arange(100)[:, None]
    X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, 0.25, stratify=True, seed=0)
    assert len(y_test) == 25 and len(y_train) == 75
    assert np.bincount(y_test).tolist() == [12, 8, 5] or np.bincount(y_test).tolist() == [13, 7, 5]
    assert sorted(np.concatenate([X_train[:, 0], X_test[:, 0]])) == list(range(100))
    np.testing.assert_array_equal(y[X_test[:, 0]], y_test)  # rows stay paired
    again = datasets.train_test_split(X, y, 0.25, stratify=True, seed=0)
    np.testing.assert_array_equal(again[1], X_test)
    plain = datasets.train_test_split(X, y, 10, seed=1)
    assert len(plain[1]) == 10
    with pytest.raises(ValueError, match="test_size"):
        datasets.train_test_split(X, y, 1.5)
    with pytest.raises(ValueError, match="samples"):
        datasets.train_test_split(X, y[:5])
    with pytest.raises(ValueError, match="y must be an array of samples, got None"):
        datasets.train_test_split(X, None)  # (had raised IndexError)


def test_standardize():
    X = np.array([[1.0, 5.0], [3.0, 5.0]])
    Z, mean, std = datasets.standardize(X)
    np.testing.assert_array_equal(Z, [[-1, 0], [1, 0]])
    Z2, _, _ = datasets.standardize(np.array([[5.0, 6.0]]), mean, std)
    np.testing.assert_array_equal(Z2, [[3, 1]])
    # refused, where they had given NaN or infinities (and RuntimeWarnings)
    for bad, message in ((np.array([[np.nan, 1.0], [2.0, 3.0]]), "NaN"),
                         (np.zeros((0, 2)), "no samples"),
                         (np.array([[1e308, -1e308], [1e308, 1e308]]), "mean overflows")):
        with pytest.raises(ValueError, match=message):
            datasets.standardize(bad)
    with pytest.raises(ValueError, match="the given std must be finite and positive"):
        datasets.standardize(X, mean, np.array([1.0, 0.0]))


def test_load_digits():
    pytest.importorskip("sklearn")
    X, y = datasets.load_digits()
    assert X.shape == (1797, 64) and y.shape == (1797,) and X.dtype == np.float64
    assert X.min() == 0 and X.max() == 16 and sorted(set(y)) == list(range(10))


def test_load_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        datasets.load_digits()


def test_core_imports_without_extras():
    import subprocess
    import sys

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('sklearn', 'matplotlib', 'tqdm', 'torch', 'threadpoolctl'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import fastbp, numpy as np\n"
            "net = fastbp.MLP([3, 4, 2], seed=0)\n"
            "h = net.fit(np.ones((8, 3)), np.zeros(8, int), epochs=2, progress=None)\n"
            "print(len(h))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"

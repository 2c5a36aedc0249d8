"""fit on scikit-learn's digits: fastbp against scikit-learn's MLPClassifier.

The training issue's settings (`fastbp.bench.digits_split`, `fit_digits_fastbp`,
`fit_digits_sklearn`): 75/25 stratified split, standardised, sizes [64, 128, 10],
relu, SGD lr 0.05 momentum 0.9 (no Nesterov), batch 32, 30 epochs, no L2
(alpha 0), no early stopping. Each benchmark records the test accuracy it
reached; compare the two medians of one run (``python -m fastbp bench --fit``
times the two in interleaved rounds instead).
"""

import numpy as np
import pytest

from fastbp.bench import digits_split, fit_digits_fastbp, fit_digits_sklearn

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    return digits_split()


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_fit_fastbp(record_threads, digits, backend):
    X_train, X_test, y_train, y_test = digits
    record_threads.group = "fit digits 64-128-10, 30 epochs"
    accuracies = []

    def fit():
        accuracies.append(fit_digits_fastbp(X_train, y_train, backend).score(X_test, y_test))

    record_threads.pedantic(fit, rounds=5, warmup_rounds=1)
    record_threads.extra_info["test_accuracy"] = float(np.median(accuracies))
    assert min(accuracies) >= 0.97


def test_fit_sklearn(record_threads, digits):
    X_train, X_test, y_train, y_test = digits
    record_threads.group = "fit digits 64-128-10, 30 epochs"
    accuracies = []

    def fit():
        accuracies.append(fit_digits_sklearn(X_train, y_train).score(X_test, y_test))

    record_threads.pedantic(fit, rounds=5, warmup_rounds=1)
    record_threads.extra_info["test_accuracy"] = float(np.median(accuracies))

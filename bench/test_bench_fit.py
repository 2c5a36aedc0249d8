"""fit on scikit-learn's digits: fastbp against scikit-learn's MLPClassifier.

The training issue's settings: 75/25 stratified split, standardised, sizes
[64, 128, 10], relu, SGD lr 0.05 momentum 0.9 (no Nesterov), batch 32, 30
epochs, no L2 (alpha 0), no early stopping. Each benchmark records the test
accuracy it reached; compare the two medians of one run.
"""

import warnings

import numpy as np
import pytest

import fastbp
from fastbp.datasets import load_digits, standardize, train_test_split

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(X, y, 0.25, stratify=True, seed=0)
    X_train, mean, std = standardize(X_train)
    X_test, _, _ = standardize(X_test, mean, std)
    return X_train, X_test, y_train, y_test


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_fit_fastbp(record_threads, digits, backend):
    X_train, X_test, y_train, y_test = digits
    record_threads.group = "fit digits 64-128-10, 30 epochs"
    accuracies = []

    def fit():
        net = fastbp.MLP([64, 128, 10], activation="relu", seed=0, backend=backend)
        net.fit(X_train, y_train, epochs=30, batch_size=32,
                optimizer=fastbp.SGD(net.params, lr=0.05, momentum=0.9))
        accuracies.append(net.score(X_test, y_test))

    record_threads.pedantic(fit, rounds=5, warmup_rounds=1)
    record_threads.extra_info["test_accuracy"] = float(np.median(accuracies))
    assert min(accuracies) >= 0.97


def test_fit_sklearn(record_threads, digits):
    from sklearn.neural_network import MLPClassifier

    X_train, X_test, y_train, y_test = digits
    record_threads.group = "fit digits 64-128-10, 30 epochs"
    accuracies = []

    def fit():
        clf = MLPClassifier(hidden_layer_sizes=(128,), activation="relu", solver="sgd", alpha=0.0,
                            batch_size=32, learning_rate_init=0.05, momentum=0.9,
                            nesterovs_momentum=False, max_iter=30, early_stopping=False,
                            n_iter_no_change=10**9, tol=0.0, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # max_iter reached: intended
            clf.fit(X_train, y_train)
        accuracies.append(clf.score(X_test, y_test))

    record_threads.pedantic(fit, rounds=5, warmup_rounds=1)
    record_threads.extra_info["test_accuracy"] = float(np.median(accuracies))

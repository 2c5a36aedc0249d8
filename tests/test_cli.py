"""The command line: `python -m fastbp train` trains and reports a real accuracy."""

import re
import subprocess
import sys

import pytest

from fastbp.cli import main, spirals


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastbp", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "train" in result.stdout


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_train_learns_the_spirals(backend):
    result = run("train", "--epochs", "120", "--backend", backend)
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", result.stdout).group(1))
    assert accuracy > 0.9, result.stdout  # chance is 1/3


@pytest.mark.parametrize("option", ["--hidden", "--epochs", "--batch-size"])
def test_bad_option_is_a_usage_error(capsys, option):
    with pytest.raises(SystemExit) as info:
        main(["train", option, "0"])
    assert info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_bad_learning_rate_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--lr", "-1", "--epochs", "1"])
    assert info.value.code == 2
    assert "invalid lr" in capsys.readouterr().err


def test_spirals_shape_and_classes():
    X, y = spirals(n_per_class=50, n_classes=4, seed=1)
    assert X.shape == (200, 2) and sorted(set(y)) == [0, 1, 2, 3]

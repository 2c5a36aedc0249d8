"""The command line: `python -m fastbp train` and `vanishing` do what they say."""

import re
import subprocess
import sys

import pytest

from fastbp.cli import main, spirals


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastbp", *args], capture_output=True, text=True,
                          timeout=600)


def accuracy(stdout):
    return float(re.search(r"test accuracy ([0-9.]+)", stdout).group(1))


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "vanishing" in result.stdout


def test_train_digits_reaches_97_percent():
    # The README's main job: digits, 75/25 stratified split, [64, 128, 10], relu,
    # SGD lr 0.05 momentum 0.9, batch 32, 30 epochs.
    pytest.importorskip("sklearn")
    result = run("train", "--dataset", "digits", "--hidden", "128", "--activation", "relu",
                 "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--epochs", "30",
                 "--batch-size", "32", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\nepoch ") == 30
    assert accuracy(result.stdout) >= 0.97, result.stdout


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_train_spirals_on_both_backends(backend):
    result = run("train", "--dataset", "spirals", "--hidden", "64", "64", "--lr", "0.1",
                 "--epochs", "100", "--backend", backend, "--quiet")
    assert result.returncode == 0, result.stderr
    assert accuracy(result.stdout) > 0.9, result.stdout  # chance is 1/3


def test_train_with_adam_writes_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    result = run("train", "--dataset", "spirals", "--optimizer", "adam", "--lr", "0.01",
                 "--epochs", "5", "--quiet", "--plot", str(png))
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_train_save_then_resume_equals_one_run(tmp_path):
    # 3 epochs, save; resume for 4 more in another process: the network of 7 epochs
    ck, once = str(tmp_path / "ck.fbp"), str(tmp_path / "once.fbp")
    common = ("train", "--dataset", "spirals", "--hidden", "32", "--lr", "0.05", "--quiet")
    for args in ((*common, "--epochs", "3", "--save", ck),
                 (*common, "--epochs", "4", "--resume", ck, "--save", ck),
                 (*common, "--epochs", "7", "--save", once)):
        result = run(*args)
        assert result.returncode == 0, result.stderr
    assert "resumed from" in run(*common, "--epochs", "1", "--resume", ck).stdout
    import fastbp

    (a, opt_a), (b, opt_b) = fastbp.load(ck), fastbp.load(once)
    assert a.epoch_ == b.epoch_ == 7 and opt_a.step_count == opt_b.step_count
    assert a.params.tobytes() == b.params.tobytes()


def test_resume_from_a_bad_file_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.fbp"
    bad.write_bytes(b"not a checkpoint")
    result = run("train", "--dataset", "spirals", "--epochs", "1", "--resume", str(bad))
    assert result.returncode == 2 and "not a valid fastbp checkpoint" in result.stderr


def test_vanishing_shows_sigmoid_gradients_shrinking():
    result = run("vanishing", "--depth", "8")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == list(range(1, 10))
    sigmoid = [float(r[1]) for r in rows]
    relu = [float(r[2]) for r in rows]
    assert sigmoid[0] < 1e-2 * sigmoid[-1]  # the first layer learns a hundred times slower
    assert all(a < b for a, b in zip(sigmoid[:3], sigmoid[1:4]))
    assert 0.1 < relu[0] / relu[-1] < 10


@pytest.mark.parametrize("option", ["--hidden", "--epochs", "--batch-size"])
def test_bad_option_is_a_usage_error(capsys, option):
    with pytest.raises(SystemExit) as info:
        main(["train", option, "0"])
    assert info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_a_path_that_cannot_be_written_is_a_usage_error_before_training(tmp_path, capsys):
    # (found after training had run: a traceback, the run lost)
    cases = [("--save", str(tmp_path / "no" / "ck.fbp"), "does not exist"),
             ("--save", str(tmp_path), "is a directory"),
             ("--plot", str(tmp_path / "no" / "curves.png"), "does not exist")]
    for option, path, message in cases:
        with pytest.raises(SystemExit) as info:
            main(["train", "--dataset", "spirals", "--epochs", "1", option, path])
        out, err = capsys.readouterr()
        assert info.value.code == 2 and f"{option} {path}: " in err and message in err
        assert "test accuracy" not in out and "MLP" not in out  # nothing was trained
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "spirals", "--resume", str(tmp_path / "missing.fbp")])
    assert info.value.code == 2 and "missing.fbp: No such file" in capsys.readouterr().err


def test_a_diverging_run_ends_with_a_message_not_a_traceback():
    result = run("train", "--dataset", "spirals", "--lr", "1e30", "--epochs", "2", "--quiet")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("python -m fastbp: error: ") and "not finite" in result.stderr


def test_a_negative_seed_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--seed", "-1"])
    assert info.value.code == 2 and "--seed: expected an integer >= 0" in capsys.readouterr().err


def test_bad_learning_rate_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "spirals", "--lr", "-1", "--epochs", "1"])
    assert info.value.code == 2
    assert "invalid lr" in capsys.readouterr().err


def test_spirals_shape_and_classes():
    X, y = spirals(n_per_class=50, n_classes=4, seed=1)
    assert X.shape == (200, 2) and sorted(set(y)) == [0, 1, 2, 3]


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--workloads", "tiny", "--dtype", "float32,float64", "--seconds", "0.05",
                 "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "% GEMM floor" in result.stdout and "BLAS threads" in result.stdout
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [(r["workload"], r["dtype"]) for r in rows] == [("tiny", "float32"), ("tiny", "float64")]
    for r in rows:
        assert {"fastbp-cython", "fastbp-numpy", "numpy-strong", "gemm-floor"} <= set(r["steps_per_s"])
        assert all(v > 0 for v in r["steps_per_s"].values())
        assert r["rounds"] >= 3 and all(v > 0 for v in r["speedup"].values())


def test_bench_fit_on_digits_against_scikit_learn(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "bench.json"
    result = run("bench", "--workloads", "tiny", "--seconds", "0.05", "--fit", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "fit on digits" in result.stdout and "MLPClassifier" in result.stdout
    import json

    fit = json.loads(out.read_text())["fit_digits"]
    assert fit["rounds"] >= 3 and fit["speedup"] > 0
    assert set(fit["seconds"]) == {"fastbp", "sklearn"} and min(fit["seconds"].values()) > 0
    # the training issue's settings reach 97% on the held-out quarter with either
    assert min(fit["test_accuracy"].values()) >= 0.97


def test_bench_fit_without_scikit_learn(monkeypatch, capsys):
    import sys

    from fastbp import bench

    monkeypatch.setitem(sys.modules, "sklearn.neural_network", None)  # import fails
    assert bench.fit_digits_row(0.01) is None
    assert "scikit-learn is not installed" in bench.format_fit(None)


def test_bench_ratios_are_taken_within_rounds():
    from fastbp.bench import _median_ratio

    # the host slowed down 4x in round 3, between the two candidates, and stayed slow:
    # the rounds' ratios are 2, 2, 8, 2, 2; the ratio of the medians (8 / 1) would be 8
    ours = [1.0, 1.0, 1.0, 4.0, 4.0]
    peer = [2.0, 2.0, 8.0, 8.0, 8.0]
    assert _median_ratio({"ours": ours, "peer": peer}, "peer", "ours") == 2.0


def test_bench_rejects_unknown_workloads(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--workloads", "huge"])
    assert "unknown workload 'huge'" in capsys.readouterr().err


def test_strong_numpy_step_is_the_same_step():
    # the peer must compute what fastbp computes, or the comparison means nothing
    import numpy as np

    import fastbp
    from fastbp.bench import NumpyStep, make_batch

    for loss, sizes in (("cross_entropy", [6, 5, 4, 3]), ("mse", [6, 5, 3])):
        X, y = make_batch(sizes, 8, loss, np.float64)
        net = fastbp.MLP(sizes, activation="relu", loss=loss, dtype=np.float64, seed=0)
        peer = NumpyStep(net.weights, net.biases, loss, 8, lr=0.1)
        opt = fastbp.SGD(net.params, lr=0.1)
        for _ in range(3):
            assert peer(X, y) == pytest.approx(net.step(X, y, opt), rel=1e-12)
        for a, b in zip(peer.W + peer.b, net.weights + net.biases):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)

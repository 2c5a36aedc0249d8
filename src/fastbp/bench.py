"""Training-step throughput of fastbp against its peers: ``python -m fastbp bench``.

Peers, all on the same batch: fastbp's reference backend (plain NumPy), a
strong hand-written NumPy step (preallocated buffers, ``out=`` everywhere),
PyTorch eager on the CPU when installed, and the GEMM floor (the step's GEMMs
alone: forward, dW, and dX for all but the first layer, through the same
product routines as the step, BLAS and fastbp's own product kernel, in one
compiled call). Also the per-step speed of the
compiled epoch `fit` runs, and (``--memory``) allocations per step and the
peak memory of a fit.
Candidates are timed in interleaved rounds in one process; speeds are medians
over rounds, ratios medians of each round's ratio: this machine's speed drifts,
the ratios within a round much less.
"""

import json
import os
import platform
import time

import numpy as np

from .network import MLP
from .optim import SGD

#: name: (sizes, batch, loss); hidden layers are relu, the optimizer plain SGD.
WORKLOADS = {
    "tiny": ([64, 32, 10], 32, "cross_entropy"),
    "small": ([784, 128, 10], 64, "cross_entropy"),
    "mnist": ([784, 256, 128, 10], 128, "cross_entropy"),
    "wide": ([1024, 1024, 1024, 10], 256, "cross_entropy"),
    "large": ([4096, 4096, 4096], 512, "mse"),
}


def make_batch(sizes, batch, loss, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(batch, sizes[0])).astype(dtype)
    if loss == "cross_entropy":
        return X, rng.integers(0, sizes[-1], size=batch)
    return X, rng.normal(size=(batch, sizes[-1])).astype(dtype)


class NumpyStep:
    """A strong NumPy training step: relu MLP, softmax cross-entropy or MSE, plain
    SGD, every buffer preallocated and every operation writing with ``out=``."""

    def __init__(self, weights, biases, loss, batch, lr=0.01):
        self.W = [W.copy() for W in weights]
        self.b = [b.copy() for b in biases]
        self.loss, self.lr = loss, lr
        dtype = self.W[0].dtype
        self.A = [np.empty((batch, W.shape[0]), dtype) for W in self.W]
        self.D = [np.empty_like(a) for a in self.A]
        self.dW = [np.empty_like(W) for W in self.W]
        self.db = [np.empty_like(b) for b in self.b]
        self.rows = np.arange(batch)
        self.tmp = np.empty((batch, 1), dtype)

    def __call__(self, X, y):
        A, D, L = self.A, self.D, len(self.W)
        prev = X
        for l in range(L):
            np.matmul(prev, self.W[l].T, out=A[l])
            A[l] += self.b[l]
            if l < L - 1:
                np.maximum(A[l], 0, out=A[l])
            prev = A[l]
        Z, G, n = A[-1], D[-1], X.shape[0]
        if self.loss == "cross_entropy":
            np.max(Z, axis=1, keepdims=True, out=self.tmp)
            np.subtract(Z, self.tmp, out=G)
            np.exp(G, out=G)
            np.sum(G, axis=1, keepdims=True, out=self.tmp)
            G /= self.tmp
            loss = -np.log(G[self.rows, y]).mean()
            G[self.rows, y] -= 1
            G /= n
        else:
            np.subtract(Z, y, out=G)
            loss = np.vdot(G, G) / G.size
            G *= 2 / G.size
        for l in range(L - 1, -1, -1):
            inp = X if l == 0 else A[l - 1]
            np.matmul(D[l].T, inp, out=self.dW[l])
            np.sum(D[l], axis=0, out=self.db[l])
            if l:
                np.matmul(D[l], self.W[l], out=D[l - 1])
                D[l - 1] *= A[l - 1] > 0
        for W, b, dW, db in zip(self.W, self.b, self.dW, self.db):
            dW *= self.lr
            W -= dW
            db *= self.lr
            b -= db
        return loss


class GemmFloor:
    """The step's GEMMs alone (forward; dW; dX for all but the first layer), through
    the product routines the step calls (BLAS, or fastbp's own kernel where it
    takes a product), in one compiled call (`_kernels._gemm_floor`)."""

    def __init__(self, net, batch):
        from . import _kernels

        self._floor = _kernels._gemm_floor
        self.net = net
        net._workspace(batch)

    def __call__(self, X, y):
        net = self.net
        self._floor(X, net.params, net.sizes, net._A, net._D, net._grad)


class EpochSteps:
    """fastbp's compiled epoch (what `fit` runs with SGD) over `rounds` batches of
    the same rows, in a shuffled order as `fit`'s default; calling it runs one
    epoch, so its time per call / rounds is the time per step inside `fit` (rows
    gathered in C, no Python between steps). (Without shuffling, fit's batches are
    read in place: a little faster.)"""

    def __init__(self, net, X, y, rounds=8):
        self.net, self.rounds = net, rounds
        self.X, self.y = np.concatenate([X] * rounds), np.concatenate([y] * rounds)
        self.batch = X.shape[0]
        self.order = np.random.default_rng(0).permutation(self.X.shape[0])
        self.opt = SGD(net.params, lr=0.01)
        self.stop = np.zeros(1, np.int8)

    def __call__(self):
        self.net._compiled_epoch(self.X, self.y, self.order, self.batch, self.opt, self.stop)


def torch_step(weights, biases, loss, lr=0.01):
    """PyTorch eager on the CPU, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    layers = []
    for l, (W, b) in enumerate(zip(weights, biases)):
        linear = torch.nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64 if W.dtype == np.float64
                                 else torch.float32)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(W))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
        if l < len(weights) - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = torch.nn.CrossEntropyLoss() if loss == "cross_entropy" else torch.nn.MSELoss()

    def step(X, y):
        opt.zero_grad()
        value = criterion(model(X), y)
        value.backward()
        opt.step()
        return value

    return step


def _round_times(candidates, seconds, block=0.1, pause=0.15):
    """Per-call times (seconds) of each interleaved round; candidates: name -> (fn, args).
    Returns name -> list of times, one per round, the lists aligned by round.

    NumPy, SciPy and PyTorch each keep their own BLAS/OpenMP threads, which
    spin for a while after a call: timed right after another library, a
    candidate shares the two cores with those threads and runs several times
    slower. So each candidate's turn in a round starts with a pause (the
    other threads go to sleep) and an untimed call, then times a block of
    about `block` seconds.
    """
    counts = {}
    for name, (fn, args) in candidates.items():
        fn(*args)
        start = time.perf_counter()
        fn(*args)
        counts[name] = max(1, int(block / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in candidates}
    deadline = time.perf_counter() + seconds
    while True:
        for name, (fn, args) in candidates.items():
            time.sleep(pause)
            fn(*args)
            start = time.perf_counter()
            for _ in range(counts[name]):
                fn(*args)
            samples[name].append((time.perf_counter() - start) / counts[name])
        if time.perf_counter() > deadline and len(next(iter(samples.values()))) >= 3:
            break
    return samples


def _median_ratio(samples, num, den):
    """Median over rounds of samples[num] / samples[den]. A ratio taken within a
    round compares two candidates timed seconds apart; the host's speed can change
    between rounds (it was seen to halve for seconds at a time), which a ratio of
    two medians would mix in."""
    return float(np.median(np.asarray(samples[num]) / np.asarray(samples[den])))


def blas_info():
    """Thread counts and BLAS libraries in use (needs threadpoolctl), else environment hints."""
    from . import _kernels  # noqa: F401  (loads scipy's BLAS)

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"threadpoolctl": "not installed",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}
    return {f"{i['internal_api']} {i.get('version')} ({i['filepath'].rsplit('/', 2)[-2]})":
            i["num_threads"] for i in threadpool_info()}


def run(workloads=("tiny", "small", "mnist"), dtypes=("float32",), seconds=1.0):
    """Benchmark rows: one per workload and dtype, with steps/s of every peer."""
    rows = []
    for name in workloads:
        sizes, batch, loss = WORKLOADS[name]
        for dtype in dtypes:
            X, y = make_batch(sizes, batch, loss, dtype)
            nets = {b: MLP(sizes, activation="relu", loss=loss, dtype=dtype, seed=0, backend=b)
                    for b in ("cython", "numpy")}
            candidates = {f"fastbp-{b}": (net.step, (X, y, SGD(net.params, lr=0.01)))
                          for b, net in nets.items()}
            W0 = [W.copy() for W in nets["cython"].weights]
            b0 = [b.copy() for b in nets["cython"].biases]
            rounds = 8
            candidates["fastbp-epoch"] = (EpochSteps(MLP.from_arrays(W0, b0, loss=loss), X, y, rounds), ())
            candidates["numpy-strong"] = (NumpyStep(W0, b0, loss, batch), (X, y))
            candidates["gemm-floor"] = (GemmFloor(MLP.from_arrays(W0, b0, loss=loss), batch), (X, y))
            step = torch_step(W0, b0, loss)
            if step is not None:
                import torch

                ty = torch.from_numpy(y)
                candidates["torch"] = (step, (torch.from_numpy(X), ty))
            samples = _round_times(candidates, seconds)
            samples["fastbp-epoch"] = [t / rounds for t in samples["fastbp-epoch"]]
            rows.append({
                "workload": name, "sizes": sizes, "batch": batch, "loss": loss, "dtype": dtype,
                "rounds": len(samples["fastbp-cython"]),
                "steps_per_s": {k: 1 / float(np.median(v)) for k, v in samples.items()},
                "speedup": {k: _median_ratio(samples, k, "fastbp-cython")
                            for k in samples if k != "fastbp-cython"},
                "percent_of_gemm_floor": 100 * _median_ratio(samples, "gemm-floor", "fastbp-cython"),
                "epoch_percent_of_gemm_floor": 100 * _median_ratio(samples, "gemm-floor", "fastbp-epoch"),
            })
    return rows


def digits_split():
    """scikit-learn's digits as the training issue uses them: a 75/25 stratified
    split (seed 0), standardised with the training part's statistics. Returns
    X_train, X_test, y_train, y_test (needs scikit-learn)."""
    from .datasets import load_digits, standardize, train_test_split

    X, y = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(X, y, 0.25, stratify=True, seed=0)
    X_train, mean, std = standardize(X_train)
    X_test, _, _ = standardize(X_test, mean, std)
    return X_train, X_test, y_train, y_test


def fit_digits_fastbp(X_train, y_train, backend="cython"):
    """fastbp's fit with the training issue's settings: 64-128-10 relu, SGD lr 0.05,
    momentum 0.9 without Nesterov, batch 32, 30 epochs."""
    net = MLP([64, 128, 10], activation="relu", seed=0, backend=backend)
    net.fit(X_train, y_train, epochs=30, batch_size=32,
            optimizer=SGD(net.params, lr=0.05, momentum=0.9))
    return net


def fit_digits_sklearn(X_train, y_train):
    """scikit-learn's MLPClassifier with the same settings (no L2, no early
    stopping; it warns that 30 iterations did not converge, as intended)."""
    import warnings

    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(128,), activation="relu", solver="sgd", alpha=0.0,
                        batch_size=32, learning_rate_init=0.05, momentum=0.9,
                        nesterovs_momentum=False, max_iter=30, early_stopping=False,
                        n_iter_no_change=10**9, tol=0.0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter reached: intended
        clf.fit(X_train, y_train)
    return clf


def fit_digits_row(seconds=10.0):
    """fit on scikit-learn's digits against scikit-learn's MLPClassifier, both fits
    (`fit_digits_fastbp`, `fit_digits_sklearn`, each followed by its test
    accuracy) timed in interleaved rounds. None when scikit-learn is not
    installed."""
    try:
        import sklearn.neural_network  # noqa: F401
    except ImportError:
        return None
    X_train, X_test, y_train, y_test = digits_split()
    scores = {"fastbp": [], "sklearn": []}

    def fastbp_fit():
        scores["fastbp"].append(fit_digits_fastbp(X_train, y_train).score(X_test, y_test))

    def sklearn_fit():
        scores["sklearn"].append(fit_digits_sklearn(X_train, y_train).score(X_test, y_test))

    samples = _round_times({"fastbp": (fastbp_fit, ()), "sklearn": (sklearn_fit, ())}, seconds,
                           block=0.0)
    return {"rounds": len(samples["fastbp"]),
            "seconds": {k: float(np.median(v)) for k, v in samples.items()},
            "speedup": _median_ratio(samples, "sklearn", "fastbp"),
            "test_accuracy": {k: float(np.median(v)) for k, v in scores.items()}}


def format_fit(row):
    if row is None:
        return "fit on digits: scikit-learn is not installed (pip install scikit-learn)"
    ms, acc = row["seconds"], row["test_accuracy"]
    return (f"fit on digits (64-128-10, 30 epochs, batch 32): fastbp {ms['fastbp'] * 1e3:.1f} ms, "
            f"scikit-learn's MLPClassifier {ms['sklearn'] * 1e3:.1f} ms: {row['speedup']:.2f}x "
            f"(median of {row['rounds']} interleaved rounds' ratios); test accuracy "
            f"{acc['fastbp']:.3f} and {acc['sklearn']:.3f}")


def _noop(*args):
    return 0.0


def _transient_peak(fn, args, steps):
    import tracemalloc

    peak = 0
    for _ in range(steps):
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        fn(*args)
        peak = max(peak, tracemalloc.get_traced_memory()[1] - before)
    return peak


def step_allocations(step, args, steps=50):
    """(kept, peak) in bytes, per tracemalloc (which sees NumPy's array buffers
    too): memory still held after `steps` calls of step(*args), and the largest
    transient peak of one call beyond what calling a no-op Python function with
    the same arguments costs (the interpreter's own call machinery). Measured
    after a warm-up call."""
    import tracemalloc

    step(*args)
    tracemalloc.start()
    try:
        step(*args)
        floor = _transient_peak(_noop, args, steps)
        base, _ = tracemalloc.get_traced_memory()
        peak = _transient_peak(step, args, steps)
        kept = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return kept, max(0, peak - floor)


def fit_peak_memory(backend, sizes=(784, 256, 128, 10), n=4096, batch=128, dtype="float32"):
    """Peak bytes traced by tracemalloc during one epoch of `fit` (SGD, momentum),
    above what the data and the network already hold."""
    import tracemalloc

    X, y = make_batch(list(sizes), n, "cross_entropy", dtype)
    net = MLP(list(sizes), dtype=dtype, seed=0, backend=backend)
    opt = SGD(net.params, lr=0.01, momentum=0.9)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        net.fit(X, y, epochs=1, batch_size=batch, optimizer=opt, progress=False, diagnostics=False)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def memory_rows(workloads=("tiny", "small", "mnist"), dtype="float32"):
    """Per workload: transient bytes per step of fastbp (cython and numpy backends)
    and of the strong NumPy step; and a fit's peak memory on both backends."""
    rows = []
    for name in workloads:
        sizes, batch, loss = WORKLOADS[name]
        X, y = make_batch(sizes, batch, loss, dtype)
        row = {"workload": name, "dtype": dtype, "step_peak_bytes": {}, "step_kept_bytes": {}}
        for b in ("cython", "numpy"):
            net = MLP(sizes, activation="relu", loss=loss, dtype=dtype, seed=0, backend=b)
            kept, peak = step_allocations(net.step, (X, y, SGD(net.params, lr=0.01)))
            row["step_peak_bytes"][f"fastbp-{b}"] = peak
            row["step_kept_bytes"][f"fastbp-{b}"] = kept
        net = MLP(sizes, activation="relu", loss=loss, dtype=dtype, seed=0)
        kept, peak = step_allocations(NumpyStep(net.weights, net.biases, loss, batch), (X, y))
        row["step_peak_bytes"]["numpy-strong"] = peak
        row["step_kept_bytes"]["numpy-strong"] = kept
        rows.append(row)
    fit = {b: fit_peak_memory(b, dtype=dtype) for b in ("cython", "numpy")}
    return rows, fit


def format_table(rows, info):
    peers = ["fastbp-numpy", "numpy-strong", "torch"]
    lines = ["workload  dtype   fastbp steps/s  " + "  ".join(f"x {p:<12}" for p in peers)
             + "  % GEMM floor   in fit: steps/s  % floor"]
    for r in rows:
        cells = [f"{r['speedup'][p]:>14.3f}" if p in r["speedup"] else f"{'-':>14}" for p in peers]
        lines.append(f"{r['workload']:<9} {r['dtype']:<7} {r['steps_per_s']['fastbp-cython']:>14.1f}  "
                     + "  ".join(cells) + f"  {r['percent_of_gemm_floor']:>12.1f}"
                     + f"   {r['steps_per_s']['fastbp-epoch']:>15.1f}  {r['epoch_percent_of_gemm_floor']:>7.1f}")
    lines.append("x peer: fastbp's net.step speed over the peer's (same batch; median over interleaved "
                 f"rounds of each round's ratio, {min(r['rounds'] for r in rows)}+ rounds); "
                 "in fit: per step of the compiled epoch fit runs")
    lines.append("machine: " + f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                 f"numpy {np.__version__}")
    lines.append("BLAS threads: " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    return "\n".join(lines)


def format_memory(rows, fit):
    peers = ["fastbp-cython", "fastbp-numpy", "numpy-strong"]
    lines = ["bytes allocated during one step (tracemalloc peak; kept after 50 steps in brackets)",
             "workload  dtype   " + "  ".join(f"{p:>20}" for p in peers)]
    for r in rows:
        lines.append(f"{r['workload']:<9} {r['dtype']:<7} " + "  ".join(
            f"{r['step_peak_bytes'][p]:>11} [{r['step_kept_bytes'][p]:>6}]" for p in peers))
    lines.append("peak memory of one fit epoch (784-256-128-10, 4096 samples, batch 128): "
                 + ", ".join(f"{b} {v / 2**20:.2f} MiB" for b, v in fit.items())
                 + f" ({fit['numpy'] / max(fit['cython'], 1):.0f}x less)")
    return "\n".join(lines)


def main(args):
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; expected some of {', '.join(WORKLOADS)}")
    if getattr(args, "threads", None) is not None:
        from .threads import set_num_threads

        set_num_threads(args.threads)
        try:
            import torch
        except ImportError:
            pass
        else:
            torch.set_num_threads(args.threads)
    dtypes = args.dtype.split(",")
    rows = run(workloads, dtypes, args.seconds)
    info = blas_info()
    print(format_table(rows, info))
    result = {"rows": rows, "blas": info, "machine": platform.platform()}
    if getattr(args, "memory", False):
        small = [w for w in workloads if w in ("tiny", "small", "mnist")] or ["tiny"]
        memory, fit = memory_rows(small, dtypes[0])
        print(format_memory(memory, fit))
        result["memory"] = {"steps": memory, "fit_peak_bytes": fit}
    if getattr(args, "fit", False):
        fit_row = fit_digits_row(args.seconds)
        print(format_fit(fit_row))
        result["fit_digits"] = fit_row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0

"""Training-step throughput of fastbp against its peers: ``python -m fastbp bench``.

Peers, all on the same batch: fastbp's reference backend (plain NumPy), a
strong hand-written NumPy step (preallocated buffers, ``out=`` everywhere),
PyTorch eager on the CPU when installed, and the GEMM floor (the step's GEMMs
alone: forward, dW, and dX for all but the first layer, with NumPy's matmul).
Times are medians of interleaved rounds in one process: this machine's speed
drifts, the ratios much less.
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
    """The step's GEMMs alone, with NumPy's matmul into preallocated outputs."""

    def __init__(self, weights, batch):
        dtype = weights[0].dtype
        self.W = weights
        self.A = [np.empty((batch, W.shape[0]), dtype) for W in weights]
        self.dW = [np.empty_like(W) for W in weights]
        self.dX = [np.empty((batch, W.shape[1]), dtype) for W in weights]

    def __call__(self, X, y):
        prev = X
        for W, A in zip(self.W, self.A):
            np.matmul(prev, W.T, out=A)
            prev = A
        for l in range(len(self.W) - 1, -1, -1):
            np.matmul(self.A[l].T, X if l == 0 else self.A[l - 1], out=self.dW[l])
            if l:
                np.matmul(self.A[l], self.W[l], out=self.dX[l])


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


def _median_times(candidates, seconds, block=0.1, pause=0.15):
    """Per-call medians (seconds) of interleaved rounds; candidates: name -> (fn, args).

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
    return {name: float(np.median(v)) for name, v in samples.items()}


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
            candidates["numpy-strong"] = (NumpyStep(W0, b0, loss, batch), (X, y))
            candidates["gemm-floor"] = (GemmFloor(W0, batch), (X, y))
            step = torch_step(W0, b0, loss)
            if step is not None:
                import torch

                ty = torch.from_numpy(y)
                candidates["torch"] = (step, (torch.from_numpy(X), ty))
            times = _median_times(candidates, seconds)
            ours = times["fastbp-cython"]
            rows.append({
                "workload": name, "sizes": sizes, "batch": batch, "loss": loss, "dtype": dtype,
                "steps_per_s": {k: 1 / t for k, t in times.items()},
                "speedup": {k: t / ours for k, t in times.items() if k != "fastbp-cython"},
                "percent_of_gemm_floor": 100 * times["gemm-floor"] / ours,
            })
    return rows


def format_table(rows, info):
    peers = ["fastbp-numpy", "numpy-strong", "torch"]
    lines = ["workload  dtype    fastbp steps/s   " + "   ".join(f"x {p:<12}" for p in peers)
             + "   % GEMM floor"]
    for r in rows:
        cells = [f"{r['speedup'][p]:>14.2f}" if p in r["speedup"] else f"{'-':>14}" for p in peers]
        lines.append(f"{r['workload']:<9} {r['dtype']:<8} {r['steps_per_s']['fastbp-cython']:>14.1f}   "
                     + "   ".join(cells) + f"   {r['percent_of_gemm_floor']:>12.0f}")
    lines.append("x peer: fastbp's speed over the peer's (same batch, medians of interleaved rounds)")
    lines.append("machine: " + f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                 f"numpy {np.__version__}")
    lines.append("BLAS threads: " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    return "\n".join(lines)


def main(args):
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; expected some of {', '.join(WORKLOADS)}")
    rows = run(workloads, args.dtype.split(","), args.seconds)
    info = blas_info()
    print(format_table(rows, info))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "blas": info, "machine": platform.platform()}, f, indent=1)
        print(f"wrote {args.json}")
    return 0

"""Command line: ``python -m fastbp train | vanishing | bench``."""

import argparse
import os
import sys
import time

import numpy as np

from ._backend import BACKENDS
from ._checks import ACTIVATIONS
from .diagnostics import layer_statistics
from .network import MLP
from .checkpoint import load, save
from .optim import SGD, Adam, AdamW
from .threads import set_num_threads


def spirals(n_per_class=300, n_classes=3, noise=0.2, seed=0):
    """Interleaved 2-D spirals, one arm a class: a small problem no linear model solves.

    Returns X (n_per_class * n_classes, 2) float64 and integer labels y.
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n_per_class)
    X, y = [], []
    for c in range(n_classes):
        angle = 4.0 * t + 2.0 * np.pi * c / n_classes + rng.normal(0.0, noise, n_per_class)
        X.append(np.column_stack([t * np.sin(angle), t * np.cos(angle)]))
        y.append(np.full(n_per_class, c))
    return np.concatenate(X), np.concatenate(y)


def _dataset(name, seed):
    from .datasets import load_digits, standardize, train_test_split

    X, y = load_digits() if name == "digits" else spirals(seed=seed)
    X_train, X_test, y_train, y_test = train_test_split(X, y, 0.25, stratify=True, seed=seed)
    X_train, mean, std = standardize(X_train)
    X_test, _, _ = standardize(X_test, mean, std)
    return X_train, X_test, y_train, y_test


def _optimizer(args, params):
    if args.optimizer == "sgd":
        return SGD(params, lr=args.lr, momentum=args.momentum)
    return (Adam if args.optimizer == "adam" else AdamW)(params, lr=args.lr)


def _check_output(option, path):
    """ValueError (a usage error) before any training when `path` cannot be written:
    a directory, or in a directory that does not exist."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{option} {path}: the directory {directory} does not exist")


def _train(args):
    # what can fail after training is checked before it
    if args.save:
        _check_output("--save", args.save)
    if args.plot:
        _check_output("--plot", args.plot)
        _import_matplotlib()
    if args.threads is not None:
        set_num_threads(args.threads)
    X_train, X_test, y_train, y_test = _dataset(args.dataset, args.seed)
    if args.resume:
        # the network, optimizer, epoch count and shuffling state of the checkpoint:
        # training continues exactly where it stopped
        net, opt = load(args.resume, backend=args.backend)
        if opt is None:
            opt = _optimizer(args, net.params)
        if net.n_features != X_train.shape[1] or net.n_outputs != int(y_train.max()) + 1:
            raise ValueError(f"{args.resume} holds a {net.n_features}-input, {net.n_outputs}-class "
                             f"network; {args.dataset} has {X_train.shape[1]} features and "
                             f"{int(y_train.max()) + 1} classes")
        print(f"resumed from {args.resume} after {net.epoch_} epochs")
    else:
        sizes = [X_train.shape[1], *args.hidden, int(y_train.max()) + 1]
        net = MLP(sizes, activation=args.activation, dtype=args.dtype, seed=args.seed,
                  backend=args.backend)
        opt = _optimizer(args, net.params)
    print(f"{net}\n{opt}\n{args.dataset}: {len(X_train)} training and {len(X_test)} test samples "
          "(stratified 75/25 split, standardised)", flush=True)
    start = time.perf_counter()
    history = net.fit(X_train, y_train, epochs=args.epochs, batch_size=args.batch_size, optimizer=opt,
                      validation_data=(X_test, y_test), verbose=not args.quiet, progress=False)
    elapsed = time.perf_counter() - start
    if history.stopped_early:
        print(f"stopped early: {history.stop_reason}")
    accuracy = net.score(X_test, y_test)
    print(f"test accuracy {accuracy:.4f}  ({len(history)} epochs in {elapsed:.2f} s)")
    if args.save:
        save(args.save, net, opt, metadata={"dataset": args.dataset, "seed": args.seed,
                                            "epochs": net.epoch_, "test_accuracy": accuracy})
        print(f"saved {args.save} (after {net.epoch_} epochs)")
    if args.plot:
        _plot(history, net, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _import_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or fastbp[plot])") from None
    return matplotlib


def _plot(history, net, path):
    matplotlib = _import_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, history.loss, label="training loss")
    left.plot(epochs, history.val_loss, label="test loss")
    left.set(xlabel="epoch", ylabel="loss", yscale="log", title="Loss")
    left.legend()
    norms = np.array([d["grad_norm"] for d in history.diagnostics])
    for l in range(norms.shape[1]):
        right.plot(epochs, norms[:, l], label=f"layer {l + 1}")
    right.set(xlabel="epoch", ylabel="gradient norm", yscale="log", title="Gradient norm per layer")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _vanishing(args):
    rng = np.random.default_rng(args.seed)
    X = rng.normal(size=(args.samples, 64))
    teacher = rng.normal(size=(64, 10))
    y = (X @ teacher).argmax(axis=1)
    sizes = [64] + [args.width] * args.depth + [10]
    columns = {}
    for activation, init in (("sigmoid", "glorot_uniform"), ("relu", "he_normal")):
        net = MLP(sizes, activation=activation, init=init, dtype=np.float64, seed=args.seed)
        opt = SGD(net.params, lr=args.lr)
        for _ in range(args.steps):
            net.step(X, y, opt)
        Xc, yc = net._as_batch(X, y)
        columns[activation] = layer_statistics(net, Xc, yc)["grad_norm"]
    print(f"Gradient norm per layer after {args.steps} SGD steps (lr {args.lr}), "
          f"{args.depth} hidden layers of {args.width}, batch {args.samples}:")
    print(f"{'layer':>6} {'sigmoid (glorot)':>18} {'relu (he)':>14}")
    for l in range(len(sizes) - 1):
        print(f"{l + 1:>6} {columns['sigmoid'][l]:>18.3e} {columns['relu'][l]:>14.3e}")
    s, r = columns["sigmoid"], columns["relu"]
    print(f"first/last layer ratio: sigmoid {s[0] / s[-1]:.2e}, relu {r[0] / r[-1]:.2e} "
          "(sigmoid' <= 1/4 shrinks the gradient at every layer on the way back)")
    return 0


def _bench(args):
    from .bench import main as bench_main

    return bench_main(args)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastbp",
        description="fastbp: fast, exact backpropagation for dense networks on the CPU. "
                    "Without a command, runs `train` with its defaults.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a network on a data set and report its test accuracy",
        description="Train on a stratified 75/25 split (standardised) and report the test accuracy.")
    train.add_argument("--dataset", choices=("digits", "spirals"), default="digits",
                       help="digits: scikit-learn's 8x8 digits (needs scikit-learn); "
                            "spirals: a synthetic 3-class problem")
    train.add_argument("--hidden", type=_positive_int, nargs="+", default=[128],
                       help="hidden layer widths")
    train.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    train.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    train.add_argument("--lr", type=float, default=0.05)
    train.add_argument("--momentum", type=float, default=0.9, help="for sgd")
    train.add_argument("--epochs", type=_positive_int, default=30)
    train.add_argument("--batch-size", type=_positive_int, default=32)
    train.add_argument("--seed", type=_seed, default=0)
    train.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    train.add_argument("--backend", choices=BACKENDS, default="cython")
    train.add_argument("--plot", metavar="PNG", help="write loss and gradient-norm curves (needs matplotlib)")
    train.add_argument("--quiet", action="store_true", help="no line per epoch")
    train.add_argument("--threads", type=_positive_int, help="BLAS threads (default: BLAS's own)")
    train.add_argument("--save", metavar="PATH", help="write a checkpoint when training ends")
    train.add_argument("--resume", metavar="PATH",
                       help="continue from a checkpoint (its network and optimizer; --epochs more "
                            "epochs on the same data set and seed)")
    train.set_defaults(func=_train)

    vanishing = commands.add_parser(
        "vanishing", help="per-layer gradient norms of deep sigmoid and relu networks",
        description="Train deep sigmoid and relu networks for a few steps and print their "
                    "per-layer gradient norms side by side.")
    vanishing.add_argument("--depth", type=_positive_int, default=8, help="hidden layers")
    vanishing.add_argument("--width", type=_positive_int, default=32)
    vanishing.add_argument("--steps", type=_positive_int, default=10)
    vanishing.add_argument("--samples", type=_positive_int, default=256)
    vanishing.add_argument("--lr", type=float, default=0.1)
    vanishing.add_argument("--seed", type=_seed, default=0)
    vanishing.set_defaults(func=_vanishing)

    bench = commands.add_parser(
        "bench", help="training-step speed against NumPy, PyTorch and the GEMM floor",
        description="Steps per second of fastbp's compiled step, and its speed-up over the "
                    "NumPy reference backend, a strong hand-written NumPy step and PyTorch "
                    "eager (when installed), with the percentage of the GEMM floor reached.")
    bench.add_argument("--workloads", default="tiny,small,mnist",
                       help="comma-separated, of tiny, small, mnist, wide, large")
    bench.add_argument("--dtype", default="float32", help="float32, float64 or both, comma-separated")
    bench.add_argument("--seconds", type=float, default=1.0, help="measuring time per workload")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--fit", action="store_true",
                       help="also fit on scikit-learn's digits against its MLPClassifier "
                            "(interleaved rounds; needs scikit-learn)")
    bench.add_argument("--memory", action="store_true",
                       help="also measure allocations per step and a fit's peak memory (tracemalloc)")
    bench.add_argument("--threads", type=_positive_int,
                       help="threads for every library's BLAS, and PyTorch's (default: their own)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        args = parser.parse_args(["train"])
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError) as exc:
        parser.error(str(exc))
    except OSError as exc:  # a path given that cannot be read or written
        parser.error(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror
                     else str(exc))
    except FloatingPointError as exc:  # training diverged: not a usage error
        parser.exit(1, f"{parser.prog}: error: {exc}\n")

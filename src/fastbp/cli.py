"""Command line: ``python -m fastbp train`` (a demo training run) and friends."""

import argparse
import sys
import time

import numpy as np

from ._backend import BACKENDS
from ._checks import ACTIVATIONS
from .network import MLP
from .optim import SGD


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


def _train(args):
    X, y = spirals(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(X))
    n_test = len(X) // 4
    test, train = order[:n_test], order[n_test:]
    net = MLP([2, args.hidden, args.hidden, 3], activation=args.activation, loss="cross_entropy",
              dtype=args.dtype, seed=args.seed, backend=args.backend)
    opt = SGD(net.params, lr=args.lr, momentum=args.momentum)
    print(f"{net}\ntraining on {len(train)} spiral points, testing on {n_test}")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = train[rng.permutation(len(train))]
        losses = [net.step(X[b], y[b], opt) for b in np.array_split(perm, -(-len(perm) // args.batch_size))]
        if epoch == 1 or epoch % max(1, args.epochs // 10) == 0 or epoch == args.epochs:
            print(f"epoch {epoch:4d}  loss {np.mean(losses):.4f}")
    elapsed = time.perf_counter() - start
    accuracy = np.mean(net.forward(X[test]).argmax(axis=1) == y[test])
    print(f"test accuracy {accuracy:.3f}  ({elapsed:.2f} s)")
    return 0


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastbp",
        description="fastbp: fast, exact backpropagation for dense networks on the CPU. "
                    "Without a command, runs `train` with its defaults.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="train a small network on a synthetic spirals problem")
    train.add_argument("--hidden", type=_positive_int, default=64, help="width of the two hidden layers")
    train.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    train.add_argument("--lr", type=float, default=0.1)
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--epochs", type=_positive_int, default=200)
    train.add_argument("--batch-size", type=_positive_int, default=32)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    train.add_argument("--backend", choices=BACKENDS, default="cython")
    train.set_defaults(func=_train)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        args = parser.parse_args(["train"])
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))

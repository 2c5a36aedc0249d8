"""The training loop behind `MLP.fit` and `MLP.partial_fit`: mini-batches, shuffling,
validation, early stopping, schedules, callbacks, progress and clean interruption."""

import contextlib
import math
import numbers
import signal
import sys
import threading
import time

import numpy as np

from .diagnostics import layer_statistics
from .optim import Optimizer, Schedule

try:
    # signal.signal without the enum conversions of its wrapper, which raise and
    # catch a ValueError for any handler that is a function: 9 us a fit call
    # (set and restore) against 0.5, a tenth of a 32-row partial_fit
    from _signal import signal as _set_handler
except ImportError:  # not CPython
    _set_handler = signal.signal


class History:
    """What `fit` recorded, one entry per epoch.

    ``history.records`` is a list of dicts with keys ``epoch``, ``loss``
    (mean training loss over the epoch's batches), ``val_loss``, ``val_score``
    (None without validation data), ``lr``, ``time`` (seconds) and
    ``diagnostics`` (see `fastbp.diagnostics.layer_statistics`, or None).
    Each key is also an attribute giving the list over epochs:
    ``history.loss``, ``history.val_loss``, ...
    """

    KEYS = ("epoch", "loss", "val_loss", "val_score", "lr", "time", "diagnostics")

    def __init__(self):
        self.records = []
        #: True when training ended early (early stopping, a callback, or Ctrl-C).
        self.stopped_early = False
        #: Why training stopped early: "early_stopping", "callback" or "interrupted".
        self.stop_reason = None

    def __getattr__(self, name):
        if name in History.KEYS:
            return [r[name] for r in self.records]
        raise AttributeError(name)

    def __len__(self):
        return len(self.records)

    def __repr__(self):
        if not self.records:
            return "History(no epochs)"
        last = self.records[-1]
        val = f", val_loss={last['val_loss']:.4g}" if last["val_loss"] is not None else ""
        return f"History({len(self)} epochs, loss={last['loss']:.4g}{val})"


class EarlyStopping:
    """Stop when the monitored loss has not improved by more than `min_delta` for
    `patience` epochs (or `partial_fit` calls).

    The monitored value is the validation loss when there is validation data,
    else the training loss. With `restore_best`, the network's parameters are
    set back to those of the best epoch when training stops.

    Attributes
    ----------
    best : float
        Best monitored value so far.
    should_stop : bool
        True once patience has run out; `fit` stops, and a loop of
        `partial_fit` calls should check it.
    """

    def __init__(self, patience=5, min_delta=0.0, restore_best=True):
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or not min_delta >= 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.restore_best = bool(restore_best)
        self.best = math.inf
        self.bad_epochs = 0
        self.should_stop = False
        self._best_params = None

    def update(self, net, value):
        """Record one epoch's monitored value; returns True when training should stop."""
        if value < self.best - self.min_delta:
            self.best = value
            self.bad_epochs = 0
            if self.restore_best:
                self._best_params = net.params.copy()
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.should_stop = True
                if self.restore_best and self._best_params is not None:
                    net.params[...] = self._best_params
        return self.should_stop


@contextlib.contextmanager
def _deferred_interrupt():
    """Turn Ctrl-C into a flag checked between batches, so a step is never cut in half.

    Outside the main thread signal handlers cannot be set; there Ctrl-C keeps
    its usual effect.
    """
    # "stop" is what a compiled epoch checks after every batch.
    state = {"interrupted": False, "stop": np.zeros(1, np.int8)}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        state["interrupted"] = True
        state["stop"][0] = 1

    previous = _set_handler(signal.SIGINT, handler)
    try:
        yield state
    finally:
        _set_handler(signal.SIGINT, previous)


def _progress_bar(progress, total, desc):
    """A tqdm bar when asked for (or, with progress=None, when tqdm is there and stderr a terminal)."""
    if progress is False:
        return None
    if progress is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            raise ImportError("progress=True needs tqdm: pip install tqdm") from None
        return None
    return tqdm(total=total, desc=desc, unit="epoch", leave=False)


def check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def split_validation(net, X, y, validation_data, validation_fraction):
    """Training and validation arrays (validation None when there is none).

    validation_fraction holds out the last samples, before any shuffling (as
    Keras does), so the split is the same in every fit call.
    """
    if validation_data is not None and validation_fraction is not None:
        raise ValueError("give validation_data or validation_fraction, not both")
    if validation_data is not None:
        try:
            Xv, yv = validation_data
        except (TypeError, ValueError):
            raise TypeError("validation_data must be a pair (X_val, y_val)") from None
        Xv, yv = net._as_batch(Xv, yv)
        return X, y, (Xv, yv)
    if validation_fraction is not None:
        if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, numbers.Real) \
                or not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
        n_val = int(math.ceil(validation_fraction * X.shape[0]))
        if n_val >= X.shape[0]:
            raise ValueError(f"validation_fraction={validation_fraction} leaves no training samples")
        cut = X.shape[0] - n_val
        return X[:cut], y[:cut], (X[cut:], y[cut:])
    return X, y, None


def run_epochs(net, X, y, *, epochs, batch_size, optimizer, shuffle, validation, early_stopping,
               schedule, callbacks, progress, verbose, diagnostics, desc="fit"):
    """Train `net` on validated arrays; returns a History."""
    history = History()
    bar = _progress_bar(progress, epochs, desc)
    n = X.shape[0]
    # the parameters at each epoch's start, for the diagnostics' update ratios: one
    # buffer for the whole fit (a copy per epoch held two copies at the rebinding)
    before = np.empty_like(net.params) if diagnostics else None
    try:
        with _deferred_interrupt() as interrupt:
            for _ in range(epochs):
                epoch = net.epoch_
                if schedule is not None:
                    schedule.start_epoch(optimizer, epoch)
                start = time.perf_counter()
                if diagnostics:
                    np.copyto(before, net.params)
                order = net._rng.permutation(n) if shuffle else None
                if net._compiled(optimizer):
                    # the whole epoch in one compiled call
                    total, seen = net._compiled_epoch(X, y, order, batch_size, optimizer, interrupt["stop"])
                else:
                    total, seen = 0.0, 0
                    for lo in range(0, n, batch_size):
                        if order is None:
                            Xb, yb = X[lo:lo + batch_size], y[lo:lo + batch_size]
                        else:
                            rows = order[lo:lo + batch_size]
                            Xb, yb = X[rows], y[rows]
                        total += net._step_checked(Xb, yb, optimizer) * Xb.shape[0]
                        seen += Xb.shape[0]
                        if interrupt["interrupted"]:
                            break
                record = {"epoch": epoch, "loss": total / seen, "val_loss": None, "val_score": None,
                          "lr": optimizer.lr, "time": None, "diagnostics": None}
                if validation is not None:
                    Xv, yv = validation
                    outputs = np.empty((Xv.shape[0], net.n_outputs), net.dtype)
                    record["val_loss"] = net._forward_checked(Xv, yv, out=outputs)
                    record["val_score"] = net._score_outputs(outputs, yv)
                if diagnostics:
                    # on the first batch's worth of samples: one step's cost, and the
                    # same BLAS threading as the steps (waking idle threads for a
                    # larger product cost more than the product itself)
                    record["diagnostics"] = layer_statistics(net, X[:batch_size], y[:batch_size],
                                                             before=before)
                record["time"] = time.perf_counter() - start
                net.epoch_ += 1
                history.records.append(record)
                monitored = record["val_loss"] if validation is not None else record["loss"]
                if schedule is not None:
                    schedule.end_epoch(monitored)
                if verbose:
                    print(_epoch_line(record), flush=True)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                if interrupt["interrupted"]:
                    history.stopped_early, history.stop_reason = True, "interrupted"
                    break
                if early_stopping is not None and early_stopping.update(net, monitored):
                    history.stopped_early, history.stop_reason = True, "early_stopping"
                    break
                if any(callback(net, record) for callback in callbacks):
                    history.stopped_early, history.stop_reason = True, "callback"
                    break
    finally:
        if bar is not None:
            bar.close()
    return history


def _epoch_line(record):
    parts = [f"epoch {record['epoch'] + 1:4d}", f"loss {record['loss']:.4f}"]
    if record["val_loss"] is not None:
        parts += [f"val_loss {record['val_loss']:.4f}", f"val_score {record['val_score']:.4f}"]
    parts += [f"lr {record['lr']:.3g}", f"{record['time']:.2f}s"]
    return "  ".join(parts)


def check_fit_arguments(optimizer, schedule, early_stopping, callbacks):
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a fastbp optimizer, got {type(optimizer).__name__}")
    if schedule is not None and not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastbp schedule such as fastbp.StepLR, got {type(schedule).__name__}")
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError(f"early_stopping must be a fastbp.EarlyStopping, got {type(early_stopping).__name__}")
    callbacks = tuple(callbacks)
    for c in callbacks:
        if not callable(c):
            raise TypeError(f"callbacks must be callables callback(net, record), got {c!r}")
    return callbacks

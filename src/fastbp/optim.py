"""Optimizers that update a flat parameter buffer in place, as `torch.optim` defines them."""

import math
import numbers

import numpy as np

from ._backend import get_backend
from ._checks import FLOAT_DTYPES
from ._layout import aligned_empty, aligned_on_load, restored


def _check_hyper(name, value, minimum=0.0):
    """A finite real number >= minimum (None: any finite number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "a finite number" if minimum is None else f"a finite number >= {minimum:g}"
        raise ValueError(f"invalid {name} {value!r}; expected {bound}")
    return value


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class Optimizer:
    """Base class: updates one flat parameter array in place.

    Parameters
    ----------
    params : ndarray, shape (p,)
        The parameters to update, usually ``net.params``: a writable,
        C-contiguous float32 or float64 array (it is updated in place, so it
        cannot be converted).
    backend : {"cython", "numpy"} or None
        The kernels that run the update. None runs on the backend of the
        network whose `step` uses it, and on "cython" for a direct `update`.
    max_grad_norm : float or None
        Clip the gradient by its global (L2) norm before each update, as
        ``torch.nn.utils.clip_grad_norm_``: scaled by
        ``min(1, max_grad_norm / (norm + 1e-6))``.

    Attributes
    ----------
    step_count : int
        Number of updates made so far.
    """

    def __init__(self, params, backend=None, max_grad_norm=None):
        if not isinstance(params, np.ndarray):
            raise TypeError(f"params must be a numpy.ndarray (e.g. net.params), got {type(params).__name__}")
        if params.dtype not in FLOAT_DTYPES:
            raise TypeError(f"params has dtype {params.dtype}; expected float32 or float64")
        if params.ndim != 1 or not params.flags.c_contiguous or not params.flags.writeable:
            raise ValueError("params must be a writable, C-contiguous 1-D array (e.g. net.params)")
        if max_grad_norm is not None:
            max_grad_norm = _check_hyper("max_grad_norm", max_grad_norm)
            if max_grad_norm <= 0:
                raise ValueError(f"invalid max_grad_norm {max_grad_norm!r}; expected a number > 0")
        self.params = params
        self.backend = backend
        self._kernels = None if backend is None else get_backend(backend)
        self.max_grad_norm = max_grad_norm
        self.step_count = 0

    #: Names of the state arrays (None when unused), for `state` / `load_state`.
    _state_arrays = ()

    def clone(self, params):
        """A new optimizer of the same kind and settings on `params`, with fresh state."""
        return type(self)(params, **self._config)

    # pickle and copy.deepcopy: the backend module is looked up again by name; the
    # parameters and the state arrays come back 64-byte aligned, the parameters
    # still the network's own when both are pickled together
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_kernels"] = None
        for name in ("params",) + self._state_arrays:
            state[name] = aligned_on_load(state[name])
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name in ("params",) + self._state_arrays:
            setattr(self, name, restored(getattr(self, name)))
        self._kernels = None if self.backend is None else get_backend(self.backend)

    def state(self):
        """The optimizer's state: copies of its state arrays and its step count."""
        state = {"step_count": self.step_count}
        for name in self._state_arrays:
            a = getattr(self, name)
            state[name] = None if a is None else a.copy()
        return state

    def load_state(self, state):
        """Set the state from `state()` of an optimizer of the same kind and size."""
        for name in self._state_arrays:
            ours, theirs = getattr(self, name), state[name]
            if (ours is None) != (theirs is None) or (ours is not None and ours.shape != theirs.shape):
                raise ValueError(f"state {name!r} does not fit this optimizer")
        for name in self._state_arrays:
            if getattr(self, name) is not None:
                getattr(self, name)[...] = state[name]
        self.step_count = int(state["step_count"])

    def update(self, grad):
        """One in-place update of the parameters from a flat gradient of the same layout.

        Parameters
        ----------
        grad : array_like, shape (p,)
            Converted once to the parameters' dtype. NaN or infinity raises
            ValueError and leaves the parameters untouched.
        """
        grad = np.asarray(grad)
        if grad.dtype.kind not in "biuf":
            raise TypeError(f"grad has dtype {grad.dtype}; expected numbers")
        if grad.shape != self.params.shape:
            raise ValueError(f"grad has shape {grad.shape}; expected {self.params.shape} like params")
        # clipping scales the gradient in place: never the caller's array
        grad = np.array(grad, dtype=self.params.dtype, order="C",
                        copy=True if self.max_grad_norm is not None else None)
        kernels = self._kernels or get_backend("cython")
        if not kernels.all_finite(grad):
            raise ValueError("grad contains NaN or infinity; the parameters were not updated")
        self._apply(grad, kernels)

    def _apply(self, grad, kernels):
        """Clip (in place: `grad` is scratch) and update; `grad` is checked already."""
        if self.max_grad_norm is not None:
            coef = self.max_grad_norm / (math.sqrt(float(np.dot(grad, grad))) + 1e-6)
            if coef < 1:
                grad *= grad.dtype.type(coef)
        self._update(grad, kernels)
        self.step_count += 1

    def _update(self, grad, kernels):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def lr(self):
        """The learning rate; a new value is checked before it is taken."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _check_hyper("lr", value)


class SGD(Optimizer):
    """Stochastic gradient descent, exactly ``torch.optim.SGD``.

    With ``g = -grad if maximize else grad``, ``g += weight_decay * param``;
    with momentum, ``buf = g`` on the first step, later
    ``buf = momentum * buf + (1 - dampening) * g``, and ``g = g + momentum * buf``
    (nesterov) or ``g = buf``; then ``param -= lr * g``.

    Parameters
    ----------
    params : ndarray, shape (p,)
        Usually ``net.params``.
    lr : float, default 1e-3
        Learning rate (>= 0); may be changed between updates.
    momentum, dampening, weight_decay : float, default 0
        momentum and weight_decay >= 0.
    nesterov, maximize : bool, default False
        Nesterov momentum needs momentum > 0 and dampening 0.
    backend : {"cython", "numpy"} or None
        See `Optimizer`.

    Attributes
    ----------
    momentum_buffer : ndarray, shape (p,), or None
        The momentum state (None without momentum).
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, maximize=False, *, max_grad_norm=None, backend=None):
        lr = _check_hyper("lr", lr)
        momentum = _check_hyper("momentum", momentum)
        dampening = _check_hyper("dampening", dampening, minimum=None)
        weight_decay = _check_hyper("weight_decay", weight_decay)
        nesterov = _check_flag("nesterov", nesterov)
        maximize = _check_flag("maximize", maximize)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        super().__init__(params, backend, max_grad_norm)
        self._config = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                            weight_decay=weight_decay, maximize=maximize,
                            max_grad_norm=max_grad_norm, backend=backend)
        self._lr = lr
        self.momentum = momentum
        self.dampening = dampening
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.maximize = maximize
        self.momentum_buffer = aligned_empty(params.shape, params.dtype, 0) if momentum != 0 else None

    _state_arrays = ("momentum_buffer",)

    def _update(self, grad, kernels):
        kernels.sgd_update(self.params, grad, self.momentum_buffer, self._lr, self.momentum,
                           self.dampening, self.nesterov, self.weight_decay, self.maximize,
                           self.step_count == 0)

    def __repr__(self):
        return (f"SGD(lr={self._lr:g}, momentum={self.momentum:g}, dampening={self.dampening:g}, "
                f"nesterov={self.nesterov}, weight_decay={self.weight_decay:g}, "
                f"maximize={self.maximize})")


class Adam(Optimizer):
    """Adam, exactly ``torch.optim.Adam`` (weight decay added to the gradient).

    Parameters
    ----------
    params : ndarray, shape (p,)
        Usually ``net.params``.
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
        Each in [0, 1).
    eps : float, default 1e-8
    weight_decay : float, default 0
    amsgrad, maximize : bool, default False
    max_grad_norm, backend
        See `Optimizer`.

    Attributes
    ----------
    exp_avg, exp_avg_sq : ndarray, shape (p,)
        First and second moment estimates.
    max_exp_avg_sq : ndarray, shape (p,), or None
        Running maximum of exp_avg_sq (amsgrad only).
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, *, max_grad_norm=None, backend=None):
        lr = _check_hyper("lr", lr)
        eps = _check_hyper("eps", eps)
        weight_decay = _check_hyper("weight_decay", weight_decay)
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}") from None
        for i, beta in enumerate((beta1, beta2)):
            beta = _check_hyper(f"betas[{i}]", beta)
            if beta >= 1:
                raise ValueError(f"invalid betas[{i}] {beta!r}; expected a number in [0, 1)")
        amsgrad = _check_flag("amsgrad", amsgrad)
        maximize = _check_flag("maximize", maximize)
        super().__init__(params, backend, max_grad_norm)
        self._config = dict(lr=lr, betas=(float(beta1), float(beta2)), eps=eps,
                            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                            max_grad_norm=max_grad_norm, backend=backend)
        self._lr = lr
        self.betas = (float(beta1), float(beta2))
        self.eps = eps
        self.weight_decay = weight_decay
        self.amsgrad = amsgrad
        self.maximize = maximize
        self.exp_avg = aligned_empty(params.shape, params.dtype, 0)
        self.exp_avg_sq = aligned_empty(params.shape, params.dtype, 0)
        self.max_exp_avg_sq = aligned_empty(params.shape, params.dtype, 0) if amsgrad else None

    _state_arrays = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _update(self, grad, kernels):
        kernels.adam_update(self.params, grad, self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq,
                            self.step_count + 1, self._lr, self.betas[0], self.betas[1], self.eps,
                            self.weight_decay, self._decoupled, self.amsgrad, self.maximize)

    def __repr__(self):
        return (f"{type(self).__name__}(lr={self._lr:g}, betas={self.betas}, eps={self.eps:g}, "
                f"weight_decay={self.weight_decay:g}, amsgrad={self.amsgrad}, "
                f"maximize={self.maximize})")


class AdamW(Adam):
    """AdamW, exactly ``torch.optim.AdamW``: Adam with decoupled weight decay,
    ``param *= 1 - lr * weight_decay`` before the Adam step (default 1e-2).

    Parameters as `Adam`.
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, *, max_grad_norm=None, backend=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize,
                         max_grad_norm=max_grad_norm, backend=backend)


# ---------------------------------------------------------------------------
# Learning-rate schedules, applied by `MLP.fit` once per epoch.


class Schedule:
    """Base class: sets ``optimizer.lr`` before each epoch from the epoch number.

    The first time a schedule meets an optimizer it takes the optimizer's lr as
    its base. Epochs are counted by the network across `fit` calls, so passing
    the same schedule to consecutive `fit` calls continues it exactly.
    """

    base_lr = None

    def start_epoch(self, optimizer, epoch):
        """Set the learning rate for `epoch` (0-based, counted across fit calls)."""
        if self.base_lr is None:
            self.base_lr = optimizer.lr
        try:
            lr = self.lr_at(epoch)
        except OverflowError:  # (Python's float power: gamma ** epoch past 1.8e308)
            lr = math.inf
        try:
            optimizer.lr = lr  # (the setter checks the rate before it takes it)
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__} gives the learning rate {lr!r} for epoch "
                             f"{epoch} ({exc})") from None

    def end_epoch(self, metric):
        """Told the monitored value after each epoch (used by ReduceLROnPlateau)."""

    def lr_at(self, epoch):  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_state(self):
        """Raise ValueError (or TypeError) unless the state, as a checkpoint restores
        it, is one the schedule can reach: its base rate None or a valid rate."""
        if self.base_lr is not None:
            _check_hyper("base_lr", self.base_lr)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class StepLR(Schedule):
    """``lr = base_lr * gamma ** (epoch // step_size)``, as ``torch.optim.lr_scheduler.StepLR``."""

    def __init__(self, step_size, gamma=0.1):
        self.step_size = _check_positive_int("step_size", step_size)
        self.gamma = _check_hyper("gamma", gamma)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(Schedule):
    """``lr = base_lr * gamma ** epoch``."""

    def __init__(self, gamma):
        self.gamma = _check_hyper("gamma", gamma)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** epoch


class CosineAnnealingLR(Schedule):
    """``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``,
    ``torch.optim.lr_scheduler.CosineAnnealingLR``: eta_min at T_max, then rising
    again (period 2 T_max), as torch's does."""

    def __init__(self, T_max, eta_min=0.0):
        self.T_max = _check_positive_int("T_max", T_max)
        self.eta_min = _check_hyper("eta_min", eta_min)

    def lr_at(self, epoch):
        # (halved before the product: the same bits, and (base_lr - eta_min) * 2 cannot
        # overflow: eta_min=1e308 had given an infinite rate)
        half = (1 + math.cos(math.pi * epoch / self.T_max)) / 2
        return self.eta_min + (self.base_lr - self.eta_min) * half


class LinearWarmup(Schedule):
    """Linear warm-up from ``start_factor * base_lr`` to ``base_lr`` over `warmup_epochs`,
    then constant, as ``torch.optim.lr_scheduler.LinearLR(start_factor, 1.0, warmup_epochs)``."""

    def __init__(self, warmup_epochs, start_factor=0.1):
        self.warmup_epochs = _check_positive_int("warmup_epochs", warmup_epochs)
        self.start_factor = _check_hyper("start_factor", start_factor)
        if not 0 < self.start_factor <= 1:
            raise ValueError(f"start_factor must be in (0, 1], got {start_factor!r}")

    def lr_at(self, epoch):
        t = min(epoch, self.warmup_epochs)
        return self.base_lr * (self.start_factor + (1 - self.start_factor) * t / self.warmup_epochs)


class InverseScaling(Schedule):
    """``lr = base_lr / (epoch + 1) ** power_t`` (scikit-learn's 'invscaling', per epoch)."""

    def __init__(self, power_t=0.5):
        self.power_t = _check_hyper("power_t", power_t)

    def lr_at(self, epoch):
        try:
            return self.base_lr / (epoch + 1) ** self.power_t
        except OverflowError:  # a denominator past 1.8e308: the rate is 0
            return 0.0


class ReduceLROnPlateau(Schedule):
    """Multiply lr by `factor` when the monitored value (validation loss if there
    is validation data, else training loss) has not improved by more than a
    relative `threshold` for `patience` epochs, as
    ``torch.optim.lr_scheduler.ReduceLROnPlateau`` in 'min' / 'rel' mode; never below min_lr.
    """

    def __init__(self, factor=0.1, patience=10, threshold=1e-4, min_lr=0.0):
        self.factor = _check_hyper("factor", factor)
        if not 0 < self.factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {patience!r}")
        self.patience = int(patience)
        self.threshold = _check_hyper("threshold", threshold)
        self.min_lr = _check_hyper("min_lr", min_lr)
        self.best = math.inf
        self.bad_epochs = 0
        self.lr = None

    def start_epoch(self, optimizer, epoch):
        if self.lr is None:
            self.base_lr = self.lr = optimizer.lr
        optimizer.lr = self.lr

    def _check_state(self):
        super()._check_state()
        if self.lr is not None:
            _check_hyper("lr", self.lr)
        if (isinstance(self.best, bool) or not isinstance(self.best, numbers.Real)
                or not (math.isfinite(self.best) or self.best == math.inf)):
            raise ValueError(f"best must be a finite number or inf, got {self.best!r}")
        if (isinstance(self.bad_epochs, bool) or not isinstance(self.bad_epochs, numbers.Integral)
                or self.bad_epochs < 0):
            raise ValueError(f"bad_epochs must be an integer >= 0, got {self.bad_epochs!r}")

    def end_epoch(self, metric):
        if metric < self.best * (1 - self.threshold):
            self.best = metric
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.lr = max(self.lr * self.factor, self.min_lr)
                self.bad_epochs = 0

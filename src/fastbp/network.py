"""The multi-layer perceptron: parameters in one flat buffer, a reusable workspace,
forward, gradients and a training step, on either kernel backend."""

import numbers

import numpy as np

from ._backend import get_backend
from ._checks import ACTIVATIONS, LOSSES, MAX_LAYERS, OUTPUT_ACTIVATIONS, check_choice, label_error
from ._layout import aligned_empty, aligned_on_load, mlp_views, restored
from . import train as _train
from .init import check_init, initial_parameters
from .optim import SGD, Adam, AdamW, Optimizer

# the optimizers with whole-step and whole-epoch kernels (exactly these types:
# a subclass may change the update)
_COMPILED_OPTIMIZERS = (SGD, Adam, AdamW)

# forward() runs through the workspace in chunks of at most this many rows, so
# that predicting on a large array does not grow the workspace to its size.
_FORWARD_CHUNK = 4096


def _check_sizes(sizes):
    try:
        sizes = list(sizes)
    except TypeError:
        raise TypeError(f"sizes must be a sequence of layer widths, got {type(sizes).__name__}") from None
    if len(sizes) < 2:
        raise ValueError(f"sizes must give at least an input and an output width, got {sizes}")
    if len(sizes) - 1 > MAX_LAYERS:
        raise ValueError(f"sizes gives {len(sizes) - 1} weight layers; a network has at most {MAX_LAYERS}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"sizes must be positive integers, got {sizes}")
    return tuple(int(s) for s in sizes)


def _check_dtype(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _as_numeric(a, name):
    """`a` as an ndarray of real numbers (any int, float or bool dtype), without copying."""
    try:
        a = np.asarray(a)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} cannot be read as an array: {exc}") from None
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} has dtype {a.dtype}; expected real numbers")
    return a


class MLP:
    """A dense feed-forward network trained by backpropagation.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths, input first: ``[64, 32, 10]`` has one hidden layer of 32.
    activation : str or sequence of str, default "relu"
        Hidden-layer activation: one name for all, or one per hidden layer, of
        "identity", "sigmoid", "tanh", "relu", "leaky_relu" (slope 0.01).
    loss : {"cross_entropy", "mse", "binary_cross_entropy"}, default "cross_entropy"
        cross_entropy: softmax outputs, integer labels, mean over samples.
        mse: mean over all elements, float targets of shape (n, n_out).
        binary_cross_entropy: sigmoid outputs (from logits), float targets in
        [0, 1] of shape (n, n_out), mean over all elements.
    output : {"identity", "sigmoid", "tanh"}, optional
        Output activation, only with loss="mse" (default "identity").
    init : str or callable, default "torch"
        See `fastbp.init`: "torch" (U(-1/sqrt(n_in), 1/sqrt(n_in)) for W and b,
        as `nn.Linear`), "glorot_uniform" ("glorot"), "glorot_normal",
        "he_uniform", "he_normal" ("he"), "lecun_normal", or
        ``init(n_in, n_out, rng) -> (W, b)``.
    dtype : float32 or float64, default float32
    seed : int, numpy.random.Generator or None
        Seeds the network's own random generator (initialisation).
    backend : {"cython", "numpy"}, default "cython"
        The compiled kernels or their NumPy specification.

    Attributes
    ----------
    params : ndarray, shape (n_params,)
        Every parameter, layer by layer, W then b.
    weights : list of ndarray
        ``weights[l]`` is a view into `params` of shape (sizes[l+1], sizes[l]).
    biases : list of ndarray
        ``biases[l]`` is a view into `params` of shape (sizes[l+1],).
    """

    def __init__(self, sizes, activation="relu", loss="cross_entropy", *, output=None,
                 init="torch", dtype=np.float32, seed=None, backend="cython"):
        sizes = _check_sizes(sizes)
        n_hidden = len(sizes) - 2
        if isinstance(activation, str):
            activations = (activation,) * n_hidden
            check_choice("activation", activation, ACTIVATIONS)
        else:
            try:
                activations = tuple(activation)
            except TypeError:
                raise TypeError("activation must be a name or a sequence of names") from None
            if len(activations) != n_hidden:
                raise ValueError(f"activation lists {len(activations)} names for {n_hidden} hidden layers")
            for a in activations:
                check_choice("activation", a, ACTIVATIONS)
        check_choice("loss", loss, LOSSES)
        if loss == "mse":
            output = check_choice("output", "identity" if output is None else output, OUTPUT_ACTIVATIONS)
        elif output is not None:
            raise ValueError(f"output= applies only to loss='mse'; loss {loss!r} fixes its own output")
        self._init = init = check_init(init)
        self.dtype = _check_dtype(dtype)
        self.backend = backend
        self._bind_backend()
        self.sizes = sizes
        self.activations = activations
        self.loss = loss
        self.output = output
        self._rng = np.random.default_rng(seed)

        # One flat buffer; each W and b is a view into it (DESIGN.md, contract 7).
        self.params = aligned_empty(self.n_params, self.dtype)
        self.weights, self.biases = self._layer_views(self.params)
        self._set_initial(initial_parameters(init, sizes, self._rng))
        self._grad = aligned_empty(self.n_params, self.dtype)
        # Layer activations during training: logits for the two classification losses.
        self._train_activations = activations + (output or "identity",)
        self._capacity = 0
        self._workspace_rows = None
        #: Epochs trained so far (across fit and partial_fit calls).
        self.epoch_ = 0
        #: The optimizer fit created when given none; reused by later fit calls.
        self.optimizer_ = None

    @classmethod
    def from_arrays(cls, weights, biases, activation="relu", loss="cross_entropy", *, output=None,
                    dtype=None, seed=None, backend="cython"):
        """A network starting from given (e.g. pretrained) weights and biases.

        Parameters
        ----------
        weights : sequence of array_like
            ``weights[l]`` of shape (n_out, n_in) (PyTorch's layout); consecutive
            layers must chain.
        biases : sequence of array_like
            ``biases[l]`` of shape (n_out,).
        dtype : float32, float64 or None
            None takes the dtype of the first weight array when it is float32
            or float64, else float32.
        Other parameters as `MLP`; `seed` seeds the network's generator
        (shuffling), not the weights.
        """
        weights = [_as_numeric(W, f"weights[{l}]") for l, W in enumerate(weights)]
        biases = [_as_numeric(b, f"biases[{l}]") for l, b in enumerate(biases)]
        if not weights or len(weights) != len(biases):
            raise ValueError(f"got {len(weights)} weight arrays and {len(biases)} bias arrays; "
                             "expected one of each per layer, at least one layer")
        for l, (W, b) in enumerate(zip(weights, biases)):
            if W.ndim != 2 or b.shape != (W.shape[0],):
                raise ValueError(f"layer {l}: weights of shape {W.shape} and bias of shape {b.shape}; "
                                 "expected (n_out, n_in) and (n_out,)")
            if l and W.shape[1] != weights[l - 1].shape[0]:
                raise ValueError(f"layer {l} takes {W.shape[1]} inputs but layer {l - 1} gives "
                                 f"{weights[l - 1].shape[0]} outputs")
            if not (np.isfinite(W).all() and np.isfinite(b).all()):
                raise ValueError(f"layer {l} holds NaN or infinite values")
        if dtype is None:  # (float64 in either byte order is float64)
            first = weights[0].dtype.newbyteorder("=")
            dtype = first if first in (np.float32, np.float64) else np.float32
        sizes = [weights[0].shape[1]] + [W.shape[0] for W in weights]
        layers = iter(zip(weights, biases))
        net = cls(sizes, activation, loss, output=output, dtype=dtype, seed=seed, backend=backend,
                  init=lambda n_in, n_out, rng: next(layers))
        net._init = "torch"  # what fit(n_init=k) draws its other candidates from
        return net

    @classmethod
    def from_torch(cls, module, activation=None, loss="cross_entropy", *, output=None, dtype=None,
                   seed=None, backend="cython"):
        """A network with the weights of a PyTorch model (PyTorch's weight layout is
        fastbp's).

        Parameters
        ----------
        module : torch.nn.Sequential or its state_dict
            nn.Linear layers with ReLU, Sigmoid, Tanh, Identity or LeakyReLU(0.01)
            between them; it may end in the activation its loss implies (Softmax /
            LogSoftmax for cross_entropy, Sigmoid for binary_cross_entropy, the
            output activation for mse). A state_dict (tensors or arrays, no
            PyTorch needed) gives only the layers: pass `activation`.
        dtype : float32, float64 or None
            None keeps the weights' dtype.
        Other parameters as `MLP`.
        """
        from .pretrained import from_torch

        return from_torch(cls, module, activation, loss, output=output, dtype=dtype, seed=seed,
                          backend=backend)

    def to_torch(self):
        """The network as a torch.nn.Sequential (Linear and activation modules, same
        dtype and weights). Its outputs are logits for cross_entropy and
        binary_cross_entropy (add nn.Softmax / nn.Sigmoid for probabilities), the
        network's outputs for mse."""
        from .pretrained import to_torch

        return to_torch(self)

    @classmethod
    def from_sklearn(cls, estimator, *, dtype=None, seed=None, backend="cython"):
        """A network with the weights of a fitted scikit-learn MLPClassifier or
        MLPRegressor (its ``coefs_`` are transposed to fastbp's layout).

        Softmax outputs become loss="cross_entropy", a logistic output (binary or
        multi-label) loss="binary_cross_entropy", an identity output loss="mse".
        """
        from .pretrained import from_sklearn

        return from_sklearn(cls, estimator, dtype=dtype, seed=seed, backend=backend)

    # -- structure ---------------------------------------------------------

    @property
    def n_layers(self):
        """Number of weight layers."""
        return len(self.sizes) - 1

    @property
    def n_features(self):
        return self.sizes[0]

    @property
    def n_outputs(self):
        return self.sizes[-1]

    @property
    def n_params(self):
        return sum((n_in + 1) * n_out for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]))

    def _set_initial(self, layers):
        """The weights and biases from float64 (W, b) pairs, one per layer; ValueError
        where a value is too large for the network's dtype (float64 weights of 1e300
        had made a float32 network of infinities)."""
        with np.errstate(over="ignore"):
            for l, ((W0, b0), W, b) in enumerate(zip(layers, self.weights, self.biases)):
                W[...] = W0
                b[...] = b0
                if not (np.isfinite(W).all() and np.isfinite(b).all()):
                    raise ValueError(f"layer {l}'s weights or biases hold values too large for "
                                     f"{self.dtype.name} (beyond {np.finfo(self.dtype).max:.3g})")

    def _layer_views(self, flat):
        """Views (W list, b list) into a flat array with the parameter layout."""
        views = mlp_views(self.sizes, 0, flat, None, None, None)
        return views[0], views[1]

    def _bind_backend(self):
        """The kernels module named by self.backend, and the compiled backend's
        one-call path for step (the reference has none)."""
        self._kernels = get_backend(self.backend)
        self._net_step = getattr(self._kernels, "_net_step", None)

    # pickle and copy.deepcopy: the backend module and the work buffers are not
    # state. weights and biases are rebuilt as views of params (pickle would restore
    # them as copies that no longer follow params); params comes back 64-byte
    # aligned and one object, so that an optimizer pickled with the network still
    # updates it.
    _UNPICKLED = ("_kernels", "_net_step", "weights", "biases", "_grad", "_A", "_D",
                  "_workspace_views", "_X_batch", "_y_batch", "_batch_rows")

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in MLP._UNPICKLED}
        state["_capacity"], state["_workspace_rows"] = 0, None
        state["params"] = aligned_on_load(self.params)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.params = restored(self.params)
        self._bind_backend()
        self.weights, self.biases = self._layer_views(self.params)
        self._grad = aligned_empty(self.n_params, self.dtype)

    def __repr__(self):
        act = self.activations[0] if len(set(self.activations)) == 1 else list(self.activations)
        extra = f", output={self.output!r}" if self.loss == "mse" else ""
        return (f"MLP({list(self.sizes)}, activation={act!r}, loss={self.loss!r}{extra}, "
                f"dtype={self.dtype.name}, backend={self.backend!r})")

    # -- input checks (all before any state changes) -----------------------

    def _as_input(self, X, check_finite=True):
        if (type(X) is np.ndarray and X.dtype == self.dtype and X.ndim == 2
                and X.shape[1] == self.n_features and X.flags.c_contiguous):
            # already in the network's layout: the common case in a training loop
            if check_finite and not self._kernels.all_finite(X.reshape(-1)):
                raise ValueError("X contains NaN or infinity")
            return X
        X = _as_numeric(X, "X")
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, {self.n_features}), got shape {X.shape}")
        if X.shape[1] != self.n_features:
            raise ValueError(f"X has {X.shape[1]} features, but the network expects {self.n_features}")
        X = np.ascontiguousarray(X, dtype=self.dtype)
        # a converted array is checked here even when check_finite is False: beside
        # the conversion the check is cheap, and it spares the step a refused run
        # (on the NumPy backend, one that warns about NaN)
        if not self._kernels.all_finite(X.reshape(-1)):
            raise ValueError("X contains NaN or infinity")
        return X

    def _as_targets(self, y, n, lazy=False):
        """Targets as the kernels take them. lazy=True leaves to the kernel the
        targets go to what it checks itself before writing anything: the label
        range (with the same message), and, for mse, finiteness (a NaN target
        makes the step refuse; `_blame_inputs` then names it)."""
        name = "y"
        if self.loss == "cross_entropy":
            if (lazy and type(y) is np.ndarray and y.dtype == np.int64
                    and y.shape == (n,) and y.flags.c_contiguous):
                return y
            y = np.asarray(y)
            if y.dtype.kind not in "iu":
                raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
            if y.ndim != 1:
                raise ValueError(f"y must be 1-D class labels of shape (n_samples,), got shape {y.shape}")
            if y.shape[0] != n:
                raise ValueError(f"X has {n} samples but y has {y.shape[0]}")
            if lazy and np.can_cast(y.dtype, np.int64):
                # every value survives the conversion: the kernel checks the range
                return np.ascontiguousarray(y, dtype=np.int64)
            # two reductions, and the index only on failure: 3 us instead of 4 on 32
            # labels, 18 instead of 55 on 60,000
            if y.size and (y.min() < 0 or y.max() >= self.n_outputs):
                i = np.flatnonzero((y < 0) | (y >= self.n_outputs))[0]
                raise label_error(i, y[i], self.n_outputs)
            return np.ascontiguousarray(y, dtype=np.int64)
        Y = _as_numeric(y, name)
        if Y.ndim == 1 and self.n_outputs == 1:
            Y = Y.reshape(-1, 1)
        if Y.ndim != 2 or Y.shape[1] != self.n_outputs:
            raise ValueError(f"y must have shape (n_samples, {self.n_outputs}), got {Y.shape}")
        if Y.shape[0] != n:
            raise ValueError(f"X has {n} samples but y has {Y.shape[0]}")
        Y = np.ascontiguousarray(Y, dtype=self.dtype)
        if not (lazy and self.loss == "mse") and not self._kernels.all_finite(Y.reshape(-1)):
            raise ValueError("y contains NaN or infinity")
        if self.loss == "binary_cross_entropy" and Y.size and (Y.min() < 0 or Y.max() > 1):
            raise ValueError("binary_cross_entropy targets must lie in [0, 1]")
        return Y

    def _as_batch(self, X, y, lazy=False):
        """Validated, converted (X, y); lazy=True leaves the checks that the one-call
        steps (`mlp_sgd_step`, `mlp_adam_step`) make themselves to them (see
        `_as_targets`)."""
        X = self._as_input(X, check_finite=not lazy)
        y = self._as_targets(y, X.shape[0], lazy)
        if X.shape[0] == 0:
            raise ValueError("X has no samples; training needs at least one")
        return X, y

    def _check_optimizer(self, optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a fastbp optimizer such as fastbp.SGD, got {type(optimizer).__name__}")
        if optimizer.params is not self.params:
            raise ValueError("optimizer was built on another parameter array; "
                             "build it on this network's: fastbp.SGD(net.params, ...)")

    # -- computation -------------------------------------------------------

    def _workspace(self, n):
        """Per-layer (n, width) activation and delta views for a batch of n rows.

        Backed by two flat buffers sized for the largest batch so far (grown,
        never shrunk), laid out as `mlp_gradients` expects.
        """
        if n > self._capacity:
            size = n * sum(self.sizes[1:])
            self._A = aligned_empty(size, self.dtype)
            self._D = aligned_empty(size, self.dtype)
            self._capacity = n
            self._workspace_rows = None
        if self._workspace_rows != n:
            views = mlp_views(self.sizes, n, None, self._A, self._D, None)
            self._workspace_views = (views[4], views[5])
            self._workspace_rows = n
        return self._workspace_views

    def forward(self, X):
        """Outputs of the network for a batch.

        Parameters
        ----------
        X : array_like, shape (n, n_features)

        Returns
        -------
        ndarray, shape (n, n_outputs)
            Class probabilities (softmax) for cross_entropy, probabilities
            (sigmoid) for binary_cross_entropy, outputs for mse.
        """
        X = self._as_input(X)
        out = np.empty((X.shape[0], self.n_outputs), dtype=self.dtype)
        self._forward_checked(X, out=out)
        return out

    def _forward_checked(self, X, y=None, out=None):
        """One pass over validated X, in chunks through the workspace, a compiled
        call per chunk (`mlp_forward`).

        Writes the network's outputs (what `forward` returns) into `out` when
        given, and returns the mean loss against `y` when given (else None):
        validation needs both, and gets them from one pass.
        """
        total = 0.0
        labels = targets = None
        for start in range(0, X.shape[0], _FORWARD_CHUNK):
            stop = min(start + _FORWARD_CHUNK, X.shape[0])
            if stop - start > self._capacity:
                self._workspace(stop - start)
            if y is not None:
                if self.loss == "cross_entropy":
                    labels = y[start:stop]
                else:
                    targets = y[start:stop]
            loss = self._kernels.mlp_forward(
                X[start:stop], labels, targets, self.params, self.sizes, self.activations,
                self.loss, self._train_activations[-1], self._A,
                None if out is None else out[start:stop])
            if y is not None:
                total += loss * (stop - start)
        return None if y is None else total / X.shape[0]

    def _loss_and_gradients(self, X, y, grad):
        """Forward, loss and backward on a validated batch, in one kernel call;
        fills the flat gradient `grad`. Returns the mean loss."""
        self._workspace(X.shape[0])
        labels, targets = (y, None) if self.loss == "cross_entropy" else (None, y)
        return self._kernels.mlp_gradients(X, labels, targets, self.params, self.sizes,
                                           self.activations, self.loss, self._train_activations[-1],
                                           self._A, self._D, grad)

    def gradients(self, X, y):
        """Mean loss and its gradients on a batch; the network is not changed.

        Parameters
        ----------
        X : array_like, shape (n, n_features)
        y : array_like
            Integer labels of shape (n,) for cross_entropy; float targets of
            shape (n, n_outputs) for mse and binary_cross_entropy.

        Returns
        -------
        loss : float
        dW : list of ndarray
            Shaped like `weights`; views into one new flat gradient array.
        db : list of ndarray
            Shaped like `biases`.
        """
        X, y = self._as_batch(X, y)
        grad = np.empty_like(self.params)
        loss = self._loss_and_gradients(X, y, grad)
        dW, db = self._layer_views(grad)
        return loss, dW, db

    def step(self, X, y, optimizer):
        """One training step: forward, loss, backward, and an optimizer update.

        Returns the mean loss before the update. If the loss or a gradient is
        not finite, raises FloatingPointError and leaves the network unchanged.
        """
        o = optimizer
        # the common case in one call: _check_optimizer's isinstance check is
        # implied by _compiled's type check (the two calls were 0.3 us of a 10 us
        # tiny step), and _compiled is written out here (its call and the tuple
        # of three globals it built were 0.2 us of a 5.3 us one)
        compiled = (type(o) in _COMPILED_OPTIMIZERS and o.max_grad_norm is None
                    and o._kernels in (None, self._kernels) and o.params is self.params)
        if compiled and self._net_step is not None:
            # the whole step, arguments read in C (None: take the path below)
            loss = self._net_step(self, X, y, o, type(o) is not SGD)
            if loss is not None:
                return loss
        if not compiled:
            self._check_optimizer(o)
            if not self._compiled(o):
                X, y = self._as_batch(X, y)
                return self._step_checked(X, y, o)
        if (type(X) is np.ndarray and type(y) is np.ndarray and X.ndim == 2 and X.shape[0]
                and X.shape[1] == self.sizes[0] and self.loss != "binary_cross_entropy"
                and X.dtype == self.dtype and X.flags.c_contiguous and y.flags.c_contiguous
                and (y.dtype, y.ndim) == ((np.int64, 1) if self.loss == "cross_entropy"
                                          else (self.dtype, 2))):
            # Arrays of the kernel's types and layout go straight to the one-call
            # step: it checks shapes, labels and finiteness itself before it writes
            # anything (_as_batch cost 1.2 us of a 13 us tiny step). Only when it
            # refuses do the checks below run, to name what is wrong. Arrays to
            # convert go to them first: a refused call costs 35-45 us, as long
            # as four tiny steps, to build the message it then drops.
            # (binary cross-entropy's target range is checked only in Python.)
            try:
                return self._step_checked(X, y, optimizer, inputs_checked=False)
            except (TypeError, ValueError):
                pass
        # the one-call steps refuse non-finite inputs without changing anything
        # (and check labels): no separate pass over the batch first
        X, y = self._as_batch(X, y, lazy=True)
        return self._step_checked(X, y, optimizer, inputs_checked=False)

    def _compiled(self, optimizer):
        """Whether `optimizer` has whole-step and whole-epoch kernels (SGD, Adam, AdamW
        without gradient clipping, on the network's backend; `step` has its own copy)."""
        o = optimizer
        return (type(o) in _COMPILED_OPTIMIZERS and o.max_grad_norm is None
                and o._kernels in (None, self._kernels))

    def _blame_inputs(self, X, y):
        """ValueError naming a non-finite X or y (after a refused step)."""
        if not self._kernels.all_finite(X.reshape(-1)):
            raise ValueError("X contains NaN or infinity")
        if self.loss != "cross_entropy" and not self._kernels.all_finite(y.reshape(-1)):
            raise ValueError("y contains NaN or infinity")

    def _step_checked(self, X, y, optimizer, inputs_checked=True):
        """`step` on a batch already validated and converted (but for what
        `_as_batch(lazy=True)` leaves out, when inputs_checked is False)."""
        o = optimizer
        # step() passes inputs_checked=False only for an optimizer it found compiled
        if not inputs_checked or self._compiled(o):
            # forward, backward and update in one compiled call
            if X.shape[0] != self._workspace_rows:
                self._workspace(X.shape[0])
            labels, targets = (y, None) if self.loss == "cross_entropy" else (None, y)
            # (arguments spelt out: packing them in a tuple would allocate each step)
            if type(o) is SGD:
                loss, status = self._kernels.mlp_sgd_step(
                    X, labels, targets, self.params, self.sizes, self.activations, self.loss,
                    self._train_activations[-1], self._A, self._D, self._grad, o.momentum_buffer,
                    o._lr, o.momentum, o.dampening, o.nesterov, o.weight_decay, o.maximize,
                    o.step_count == 0)
            else:
                loss, status = self._kernels.mlp_adam_step(
                    X, labels, targets, self.params, self.sizes, self.activations, self.loss,
                    self._train_activations[-1], self._A, self._D, self._grad, o.exp_avg,
                    o.exp_avg_sq, o.max_exp_avg_sq, o.step_count + 1, o._lr, o.betas[0],
                    o.betas[1], o.eps, o.weight_decay, o._decoupled, o.amsgrad, o.maximize)
            if status:
                if not inputs_checked:
                    self._blame_inputs(X, y)
                raise FloatingPointError(f"the loss ({loss}) or a gradient is not finite; "
                                         "the network was not updated (lower the learning rate?)")
            o.step_count += 1
            return loss
        loss = self._loss_and_gradients(X, y, self._grad)
        if not (np.isfinite(loss) and self._kernels.all_finite(self._grad)):
            raise FloatingPointError(f"the loss ({loss}) or a gradient is not finite; "
                                     "the network was not updated (lower the learning rate?)")
        optimizer._apply(self._grad, optimizer._kernels or self._kernels)  # clips in place
        return loss

    def _compiled_epoch(self, X, y, order, batch_size, optimizer, stop):
        """One epoch in one compiled call (`mlp_sgd_epoch`, or `mlp_adam_epoch` for
        Adam and AdamW).

        Returns (sum of batch losses times batch sizes, samples used). Raises
        FloatingPointError at a batch whose loss or gradient is not finite; the
        updates before it stay, that batch is not applied.
        """
        n = X.shape[0]
        order = np.arange(n, dtype=np.int64) if order is None else order.astype(np.int64, copy=False)
        rows = min(batch_size, n)
        self._workspace(rows)
        if getattr(self, "_batch_rows", 0) < rows:
            self._X_batch = aligned_empty((rows, self.n_features), self.dtype)
            self._y_batch = (np.empty(rows, np.int64) if self.loss == "cross_entropy"
                             else np.empty((rows, self.n_outputs), self.dtype))
            self._batch_rows = rows
        labels, targets = (y, None) if self.loss == "cross_entropy" else (None, y)
        Xb = self._X_batch
        lb, tb = (self._y_batch[:Xb.shape[0]], None) if labels is not None else (None, self._y_batch)
        o = optimizer
        net = (X, labels, targets, order, batch_size, self.params, self.sizes, self.activations,
               self.loss, self._train_activations[-1], self._A, self._D, self._grad, Xb, lb, tb)
        if type(o) is SGD:
            total, steps, status = self._kernels.mlp_sgd_epoch(
                *net, o.momentum_buffer, stop, o.lr, o.momentum, o.dampening, o.nesterov,
                o.weight_decay, o.maximize, o.step_count == 0)
        else:
            total, steps, status = self._kernels.mlp_adam_epoch(
                *net, o.exp_avg, o.exp_avg_sq, o.max_exp_avg_sq, stop, o.step_count + 1, o.lr,
                o.betas[0], o.betas[1], o.eps, o.weight_decay, o._decoupled, o.amsgrad, o.maximize)
        o.step_count += steps
        if status == 1:
            raise FloatingPointError("a batch's loss or gradient is not finite; it was not applied "
                                     f"(after {steps} good step{'' if steps == 1 else 's'} this "
                                     "epoch; lower the learning rate?)")
        return total, min(steps * batch_size, n)

    # -- evaluation ---------------------------------------------------------

    def _evaluate_checked(self, X, y):
        """Mean loss on validated arrays (no gradient)."""
        return self._forward_checked(X, y)

    def evaluate(self, X, y):
        """Mean loss on (X, y), as `gradients` computes it, without gradients."""
        X, y = self._as_batch(X, y)
        return self._evaluate_checked(X, y)

    def _predict_from_output(self, out):
        if self.loss == "cross_entropy":
            return out.argmax(axis=1)
        if self.loss == "binary_cross_entropy":
            return (out > 0.5).astype(np.int64)
        return out

    def predict(self, X):
        """Class labels for cross_entropy (argmax), 0/1 labels of shape (n, n_outputs)
        for binary_cross_entropy (probability > 0.5), outputs for mse."""
        return self._predict_from_output(self.forward(X))

    def predict_proba(self, X):
        """Class probabilities (cross_entropy) or positive-class probabilities
        (binary_cross_entropy), shape (n, n_outputs)."""
        if self.loss == "mse":
            raise AttributeError("predict_proba needs a classification loss; this network uses 'mse'")
        return self.forward(X)

    def _score_checked(self, X, y):
        out = np.empty((X.shape[0], self.n_outputs), dtype=self.dtype)
        self._forward_checked(X, out=out)
        return self._score_outputs(out, y)

    def _score_outputs(self, out, y):
        """`score` from the network's outputs on validated targets."""
        pred = self._predict_from_output(out)
        # (accuracies as counts over n: np.mean's value, in a quarter of its time on
        # small batches)
        if self.loss == "cross_entropy":
            return np.count_nonzero(pred == y) / out.shape[0]
        if self.loss == "binary_cross_entropy":
            # subset accuracy, as sklearn's accuracy_score for multi-label targets
            return np.count_nonzero(np.all(pred == (y > 0.5), axis=1)) / out.shape[0]
        # R^2 averaged over outputs, as sklearn's r2_score (1 or 0 for a constant target)
        residual = np.sum((y - pred) ** 2, axis=0, dtype=np.float64)
        total = np.sum((y - y.mean(axis=0)) ** 2, axis=0, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(total > 0, 1 - residual / total, np.where(residual == 0, 1.0, 0.0))
        return float(np.mean(r2))

    def score(self, X, y):
        """Accuracy for classification (subset accuracy for binary_cross_entropy), R^2 for mse."""
        X, y = self._as_batch(X, y)
        return self._score_checked(X, y)

    # -- training ------------------------------------------------------------

    def _resolve_optimizer(self, optimizer):
        if optimizer is None:
            if self.optimizer_ is None:
                self.optimizer_ = SGD(self.params, lr=0.01, momentum=0.9)
            optimizer = self.optimizer_
        self._check_optimizer(optimizer)
        return optimizer

    def fit(self, X, y, epochs=10, batch_size=32, optimizer=None, shuffle=True,
            validation_data=None, validation_fraction=None, early_stopping=None, schedule=None,
            callbacks=(), progress=None, verbose=False, n_init=1, trial_epochs=None,
            diagnostics=True):
        """Train by mini-batch gradient descent; returns a `History`.

        Parameters
        ----------
        X : array_like, shape (n, n_features)
        y : array_like
            Labels (n,) for cross_entropy; targets (n, n_outputs) otherwise.
        epochs : int
            Passes over the data. Every sample is used once per epoch; the last
            batch may be smaller.
        batch_size : int
        optimizer : fastbp optimizer, optional
            Built on ``net.params``. None uses (and keeps, in ``optimizer_``)
            ``SGD(lr=0.01, momentum=0.9)``.
        shuffle : bool
            Reshuffle every epoch with the network's own generator (seeded by
            `seed`): fit(epochs=a) then fit(epochs=b) gives the network of
            fit(epochs=a + b), bit for bit.
        validation_data : (X_val, y_val), optional
        validation_fraction : float, optional
            Hold out this fraction of the samples, the last ones (before
            shuffling), for validation.
        early_stopping : fastbp.EarlyStopping, optional
        schedule : fastbp schedule, optional
            Sets the learning rate before each epoch.
        callbacks : sequence of callables
            ``callback(net, record)`` after each epoch; a true return value stops.
        progress : bool or None
            A tqdm bar; None shows one when tqdm is installed and stderr is a terminal.
        verbose : bool
            Print one line per epoch.
        n_init : int
            With n_init > 1, first train n_init candidates for `trial_epochs`
            epochs each, from the current weights and from n_init - 1 fresh
            initialisations (seeds drawn from the network's generator), and
            continue from the best by validation loss (training loss without
            validation data). The trials count toward `epochs`.
        trial_epochs : int, optional
            Epochs per trial (default: min(5, epochs)).
        diagnostics : bool
            Record per-layer statistics in the history each epoch
            (`fastbp.diagnostics.layer_statistics` on the first `batch_size` training
            samples).

        Ctrl-C stops cleanly after the current batch, with the network whole.
        With `SGD`, `Adam` or `AdamW` (without max_grad_norm) each epoch runs as
        one compiled call (`mlp_sgd_epoch`, `mlp_adam_epoch`); otherwise one step
        per batch.
        """
        epochs = _train.check_positive_int("epochs", epochs, minimum=0)
        batch_size = _train.check_positive_int("batch_size", batch_size)
        n_init = _train.check_positive_int("n_init", n_init)
        callbacks = _train.check_fit_arguments(optimizer, schedule, early_stopping, callbacks)
        optimizer = self._resolve_optimizer(optimizer)
        X, y = self._as_batch(X, y)
        X, y, validation = _train.split_validation(self, X, y, validation_data, validation_fraction)
        run = dict(batch_size=batch_size, shuffle=bool(shuffle), validation=validation,
                   early_stopping=early_stopping, schedule=schedule, callbacks=callbacks,
                   progress=progress, verbose=verbose, diagnostics=diagnostics)
        trials = None
        if n_init > 1:
            trial_epochs = min(5, epochs) if trial_epochs is None else \
                _train.check_positive_int("trial_epochs", trial_epochs)
            if trial_epochs > epochs:
                raise ValueError(f"trial_epochs={trial_epochs} exceeds epochs={epochs}")
            trials = self._run_trials(X, y, optimizer, n_init, trial_epochs, run)
            epochs -= trial_epochs
        history = _train.run_epochs(self, X, y, epochs=epochs, optimizer=optimizer, **run)
        history.trials = trials
        return history

    def _run_trials(self, X, y, optimizer, n_init, trial_epochs, run):
        """Train n_init candidates briefly; leave the network and optimizer at the best."""
        start_rng = self._rng.bit_generator.state
        seeds = self._rng.integers(0, 2**63, size=n_init - 1)
        start_params, start_epoch = self.params.copy(), self.epoch_
        trial_run = dict(run, early_stopping=None, schedule=None, callbacks=(), progress=False,
                         verbose=False)
        results = []
        for trial in range(n_init):
            if trial > 0:
                rng = np.random.default_rng(seeds[trial - 1])
                try:
                    self._set_initial(initial_parameters(self._init, self.sizes, rng))
                except (TypeError, ValueError):
                    # (an init callable's refused draw: the network as fit found it)
                    self.params[...] = start_params
                    self.epoch_ = start_epoch
                    self._rng.bit_generator.state = start_rng
                    raise
            else:
                self.params[...] = start_params
            self.epoch_ = start_epoch
            trial_opt = optimizer.clone(self.params)
            trial_opt.lr = optimizer.lr
            history = _train.run_epochs(self, X, y, epochs=trial_epochs, optimizer=trial_opt, **trial_run)
            last = history.records[-1]
            score = last["val_loss"] if last["val_loss"] is not None else last["loss"]
            results.append({"trial": trial, "loss": score, "params": self.params.copy(),
                            "state": trial_opt.state(), "history": history})
        best = min(results, key=lambda r: r["loss"])
        self.params[...] = best["params"]
        optimizer.load_state(best["state"])
        self.epoch_ = start_epoch + trial_epochs
        for r in results:
            del r["params"], r["state"]
        return results

    def partial_fit(self, X, y, optimizer=None, *, batch_size=32, shuffle=True,
                    validation_data=None, early_stopping=None):
        """One pass (epoch) over (X, y); returns self.

        With `early_stopping` (and `validation_data`), each call counts as an
        epoch for it: check ``early_stopping.should_stop`` between calls.
        """
        if early_stopping is not None and early_stopping.should_stop:
            return self
        self.fit(X, y, epochs=1, batch_size=batch_size, optimizer=optimizer, shuffle=shuffle,
                 validation_data=validation_data, early_stopping=early_stopping, progress=False,
                 diagnostics=False)
        return self

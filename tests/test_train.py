"""fit, partial_fit, predict/score, schedules, early stopping, restarts and interruption."""

import re
import signal

import numpy as np
import pytest

import fastbp

from conftest import BACKEND_NAMES


def blobs(n=240, n_features=5, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    return centers[y] + rng.normal(size=(n, n_features)), y


def make(backend="cython", dtype=np.float64, seed=0, **kwargs):
    kwargs.setdefault("activation", "tanh")
    return fastbp.MLP([5, 16, 3], dtype=dtype, seed=seed, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("opt_cls, opt_kwargs", [
    (fastbp.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (fastbp.Adam, dict(lr=0.01, amsgrad=True)),
])
def test_fit_in_two_calls_equals_one_call_bit_for_bit(backend, opt_cls, opt_kwargs):
    X, y = blobs()
    nets = [make(backend, dtype=np.float32) for _ in range(2)]
    opts = [opt_cls(net.params, **opt_kwargs) for net in nets]
    schedules = [fastbp.StepLR(2, gamma=0.5) for _ in range(2)]
    h1 = nets[0].fit(X, y, epochs=3, batch_size=17, optimizer=opts[0], schedule=schedules[0])
    h2 = nets[0].fit(X, y, epochs=2, batch_size=17, optimizer=opts[0], schedule=schedules[0])
    h = nets[1].fit(X, y, epochs=5, batch_size=17, optimizer=opts[1], schedule=schedules[1])
    assert nets[0].params.tobytes() == nets[1].params.tobytes()
    assert h1.loss + h2.loss == h.loss
    assert nets[0].epoch_ == nets[1].epoch_ == 5
    assert opts[0].step_count == opts[1].step_count == 5 * 15  # ceil(240 / 17) batches an epoch


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_compiled_sgd_epoch_equals_the_step_by_step_loop(backend, loss, shuffle):
    class StepByStep(fastbp.SGD):
        """Not SGD itself: fit runs it one Python step at a time."""

    X, y = blobs(n=100)
    if loss == "mse":
        y = np.column_stack([X[:, 0], X[:, 1] * X[:, 2], -X[:, 3]])
    nets = [make(backend, dtype=np.float32, loss=loss) for _ in range(2)]
    kwargs = dict(lr=0.02, momentum=0.9, weight_decay=1e-3)
    opts = [fastbp.SGD(nets[0].params, **kwargs), StepByStep(nets[1].params, **kwargs)]
    histories = [net.fit(X, y, epochs=3, batch_size=16, optimizer=opt, shuffle=shuffle)
                 for net, opt in zip(nets, opts)]
    assert nets[0].params.tobytes() == nets[1].params.tobytes()
    assert histories[0].loss == histories[1].loss
    assert opts[0].step_count == opts[1].step_count == 3 * 7
    np.testing.assert_array_equal(opts[0].momentum_buffer, opts[1].momentum_buffer)


def test_diverging_compiled_epoch_raises_with_the_network_whole():
    X, y = blobs()
    net = fastbp.MLP([5, 3], loss="mse", dtype=np.float32, seed=0)
    opt = fastbp.SGD(net.params, lr=1e30)
    with pytest.raises(FloatingPointError, match="not applied") as info:
        net.fit(X, np.full((240, 3), 1e3), epochs=3, optimizer=opt)
    assert np.isfinite(net.params).all() and opt.step_count >= 1
    # the message counts the good steps of the epoch ("1 good step", "2 good steps")
    count = int(str(info.value).split("(after ")[1].split(" ")[0])
    assert f"after {count} good step{'' if count == 1 else 's'} this epoch" in str(info.value)


def test_every_sample_once_per_epoch_and_last_batch_smaller():
    X, y = blobs(n=50)
    seen = []

    class Recording(fastbp.SGD):
        def _update(self, grad, kernels):
            seen.append(self._rows)
            super()._update(grad, kernels)

    net = make()
    opt = Recording(net.params, lr=0.01)  # a subclass: fit takes it step by step
    original = net._step_checked

    def step(Xb, yb, optimizer):
        opt._rows = [tuple(r) for r in Xb]
        return original(Xb, yb, optimizer)

    net._step_checked = step
    net.fit(X, y, epochs=2, batch_size=16, optimizer=opt, diagnostics=False)
    assert [len(b) for b in seen] == [16, 16, 16, 2] * 2
    for epoch in (seen[:4], seen[4:]):
        assert sorted(r for b in epoch for r in b) == sorted(tuple(r) for r in X)
    assert seen[0] != seen[4]  # reshuffled


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_fit_learns_and_scores(backend):
    X, y = blobs()
    net = make(backend)
    history = net.fit(X, y, epochs=20, optimizer=fastbp.SGD(net.params, lr=0.05, momentum=0.9),
                      validation_fraction=0.25)
    assert history.loss[-1] < 0.2 * history.loss[0]
    assert history.val_score[-1] > 0.95
    assert len(history) == 20 and history.epoch == list(range(20))
    assert all(t > 0 for t in history.time) and history.lr == [0.05] * 20
    # the last quarter of the samples was held out: the score there is the one recorded
    assert net.score(X[180:], y[180:]) == history.val_score[-1]
    assert np.array_equal(net.predict(X), net.predict_proba(X).argmax(1))
    assert net.score(X, y) == np.mean(net.predict(X) == y)


def test_default_optimizer_is_kept_between_calls():
    X, y = blobs()
    a, b = make(), make()
    a.fit(X, y, epochs=2)
    a.fit(X, y, epochs=1)
    b.fit(X, y, epochs=3)
    assert isinstance(a.optimizer_, fastbp.SGD) and a.optimizer_.step_count == 3 * 8
    np.testing.assert_array_equal(a.params, b.params)


def test_predict_and_score_for_regression_and_multilabel():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    Y = np.column_stack([X[:, 0] - X[:, 1], X[:, 2] * 0.5])
    net = fastbp.MLP([4, 16, 2], loss="mse", dtype=np.float64, seed=0)
    net.fit(X, Y, epochs=40, optimizer=fastbp.Adam(net.params, lr=0.01))
    pred = net.predict(X)
    r2 = np.mean(1 - ((Y - pred) ** 2).sum(0) / ((Y - Y.mean(0)) ** 2).sum(0))
    assert net.score(X, Y) == pytest.approx(r2, rel=1e-12) and r2 > 0.95
    with pytest.raises(AttributeError, match="classification"):
        net.predict_proba(X)
    T = (Y > 0).astype(float)
    clf = fastbp.MLP([4, 16, 2], loss="binary_cross_entropy", dtype=np.float64, seed=0)
    clf.fit(X, T, epochs=40, optimizer=fastbp.Adam(clf.params, lr=0.01))
    labels = clf.predict(X)
    assert labels.shape == (200, 2) and set(np.unique(labels)) <= {0, 1}
    assert clf.score(X, T) == np.mean(np.all(labels == T, axis=1)) > 0.9


def test_sklearn_metrics_agree():
    metrics = pytest.importorskip("sklearn.metrics")
    X, y = blobs()
    net = make()
    net.fit(X, y, epochs=3)
    assert net.score(X, y) == metrics.accuracy_score(y, net.predict(X))
    reg = fastbp.MLP([5, 2], loss="mse", dtype=np.float64, seed=1)
    Y = np.column_stack([X[:, 0], X[:, 1] + X[:, 2]])
    reg.fit(X, Y, epochs=3)
    assert reg.score(X, Y) == pytest.approx(metrics.r2_score(Y, reg.predict(X)), rel=1e-10)


def test_evaluate_equals_gradients_loss():
    X, y = blobs()
    net = make()
    assert net.evaluate(X, y) == pytest.approx(net.gradients(X, y)[0], rel=1e-12)


# ---------------------------------------------------------------------------
# Early stopping, callbacks, interruption

def test_early_stopping_stops_and_restores_the_best():
    X, y = blobs()
    rng = np.random.default_rng(1)
    y_noisy = rng.integers(0, 3, size=y.size)  # nothing to learn: validation loss rises
    net = make()
    stopper = fastbp.EarlyStopping(patience=2, restore_best=True)
    history = net.fit(X, y_noisy, epochs=100, optimizer=fastbp.Adam(net.params, lr=0.05),
                      validation_data=blobs(seed=2), early_stopping=stopper)
    assert history.stopped_early and history.stop_reason == "early_stopping"
    assert len(history) < 100
    best = int(np.argmin(history.val_loss))
    assert len(history) == best + 1 + 3  # patience 2: stops on the third epoch without progress
    assert net.evaluate(*blobs(seed=2)) == pytest.approx(history.val_loss[best], rel=1e-12)


def test_early_stopping_with_partial_fit():
    X, y = blobs()
    Xv, yv = blobs(seed=5)
    net = make()
    opt = fastbp.Adam(net.params, lr=0.05)
    stopper = fastbp.EarlyStopping(patience=1, min_delta=10.0)  # no epoch can improve by 10
    calls = 0
    while not stopper.should_stop:
        net.partial_fit(X, y, opt, validation_data=(Xv, yv), early_stopping=stopper)
        calls += 1
        assert calls < 10
    assert calls == 3 and net.epoch_ == 3
    before = net.params.copy()
    net.partial_fit(X, y, opt, early_stopping=stopper)  # stopped: nothing more happens
    np.testing.assert_array_equal(net.params, before)


def test_callback_can_stop():
    X, y = blobs()
    seen = []
    history = make().fit(X, y, epochs=10, callbacks=[lambda net, record: seen.append(record["epoch"]) or
                                                      record["epoch"] == 3])
    assert seen == [0, 1, 2, 3] and history.stop_reason == "callback"


def test_ctrl_c_stops_after_the_current_batch_with_the_network_whole():
    X, y = blobs()
    net = make()
    opt = fastbp.SGD(net.params, lr=0.05, momentum=0.9)

    def press_ctrl_c(net, record):
        if record["epoch"] == 1:
            signal.raise_signal(signal.SIGINT)

    history = net.fit(X, y, epochs=10, batch_size=40, optimizer=opt, callbacks=[press_ctrl_c])
    assert history.stop_reason == "interrupted" and history.stopped_early
    # two whole epochs of 6 batches, then one batch of the third
    assert opt.step_count == 2 * 6 + 1 and len(history) == 3 and net.epoch_ == 3
    assert np.isfinite(net.params).all()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_fit_restores_the_callers_sigint_handler():
    X, y = blobs()
    calls = []
    mine = lambda signum, frame: calls.append(signum)
    previous = signal.signal(signal.SIGINT, mine)
    try:
        make().fit(X, y, epochs=1)
        make().partial_fit(X, y)
        assert signal.getsignal(signal.SIGINT) is mine
        signal.raise_signal(signal.SIGINT)
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------
# Schedules

@pytest.mark.parametrize("schedule, expected", [
    (fastbp.StepLR(2, gamma=0.5), [0.1, 0.1, 0.05, 0.05, 0.025]),
    (fastbp.ExponentialLR(0.5), [0.1, 0.05, 0.025, 0.0125, 0.00625]),
    (fastbp.CosineAnnealingLR(4), [0.1, 0.1 * (1 + np.cos(np.pi / 4)) / 2, 0.05,
                                   0.1 * (1 + np.cos(3 * np.pi / 4)) / 2, 0.0]),
    (fastbp.LinearWarmup(2, start_factor=0.5), [0.05, 0.075, 0.1, 0.1, 0.1]),
    (fastbp.InverseScaling(1.0), [0.1, 0.05, 0.1 / 3, 0.025, 0.02]),
])
def test_schedules(schedule, expected):
    X, y = blobs()
    net = make()
    history = net.fit(X, y, epochs=5, optimizer=fastbp.SGD(net.params, lr=0.1), schedule=schedule)
    np.testing.assert_allclose(history.lr, expected, rtol=1e-12, atol=1e-15)


def test_schedules_that_overflow_name_the_schedule_and_epoch():
    # (InverseScaling(1e30) had raised OverflowError '(34, Numerical result out of
    # range)' from fit; CosineAnnealingLR(eta_min=1e308) an 'invalid lr -inf')
    opt = fastbp.SGD(np.zeros(1), lr=0.1)
    inverse = fastbp.InverseScaling(1e30)
    rates = []
    for epoch in range(3):
        inverse.start_epoch(opt, epoch)
        rates.append(opt.lr)
    assert rates == [0.1, 0.0, 0.0]  # 0.1 / 2**1e30
    cosine = fastbp.CosineAnnealingLR(4, eta_min=1e308)
    cosine.start_epoch(opt, 1)
    assert opt.lr == 1e308 + (0.1 - 1e308) * ((1 + np.cos(np.pi / 4)) / 2)
    for schedule, epoch in ((fastbp.ExponentialLR(1e200), 2), (fastbp.StepLR(1, gamma=1e300), 2)):
        opt.lr = 0.1
        with pytest.raises(ValueError, match=f"{type(schedule).__name__} gives the learning rate inf "
                                             f"for epoch {epoch}"):
            schedule.start_epoch(opt, epoch)
        assert opt.lr == 0.1


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    pairs = [
        (fastbp.StepLR(3, gamma=0.3), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.3)),
        (fastbp.ExponentialLR(0.9), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),
        (fastbp.CosineAnnealingLR(5, eta_min=0.01),
         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 5, eta_min=0.01)),
        (fastbp.LinearWarmup(4, start_factor=0.25),
         lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.25, 1.0, total_iters=4)),
    ]
    for ours, make_theirs in pairs:
        opt = fastbp.SGD(np.zeros(1), lr=0.2)
        topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
        theirs = make_theirs(topt)
        for epoch in range(8):
            ours.start_epoch(opt, epoch)
            assert opt.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12), (ours, epoch)
            topt.step()
            theirs.step()


def test_reduce_on_plateau():
    opt = fastbp.SGD(np.zeros(1), lr=1.0)
    schedule = fastbp.ReduceLROnPlateau(factor=0.5, patience=1, min_lr=0.3)
    lrs = []
    for epoch, metric in enumerate([5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]):
        schedule.start_epoch(opt, epoch)
        lrs.append(opt.lr)
        schedule.end_epoch(metric)
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.3]


# ---------------------------------------------------------------------------
# Initialisation and restarts

def test_from_arrays_starts_from_the_given_weights():
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(4, 3)), rng.normal(size=(2, 4))]
    biases = [rng.normal(size=4), rng.normal(size=2)]
    net = fastbp.MLP.from_arrays(weights, biases, activation="tanh", loss="mse")
    assert net.sizes == (3, 4, 2) and net.dtype == np.float64 and net.activations == ("tanh",)
    for a, b in zip(net.weights + net.biases, weights + biases):
        np.testing.assert_array_equal(a, b)
    X = rng.normal(size=(5, 3))
    np.testing.assert_allclose(net.forward(X), np.tanh(X @ weights[0].T + biases[0]) @ weights[1].T + biases[1])
    single = fastbp.MLP.from_arrays([w.astype(np.float32) for w in weights], biases)
    assert single.dtype == np.float32
    # float64 weights in the other byte order (a file written on another machine)
    # are float64: they had made a float32 network
    swapped = [w.astype(w.dtype.newbyteorder()) for w in weights]
    assert fastbp.MLP.from_arrays(swapped, biases).dtype == np.float64
    np.testing.assert_array_equal(fastbp.MLP.from_arrays(swapped, biases).params, net.params)
    with pytest.raises(ValueError, match="layer 1 takes 5 inputs"):
        fastbp.MLP.from_arrays([weights[0], rng.normal(size=(2, 5))], biases)
    with pytest.raises(ValueError, match="bias of shape"):
        fastbp.MLP.from_arrays(weights, [biases[0], np.zeros(3)])
    with pytest.raises(ValueError, match="NaN"):
        fastbp.MLP.from_arrays([np.full((4, 3), np.nan), weights[1]], biases)
    # finite float64 weights beyond float32's range had made a float32 network of
    # infinities; a float64 network holds them
    huge = [weights[0], np.full((2, 4), 1e300)]
    with pytest.raises(ValueError, match="layer 1's weights or biases hold values too large for float32"):
        fastbp.MLP.from_arrays(huge, biases, dtype=np.float32)
    assert fastbp.MLP.from_arrays(huge, biases).weights[1][0, 0] == 1e300
    # fine-tuning with a new optimizer
    history = net.fit(X, rng.normal(size=(5, 2)), epochs=3, optimizer=fastbp.Adam(net.params))
    assert len(history) == 3


def test_random_restarts_continue_from_the_best_trial():
    X, y = blobs()
    net = make(seed=3)
    opt = fastbp.SGD(net.params, lr=0.05, momentum=0.9)
    history = net.fit(X, y, epochs=6, optimizer=opt, n_init=4, trial_epochs=2, validation_fraction=0.25)
    assert len(history.trials) == 4 and len(history) == 4 and net.epoch_ == 6
    losses = [t["loss"] for t in history.trials]
    best = int(np.argmin(losses))
    assert len(set(losses)) == 4  # four different starting points
    assert opt.step_count == 2 * 6 + 4 * 6  # the best trial's 2 epochs, then 4 more (180 samples, batch 32)
    # same seed, same restarts: the same network
    twin = make(seed=3)
    twin.fit(X, y, epochs=6, optimizer=fastbp.SGD(twin.params, lr=0.05, momentum=0.9), n_init=4,
             trial_epochs=2, validation_fraction=0.25)
    np.testing.assert_array_equal(net.params, twin.params)
    assert history.trials[best]["history"].val_loss[-1] == min(losses)


def test_a_restart_whose_initialisation_is_refused_leaves_the_network_as_it_was():
    X, y = blobs()
    calls = []

    def grows(n_in, n_out, rng):  # fit for float32 on the network's own draw only
        calls.append(n_in)
        scale = 1.0 if len(calls) <= 2 else 1e300
        return rng.normal(size=(n_out, n_in)) * scale, np.zeros(n_out)

    net = fastbp.MLP([5, 4, 3], init=grows, seed=3)
    opt = fastbp.SGD(net.params, lr=0.05)
    net.fit(X, y, epochs=1, optimizer=opt, progress=False)
    before, epoch, rng = net.params.copy(), net.epoch_, net._rng.bit_generator.state
    with pytest.raises(ValueError, match="layer 0's weights or biases hold values too large"):
        net.fit(X, y, epochs=4, optimizer=opt, n_init=3, trial_epochs=2, progress=False)
    np.testing.assert_array_equal(net.params, before)
    assert net.epoch_ == epoch and net._rng.bit_generator.state == rng


@pytest.mark.parametrize("kwargs, exc_type, message", [
    (dict(epochs=-1), ValueError, "epochs"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(n_init=0), ValueError, "n_init"),
    (dict(n_init=2, trial_epochs=20), ValueError, "trial_epochs"),
    (dict(validation_fraction=1.5), ValueError, "validation_fraction"),
    (dict(validation_fraction=0.2, validation_data=(np.ones((2, 5)), [0, 1])), ValueError, "not both"),
    (dict(validation_data=(np.ones((2, 4)), [0, 1])), ValueError, "4 features"),
    (dict(schedule="cosine"), TypeError, "schedule"),
    (dict(early_stopping=5), TypeError, "EarlyStopping"),
    (dict(callbacks=[1]), TypeError, "callbacks"),
    (dict(optimizer="adam"), TypeError, "optimizer"),
])
def test_bad_fit_arguments_change_nothing(kwargs, exc_type, message):
    X, y = blobs()
    net = make()
    before = net.params.tobytes()
    with pytest.raises(exc_type, match=message):
        net.fit(X, y, **kwargs)
    assert net.params.tobytes() == before and net.epoch_ == 0


def test_verbose_prints_a_line_per_epoch(capsys):
    X, y = blobs()
    make().fit(X, y, epochs=3, verbose=True, validation_fraction=0.2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert all(re.match(r"epoch +\d+ +loss [0-9.]+ +val_loss [0-9.]+ +val_score [0-9.]+ +lr", l) for l in lines)


def test_progress_bar(capsys, monkeypatch):
    pytest.importorskip("tqdm")
    X, y = blobs()
    make().fit(X, y, epochs=2, progress=True)
    assert "2/2" in capsys.readouterr().err
    make().fit(X, y, epochs=2)  # progress=None: stderr is not a terminal here, no bar
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        make().fit(X, y, epochs=1, progress=True)

"""fastbp.set_num_threads / get_num_threads, with and without threadpoolctl."""

import sys

import numpy as np
import pytest

import fastbp


@pytest.fixture(params=["threadpoolctl", "openblas"])
def thread_control(request, monkeypatch):
    """Each test runs through threadpoolctl (when installed) and through the
    OpenBLAS fallback, and leaves the thread count as it found it."""
    if request.param == "threadpoolctl":
        pytest.importorskip("threadpoolctl")
    else:
        monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    original = fastbp.get_num_threads()
    yield request.param
    fastbp.set_num_threads(original)


def test_set_and_get(thread_control):
    for n in (1, 2, 1):
        fastbp.set_num_threads(n)
        assert fastbp.get_num_threads() == n


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", True, None, 2**31, 10**20])
def test_bad_counts_change_nothing(thread_control, n):
    before = fastbp.get_num_threads()
    with pytest.raises(ValueError, match="positive integer"):
        fastbp.set_num_threads(n)
    assert fastbp.get_num_threads() == before


def test_training_gives_the_same_network_on_one_and_two_threads(thread_control):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(256, 64)), rng.integers(0, 10, size=256)
    params = []
    for n in (1, 2):
        fastbp.set_num_threads(n)
        net = fastbp.MLP([64, 300, 10], dtype=np.float64, seed=0)
        net.fit(X, y, epochs=2, batch_size=128, optimizer=fastbp.SGD(net.params, lr=0.1),
                progress=False, diagnostics=False)
        params.append(net.params)
    # BLAS may split its sums differently across threads: equal up to rounding
    np.testing.assert_allclose(params[0], params[1], rtol=0, atol=1e-12)


# -- fastbp's own threads (_pool.h): steps, epochs and gradients of networks the
# forward kernel suits run on them, BLAS set to one thread for the call

from fastbp import _kernels  # noqa: E402

KERNEL = _kernels._small_gemm() is True  # the rule needs the AVX-512 kernel
OWN = _kernels._own_threads()


@pytest.fixture
def own_threads():
    """Restores the own-threads setting and BLAS's thread count."""
    threads = fastbp.get_num_threads()
    yield
    _kernels._own_threads(OWN)
    fastbp.set_num_threads(threads)


@pytest.mark.parametrize("n, sizes, threads, f64, expected", [
    (128, [784, 256, 128, 10], 2, False, True),   # mnist
    (32, [784, 128, 10], 2, False, True),
    (64, [300, 64, 10], 4, False, True),
    (1024, [784, 256, 128, 10], 2, False, True),  # larger batches
    (256, [64, 256, 256, 10], 2, False, True),    # shallow inputs, wide layers
    (128, [784, 512, 512, 10], 2, False, True),
    (128, [784, 256, 128, 10], 1, False, False),  # BLAS on one thread: nothing to split
    (128, [784, 256, 128, 10], 2, True, True),    # float64: up to 128 rows,
    (64, [300, 64, 10], 2, True, True),
    (256, [784, 256, 128, 10], 2, True, False),
    (128, [784, 512, 512, 10], 2, True, False),   # and no layer above 2^25
    (128, [1024, 256, 10], 2, True, True),
    (2048, [784, 256, 128, 10], 2, False, False),
    (16, [784, 256, 128, 10], 2, False, False),
    (32, [64, 32, 10], 2, False, False),           # products of microseconds
    (256, [1024, 1024, 1024, 10], 2, False, False),  # a product of 2^28: BLAS's threads
    (512, [4096, 4096, 4096], 2, False, False),
])
def test_own_threads_rule(n, sizes, threads, f64, expected):
    assert _kernels._own_threads_takes(n, sizes, threads, f64) is (expected and KERNEL)


def test_own_threads_setting(own_threads):
    assert _kernels._own_threads(False) is OWN and _kernels._own_threads() is False
    for bad in (1, 0, "yes", None.__class__):
        with pytest.raises(ValueError, match="own-threads setting"):
            _kernels._own_threads(bad)
        assert _kernels._own_threads() is False
    assert _kernels._own_threads("always") is False and _kernels._own_threads() == "always"
    assert _kernels._own_threads(True) == "always" and _kernels._own_threads() is True


def _train(mode, threads, optimizer, how, dtype=np.float32, sizes=(300, 128, 10), batch=64):
    """A network trained with own threads `mode` and BLAS on `threads` threads; the
    own-threads calls made, and BLAS's thread count after each call. (39,818
    parameters: the optimizers' passes are split across the pool too.)"""
    _kernels._own_threads(mode)
    fastbp.set_num_threads(threads)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(4 * batch, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], size=4 * batch)
    net = fastbp.MLP(list(sizes), dtype=dtype, seed=0)
    opt = {"sgd": lambda: fastbp.SGD(net.params, lr=0.05),
           "momentum": lambda: fastbp.SGD(net.params, lr=0.05, momentum=0.9),
           "adam": lambda: fastbp.Adam(net.params, lr=1e-3)}[optimizer]()
    calls, after = _kernels._own_threads_calls(), []
    losses = []
    for _ in range(2):
        if how == "step":
            losses += [net.step(X[i:i + batch], y[i:i + batch], opt)
                       for i in range(0, len(X), batch)]
        elif how == "fit":
            history = net.fit(X, y, epochs=1, batch_size=batch, optimizer=opt, shuffle=True,
                              progress=False, diagnostics=False)
            losses.append(history.records[-1]["loss"])
        else:
            loss, dW, db = net.gradients(X[:batch], y[:batch])
            losses.append(loss)
            for W, b, gW, gb in zip(net.weights, net.biases, dW, db):
                W -= 0.05 * gW
                b -= 0.05 * gb
        after.append(fastbp.get_num_threads())
    return net, losses, _kernels._own_threads_calls() - calls, after


@pytest.mark.parametrize("how, optimizer", [
    ("step", "sgd"), ("step", "momentum"), ("step", "adam"),
    ("fit", "sgd"), ("fit", "momentum"), ("fit", "adam"), ("gradients", "sgd")])
def test_own_threads_train_as_blas_does(own_threads, how, optimizer):
    # the same network (up to BLAS's rounding) with and without the pool, on 2 and
    # on 3 threads (more than this machine may have: still right); BLAS's thread
    # count is back after every call
    reference, ref_losses, calls, _ = _train(False, 2, optimizer, how)
    assert calls == 0
    for mode, threads in ((True, 2), ("always", 2), ("always", 3)):
        net, losses, calls, after = _train(mode, threads, optimizer, how)
        assert after == [threads, threads]
        assert calls == (2 if how != "step" else 8) * (KERNEL or mode == "always")
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        np.testing.assert_allclose(net.params, reference.params, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how, optimizer", [("step", "momentum"), ("step", "adam"),
                                            ("fit", "sgd")])
def test_own_threads_train_float64_as_blas_does(own_threads, how, optimizer):
    # float64 networks with a layer of 2^20 multiply-adds run on the pool too (the
    # rule's default, not only "always"): the same network as dgemm's threads make
    reference, ref_losses, calls, _ = _train(False, 2, optimizer, how, dtype=np.float64)
    assert calls == 0
    net, losses, calls, after = _train(True, 2, optimizer, how, dtype=np.float64)
    assert after == [2, 2] and calls == (2 if how != "step" else 8) * KERNEL
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
    np.testing.assert_allclose(net.params, reference.params, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("rows", [128, 61])
def test_own_threads_epoch_is_bitwise_its_steps(own_threads, rows):
    # a compiled epoch on the pool (its batches of 128 x 300 gathered by both
    # threads, a share each; the last of 61 rows by one) makes the network that
    # net.step makes on the same batches, bit for bit
    _kernels._own_threads("always")
    fastbp.set_num_threads(2)
    rng = np.random.default_rng(rows)
    X = rng.normal(size=(3 * 128 + rows, 300)).astype(np.float32)
    y = rng.integers(0, 10, size=len(X))
    order = rng.permutation(len(X))
    nets = [fastbp.MLP([300, 128, 10], seed=0) for _ in range(2)]
    opts = [fastbp.SGD(net.params, lr=0.05, momentum=0.9) for net in nets]
    calls = _kernels._own_threads_calls()
    nets[0]._compiled_epoch(X, y, order, 128, opts[0], np.zeros(1, np.int8))
    for lo in range(0, len(X), 128):
        batch = order[lo:lo + 128]
        nets[1].step(X[batch], y[batch], opts[1])
    assert _kernels._own_threads_calls() - calls == 5
    assert nets[0].params.tobytes() == nets[1].params.tobytes()
    assert opts[0].momentum_buffer.tobytes() == opts[1].momentum_buffer.tobytes()


def _bits_with_and_without_own_threads(rows, run, calls, hidden=512, dtype=np.float32):
    """run(X, y) -> a list of arrays, on a 300-`hidden`-10 network of `dtype` and a batch of
    `rows` rows, every product on the kernel: first on one thread (BLAS's threads,
    which the kernel does not use), then split across fastbp's pool by the layers'
    units, then by the batch's rows (`_split_by_units`); the pool must take `calls`
    calls. Returns the three runs' bytes."""
    if not KERNEL:
        pytest.skip("the kernel needs AVX-512")
    before = _kernels._small_gemm("always"), _kernels._split_by_units()
    try:
        results = []
        for mode, units in ((False, True), ("always", True), ("always", False)):
            _kernels._own_threads(mode)
            _kernels._split_by_units(units)
            fastbp.set_num_threads(2)
            rng = np.random.default_rng(rows)
            X = rng.normal(size=(rows, 300)).astype(dtype)
            y = rng.integers(0, 10, size=rows)
            net = fastbp.MLP([300, hidden, 10], dtype=dtype, seed=0)
            before_calls = _kernels._own_threads_calls()
            results.append([np.asarray(a).tobytes() for a in run(net, X, y)])
            assert _kernels._own_threads_calls() - before_calls == calls * (mode == "always")
        return results
    finally:
        _kernels._small_gemm(before[0])
        _kernels._split_by_units(before[1])


@pytest.mark.parametrize("hidden, dtype", [(512, np.float32), (200, np.float32),
                                           (200, np.float64)])
def test_own_threads_products_are_bitwise_the_kernels(own_threads, hidden, dtype):
    # the kernel's products split across the pool: every element the same FMA chain,
    # so the loss and the gradients have the bits of the one-thread kernel. With
    # 61 rows (uneven parts): the forward products split by the layers' units (200:
    # at 96, not at a panel's edge) or by rows, dX by rows, dW of the first layer
    # by its rows, dW of the last (10 x hidden) by its columns
    def gradients(net, X, y):
        loss, dW, db = net.gradients(X, y)
        return [np.float64(loss)] + dW + db

    one, units, rows = _bits_with_and_without_own_threads(61, gradients, calls=1, hidden=hidden,
                                                          dtype=dtype)
    assert one == units == rows


@pytest.mark.parametrize("rows, hidden, dtype", [(100, 512, np.float32), (100, 200, np.float32),
                                                (300, 512, np.float32), (100, 200, np.float64)])
def test_own_threads_momentum_step_is_bitwise_the_kernels(own_threads, rows, hidden, dtype):
    # the momentum update folded into each part of a split weight gradient (a batch
    # one panel deep; 300 rows: a pass of its own): the parameters and buffer
    # after a first and a steady-state step have the bits of the one-thread
    # kernel's
    def steps(net, X, y):
        opt = fastbp.SGD(net.params, lr=0.05, momentum=0.9)
        for _ in range(2):
            net.step(X, y, opt)
        return [net.params, opt.momentum_buffer]

    one, units, rows = _bits_with_and_without_own_threads(rows, steps, calls=2, hidden=hidden,
                                                          dtype=dtype)
    assert one == units == rows


@pytest.mark.parametrize("rows, units", [(32, True), (32, False), (61, True), (300, True)])
def test_own_threads_blas_parts_take_the_momentum_update(own_threads, rows, units):
    # BLAS's parts of a weight gradient split across the pool, each part's momentum
    # update made by the thread that made it, have the bits of the parts followed
    # by a pass of its own (`_fold_momentum(False)`): dW1 (128 x 300) is split by
    # its rows on batches below 256 rows (or with `_split_by_units(False)`, along
    # its longer side: columns), by its columns on 300 rows
    before = _kernels._small_gemm(False), _kernels._split_by_units(units), \
        _kernels._fold_momentum()
    try:
        results = []
        for fold in (True, False):
            _kernels._fold_momentum(fold)
            _kernels._own_threads("always")
            fastbp.set_num_threads(2)
            rng = np.random.default_rng(rows)
            X = rng.normal(size=(rows, 300)).astype(np.float32)
            y = rng.integers(0, 10, size=rows)
            net = fastbp.MLP([300, 128, 10], dtype=np.float32, seed=0)
            opt = fastbp.SGD(net.params, lr=0.05, momentum=0.9, dampening=0.25)
            calls = _kernels._own_threads_calls()
            for _ in range(3):
                net.step(X, y, opt)
            assert _kernels._own_threads_calls() - calls == 3
            results.append((net.params.tobytes(), opt.momentum_buffer.tobytes()))
        assert results[0] == results[1]
    finally:
        _kernels._small_gemm(before[0])
        _kernels._split_by_units(before[1])
        _kernels._fold_momentum(before[2])


@pytest.mark.parametrize("how", ["step", "fit"])
def test_own_threads_refused_step_restores_blas(own_threads, how):
    # a step whose loss overflows is refused: nothing changes, BLAS's threads are back
    _kernels._own_threads("always")
    fastbp.set_num_threads(2)
    net = fastbp.MLP([300, 64, 10], loss="mse", dtype=np.float32, seed=0)
    X = np.ones((64, 300), np.float32)
    Y = np.full((64, 10), 1e30, np.float32)  # (A - Y)**2 overflows float32
    opt = fastbp.SGD(net.params, lr=0.1)
    before, calls = net.params.copy(), _kernels._own_threads_calls()
    with pytest.raises(FloatingPointError, match="not"):
        if how == "step":
            net.step(X, Y, opt)
        else:
            net.fit(X, Y, epochs=1, batch_size=64, optimizer=opt, progress=False,
                    diagnostics=False)
    assert _kernels._own_threads_calls() > calls and fastbp.get_num_threads() == 2
    np.testing.assert_array_equal(net.params, before)


def _child_step(queue):
    net, losses, calls, after = _train("always", 2, "sgd", "step")
    queue.put((net.params, calls, after))


def test_own_threads_after_fork(own_threads):
    # a child forked after the parent's workers ran starts its own (libgomp hangs here)
    import multiprocessing
    parent, _, calls, _ = _train("always", 2, "sgd", "step")
    assert calls == 8
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_step, args=(queue,))
    child.start()
    params, child_calls, after = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert child_calls == 8 and after == [2, 2]
    np.testing.assert_array_equal(params, parent.params)


def test_own_threads_concurrent_callers(own_threads):
    # steps on two Python threads at once: one holds the pool, the other runs alone;
    # both networks come out as when trained one after the other
    import threading
    _kernels._own_threads("always")
    fastbp.set_num_threads(2)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(64, 300)).astype(np.float32)
    y = rng.integers(0, 10, size=64)

    def run(out, key):
        net = fastbp.MLP([300, 64, 10], dtype=np.float32, seed=0)
        opt = fastbp.SGD(net.params, lr=0.05)
        for _ in range(30):
            net.step(X, y, opt)
        out[key] = net.params

    serial, together = {}, {}
    run(serial, 0)
    threads = [threading.Thread(target=run, args=(together, k)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fastbp.get_num_threads() == 2
    for k in range(2):
        np.testing.assert_allclose(together[k], serial[0], rtol=1e-4, atol=1e-6)


def test_own_threads_forward_passes(own_threads):
    # predict / evaluate of a network that trains on fastbp's own threads run on
    # them too, at any row count: the outputs of BLAS's threads, up to rounding
    rng = np.random.default_rng(4)
    net = fastbp.MLP([300, 128, 10], dtype=np.float32, seed=0)
    fastbp.set_num_threads(2)
    for n in (1, 40, 1000):
        X = rng.normal(size=(n, 300)).astype(np.float32)
        y = rng.integers(0, 10, size=n)
        results = {}
        for mode in (False, True, "always"):
            _kernels._own_threads(mode)
            calls = _kernels._own_threads_calls()
            results[mode] = net.predict_proba(X), net.evaluate(X, y)
            used = _kernels._own_threads_calls() - calls
            assert used == (2 if mode == "always" or (mode and KERNEL and n >= 32) else 0)
            assert fastbp.get_num_threads() == 2
        for mode in (True, "always"):
            np.testing.assert_allclose(results[mode][0], results[False][0], rtol=1e-5, atol=1e-7)
            assert results[mode][1] == pytest.approx(results[False][1], rel=1e-5)

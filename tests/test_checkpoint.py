"""fastbp.save / fastbp.load: round trips, bit-identical resume in a new process,
atomic writes under SIGKILL, and loads that reject every kind of bad file."""

import hashlib
import json
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fastbp
from fastbp import checkpoint

from conftest import BACKEND_NAMES

ARCHITECTURES = {
    "relu ce float32": dict(sizes=[5, 8, 3], activation="relu", loss="cross_entropy", dtype=np.float32),
    "mixed ce float64": dict(sizes=[5, 7, 6, 3], activation=["tanh", "leaky_relu"],
                             loss="cross_entropy", dtype=np.float64),
    "no hidden mse sigmoid": dict(sizes=[5, 2], loss="mse", output="sigmoid", dtype=np.float64),
    "sigmoid bce": dict(sizes=[5, 4, 2], activation="sigmoid", loss="binary_cross_entropy",
                        dtype=np.float32),
    "identity mse tanh": dict(sizes=[5, 3, 2], activation="identity", loss="mse", output="tanh",
                              dtype=np.float32),
}
OPTIMIZERS = {
    "none": None,
    "sgd": lambda p: fastbp.SGD(p, lr=0.05),
    "sgd nesterov": lambda p: fastbp.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam amsgrad": lambda p: fastbp.Adam(p, lr=0.01, betas=(0.8, 0.99), amsgrad=True),
    "adamw": lambda p: fastbp.AdamW(p, lr=0.01, weight_decay=0.05, max_grad_norm=1.0),
}


def data(spec, n=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, spec["sizes"][0]))
    k = spec["sizes"][-1]
    if spec["loss"] == "cross_entropy":
        return X, rng.integers(0, k, size=n)
    return X, rng.uniform(size=(n, k))


def trained(arch, opt_name, seed=0, epochs=2):
    spec = ARCHITECTURES[arch]
    net = fastbp.MLP(spec["sizes"], activation=spec.get("activation", "relu"), loss=spec["loss"],
                     output=spec.get("output"), dtype=spec["dtype"], seed=seed)
    make = OPTIMIZERS[opt_name]
    opt = None if make is None else make(net.params)
    X, y = data(spec)
    net.fit(X, y, epochs=epochs, batch_size=16, optimizer=opt or fastbp.SGD(net.params, lr=0.01),
            progress=False, diagnostics=False)
    return net, opt


def same_optimizer(a, b):
    assert type(a) is type(b) and a.step_count == b.step_count and a.lr == b.lr
    assert a._config == b._config
    for name in a._state_arrays:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_round_trip(tmp_path, arch, opt_name):
    net, opt = trained(arch, opt_name)
    meta = {"run": "a", "score": 0.5, "tags": ["x", 1, None, True], "nested": {"inf": float("inf")}}
    path = tmp_path / "net.fbp"
    fastbp.save(path, net, opt, metadata=meta)
    loaded = fastbp.load(path)
    net2, opt2 = loaded
    assert loaded.metadata == meta and loaded.fastbp_version == fastbp.__version__
    assert (net2.sizes, net2.activations, net2.loss, net2.output, net2.dtype, net2.epoch_) == \
        (net.sizes, net.activations, net.loss, net.output, net.dtype, net.epoch_)
    assert net2.params.tobytes() == net.params.tobytes()
    assert net2._rng.bit_generator.state == net._rng.bit_generator.state
    X, _ = data(ARCHITECTURES[arch], seed=1)
    np.testing.assert_array_equal(net2.forward(X), net.forward(X))
    if opt is None:
        assert opt2 is None
    else:
        same_optimizer(opt, opt2)
        assert opt2.params is net2.params


def test_fine_tuning_a_loaded_network_with_a_new_optimizer(tmp_path):
    net, _ = trained("relu ce float32", "none")
    fastbp.save(tmp_path / "p.fbp", net)
    net2, opt = fastbp.load(tmp_path / "p.fbp", backend="numpy")
    assert opt is None and net2.backend == "numpy"
    X, y = data(ARCHITECTURES["relu ce float32"])
    before = net2.evaluate(X, y)
    net2.fit(X, y, epochs=5, optimizer=fastbp.Adam(net2.params, lr=0.01), progress=False)
    assert net2.evaluate(X, y) < before


SCHEDULES = {
    "step": lambda: fastbp.StepLR(2, gamma=0.5),
    "exponential": lambda: fastbp.ExponentialLR(0.9),
    "cosine": lambda: fastbp.CosineAnnealingLR(3, eta_min=1e-4),
    "warmup": lambda: fastbp.LinearWarmup(3),
    "inverse": lambda: fastbp.InverseScaling(0.5),
    "plateau": lambda: fastbp.ReduceLROnPlateau(factor=0.5, patience=0, threshold=0.5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_resume_with_a_schedule_continues_it_exactly(tmp_path, name):
    X, y = data(ARCHITECTURES["relu ce float32"])
    runs = []
    for split_at in (None, 3):
        net = fastbp.MLP([5, 8, 3], seed=0)
        opt = fastbp.SGD(net.params, lr=0.1, momentum=0.9)
        sched = SCHEDULES[name]()
        if split_at is None:
            net.fit(X, y, epochs=7, optimizer=opt, schedule=sched, progress=False)
        else:
            net.fit(X, y, epochs=split_at, optimizer=opt, schedule=sched, progress=False)
            fastbp.save(tmp_path / "s.fbp", net, opt, schedule=sched)
            ck = fastbp.load(tmp_path / "s.fbp")
            assert type(ck.schedule) is type(sched) and vars(ck.schedule) == vars(sched)
            net, opt = ck
            net.fit(X, y, epochs=7 - split_at, optimizer=opt, schedule=ck.schedule, progress=False)
        runs.append((net.params.tobytes(), opt.lr))
    assert runs[0] == runs[1]


RESUME = textwrap.dedent("""
    import sys, numpy as np, fastbp
    mode, path, opt_name, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 6)), rng.integers(0, 3, size=200)
    if mode == "start":
        net = fastbp.MLP([6, 16, 3], activation="tanh", seed=5)
        opt = (fastbp.SGD(net.params, lr=0.05, momentum=0.9) if opt_name == "sgd"
               else fastbp.Adam(net.params, lr=0.01, amsgrad=True))
    else:
        net, opt = fastbp.load(path)
    net.fit(X, y, epochs=epochs, batch_size=32, optimizer=opt, progress=False)
    if mode == "start":
        fastbp.save(path, net, opt)
    else:
        np.save(path + ".params.npy", net.params)
""")


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_resume_in_a_new_process_is_bit_identical(tmp_path, opt_name):
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    path = str(tmp_path / "ck.fbp")
    for mode, epochs in (("start", 3), ("resume", 4)):
        subprocess.run([sys.executable, str(script), mode, path, opt_name, str(epochs)], check=True,
                       stdin=subprocess.DEVNULL)
    resumed = np.load(path + ".params.npy")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 6)), rng.integers(0, 3, size=200)
    net = fastbp.MLP([6, 16, 3], activation="tanh", seed=5)
    opt = (fastbp.SGD(net.params, lr=0.05, momentum=0.9) if opt_name == "sgd"
           else fastbp.Adam(net.params, lr=0.01, amsgrad=True))
    net.fit(X, y, epochs=7, batch_size=32, optimizer=opt, progress=False)
    assert resumed.tobytes() == net.params.tobytes()


# -- bad files ---------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path):
    net, opt = trained("mixed ce float64", "adam amsgrad")
    path = tmp_path / "good.fbp"
    fastbp.save(path, net, opt, metadata={"k": 1})
    return path, path.read_bytes()


def rejected(path, match=None):
    with pytest.raises(ValueError, match=match) as info:
        fastbp.load(path)
    assert "not a valid fastbp checkpoint" in str(info.value)


def test_truncation_at_every_offset_is_rejected(tmp_path, good_file):
    _, blob = good_file
    bad = tmp_path / "bad.fbp"
    for cut in range(len(blob)):
        bad.write_bytes(blob[:cut])
        rejected(bad)


def test_every_flipped_byte_is_rejected(tmp_path, good_file):
    _, blob = good_file
    bad = tmp_path / "bad.fbp"
    for i in range(len(blob)):
        corrupt = bytearray(blob)
        corrupt[i] ^= 0x5A
        bad.write_bytes(bytes(corrupt))
        rejected(bad)


def test_empty_and_random_files_are_rejected(tmp_path):
    bad = tmp_path / "bad.fbp"
    bad.write_bytes(b"")
    rejected(bad, "too short")
    rng = np.random.default_rng(0)
    for n in (10, 100, 5000):
        bad.write_bytes(rng.bytes(n))
        rejected(bad)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = None


def test_a_pickle_payload_is_rejected_and_never_runs(tmp_path, monkeypatch):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    bad = tmp_path / "bad.fbp"
    bad.write_bytes(pickle.dumps(_Payload()))
    rejected(bad, "magic")
    # the same payload behind valid magic bytes
    bad.write_bytes(checkpoint.MAGIC + pickle.dumps(_Payload()))
    rejected(bad)
    assert not os.path.exists(MARKER)


def rebuild(header, data=b"", version=checkpoint.FORMAT_VERSION, header_bytes=None):
    """A file with a valid checksum around any header: reaches the schema checks."""
    text = header_bytes if header_bytes is not None else json.dumps(header).encode()
    pre = struct.pack("<8sIQ", checkpoint.MAGIC, version, len(text)) + text
    pre += b"\0" * (-len(pre) % 64)
    body = pre + data
    return body + hashlib.sha256(body).digest()


def split(blob):
    size = struct.unpack_from("<8sIQ", blob)[2]
    header = json.loads(blob[20:20 + size])
    start = 20 + size
    start += -start % 64
    return header, blob[start:-32]


def edit(mutate):
    def make(blob):
        header, data = split(blob)
        mutate(header)
        return rebuild(header, data)
    return make


BAD_HEADERS = {
    "version 2": (lambda b: rebuild(*split(b), version=2), "version 2"),
    "header not JSON": (lambda b: rebuild(None, header_bytes=b"{not json"), "unreadable header"),
    "header not UTF-8": (lambda b: rebuild(None, header_bytes=b"\xff\xfe"), "unreadable header"),
    "duplicate keys": (lambda b: rebuild(None, header_bytes=b'{"format": 1, "format": 2}'),
                       "duplicate key"),
    "header is a list": (lambda b: rebuild(None, header_bytes=b"[]"), "not an object"),
    "unknown entry": (edit(lambda h: h.update(code="print(1)")), "unknown entries"),
    "wrong format name": (edit(lambda h: h.update(format="other")), "format"),
    "huge width": (edit(lambda h: h["network"].update(sizes=[5, 2**40, 3])), "sizes"),
    "negative width": (edit(lambda h: h["network"].update(sizes=[5, -7, 3])), "sizes"),
    "bool width": (edit(lambda h: h["network"].update(sizes=[5, True, 3])), "sizes"),
    "too many layers": (edit(lambda h: h["network"].update(sizes=[2] * 600)), "sizes"),
    "unknown activation": (edit(lambda h: h["network"].update(activations=["tanh", "swish"])),
                           "activations"),
    "unknown loss": (edit(lambda h: h["network"].update(loss="hinge")), "loss"),
    "unknown dtype": (edit(lambda h: h["network"].update(dtype="<f2")), "dtype"),
    "negative epoch": (edit(lambda h: h["network"].update(epoch=-1)), "epoch"),
    "bad rng": (edit(lambda h: h["network"]["rng"].update(bit_generator="MT19937")), "PCG64"),
    "rng state too big": (edit(lambda h: h["network"]["rng"]["state"].update(state=2**200)), "128-bit"),
    "unknown optimizer": (edit(lambda h: h["optimizer"].update(type="os.system")), "optimizer type"),
    "bad optimizer setting": (edit(lambda h: h["optimizer"]["config"].update(lr=-1.0)),
                              "optimizer cannot be built"),
    "unknown optimizer setting": (edit(lambda h: h["optimizer"]["config"].update(evil=1)),
                                  "optimizer cannot be built"),
    "missing state array": (edit(lambda h: (h["optimizer"]["state_arrays"].pop(),
                                            h["arrays"].pop())), "missing"),
    "array too long": (edit(lambda h: h["arrays"][0].update(nbytes=h["arrays"][0]["nbytes"] + 8)),
                       "bytes"),
    "array past the end": (edit(lambda h: h["arrays"][-1].update(offset=2**62)), "data section"),
    "arrays overlap": (edit(lambda h: h["arrays"][1].update(offset=0)), "data section"),
    "array shape": (edit(lambda h: h["arrays"][0].update(shape=[2, 3])), "shape"),
    "metadata too deep": (edit(lambda h: h.update(metadata=json.loads("[" * 40 + "]" * 40))),
                          "nests"),
    "unknown schedule": (edit(lambda h: h.update(schedule={"type": "eval", "attributes": {}})),
                         "schedule type"),
    "bad schedule setting": (edit(lambda h: h.update(schedule={
        "type": "StepLR", "attributes": {"step_size": 0, "gamma": 0.5}})), "schedule cannot be built"),
    "schedule with a string": (edit(lambda h: h.update(schedule={
        "type": "StepLR", "attributes": {"step_size": 2, "gamma": "0.5"}})), "finite numbers"),
    "unknown schedule entry": (edit(lambda h: h.update(schedule={
        "type": "StepLR", "attributes": {"step_size": 2, "gamma": 0.5, "__class__": 1}})),
        "unknown entries"),
    # a JSON list or object where a name goes (it had raised TypeError: unhashable)
    "optimizer type a list": (edit(lambda h: h["optimizer"].update(type=["SGD"])),
                              "optimizer type"),
    "array name an object": (edit(lambda h: h["arrays"][0].update(name={"params": 1})),
                             "unexpected array"),
    # beyond what the compiled Adam steps take (a C long): the backends disagreed
    "step count past 2**53": (edit(lambda h: h["optimizer"].update(step_count=2**63)),
                              "step_count"),
    # a schedule's state that fit could only fail on later (TypeError, ValueError)
    "plateau without a best": (edit(lambda h: h.update(schedule=plateau(best=None))),
                               "schedule's state"),
    "plateau with a NaN best": (edit(lambda h: h.update(schedule=plateau(best=float("nan")))),
                                "schedule's state"),
    "plateau with a negative rate": (edit(lambda h: h.update(schedule=plateau(lr=-1.0))),
                                     "schedule's state"),
    "plateau counting half epochs": (edit(lambda h: h.update(schedule=plateau(bad_epochs=1.5))),
                                     "schedule's state"),
    "negative base rate": (edit(lambda h: h.update(schedule={
        "type": "StepLR", "attributes": {"step_size": 2, "gamma": 0.5, "base_lr": -0.1}})),
        "schedule's state"),
}


def plateau(**state):
    """A saved ReduceLROnPlateau's header entry, its state changed by `state`."""
    attributes = {"factor": 0.5, "patience": 1, "threshold": 1e-4, "min_lr": 0.0,
                  "best": 0.25, "bad_epochs": 1, "lr": 0.01, "base_lr": 0.02}
    attributes.update(state)
    return {"type": "ReduceLROnPlateau", "attributes": attributes}


def test_a_saved_plateau_state_loads_back(tmp_path):
    """The state `plateau` writes is a valid one: the cases above fail on one change."""
    net, opt = trained("relu ce float32", "sgd")
    path = tmp_path / "plateau.fbp"
    fastbp.save(path, net, opt)
    header, data = split(path.read_bytes())
    header["schedule"] = plateau()
    path.write_bytes(rebuild(header, data))
    schedule = fastbp.load(path).schedule
    assert (schedule.best, schedule.bad_epochs, schedule.lr, schedule.base_lr) == (0.25, 1, 0.01, 0.02)


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_inconsistent_headers_are_rejected(tmp_path, good_file, case):
    make, match = BAD_HEADERS[case]
    _, blob = good_file
    bad = tmp_path / "bad.fbp"
    bad.write_bytes(make(blob))
    rejected(bad, match)


def test_nan_parameters_are_rejected(tmp_path, good_file):
    _, blob = good_file
    header, data = split(blob)
    data = bytearray(data)
    data[0:8] = struct.pack("<d", float("nan"))
    bad = tmp_path / "bad.fbp"
    bad.write_bytes(rebuild(header, bytes(data)))
    rejected(bad, "NaN")


def test_oversized_header_is_rejected_before_reading_it(tmp_path):
    bad = tmp_path / "bad.fbp"
    bad.write_bytes(struct.pack("<8sIQ", checkpoint.MAGIC, 1, 2**60) + b"\0" * 64)
    rejected(bad, "header size")


# -- saving ------------------------------------------------------------------


def test_bad_save_arguments_write_nothing(tmp_path):
    net, opt = trained("relu ce float32", "sgd")
    other = fastbp.MLP([5, 8, 3], seed=1)
    path = tmp_path / "x.fbp"
    with pytest.raises(TypeError, match="metadata"):
        fastbp.save(path, net, opt, metadata={"f": lambda: 0})
    with pytest.raises(TypeError, match="JSON keys"):
        fastbp.save(path, net, opt, metadata={1: 2})
    with pytest.raises(ValueError, match="another parameter array"):
        fastbp.save(path, other, opt)
    with pytest.raises(TypeError, match="fastbp.MLP"):
        fastbp.save(path, "net")
    with pytest.raises(TypeError, match="schedule"):
        fastbp.save(path, net, opt, schedule="cosine")
    mt = fastbp.MLP([5, 8, 3], seed=np.random.Generator(np.random.MT19937(0)))
    with pytest.raises(ValueError, match="PCG64"):
        fastbp.save(path, mt)
    assert os.listdir(tmp_path) == []


def test_save_names_a_path_it_cannot_write(tmp_path):
    # (a directory had given 'Device or resource busy' or 'Is a directory' from the
    # rename; a missing directory was reported under the temporary file's name)
    net = fastbp.MLP([3, 2], seed=0)
    with pytest.raises(IsADirectoryError) as info:
        fastbp.save(tmp_path, net)
    assert info.value.filename == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="No such directory") as info:
        fastbp.save(tmp_path / "no" / "x.fbp", net)
    assert info.value.filename == str(tmp_path / "no" / "x.fbp")
    assert os.listdir(tmp_path) == []


def test_save_keeps_permissions_and_leaves_no_temporary_file(tmp_path):
    net, opt = trained("relu ce float32", "sgd")
    path = tmp_path / "x.fbp"
    fastbp.save(path, net, opt)
    os.chmod(path, 0o640)
    fastbp.save(path, net, opt, metadata="again")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert fastbp.load(path).metadata == "again"
    assert os.listdir(tmp_path) == ["x.fbp"]


def test_new_file_permissions_follow_the_umask(tmp_path):
    net, _ = trained("relu ce float32", "none")
    old = os.umask(0o027)
    try:
        fastbp.save(tmp_path / "x.fbp", net)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "x.fbp").st_mode) == 0o640


KILL_LOOP = textwrap.dedent("""
    import sys, numpy as np, fastbp
    path = sys.argv[1]
    nets = [fastbp.MLP([50, 200, 10], seed=s) for s in (0, 1)]
    opts = [fastbp.Adam(n.params) for n in nets]
    print("ready", flush=True)
    i = 0
    while True:
        fastbp.save(path, nets[i % 2], opts[i % 2], metadata={"version": i % 2, "i": i})
        i += 1
""")


def test_a_process_killed_while_saving_leaves_a_whole_checkpoint(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(KILL_LOOP)
    path = tmp_path / "ck.fbp"
    expected = {s: fastbp.MLP([50, 200, 10], seed=s).params.tobytes() for s in (0, 1)}
    rng = np.random.default_rng(0)
    kills, inside = 0, []
    # At least 25 kills, and on until one has landed inside a save: how often
    # one does depends on how long the disk takes to fsync (once in 11 runs on
    # a busy host, none of 25 did).
    while kills < 25 or (not inside and kills < 250):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.02, 0.2))  # some saves done, one under way
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        kills += 1
        # stray temporary files: kills that landed inside a save, between creating
        # the temporary file and renaming it (the window this test is about)
        inside = [f for f in os.listdir(tmp_path) if f.startswith(".ck.fbp.tmp-")]
        if not path.exists():
            continue  # killed before the first rename
        net, opt = ck = fastbp.load(path)
        assert net.params.tobytes() == expected[ck.metadata["version"]]
    assert path.exists() and len(inside) >= 1, (kills, inside)

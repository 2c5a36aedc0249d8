"""Checkpoints: ``fastbp.save(path, net, optimizer)`` and ``net, optimizer = fastbp.load(path)``.

The file format (version 1), all integers little-endian::

    magic          8 bytes   b"FASTBPCK"
    version        4 bytes   uint32, 1
    header size    8 bytes   uint64, at most 16 MiB
    header         UTF-8 JSON object (below)
    padding        zero bytes up to a multiple of 64 from the file start
    data           the arrays' bytes, each at its 64-byte aligned offset
    checksum       32 bytes  SHA-256 of everything before it

The header holds ``format`` ("fastbp-checkpoint"), ``fastbp_version``, ``network``
(sizes, activations, loss, output, dtype, backend, epoch, and the state of its
random generator), ``optimizer`` (null, or its type, hyper-parameters, step
count and the names of its state arrays), ``metadata`` (the user's, any JSON
value) and ``arrays``: for each array its name, dtype ("<f4", "<f8"), shape,
offset into the data section and size in bytes. Nothing in a checkpoint is
ever executed: it holds numbers, strings and raw little-endian arrays, and
`load` checks every one of them (and the checksum first) before it builds
anything.

`save` writes a temporary file beside the target, flushes and fsyncs it,
renames it over the target and fsyncs the directory: a process killed at any
moment leaves the previous checkpoint whole (and at worst a stray
``.<name>.tmp-*`` file). An existing file's permission bits are kept.
"""

import errno
import hashlib
import inspect
import json
import math
import numbers
import os
import struct
import tempfile

import numpy as np

from ._checks import ACTIVATIONS, LOSSES, MAX_LAYERS, OUTPUT_ACTIVATIONS
from . import optim
from .optim import SGD, Adam, AdamW

__all__ = ["save", "load", "Checkpoint", "FORMAT_VERSION"]

MAGIC = b"FASTBPCK"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header size
_CHECKSUM_SIZE = 32
_ALIGN = 64
MAX_HEADER_SIZE = 16 * 2**20
# Limits that keep a hostile header from asking for absurd work or memory.
_MAX_WIDTH = 2**31 - 1
_MAX_METADATA_DEPTH = 32
_MAX_STEPS = 2**53

_OPTIMIZERS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}
_SCHEDULES = {c.__name__: c for c in (optim.StepLR, optim.ExponentialLR, optim.CosineAnnealingLR,
                                      optim.LinearWarmup, optim.InverseScaling,
                                      optim.ReduceLROnPlateau)}
_DTYPES = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8")}


class Checkpoint(tuple):
    """What `load` returns: unpacks as ``net, optimizer``; also has ``.schedule``
    (None when none was saved), ``.metadata`` and ``.fastbp_version``."""

    def __new__(cls, net, optimizer, metadata, fastbp_version, schedule=None):
        self = super().__new__(cls, (net, optimizer))
        self.metadata = metadata
        self.fastbp_version = fastbp_version
        self.schedule = schedule
        return self

    @property
    def net(self):
        return self[0]

    @property
    def optimizer(self):
        return self[1]


# -- saving ------------------------------------------------------------------


def _json_safe(value, path="metadata", depth=0):
    """Check that user metadata is plain JSON (dict with str keys, list, str,
    finite or infinite float, int, bool, None): nothing that needs code to read."""
    if depth > _MAX_METADATA_DEPTH:
        raise ValueError(f"{path} nests deeper than {_MAX_METADATA_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path} has a key {k!r} that is not a string (JSON keys are strings)")
            out[k] = _json_safe(v, f"{path}[{k!r}]", depth + 1)
        return out
    raise TypeError(f"{path} holds a {type(value).__name__}; metadata must be JSON "
                    "(dict, list, str, int, float, bool, None)")


def _optimizer_config(optimizer):
    config = dict(optimizer._config)
    config.pop("backend", None)
    if "betas" in config:
        config["betas"] = list(config["betas"])
    config["lr"] = optimizer.lr  # the current rate (a schedule may have moved it)
    return config


def _schedule_header(schedule):
    if type(schedule) not in _SCHEDULES.values():
        raise TypeError("schedule must be one of fastbp's learning-rate schedules (or None), "
                        f"got {type(schedule).__name__}")
    return {"type": type(schedule).__name__, "attributes": dict(vars(schedule))}


def save(path, net, optimizer=None, *, schedule=None, metadata=None):
    """Write a checkpoint of `net` (and `optimizer`, built on ``net.params``) to `path`.

    Parameters
    ----------
    path : str or os.PathLike
    net : fastbp.MLP
    optimizer : fastbp.SGD, Adam or AdamW, optional
    schedule : a fastbp learning-rate schedule, optional
        Its settings and state (base rate, plateau counters), so that a resumed
        `fit` with ``schedule=checkpoint.schedule`` continues it exactly.
    metadata : JSON-compatible value, optional
        Stored as is (dicts with string keys, lists, strings, numbers, bools, None).

    The write is atomic: readers see the old file or the new one, never a mix.
    """
    from .network import MLP
    from . import __version__

    if not isinstance(net, MLP):
        raise TypeError(f"net must be a fastbp.MLP, got {type(net).__name__}")
    if optimizer is not None:
        if type(optimizer) not in _OPTIMIZERS.values():
            raise TypeError("optimizer must be a fastbp.SGD, Adam or AdamW (or None), "
                            f"got {type(optimizer).__name__}")
        if optimizer.params is not net.params:
            raise ValueError("optimizer was built on another parameter array than net.params")
    metadata = _json_safe(metadata)
    schedule_header = None if schedule is None else _schedule_header(schedule)
    dtype = "<f4" if net.dtype == np.float32 else "<f8"
    arrays = [("params", net.params)]
    opt_header = None
    if optimizer is not None:
        state_names = []
        for name in optimizer._state_arrays:
            a = getattr(optimizer, name)
            if a is not None:
                arrays.append((f"optimizer.{name}", a))
                state_names.append(name)
        opt_header = {"type": type(optimizer).__name__, "config": _optimizer_config(optimizer),
                      "step_count": int(optimizer.step_count), "state_arrays": state_names}
    rng_state = net._rng.bit_generator.state
    if rng_state.get("bit_generator") != "PCG64":
        raise ValueError("checkpoints keep PCG64 random generators (numpy's default); this "
                         f"network's is {rng_state.get('bit_generator')}")
    header = {
        "format": "fastbp-checkpoint",
        "fastbp_version": __version__,
        "network": {"sizes": list(net.sizes), "activations": list(net.activations),
                    "loss": net.loss, "output": net.output, "dtype": dtype,
                    "backend": net.backend, "epoch": int(net.epoch_), "rng": rng_state},
        "optimizer": opt_header,
        "schedule": schedule_header,
        "metadata": metadata,
        "arrays": [],
    }
    offset = 0
    for name, a in arrays:
        header["arrays"].append({"name": name, "dtype": dtype, "shape": list(a.shape),
                                 "offset": offset, "nbytes": int(a.nbytes)})
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    text = json.dumps(header, separators=(",", ":"), allow_nan=True).encode("utf-8")
    if len(text) > MAX_HEADER_SIZE:
        raise ValueError(f"the checkpoint header would take {len(text)} bytes; at most "
                         f"{MAX_HEADER_SIZE} (is the metadata that large?)")
    start = _PREAMBLE.size + len(text)
    pad = -start % _ALIGN
    chunks = [_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(text)), text, b"\0" * pad]
    for (name, a), spec in zip(arrays, header["arrays"]):
        data = np.ascontiguousarray(a, dtype=_DTYPES[dtype]).tobytes()
        chunks.append(data)
        chunks.append(b"\0" * (-len(data) % _ALIGN))
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(c)
    chunks.append(digest.digest())
    _atomic_write(os.fspath(path), chunks)


def _atomic_write(path, chunks):
    directory = os.path.dirname(os.path.abspath(path))
    # (named here: the rename over a directory said 'Device or resource busy', and
    # a missing directory was reported under the temporary file's name)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "Is a directory (save takes a file name)", path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"No such directory {directory!r}", path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory fds: the rename is done
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- loading -----------------------------------------------------------------


def _bad(path, what):
    return ValueError(f"{path} is not a valid fastbp checkpoint: {what}")


def _reject_constant(name):
    if name == "NaN":
        return math.nan
    if name in ("Infinity", "-Infinity"):
        return math.inf if name == "Infinity" else -math.inf
    raise ValueError(name)


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _expect(cond, path, what):
    if not cond:
        raise _bad(path, what)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _keys(obj, path, where, required, optional=()):
    _expect(isinstance(obj, dict), path, f"{where} is not an object")
    missing = [k for k in required if k not in obj]
    _expect(not missing, path, f"{where} lacks {', '.join(missing)}")
    extra = [k for k in obj if k not in required and k not in optional]
    _expect(not extra, path, f"{where} has unknown entries {', '.join(map(repr, extra))}")


def load(path, *, backend=None):
    """Read a checkpoint written by `save`.

    Parameters
    ----------
    path : str or os.PathLike
    backend : {"cython", "numpy"}, optional
        The network's kernel backend; default: the one it was saved with.

    Returns
    -------
    Checkpoint
        Unpacks as ``net, optimizer`` (optimizer is None when none was saved);
        ``.metadata`` is the saved metadata.

    Raises
    ------
    ValueError
        If the file is not a whole, valid fastbp checkpoint (wrong magic or
        version, truncated, corrupted, inconsistent); nothing is built then.
    """
    from .network import MLP

    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    n = len(blob)
    _expect(n >= _PREAMBLE.size + _CHECKSUM_SIZE, path, f"{n} bytes is too short")
    magic, version, header_size = _PREAMBLE.unpack_from(blob)
    _expect(magic == MAGIC, path, "wrong magic bytes")
    _expect(version == FORMAT_VERSION, path,
            f"format version {version}; this fastbp reads version {FORMAT_VERSION}")
    _expect(header_size <= MAX_HEADER_SIZE, path, f"header size {header_size} exceeds {MAX_HEADER_SIZE}")
    _expect(_PREAMBLE.size + header_size + _CHECKSUM_SIZE <= n, path,
            "truncated (the header runs past the end of the file)")
    body, checksum = blob[:-_CHECKSUM_SIZE], blob[-_CHECKSUM_SIZE:]
    _expect(hashlib.sha256(body).digest() == checksum, path,
            "checksum mismatch (the file is truncated or corrupted)")
    try:
        header = json.loads(blob[_PREAMBLE.size:_PREAMBLE.size + header_size].decode("utf-8"),
                            parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(path, f"unreadable header ({exc})") from None
    start = _PREAMBLE.size + header_size
    data_start = start + (-start % _ALIGN)
    _expect(data_start <= len(body), path, "truncated (no data section)")
    data = memoryview(body)[data_start:]

    _keys(header, path, "the header", ("format", "fastbp_version", "network", "optimizer",
                                       "schedule", "metadata", "arrays"))
    _expect(header["format"] == "fastbp-checkpoint", path, "the header's format is not fastbp-checkpoint")
    _expect(isinstance(header["fastbp_version"], str), path, "fastbp_version is not a string")

    netspec = header["network"]
    _keys(netspec, path, "network", ("sizes", "activations", "loss", "output", "dtype",
                                     "backend", "epoch", "rng"))
    sizes = netspec["sizes"]
    _expect(isinstance(sizes, list) and 2 <= len(sizes) <= MAX_LAYERS + 1
            and all(_is_int(s) and 1 <= s <= _MAX_WIDTH for s in sizes), path,
            "network sizes are not 2 to 513 positive integers")
    acts = netspec["activations"]
    _expect(isinstance(acts, list) and len(acts) == len(sizes) - 2
            and all(isinstance(a, str) and a in ACTIVATIONS for a in acts), path,
            "network activations do not name one known activation per hidden layer")
    loss, output = netspec["loss"], netspec["output"]
    _expect(isinstance(loss, str) and loss in LOSSES, path, f"unknown loss {loss!r}")
    _expect(output is None if loss != "mse" else (isinstance(output, str) and output in OUTPUT_ACTIVATIONS),
            path, f"output {output!r} does not fit loss {loss!r}")
    dtype = netspec["dtype"]
    _expect(isinstance(dtype, str) and dtype in _DTYPES, path, f"unknown dtype {dtype!r}")
    saved_backend = netspec["backend"]
    _expect(saved_backend in ("cython", "numpy"), path, f"unknown backend {saved_backend!r}")
    epoch = netspec["epoch"]
    _expect(_is_int(epoch) and epoch >= 0, path, "network epoch is not an integer >= 0")
    rng = _check_rng(netspec["rng"], path)
    n_params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))

    optspec = header["optimizer"]
    expected = {"params": (n_params,)}
    if optspec is not None:
        _keys(optspec, path, "optimizer", ("type", "config", "step_count", "state_arrays"))
        _expect(isinstance(optspec["type"], str) and optspec["type"] in _OPTIMIZERS, path,
                f"unknown optimizer type {optspec['type']!r}")
        # (the compiled steps take Adam's step number as a C long; 2**53 steps is
        # beyond any training run, and every count up to it is exact in a float64)
        _expect(_is_int(optspec["step_count"]) and 0 <= optspec["step_count"] <= _MAX_STEPS, path,
                "optimizer step_count is not an integer from 0 to 2**53")
        _expect(isinstance(optspec["config"], dict), path, "optimizer config is not an object")
        names = optspec["state_arrays"]
        known = _OPTIMIZERS[optspec["type"]]._state_arrays
        _expect(isinstance(names, list) and all(isinstance(s, str) and s in known for s in names)
                and len(set(names)) == len(names), path, "optimizer state_arrays are not its state names")
        for s in names:
            expected[f"optimizer.{s}"] = (n_params,)

    specs = header["arrays"]
    _expect(isinstance(specs, list) and len(specs) == len(expected), path,
            f"expected {len(expected)} arrays")
    arrays, end = {}, 0
    for spec in specs:
        _keys(spec, path, "an array entry", ("name", "dtype", "shape", "offset", "nbytes"))
        name = spec["name"]
        _expect(isinstance(name, str) and name in expected and name not in arrays, path,
                f"unexpected array {name!r}")
        _expect(spec["dtype"] == dtype, path, f"array {name!r} has dtype {spec['dtype']!r}, not {dtype!r}")
        _expect(spec["shape"] == list(expected[name]), path,
                f"array {name!r} has shape {spec['shape']}, not {list(expected[name])}")
        size = _DTYPES[dtype].itemsize * expected[name][0]
        off = spec["offset"]
        _expect(spec["nbytes"] == size, path, f"array {name!r} has {spec['nbytes']!r} bytes, not {size}")
        _expect(_is_int(off) and off >= end and off % _ALIGN == 0 and off + size <= len(data), path,
                f"array {name!r} does not lie in the data section in order")
        arrays[name] = np.frombuffer(data, dtype=_DTYPES[dtype], count=expected[name][0], offset=off)
        end = off + size
    _expect(all(np.isfinite(a).all() for a in arrays.values()), path, "an array holds NaN or infinity")
    _check_metadata(header["metadata"], path)
    schedule = None if header["schedule"] is None else _build_schedule(header["schedule"], path)

    # Everything is checked: build (nothing above has created a network).
    params = arrays["params"]
    layers = []
    p = 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        W = params[p:p + n_in * n_out].reshape(n_out, n_in)
        b = params[p + n_in * n_out:p + (n_in + 1) * n_out]
        layers.append((W, b))
        p += (n_in + 1) * n_out
    try:
        net = MLP.from_arrays([W for W, _ in layers], [b for _, b in layers],
                              activation=list(acts), loss=loss, output=output,
                              dtype=np.float32 if dtype == "<f4" else np.float64,
                              backend=saved_backend if backend is None else backend)
    except (TypeError, ValueError) as exc:
        raise _bad(path, f"its network cannot be built ({exc})") from None
    net._rng = rng
    net.epoch_ = epoch
    optimizer = None
    if optspec is not None:
        cls = _OPTIMIZERS[optspec["type"]]
        config = dict(optspec["config"])
        if "betas" in config and isinstance(config["betas"], list):
            config["betas"] = tuple(config["betas"])
        try:
            optimizer = cls(net.params, **config)
        except (TypeError, ValueError) as exc:
            raise _bad(path, f"its optimizer cannot be built ({exc})") from None
        for s in optspec["state_arrays"]:
            target = getattr(optimizer, s)
            _expect(target is not None, path, f"optimizer state {s!r} does not fit its settings")
            target[...] = arrays[f"optimizer.{s}"]
        missing = [s for s in cls._state_arrays
                   if getattr(optimizer, s) is not None and s not in optspec["state_arrays"]]
        _expect(not missing, path, f"optimizer state {', '.join(missing)} is missing")
        optimizer.step_count = optspec["step_count"]
    return Checkpoint(net, optimizer, header["metadata"], header["fastbp_version"], schedule)


def _check_rng(state, path):
    """A numpy Generator from a saved bit-generator state (PCG64 only: the one
    fastbp's networks use), every field checked."""
    _keys(state, path, "network rng", ("bit_generator", "state", "has_uint32", "uinteger"))
    _expect(state["bit_generator"] == "PCG64", path, "network rng is not a PCG64 state")
    inner = state["state"]
    _keys(inner, path, "network rng state", ("state", "inc"))
    _expect(all(_is_int(inner[k]) and 0 <= inner[k] < 2**128 for k in ("state", "inc")), path,
            "network rng state is not two 128-bit integers")
    _expect(state["has_uint32"] in (0, 1) and _is_int(state["uinteger"])
            and 0 <= state["uinteger"] < 2**32, path, "network rng buffer is invalid")
    bit_generator = np.random.PCG64()
    try:
        bit_generator.state = state
    except (TypeError, ValueError) as exc:
        raise _bad(path, f"network rng state is invalid ({exc})") from None
    return np.random.Generator(bit_generator)


def _check_metadata(value, path, depth=0):
    _expect(depth <= _MAX_METADATA_DEPTH, path, "metadata nests too deeply")
    if isinstance(value, dict):
        for v in value.values():
            _check_metadata(v, path, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_metadata(v, path, depth + 1)
    else:
        _expect(value is None or isinstance(value, (bool, int, float, str)), path, "metadata is not JSON")


def _build_schedule(spec, path):
    """A schedule from its saved type and attributes: the settings through the
    class's own constructor (which checks them), the state (numbers) set after."""
    _keys(spec, path, "schedule", ("type", "attributes"))
    cls = _SCHEDULES.get(spec["type"]) if isinstance(spec["type"], str) else None
    _expect(cls is not None, path, f"unknown schedule type {spec['type']!r}")
    attrs = spec["attributes"]
    _expect(isinstance(attrs, dict) and all(
        v is None or _is_number(v) and (math.isfinite(v) or k == "best") for k, v in attrs.items()),
        path, "schedule attributes are not finite numbers")
    settings = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    _expect(all(p in attrs for p in settings), path, "schedule settings are missing")
    try:
        schedule = cls(**{p: attrs[p] for p in settings})
    except (TypeError, ValueError) as exc:
        raise _bad(path, f"its schedule cannot be built ({exc})") from None
    state = dict(vars(schedule))
    _expect(set(attrs) <= set(state) | {"base_lr"}, path,
            f"schedule has unknown entries {', '.join(map(repr, set(attrs) - set(state) - {'base_lr'}))}")
    for k, v in attrs.items():
        setattr(schedule, k, v)
    try:
        schedule._check_state()
    except (TypeError, ValueError) as exc:
        raise _bad(path, f"its schedule's state is invalid ({exc})") from None
    return schedule

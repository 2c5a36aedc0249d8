"""Threads: ``fastbp.set_num_threads(n)`` and ``fastbp.get_num_threads()``.

BLAS's thread count (scipy's BLAS, which fastbp's kernels call through
``scipy.linalg.cython_blas``) is fastbp's too, and limits set from outside hold
as they are: ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` at start-up, or
``threadpoolctl.threadpool_limits`` around a block of code. There is never more
than one level of parallelism:

- Most calls run their products in BLAS, on its threads. fastbp's own
  product kernel runs on the calling thread; it reads BLAS's thread count at
  every product and, when BLAS has one thread, takes most forward products
  and the larger backward ones from it (it is faster than one-thread OpenBLAS
  there).
- The training steps, epochs and gradients of float32 networks on batches of
  32-1,024 rows with a layer of 2^20 multiply-adds or more and none of 2^28 or
  more (MNIST-sized networks and up to a few thousand units per layer), of
  float64 networks on batches of 32-128 rows with such a layer and none above
  2^25, and their forward passes of 32 rows or more (``predict``, ``evaluate``, fit's
  validation), run on fastbp's own threads instead, as many as BLAS has: for
  the length of the call, SciPy's OpenBLAS is set to one thread and every
  product is split across fastbp's threads (1.02-1.30x faster steps on two
  cores; on batches of fewer than 256 rows, by each layer's units, so that
  each thread reads and updates its own rows of W). That switch is visible to
  other Python threads that call SciPy's BLAS at the same moment (their
  products run on one thread meanwhile), and a thread count changed by another
  thread during such a call is overwritten when it ends. With
  ``set_num_threads(1)``, with a BLAS other than OpenBLAS, or off Linux, fastbp
  starts no threads. Its threads spin for up to a millisecond after their last
  job, then sleep; after ``fork()`` the child starts its own.

`set_num_threads` sets the thread count of every BLAS library loaded in the
process (NumPy's too, as ``torch.set_num_threads`` sets PyTorch's for all its
operations): through threadpoolctl when it is installed, which also knows MKL
and BLIS; otherwise by calling OpenBLAS's own ``*openblas_set_num_threads``
in each OpenBLAS copy the process has loaded (Linux).
"""

import ctypes
import numbers
import os

__all__ = ["set_num_threads", "get_num_threads"]

# Entry points of OpenBLAS builds: plain, and the prefixed ones that NumPy's and
# SciPy's wheels carry (scipy-openblas, with and without 64-bit integers).
_SETTERS = ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads", "openblas_set_num_threads64_")
_GETTERS = ("scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_",
            "openblas_get_num_threads", "openblas_get_num_threads64_")


def _load_blas():
    from . import _kernels  # noqa: F401  (loads the BLAS our kernels call)


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl


def _openblas_libraries():
    """(path, ctypes library) of each OpenBLAS copy loaded in this process,
    SciPy's (the one fastbp's kernels call) first."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if "openblas" in line.lower()}
    except OSError:
        return []
    paths = sorted((p for p in paths if os.path.isfile(p)), key=lambda p: "scipy" not in p.split("/")[-2])
    return [(p, ctypes.CDLL(p, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)) for p in paths]


def _symbol(lib, names):
    for name in names:
        try:
            return getattr(lib, name)
        except AttributeError:
            continue
    return None


def _check_n(n):
    # (the libraries take a C int: 10**20 had raised ctypes' ArgumentError)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= 2**31 - 1:
        raise ValueError(f"the number of threads must be a positive integer (below 2**31), "
                         f"got {n!r}")
    return int(n)


def set_num_threads(n):
    """Use `n` threads in BLAS (every BLAS library of the process).

    Parameters
    ----------
    n : int
        At least 1. One thread is often the fastest choice for tiny networks,
        and for any size when another busy process shares the cores.
    """
    n = _check_n(n)
    _load_blas()
    tpc = _threadpoolctl()
    if tpc is not None:
        # A ThreadpoolController's limits persist (threadpool_limits restores on exit).
        tpc.ThreadpoolController().limit(limits=n, user_api="blas")
        return
    setters = [(p, _symbol(lib, _SETTERS)) for p, lib in _openblas_libraries()]
    setters = [(p, f) for p, f in setters if f is not None]
    if not setters:
        raise RuntimeError("cannot find the BLAS library's thread control; install threadpoolctl "
                           "(pip install threadpoolctl) or set OMP_NUM_THREADS before starting Python")
    for _, f in setters:
        f.argtypes = [ctypes.c_int]
        f.restype = None
        f(n)


def get_num_threads():
    """The number of threads of the BLAS library fastbp's kernels call (SciPy's)."""
    _load_blas()
    tpc = _threadpoolctl()
    if tpc is not None:
        infos = [i for i in tpc.threadpool_info() if i["user_api"] == "blas"]
        if infos:
            infos.sort(key=lambda i: "scipy" not in os.path.dirname(i["filepath"]))
            return int(infos[0]["num_threads"])
    for _, lib in _openblas_libraries():
        f = _symbol(lib, _GETTERS)
        if f is not None:
            f.restype = ctypes.c_int
            return int(f())
    raise RuntimeError("cannot find the BLAS library's thread control; install threadpoolctl")

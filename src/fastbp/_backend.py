"""Backend selection: the compiled kernels or their NumPy specification, by name."""

import importlib

BACKENDS = ("cython", "numpy")

_MODULES = {"cython": "fastbp._kernels", "numpy": "fastbp.reference"}


def get_backend(name):
    """The kernel module for backend `name` ("cython" or "numpy")."""
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of 'cython', 'numpy'")
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ImportError(
            "fastbp's compiled kernels are not built; reinstall with `pip install .` "
            "(needs a C compiler), or use backend='numpy'"
        ) from exc

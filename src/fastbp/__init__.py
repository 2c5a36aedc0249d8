"""fastbp: fast, exact backpropagation for dense neural networks on the CPU.

The compiled kernels (`fastbp._kernels`) and their NumPy specification
(`fastbp.reference`) share names and signatures; `MLP` runs on either.
"""

from ._backend import BACKENDS, get_backend
from . import datasets
from .checkpoint import Checkpoint, load, save
from .diagnostics import gradcheck, layer_statistics
from .network import LOSSES, MLP
from .optim import (
    SGD,
    Adam,
    AdamW,
    CosineAnnealingLR,
    ExponentialLR,
    InverseScaling,
    LinearWarmup,
    Optimizer,
    ReduceLROnPlateau,
    Schedule,
    StepLR,
)
from .threads import get_num_threads, set_num_threads
from .train import EarlyStopping, History

__version__ = "0.1.0"

__all__ = [
    "MLP", "SGD", "Adam", "AdamW", "Optimizer", "Schedule", "StepLR", "ExponentialLR",
    "CosineAnnealingLR", "LinearWarmup", "InverseScaling", "ReduceLROnPlateau", "EarlyStopping",
    "History", "gradcheck", "layer_statistics", "datasets", "LOSSES", "BACKENDS", "get_backend",
    "set_num_threads", "get_num_threads", "save", "load", "Checkpoint", "__version__",
]

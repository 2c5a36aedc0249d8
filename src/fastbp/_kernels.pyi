# Type stubs of the compiled kernels; semantics in fastbp/reference.py.
from typing import Literal, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray

Activation = Literal["identity", "sigmoid", "tanh", "relu", "leaky_relu"]
OutputActivation = Literal["identity", "sigmoid", "tanh"]
Loss = Literal["cross_entropy", "mse", "binary_cross_entropy"]
Float = NDArray[np.floating]

DEBUG_BUILD: bool

def dense_forward(X: Float, W: Float, b: Float, activation: Activation, out: Float) -> Float: ...
def activation_backward(A: Float, dA: Float, activation: Activation, out: Float) -> Float: ...
def dense_backward(dZ: Float, X: Float, W: Float, dW: Float, db: Float,
                   dX: Optional[Float] = None) -> Tuple[Float, Float, Optional[Float]]: ...
def softmax(Z: Float, out: Float) -> Float: ...
def softmax_cross_entropy(Z: Float, y: NDArray[np.int64], dZ: Optional[Float] = None) -> float: ...
def mean_squared_error(A: Float, Y: Float, activation: OutputActivation,
                       dZ: Optional[Float] = None) -> float: ...
def binary_cross_entropy_with_logits(Z: Float, Y: Float, dZ: Optional[Float] = None) -> float: ...
def sgd_update(param: Float, grad: Float, momentum_buffer: Optional[Float], lr: float,
               momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
               weight_decay: float = 0.0, maximize: bool = False, first_step: bool = False) -> None: ...
def all_finite(x: Float) -> bool: ...
def adam_update(param: Float, grad: Float, exp_avg: Float, exp_avg_sq: Float,
                max_exp_avg_sq: Optional[Float], step: int, lr: float, beta1: float = 0.9,
                beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                decoupled_weight_decay: bool = False, amsgrad: bool = False,
                maximize: bool = False) -> None: ...
def mlp_forward(X: Float, labels: Optional[NDArray[np.int64]], targets: Optional[Float],
                params: Float, sizes: Sequence[int], activations: Sequence[Activation],
                loss: Loss, output: OutputActivation, A: Float,
                out: Optional[Float]) -> Optional[float]: ...
def mlp_gradients(X: Float, labels: Optional[NDArray[np.int64]], targets: Optional[Float],
                  params: Float, sizes: Sequence[int], activations: Sequence[Activation],
                  loss: Loss, output: OutputActivation, A: Float, D: Float, grad: Float) -> float: ...
def mlp_sgd_step(X: Float, labels: Optional[NDArray[np.int64]], targets: Optional[Float],
                 params: Float, sizes: Sequence[int], activations: Sequence[Activation],
                 loss: Loss, output: OutputActivation, A: Float, D: Float, grad: Float,
                 momentum_buffer: Optional[Float], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 maximize: bool = False, first_step: bool = False) -> Tuple[float, int]: ...
def mlp_sgd_epoch(X: Float, labels: Optional[NDArray[np.int64]], targets: Optional[Float],
                  order: NDArray[np.int64], batch_size: int, params: Float, sizes: Sequence[int],
                  activations: Sequence[Activation], loss: Loss, output: OutputActivation,
                  A: Float, D: Float, grad: Float, X_batch: Float,
                  labels_batch: Optional[NDArray[np.int64]], targets_batch: Optional[Float],
                  momentum_buffer: Optional[Float], stop: NDArray[np.int8], lr: float,
                  momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                  weight_decay: float = 0.0, maximize: bool = False,
                  first_step: bool = False) -> Tuple[float, int, int]: ...
def mlp_adam_step(X: Float, labels: Optional[NDArray[np.int64]], targets: Optional[Float],
                  params: Float, sizes: Sequence[int], activations: Sequence[Activation],
                  loss: Loss, output: OutputActivation, A: Float, D: Float, grad: Float,
                  exp_avg: Float, exp_avg_sq: Float, max_exp_avg_sq: Optional[Float], step: int,
                  lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                  weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                  amsgrad: bool = False, maximize: bool = False) -> Tuple[float, int]: ...
def mlp_adam_epoch(X: Float, labels: Optional[NDArray[np.int64]], targets: Optional[Float],
                   order: NDArray[np.int64], batch_size: int, params: Float, sizes: Sequence[int],
                   activations: Sequence[Activation], loss: Loss, output: OutputActivation,
                   A: Float, D: Float, grad: Float, X_batch: Float,
                   labels_batch: Optional[NDArray[np.int64]], targets_batch: Optional[Float],
                   exp_avg: Float, exp_avg_sq: Float, max_exp_avg_sq: Optional[Float],
                   stop: NDArray[np.int8], step: int, lr: float, beta1: float = 0.9,
                   beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   decoupled_weight_decay: bool = False, amsgrad: bool = False,
                   maximize: bool = False) -> Tuple[float, int, int]: ...

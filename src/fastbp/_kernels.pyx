"""Compiled kernels of fastbp: the fast twins of `fastbp.reference`.

Every public function has the name, signature and semantics of its twin in
`fastbp.reference` (read that module's docstrings for the formulas). Each is
built in three tiers:

1. a public ``def`` on Python objects that turns a refused argument into an
   error naming it (the same checks and messages as the reference, in
   `fastbp._checks`, which also refuse anything but an ndarray);
2. the checks of shapes, aliasing and BLAS limits, then the GIL released: for
   a single kernel, a private fused ``def`` over typed memoryviews, one body for
   float32 and float64; for the whole-network calls (mlp_*), a ``cdef`` reading
   plain ndarrays through NumPy's C API (no memoryview objects: nothing
   allocated per call);
3. ``cdef ... noexcept nogil`` loops on raw pointers that assume valid input.

GEMMs go through scipy's BLAS (`scipy.linalg.cython_blas`); everything else is
fused loops over row pointers, the elementwise ones (and exp) in `_vecmath.h`,
compiled once per instruction-set level.
"""

from cython cimport floating
from libc.limits cimport INT_MAX
from libc.math cimport fabs, log, log1p, log1pf, logf
from libc.stdint cimport int8_t, int64_t
from cpython.exc cimport PyErr_CheckSignals
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport dgemm, sgemm
cimport numpy as cnp

from fastbp._checks import (
    ACTIVATIONS,
    LEAKY_RELU_SLOPE,
    LOSSES,
    OUTPUT_ACTIVATIONS,
    check_adam_epoch_call,
    check_adam_state,
    check_adam_step_call,
    check_call,
    check_choice,
    check_epoch_call,
    check_forward_call,
    check_mlp_call,
    check_step_call,
    empty_batch_error,
    label_error,
    overlap_error,
    shape_error,
)

cdef extern from *:
    """
    #ifndef FASTBP_DEBUG
    #define FASTBP_DEBUG 0
    #endif
    """
    int FASTBP_DEBUG

# The elementwise loops, compiled per instruction-set level, and fastbp's exp:
# _vecmath.h says why they are in C.
cdef extern from "_vecmath.h" nogil:
    float fbp_expf(float x)
    double fbp_exp(double x)
    void fbp_exp_f32(float* x, Py_ssize_t n)
    void fbp_exp_f64(double* x, Py_ssize_t n)
    float fbp_sigmoid1_f32(float z)
    double fbp_sigmoid1_f64(double z)
    void fbp_sigmoid_f32(float* z, Py_ssize_t n)
    void fbp_sigmoid_f64(double* z, Py_ssize_t n)
    void fbp_softmax_rows_f32(const float* Z, float* out, Py_ssize_t n, Py_ssize_t k,
                              float* lse)
    void fbp_softmax_rows_f64(const double* Z, double* out, Py_ssize_t n, Py_ssize_t k,
                              double* lse)
    double fbp_softmax_xent_f32(const float* Z, const int64_t* y, float* dZ, Py_ssize_t n,
                                Py_ssize_t k, float scale)
    double fbp_softmax_xent_f64(const double* Z, const int64_t* y, double* dZ, Py_ssize_t n,
                                Py_ssize_t k, double scale)
    int FBP_SOFTMAX_NARROW
    int fbp_vec512_on
    int fbp_vec512_init()
    void fbp_tanh_f32(float* z, Py_ssize_t n)
    void fbp_tanh_f64(double* z, Py_ssize_t n)
    int fbp_max_exponent_f32(const float* x, Py_ssize_t n)
    int fbp_max_exponent_f64(const double* x, Py_ssize_t n)
    int fbp_all_finite_f32(const float* x, Py_ssize_t n)
    int fbp_all_finite_f64(const double* x, Py_ssize_t n)
    void fbp_bias_act_f32(float* Z, const float* b, Py_ssize_t n, Py_ssize_t m, int act,
                          float slope)
    void fbp_bias_act_f64(double* Z, const double* b, Py_ssize_t n, Py_ssize_t m, int act,
                          double slope)
    void fbp_act_backward_f32(const float* A, const float* dA, float* out, Py_ssize_t size,
                              int act, float slope)
    void fbp_act_backward_f64(const double* A, const double* dA, double* out, Py_ssize_t size,
                              int act, double slope)
    void fbp_act_backward_bound_f32(const float* A, const float* dA, float* out,
                                    Py_ssize_t size, int act, float slope, int* e)
    void fbp_act_backward_bound_f64(const double* A, const double* dA, double* out,
                                    Py_ssize_t size, int act, double slope, int* e)
    void fbp_column_sums_f32(const float* M, float* out, Py_ssize_t n, Py_ssize_t m)
    void fbp_column_sums_f64(const double* M, double* out, Py_ssize_t n, Py_ssize_t m)
    double fbp_sum_squares_f32(const float* a, const float* b, Py_ssize_t size, int sub)
    double fbp_sum_squares_f64(const double* a, const double* b, Py_ssize_t size, int sub)
    double fbp_mse_f32(const float* A, const float* Y, float* dZ, Py_ssize_t size, int act,
                       float scale)
    double fbp_mse_f64(const double* A, const double* Y, double* dZ, Py_ssize_t size, int act,
                       double scale)
    double fbp_bce_f32(const float* Z, const float* Y, float* dZ, Py_ssize_t size, float scale)
    double fbp_bce_f64(const double* Z, const double* Y, double* dZ, Py_ssize_t size,
                       double scale)
    Py_ssize_t fbp_count_saturated_f32(const float* A, Py_ssize_t size, int act, float below)
    Py_ssize_t fbp_count_saturated_f64(const double* A, Py_ssize_t size, int act, double below)
    Py_ssize_t fbp_count_dead_f32(const float* A, Py_ssize_t n, Py_ssize_t m)
    Py_ssize_t fbp_count_dead_f64(const double* A, Py_ssize_t n, Py_ssize_t m)
    void fbp_sgd_f32(float* param, const float* grad, float* buf, Py_ssize_t size, float lr,
                     float momentum, float dampening_complement, int nesterov,
                     float weight_decay, int maximize, int first_step)
    void fbp_sgd_f64(double* param, const double* grad, double* buf, Py_ssize_t size,
                     double lr, double momentum, double dampening_complement, int nesterov,
                     double weight_decay, int maximize, int first_step)
    void fbp_adam_f32(float* param, const float* grad, float* m, float* v, float* vmax,
                      Py_ssize_t size, float neg_step_size, float beta1_weight, float beta2,
                      float beta2_complement, float bc2_sqrt, float eps, float l2,
                      int scale_param, float param_scale, int maximize)
    void fbp_adam_f64(double* param, const double* grad, double* m, double* v, double* vmax,
                      Py_ssize_t size, double neg_step_size, double beta1_weight, double beta2,
                      double beta2_complement, double bc2_sqrt, double eps, double l2,
                      int scale_param, double param_scale, int maximize)

# The forward product of small layers without BLAS (_smallgemm.h says why).
cdef extern from "_smallgemm.h" nogil:
    int fbp_tn_on
    int fbp_tn_init()
    int fbp_tn_find_blas_threads(const void* fn)
    int (*fbp_blas_threads)()
    int fbp_tn_takes(Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out, int f64)
    int fbp_tn_takes_for(Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out, int threads, int f64)
    int fbp_gemm_sgd_takes_for(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int threads, int f64,
                               int parts)
    int fbp_gemm_takes_for(char transa, char transb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                           int threads, int f64, int parts)
    int fbp_gemm_takes(char transa, char transb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                       int f64)
    int fbp_tn_f32(const float* X, const float* W, float* Z, Py_ssize_t n, Py_ssize_t n_in,
                   Py_ssize_t n_out, const float* b, int act, float slope)
    int fbp_tn_f64(const double* X, const double* W, double* Z, Py_ssize_t n,
                   Py_ssize_t n_in, Py_ssize_t n_out, const double* b, int act, double slope)
    int fbp_gemm_f32(char transa, char transb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                     float alpha, const float* A, Py_ssize_t lda, const float* B, Py_ssize_t ldb,
                     float beta, float* C, Py_ssize_t ldc)
    int fbp_gemm_f64(char transa, char transb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                     double alpha, const double* A, Py_ssize_t lda, const double* B,
                     Py_ssize_t ldb, double beta, double* C, Py_ssize_t ldc)
    int fbp_fold_momentum
    int fbp_split_units
    bint fbp_split_by_units(Py_ssize_t batch)
    Py_ssize_t fbp_split_at(Py_ssize_t size, int k, int parts, Py_ssize_t unit)
    int fbp_gemm_sgd_f32(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float* A, Py_ssize_t lda,
                         const float* B, Py_ssize_t ldb, float* C, Py_ssize_t ldc, float* param,
                         float* buf, float lr, float momentum, float dc, int first)
    int fbp_gemm_sgd_f64(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const double* A,
                         Py_ssize_t lda, const double* B, Py_ssize_t ldb, double* C,
                         Py_ssize_t ldc, double* param, double* buf, double lr, double momentum,
                         double dc, int first)
    # fastbp's own threads for whole-network calls (_pool.h; the rule in _smallgemm.h)
    ctypedef void (*fbp_part_fn)(void* arg, int part, int parts) noexcept nogil
    int fbp_own_threads
    long fbp_own_threads_calls
    int fbp_pool_held
    int fbp_pool_takes(Py_ssize_t n, Py_ssize_t n_layers, const Py_ssize_t* sizes, int f64,
                       int threads)
    int fbp_threads_enter(Py_ssize_t n, Py_ssize_t n_layers, const Py_ssize_t* sizes, int f64)
    void fbp_threads_exit(int threads)
    void fbp_pool_run(fbp_part_fn fn, void* arg, int parts)

cnp.import_array()
fbp_tn_init()
fbp_vec512_init()
fbp_tn_find_blas_threads(<const void*>sgemm)

#: True when built with FASTBP_CYTHON_DEBUG=1 (bounds and initialisation checks on).
DEBUG_BUILD = bool(FASTBP_DEBUG)

__all__ = [
    "dense_forward",
    "activation_backward",
    "dense_backward",
    "softmax",
    "softmax_cross_entropy",
    "mean_squared_error",
    "binary_cross_entropy_with_logits",
    "sgd_update",
    "adam_update",
    "all_finite",
    "mlp_forward",
    "mlp_gradients",
    "mlp_sgd_step",
    "mlp_sgd_epoch",
    "mlp_adam_step",
    "mlp_adam_epoch",
]

# Activation codes, in the order of fastbp._checks.ACTIVATIONS (one list, in _vecmath.h).
cdef extern from "_vecmath.h":
    enum:
        IDENTITY "FBP_IDENTITY"
        SIGMOID "FBP_SIGMOID"
        TANH "FBP_TANH"
        RELU "FBP_RELU"
        LEAKY_RELU "FBP_LEAKY_RELU"


# A C copy of the Python constant, readable without the GIL.
cdef double _LEAKY_SLOPE = LEAKY_RELU_SLOPE


cdef int _activation_code(activation, choices) except -1:
    check_choice("activation", activation, choices)
    return ACTIVATIONS.index(activation)


# ---------------------------------------------------------------------------
# Scalar helpers: one body for both dtypes.

cdef inline floating _exp(floating x) noexcept nogil:
    # fastbp's own (_vecmath.h): the same in every loop, vectorised or not
    if floating is float:
        return fbp_expf(x)
    else:
        return fbp_exp(x)


cdef inline floating _log(floating x) noexcept nogil:
    if floating is float:
        return logf(x)
    else:
        return log(x)


cdef inline floating _sigmoid(floating z) noexcept nogil:
    # the sigmoid of _vecmath.h's loops, for one element
    if floating is float:
        return fbp_sigmoid1_f32(z)
    else:
        return fbp_sigmoid1_f64(z)


# ---------------------------------------------------------------------------
# Checks that need the typed views.

cdef inline bint _overlap(const void* a, size_t na, const void* b, size_t nb,
                          bint allow_identical) noexcept:
    """Whether byte ranges [a, a + na) and [b, b + nb) share memory."""
    cdef const char* ca = <const char*>a
    cdef const char* cb = <const char*>b
    if na == 0 or nb == 0 or a == NULL or b == NULL:
        return False
    if ca < cb + nb and cb < ca + na:
        return not (allow_identical and ca == cb and na == nb)
    return False


cdef inline bint _nd(object a):
    """`a` is None or an ndarray. The typed memoryviews of the kernels below take any
    object with the buffer protocol (a memoryview, an array.array), which the
    reference refuses: each public kernel sends such arguments to check_call first,
    which names them with the reference's message."""
    return a is None or cnp.PyArray_Check(a)


cdef int _check_blas_size(str name, Py_ssize_t size) except -1:
    if size > INT_MAX:
        raise ValueError(f"{name} = {size} exceeds the BLAS limit of {INT_MAX}")
    return 0


# ---------------------------------------------------------------------------
# BLAS

ctypedef struct _GemmJob:
    # One GEMM for `_gemm_part`, in `_gemm`'s row-major terms; by_rows: its parts
    # are blocks of C's rows, else of its columns. alpha, beta: as doubles, exact
    # for either type.
    char transa, transb
    int M, N, K, lda, ldb, ldc
    bint by_rows, f64
    double alpha, beta
    const void* A
    const void* B
    void* C


cdef inline void _slice(Py_ssize_t size, int part, int parts, bint f64, Py_ssize_t* lo,
                        Py_ssize_t* hi) noexcept nogil:
    """Part `part` of `parts` of range(size), for a part of a product or a pass split
    across fastbp's threads: cut at the nearest multiple of 16 floats or 8 doubles
    (whole cache lines, so that no two threads write one line; and where
    _smallgemm.h's kernel cuts a layer's units: `fbp_split_at`, FBP_SPLIT_UNIT)."""
    cdef Py_ssize_t unit = 8 if f64 else 16
    lo[0] = fbp_split_at(size, part, parts, unit)
    hi[0] = fbp_split_at(size, part + 1, parts, unit)


cdef void _gemm_part(void* arg, int part, int parts) noexcept nogil:
    """Part `part` of the GEMM in arg (a _GemmJob): one BLAS call on its block of C."""
    cdef const _GemmJob* j = <const _GemmJob*>arg
    cdef Py_ssize_t start, end
    _slice(j.M if j.by_rows else j.N, part, parts, j.f64, &start, &end)
    cdef int lo = <int>start, hi = <int>end
    if lo >= hi:
        return
    if j.by_rows:  # rows lo..hi of C and of op(A)
        if j.f64:
            _gemm_blas(j.transa, j.transb, hi - lo, j.N, j.K, <double>j.alpha,
                       <const double*>j.A + (lo * j.lda if j.transa == c'N' else lo), j.lda,
                       <const double*>j.B, j.ldb, <double>j.beta, <double*>j.C + lo * j.ldc, j.ldc)
        else:
            _gemm_blas(j.transa, j.transb, hi - lo, j.N, j.K, <float>j.alpha,
                       <const float*>j.A + (lo * j.lda if j.transa == c'N' else lo), j.lda,
                       <const float*>j.B, j.ldb, <float>j.beta, <float*>j.C + lo * j.ldc, j.ldc)
    else:  # columns lo..hi of C and of op(B)
        if j.f64:
            _gemm_blas(j.transa, j.transb, j.M, hi - lo, j.K, <double>j.alpha,
                       <const double*>j.A, j.lda,
                       <const double*>j.B + (lo if j.transb == c'N' else lo * j.ldb), j.ldb,
                       <double>j.beta, <double*>j.C + lo, j.ldc)
        else:
            _gemm_blas(j.transa, j.transb, j.M, hi - lo, j.K, <float>j.alpha,
                       <const float*>j.A, j.lda,
                       <const float*>j.B + (lo if j.transb == c'N' else lo * j.ldb), j.ldb,
                       <float>j.beta, <float*>j.C + lo, j.ldc)


cdef void _gemm(char transa, char transb, int M, int N, int K, floating alpha,
                const floating* A, int lda, const floating* B, int ldb, floating beta,
                floating* C, int ldc) noexcept nogil:
    """Row-major ``C (M x N) = alpha * op(A) @ op(B) + beta * C``, op given by 'N'/'T':
    on _smallgemm.h's kernel where it takes the product (split across the pool by
    itself); else one BLAS call, or (inside a call on fastbp's own threads,
    _pool.h) one per part of C across the pool (`_gemm_split`)."""
    cdef _GemmJob j
    cdef int parts
    if floating is float:
        if fbp_gemm_f32(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
            return
    else:
        if fbp_gemm_f64(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
            return
    _gemm_job(&j, transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
    parts = _gemm_split(&j)
    if parts:
        fbp_pool_run(_gemm_part, &j, parts)
        return
    _gemm_blas(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)


cdef inline void _gemm_job(_GemmJob* j, char transa, char transb, int M, int N, int K,
                           floating alpha, const floating* A, int lda, const floating* B,
                           int ldb, floating beta, floating* C, int ldc) noexcept nogil:
    """The product in a job for `_gemm_part` (by_rows: set by `_gemm_split`)."""
    j.transa, j.transb, j.M, j.N, j.K = transa, transb, M, N, K
    j.lda, j.ldb, j.ldc, j.by_rows, j.f64 = lda, ldb, ldc, True, floating is double
    j.alpha, j.beta, j.A, j.B, j.C = alpha, beta, A, B, C


cdef int _gemm_split(_GemmJob* j) noexcept nogil:
    """The parts `_gemm` splits the BLAS product in j into across fastbp's threads,
    or 0 (one BLAS call), and along which side of C (j.by_rows). Split where the
    product is large enough (2^18 multiply-adds; BLAS too runs smaller ones on
    one thread): by the layer's units where _smallgemm.h's kernel splits that way
    (`fbp_split_by_units` says why: rows of a weight gradient dZ.T @ input,
    columns of a forward product input @ W.T); else along C's longer side (each
    part then packs the smaller operand whole: measured the faster split)."""
    cdef int parts = fbp_pool_held, side
    if parts < 2 or j.K == 0 or <double>j.M * j.N * j.K < 262144.0:
        return 0
    if j.transa == c'T' and fbp_split_by_units(j.K):
        j.by_rows = True
    elif j.transb == c'T' and fbp_split_by_units(j.M):
        j.by_rows = False
    else:
        j.by_rows = j.M >= j.N
    side = j.M if j.by_rows else j.N
    if side < 32:  # too narrow that way
        j.by_rows = j.M >= j.N
        side = j.M if j.by_rows else j.N
    if side < 32:
        return 0
    return parts if parts <= side // 16 else side // 16


cdef inline bint _gemm_sgd(int M, int N, int K, const floating* A, int lda, const floating* B,
                           int ldb, floating* C, floating* param, floating* buf, floating lr,
                           floating momentum, floating dampening_complement,
                           bint first_step) noexcept nogil:
    """A layer's weight gradient ``dW (M x N) = A.T @ B`` (A (K x M), B (K x N)) and
    torch.optim.SGD's momentum update of its W (param) and buffer, in one pass on
    _smallgemm.h's kernel where it takes the product (`fbp_gemm_sgd_*`): the same
    bits as `_gemm` then `_sgd_loop`; C (M x N) is scratch. False: nothing was done."""
    if floating is float:
        return fbp_gemm_sgd_f32(M, N, K, A, lda, B, ldb, C, N, param, buf, lr, momentum,
                                dampening_complement, first_step)
    else:
        return fbp_gemm_sgd_f64(M, N, K, A, lda, B, ldb, C, N, param, buf, lr, momentum,
                                dampening_complement, first_step)


cdef void _gemm_blas(char transa, char transb, int M, int N, int K, floating alpha,
                     const floating* A, int lda, const floating* B, int ldb, floating beta,
                     floating* C, int ldc) noexcept nogil:
    """`_gemm` in one BLAS call.

    BLAS is column-major and a row-major matrix is its transpose there, so we
    ask BLAS for ``C.T = op(B).T @ op(A).T``: operands swapped, flags unchanged.
    Zero-sized products are handled here, since BLAS rejects ld = 0.
    """
    cdef Py_ssize_t i, j
    if M == 0 or N == 0:
        return
    if K == 0:
        for i in range(M):
            for j in range(N):
                C[i * ldc + j] = 0 if beta == 0 else beta * C[i * ldc + j]
        return
    if floating is float:
        sgemm(&transb, &transa, &N, &M, &K, &alpha, <float*>B, &ldb, <float*>A, &lda,
              &beta, C, &ldc)
    else:
        dgemm(&transb, &transa, &N, &M, &K, &alpha, <double*>B, &ldb, <double*>A, &lda,
              &beta, C, &ldc)


cdef inline void _forward_product(const floating* X, const floating* W, floating* Z,
                                  Py_ssize_t n, Py_ssize_t n_in,
                                  Py_ssize_t n_out) noexcept nogil:
    """Z = X @ W.T for X (n, n_in), W (n_out, n_in): _smallgemm.h's kernel where it
    takes the shape, BLAS elsewhere (`_gemm`)."""
    _gemm(c'N', c'T', <int>n, <int>n_out, <int>n_in, 1, X, <int>n_in, W, <int>n_in, 0, Z,
          <int>n_out)


cdef inline void _forward_layer(const floating* X, const floating* W, const floating* b,
                                floating* Z, Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                                int act) noexcept nogil:
    """Z = act(X @ W.T + b): on _smallgemm.h's kernel where it takes the shape, with
    the bias (and relu / leaky relu) applied as it stores (sigmoid and tanh then run
    over Z); elsewhere BLAS, then `_bias_activation`. The same bits either way."""
    cdef int fused = act if act == RELU or act == LEAKY_RELU else IDENTITY
    cdef int done
    if floating is float:
        done = fbp_tn_f32(X, W, Z, n, n_in, n_out, b, fused, <float>_LEAKY_SLOPE)
    else:
        done = fbp_tn_f64(X, W, Z, n, n_in, n_out, b, fused, _LEAKY_SLOPE)
    if not done:  # (the kernel declines here too: BLAS)
        _forward_product(X, W, Z, n, n_in, n_out)
        _bias_activation(Z, b, n, n_out, act)
    elif act == SIGMOID or act == TANH:
        _squash(Z, n * n_out, act)


# The settings of the switches below (tests and benchmarks), by their C code 0, 1, 2.
_SWITCH_MODES = (False, True, "always")


cdef int _switch_code(object enabled, str what) except -1:
    """The C code of a switch setting: False 0, True 1, "always" 2."""
    if not (enabled is True or enabled is False or enabled == "always"):
        raise ValueError(f"the {what} setting is False, True or 'always', got {enabled!r}")
    return 2 if enabled == "always" else int(enabled)


cdef int _on_off_code(object enabled, str what) except -1:
    """The C code of an on/off switch's setting: False 0, True 1."""
    if not (enabled is True or enabled is False):
        raise ValueError(f"the {what} setting is True or False, got {enabled!r}")
    return int(enabled)


def _small_gemm(enabled=None):
    """Whether products (a layer's forward product and its two backward ones) run on
    _smallgemm.h's kernel (needs AVX-512) where it beats BLAS. With an argument,
    switches it and returns the previous setting: False (BLAS does every product),
    True, or "always" (the kernel does every product, for tests). Tests and
    benchmarks compare them."""
    global fbp_tn_on
    cdef int before = fbp_tn_on, code
    if enabled is not None:
        code = _switch_code(enabled, "small-product")
        if code and not fbp_tn_init():
            fbp_tn_on = before
            raise ValueError("the small-product kernel needs AVX-512, which this CPU lacks")
        fbp_tn_on = code
    return _SWITCH_MODES[before]


def _vector_loss(enabled=None):
    """Whether the softmax cross-entropy of rows of up to 16 classes runs its AVX-512
    version (_vecmath.h; on where the CPU has AVX-512): the same bits as the portable
    one. With an argument, switches it and returns the previous setting (tests
    compare the two)."""
    global fbp_vec512_on
    cdef int before = fbp_vec512_on
    if enabled is not None:
        if _on_off_code(enabled, "vector-loss") and not fbp_vec512_init():
            fbp_vec512_on = before
            raise ValueError("the vector loss needs AVX-512, which this CPU lacks")
        fbp_vec512_on = int(enabled)
    return bool(before)


def _split_by_units(enabled=None):
    """Whether a call on fastbp's own threads splits a layer's products by its units
    on batches of fewer than 256 rows (`fbp_split_by_units`), else by the batch's
    rows or C's longer side. The same bits either way. With an argument, switches
    it and returns the previous setting (tests and benchmarks compare the two)."""
    global fbp_split_units
    cdef int before = fbp_split_units
    if enabled is not None:
        fbp_split_units = _on_off_code(enabled, "split-by-units")
    return bool(before)


def _fold_momentum(enabled=None):
    """Whether a weight gradient takes SGD's momentum update along: made on
    _smallgemm.h's kernel, where its batch fits one panel of the kernel (128
    rows; the gradient is never stored), or in BLAS parts across fastbp's
    threads (each part updated by the thread that made it); else the update is
    a pass of its own. The same bits either way. With an argument, switches it
    and returns the previous setting (tests and benchmarks compare the two)."""
    global fbp_fold_momentum
    cdef int before = fbp_fold_momentum
    if enabled is not None:
        fbp_fold_momentum = _on_off_code(enabled, "fold-momentum")
    return bool(before)


def _blas_threads():
    """The thread count of the BLAS that the kernels call, as _smallgemm.h reads it
    to choose between its kernel and BLAS; None where it found no way to read it."""
    return fbp_blas_threads() if fbp_blas_threads != NULL else None


def _own_threads(enabled=None):
    """Whether whole-network calls (steps, epochs, gradients) run on fastbp's own
    threads, BLAS set to one thread meanwhile, where that is faster (_pool.h,
    _smallgemm.h's `fbp_pool_takes`). With an argument, switches it and returns
    the previous setting: False, True, or "always" (wherever BLAS has several
    threads, for tests). Tests and benchmarks compare them."""
    global fbp_own_threads
    cdef int before = fbp_own_threads
    if enabled is not None:
        fbp_own_threads = _switch_code(enabled, "own-threads")
    return _SWITCH_MODES[before]


def _own_threads_calls():
    """How many whole-network calls have run on fastbp's own threads (tests)."""
    return fbp_own_threads_calls


def _own_threads_takes(Py_ssize_t n, sizes, int blas_threads, bint f64=False):
    """Whether a call on batches of n rows through layers `sizes` runs on fastbp's
    own threads when BLAS has `blas_threads` threads (and the setting is True)."""
    cdef Py_ssize_t c_sizes[MAX_LAYERS + 1]
    cdef Py_ssize_t l, n_layers = len(sizes) - 1
    if n_layers < 1 or n_layers > MAX_LAYERS:
        raise ValueError(f"sizes must describe 1 to {MAX_LAYERS} layers")
    for l in range(n_layers + 1):
        c_sizes[l] = sizes[l]
    return bool(fbp_pool_takes(n, n_layers, c_sizes, f64, blas_threads))


def _small_gemm_takes(Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out, blas_threads=None,
                      bint f64=False):
    """Whether the forward product of this shape runs on _smallgemm.h's kernel
    (when it is on) rather than BLAS, in float32 (or float64 with `f64`): with
    BLAS's thread count as it is now, or as if it were `blas_threads` (0: unknown)."""
    if blas_threads is None:
        return bool(fbp_tn_takes(n, n_in, n_out, f64))
    return bool(fbp_tn_takes_for(n, n_in, n_out, blas_threads, f64))


def _gradient_product_takes(str product, Py_ssize_t n, Py_ssize_t n_in, Py_ssize_t n_out,
                            int blas_threads, bint f64=False, int parts=1):
    """Whether a layer's backward product runs on _smallgemm.h's kernel (when it is
    on) rather than BLAS: product "weights" (dW = dZ.T @ X), "momentum" (dW with
    SGD's momentum update folded in) or "inputs" (dX = dZ @ W) on a batch of n
    rows, BLAS on `blas_threads` threads (0: unknown), inside a call split into
    `parts` parts on fastbp's own threads."""
    if product == "weights":
        return bool(fbp_gemm_takes_for(c'T', c'N', n_out, n_in, n, blas_threads, f64, parts))
    if product == "momentum":
        return bool(fbp_gemm_sgd_takes_for(n_out, n_in, n, blas_threads, f64, parts))
    if product == "inputs":
        return bool(fbp_gemm_takes_for(c'N', c'N', n, n_in, n_out, blas_threads, f64, parts))
    raise ValueError(f"product is 'weights', 'momentum' or 'inputs', got {product!r}")


# ---------------------------------------------------------------------------
# dense_forward

cdef inline void _bias_act(floating* Z, const floating* b, Py_ssize_t n, Py_ssize_t m,
                           int act) noexcept nogil:
    # identity, relu, leaky relu (_vecmath.h)
    if floating is float:
        fbp_bias_act_f32(Z, b, n, m, act, <float>_LEAKY_SLOPE)
    else:
        fbp_bias_act_f64(Z, b, n, m, act, _LEAKY_SLOPE)


cdef void _bias_activation(floating* Z, const floating* b, Py_ssize_t n, Py_ssize_t m,
                           int act) noexcept nogil:
    """Z[i, j] = act(Z[i, j] + b[j]) for Z (n, m), b (m,)."""
    # libm's exp and tanh are a call per element (18-33 ns per element that
    # way); _vecmath.h's sigmoid and tanh loops run 2-16 lanes wide.
    if act != SIGMOID and act != TANH:
        _bias_act(Z, b, n, m, act)
        return
    _bias_act(Z, b, n, m, IDENTITY)
    _squash(Z, n * m, act)


cdef void _squash(floating* Z, Py_ssize_t size, int act) noexcept nogil:
    """Z = sigmoid(Z) or tanh(Z) in place."""
    if floating is float:
        if act == SIGMOID:
            fbp_sigmoid_f32(Z, size)
        else:
            fbp_tanh_f32(Z, size)
    else:
        if act == SIGMOID:
            fbp_sigmoid_f64(Z, size)
        else:
            fbp_tanh_f64(Z, size)


def _dense_forward(const floating[:, ::1] X, const floating[:, ::1] W,
                   const floating[::1] b, int act, floating[:, ::1] out):
    cdef Py_ssize_t n = X.shape[0], n_in = X.shape[1], n_out = W.shape[0]
    if W.shape[1] != n_in:
        raise shape_error("W", (None, n_in), (W.shape[0], W.shape[1]))
    if b.shape[0] != n_out:
        raise shape_error("b", (n_out,), (b.shape[0],))
    if out.shape[0] != n or out.shape[1] != n_out:
        raise shape_error("out", (n, n_out), (out.shape[0], out.shape[1]))
    if n == 0 or n_out == 0:
        return
    cdef size_t s = sizeof(floating)
    cdef const floating* pX = &X[0, 0] if n_in else NULL
    cdef const floating* pW = &W[0, 0] if n_in else NULL
    cdef floating* pout = &out[0, 0]
    for name, p, size in (("X", <size_t>pX, n * n_in), ("W", <size_t>pW, n_out * n_in),
                          ("b", <size_t>&b[0], n_out)):
        if _overlap(pout, n * n_out * s, <void*><size_t>p, size * s, False):
            raise overlap_error("out", name)
    for name, size in (("n", n), ("n_in", n_in), ("n_out", n_out)):
        _check_blas_size(name, size)
    with nogil:
        _forward_layer(pX, pW, &b[0], pout, n, n_in, n_out, act)


def dense_forward(X, W, b, activation, out):
    """Dense layer with bias and activation: ``out = act(X @ W.T + b)``.

    X (n, n_in), W (n_out, n_in), b (n_out,), out (n, n_out); see
    `fastbp.reference.dense_forward`.
    """
    cdef int act = _activation_code(activation, ACTIVATIONS)
    if not (_nd(X) and _nd(W) and _nd(b) and _nd(out)):
        check_call("dense_forward", X=X, W=W, b=b, out=out)
    try:
        _dense_forward(X, W, b, act, out)
    except (TypeError, ValueError):
        check_call("dense_forward", X=X, W=W, b=b, out=out)
        raise
    return out


# ---------------------------------------------------------------------------
# activation_backward

cdef inline void _activation_backward_loop(const floating* A, const floating* dA, floating* out,
                                           Py_ssize_t size, int act) noexcept nogil:
    if floating is float:
        fbp_act_backward_f32(A, dA, out, size, act, <float>_LEAKY_SLOPE)
    else:
        fbp_act_backward_f64(A, dA, out, size, act, _LEAKY_SLOPE)


def _activation_backward(const floating[:, ::1] A, const floating[:, ::1] dA, int act,
                         floating[:, ::1] out):
    cdef Py_ssize_t n = A.shape[0], m = A.shape[1]
    if dA.shape[0] != n or dA.shape[1] != m:
        raise shape_error("dA", (n, m), (dA.shape[0], dA.shape[1]))
    if out.shape[0] != n or out.shape[1] != m:
        raise shape_error("out", (n, m), (out.shape[0], out.shape[1]))
    if n == 0 or m == 0:
        return
    cdef size_t nbytes = n * m * sizeof(floating)
    if _overlap(&out[0, 0], nbytes, &A[0, 0], nbytes, True):
        raise overlap_error("out", "A")
    if _overlap(&out[0, 0], nbytes, &dA[0, 0], nbytes, True):
        raise overlap_error("out", "dA")
    with nogil:
        _activation_backward_loop(&A[0, 0], &dA[0, 0], &out[0, 0], n * m, act)


def activation_backward(A, dA, activation, out):
    """Gradient through an activation, from its output: ``out = dA * act'(A)``.

    A, dA, out (n, m); out may be dA. See `fastbp.reference.activation_backward`.
    """
    cdef int act = _activation_code(activation, ACTIVATIONS)
    if not (_nd(A) and _nd(dA) and _nd(out)):
        check_call("activation_backward", A=A, dA=dA, out=out)
    try:
        _activation_backward(A, dA, act, out)
    except (TypeError, ValueError):
        check_call("activation_backward", A=A, dA=dA, out=out)
        raise
    return out


# ---------------------------------------------------------------------------
# dense_backward

cdef inline void _column_sums(const floating* M, floating* out, Py_ssize_t n,
                              Py_ssize_t m) noexcept nogil:
    if floating is float:
        fbp_column_sums_f32(M, out, n, m)
    else:
        fbp_column_sums_f64(M, out, n, m)


def _dense_backward(const floating[:, ::1] dZ, const floating[:, ::1] X,
                    const floating[:, ::1] W, floating[:, ::1] dW, floating[::1] db,
                    floating[:, ::1] dX=None):
    cdef Py_ssize_t n = dZ.shape[0], n_out = dZ.shape[1], n_in = X.shape[1]
    cdef bint want_dX = dX is not None
    if X.shape[0] != n:
        raise shape_error("X", (n, None), (X.shape[0], X.shape[1]))
    if W.shape[0] != n_out or W.shape[1] != n_in:
        raise shape_error("W", (n_out, n_in), (W.shape[0], W.shape[1]))
    if dW.shape[0] != n_out or dW.shape[1] != n_in:
        raise shape_error("dW", (n_out, n_in), (dW.shape[0], dW.shape[1]))
    if db.shape[0] != n_out:
        raise shape_error("db", (n_out,), (db.shape[0],))
    if want_dX and (dX.shape[0] != n or dX.shape[1] != n_in):
        raise shape_error("dX", (n, n_in), (dX.shape[0], dX.shape[1]))
    cdef size_t s = sizeof(floating)
    cdef const floating* pdZ = &dZ[0, 0] if n and n_out else NULL
    cdef const floating* pX = &X[0, 0] if n and n_in else NULL
    cdef const floating* pW = &W[0, 0] if n_out and n_in else NULL
    cdef floating* pdW = &dW[0, 0] if n_out and n_in else NULL
    cdef floating* pdb = &db[0] if n_out else NULL
    cdef floating* pdX = &dX[0, 0] if want_dX and n and n_in else NULL
    # (output name, pointer, bytes) and (input name, pointer, bytes): outputs
    # must not overlap the inputs nor each other.
    outputs = (("dW", <size_t>pdW, n_out * n_in * s), ("db", <size_t>pdb, n_out * s),
               ("dX", <size_t>pdX, n * n_in * s))
    inputs = (("dZ", <size_t>pdZ, n * n_out * s), ("X", <size_t>pX, n * n_in * s),
              ("W", <size_t>pW, n_out * n_in * s))
    for k, (oname, op, obytes) in enumerate(outputs):
        for iname, ip, ibytes in inputs + outputs[k + 1:]:
            if _overlap(<void*><size_t>op, obytes, <void*><size_t>ip, ibytes, False):
                raise overlap_error(oname, iname)
    for name, size in (("n", n), ("n_in", n_in), ("n_out", n_out)):
        _check_blas_size(name, size)
    with nogil:
        # dW (n_out x n_in) = dZ.T @ X
        _gemm(c'T', c'N', <int>n_out, <int>n_in, <int>n, 1, pdZ, <int>n_out, pX, <int>n_in,
              0, pdW, <int>n_in)
        if n_out:
            _column_sums(pdZ, pdb, n, n_out)
        if want_dX:
            # dX (n x n_in) = dZ @ W
            _gemm(c'N', c'N', <int>n, <int>n_in, <int>n_out, 1, pdZ, <int>n_out, pW, <int>n_in,
                  0, pdX, <int>n_in)


def dense_backward(dZ, X, W, dW, db, dX=None):
    """Gradients of a dense layer: ``dW = dZ.T @ X``, ``db = dZ.sum(0)``, ``dX = dZ @ W``.

    dZ (n, n_out), X (n, n_in), W and dW (n_out, n_in), db (n_out,), dX (n, n_in)
    or None. See `fastbp.reference.dense_backward`.
    """
    if not (_nd(dZ) and _nd(X) and _nd(W) and _nd(dW) and _nd(db) and _nd(dX)):
        check_call("dense_backward", dZ=dZ, X=X, W=W, dW=dW, db=db, dX=dX)
    try:
        _dense_backward(dZ, X, W, dW, db, dX)
    except (TypeError, ValueError):
        check_call("dense_backward", dZ=dZ, X=X, W=W, dW=dW, db=db, dX=dX)
        raise
    return dW, db, dX


# ---------------------------------------------------------------------------
# softmax and softmax_cross_entropy

cdef floating _softmax_row(const floating* z, floating* out, Py_ssize_t k) noexcept nogil:
    """out = exp(z - max(z)) / sum; returns log(sum(exp(z))). out may be z; may be NULL."""
    cdef Py_ssize_t j
    cdef floating m = z[0], s = 0, e
    for j in range(1, k):
        if z[j] > m:
            m = z[j]
    if out == NULL:
        for j in range(k):
            s += _exp(z[j] - m)
    else:
        for j in range(k):
            e = _exp(z[j] - m)
            out[j] = e
            s += e
        for j in range(k):
            out[j] = out[j] / s
    return _log(s) + m


cdef enum:
    # rows per pass of _cross_entropy_loop (its per-row values live on the stack)
    SOFTMAX_CHUNK = 64
    # elements of its scratch softmax block when only the loss is wanted
    SOFTMAX_SCRATCH = 4096


cdef inline void _softmax_rows(const floating* Z, floating* out, Py_ssize_t n, Py_ssize_t k,
                               floating* lse) noexcept nogil:
    """Row-wise softmax of Z (n, k) into out (which may be Z); when lse is not NULL,
    lse[i] = log(sum(exp(Z[i]))) (n values). _vecmath.h's loop: the same steps as
    _softmax_row, its exp vectorised over the block."""
    if floating is float:
        fbp_softmax_rows_f32(Z, out, n, k, lse)
    else:
        fbp_softmax_rows_f64(Z, out, n, k, lse)


def _softmax(const floating[:, ::1] Z, floating[:, ::1] out):
    cdef Py_ssize_t n = Z.shape[0], k = Z.shape[1], i
    if k == 0:
        raise ValueError(f"Z has shape {(n, k)}; expected at least one column")
    if out.shape[0] != n or out.shape[1] != k:
        raise shape_error("out", (n, k), (out.shape[0], out.shape[1]))
    if n == 0:
        return
    cdef size_t nbytes = n * k * sizeof(floating)
    if _overlap(&out[0, 0], nbytes, &Z[0, 0], nbytes, True):
        raise overlap_error("out", "Z")
    with nogil:
        _softmax_rows(&Z[0, 0], &out[0, 0], n, k, NULL)


def softmax(Z, out):
    """Row-wise softmax ``out = exp(Z - max) / sum(exp(Z - max))``; Z, out (n, k).

    See `fastbp.reference.softmax`.
    """
    if not (_nd(Z) and _nd(out)):
        check_call("softmax", Z=Z, out=out)
    try:
        _softmax(Z, out)
    except (TypeError, ValueError):
        check_call("softmax", Z=Z, out=out)
        raise
    return out


cdef Py_ssize_t _first_bad_label(const int64_t* y, Py_ssize_t n, int64_t k) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if y[i] < 0 or y[i] >= k:
            return i
    return -1


cdef double _cross_entropy_loop(const floating* Z, const int64_t* y, floating* dZ,
                                Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t i, j, start, rows
    cdef double total = 0
    cdef floating zy[SOFTMAX_CHUNK]
    cdef floating lse[SOFTMAX_CHUNK]
    cdef floating inv_n = 1 / <floating>n
    cdef floating* dzr
    cdef floating scratch[SOFTMAX_SCRATCH]
    if dZ == NULL and (k > SOFTMAX_SCRATCH or k <= FBP_SOFTMAX_NARROW and n < FBP_SOFTMAX_NARROW):
        # (below one block of 16 narrow rows, blocking costs more than it saves)
        for i in range(n):
            total += <double>(_softmax_row(Z + i * k, NULL, k) - Z[i * k + y[i]])
        return total / n
    if dZ == NULL:
        # the loss alone: the vectorised softmax into a scratch block, for its
        # log-sum-exp (the same bits as the loop above, which ran 2-3x slower)
        start = 0
        while start < n:
            rows = min(<Py_ssize_t>SOFTMAX_CHUNK, SOFTMAX_SCRATCH // k, n - start)
            _softmax_rows(Z + start * k, scratch, rows, k, lse)
            for i in range(rows):
                total += <double>(lse[i] - Z[(start + i) * k + y[start + i]])
            start += rows
        return total / n
    if k <= FBP_SOFTMAX_NARROW:
        # the loop below, fused in C
        if floating is float:
            return fbp_softmax_xent_f32(Z, y, dZ, n, k, inv_n) / n
        else:
            return fbp_softmax_xent_f64(Z, y, dZ, n, k, inv_n) / n
    start = 0
    while start < n:
        rows = min(<Py_ssize_t>SOFTMAX_CHUNK, n - start)
        for i in range(rows):
            zy[i] = Z[(start + i) * k + y[start + i]]  # read before dZ (which may be Z) is written
        _softmax_rows(Z + start * k, dZ + start * k, rows, k, lse)
        for i in range(rows):
            total += <double>(lse[i] - zy[i])
            dzr = dZ + (start + i) * k
            dzr[y[start + i]] -= 1
            for j in range(k):
                dzr[j] *= inv_n
        start += rows
    return total / n


def _softmax_cross_entropy(const floating[:, ::1] Z, const int64_t[::1] y,
                           floating[:, ::1] dZ=None):
    cdef Py_ssize_t n = Z.shape[0], k = Z.shape[1]
    cdef bint want_dZ = dZ is not None
    if k == 0:
        raise ValueError(f"Z has shape {(n, k)}; expected at least one column")
    if y.shape[0] != n:
        raise shape_error("y", (n,), (y.shape[0],))
    if want_dZ and (dZ.shape[0] != n or dZ.shape[1] != k):
        raise shape_error("dZ", (n, k), (dZ.shape[0], dZ.shape[1]))
    if n == 0:
        raise empty_batch_error("Z")
    cdef size_t nbytes = n * k * sizeof(floating)
    cdef floating* pdZ = &dZ[0, 0] if want_dZ else NULL
    if _overlap(pdZ, nbytes, &Z[0, 0], nbytes, True):
        raise overlap_error("dZ", "Z")
    cdef Py_ssize_t bad = -1
    cdef double loss = 0
    with nogil:
        bad = _first_bad_label(&y[0], n, k)
        if bad < 0:
            loss = _cross_entropy_loop(&Z[0, 0], &y[0], pdZ, n, k)
    if bad >= 0:
        raise label_error(bad, y[bad], k)
    return loss


def softmax_cross_entropy(Z, y, dZ=None):
    """Softmax cross-entropy of int64 labels, mean over samples, and its gradient.

    Z and dZ (n, k), y (n,); returns the loss. See
    `fastbp.reference.softmax_cross_entropy`.
    """
    if not (_nd(Z) and _nd(y) and _nd(dZ)):
        check_call("softmax_cross_entropy", Z=Z, y=y, dZ=dZ)
    try:
        return _softmax_cross_entropy(Z, y, dZ)
    except (TypeError, ValueError):
        check_call("softmax_cross_entropy", Z=Z, y=y, dZ=dZ)
        raise


# ---------------------------------------------------------------------------
# mean_squared_error and binary_cross_entropy_with_logits

cdef double _mse_loop(const floating* A, const floating* Y, floating* dZ, Py_ssize_t size,
                      int act) noexcept nogil:
    # the squares summed in double over 32 lanes, dZ = (A - Y) * (2 / size) * act'
    if floating is float:
        return fbp_mse_f32(A, Y, dZ, size, act, <float>(2.0 / size)) / size
    else:
        return fbp_mse_f64(A, Y, dZ, size, act, 2.0 / size) / size


cdef double _bce_loop(const floating* Z, const floating* Y, floating* dZ,
                      Py_ssize_t size) noexcept nogil:
    # max(z, 0) - z t + log(1 + exp(-|z|)) (no overflow for any finite z) summed in
    # double over 32 lanes, dZ = (sigmoid(z) - t) * (1 / size)
    if floating is float:
        return fbp_bce_f32(Z, Y, dZ, size, 1 / <float>size) / size
    else:
        return fbp_bce_f64(Z, Y, dZ, size, 1 / <double>size) / size


def _elementwise_loss(str kernel, const floating[:, ::1] P, const floating[:, ::1] Y,
                      int act, floating[:, ::1] dZ=None):
    """Shared checks of the two elementwise losses; P is A (mse) or Z (bce)."""
    cdef Py_ssize_t n = P.shape[0], k = P.shape[1]
    cdef bint want_dZ = dZ is not None
    pname = "A" if kernel == "mean_squared_error" else "Z"
    if Y.shape[0] != n or Y.shape[1] != k:
        raise shape_error("Y", (n, k), (Y.shape[0], Y.shape[1]))
    if want_dZ and (dZ.shape[0] != n or dZ.shape[1] != k):
        raise shape_error("dZ", (n, k), (dZ.shape[0], dZ.shape[1]))
    if n == 0:
        raise empty_batch_error(pname)
    if k == 0:
        return float("nan")  # the mean of no elements, as NumPy and PyTorch give
    cdef size_t nbytes = n * k * sizeof(floating)
    cdef floating* pdZ = &dZ[0, 0] if want_dZ else NULL
    if _overlap(pdZ, nbytes, &P[0, 0], nbytes, True):
        raise overlap_error("dZ", pname)
    if _overlap(pdZ, nbytes, &Y[0, 0], nbytes, True):
        raise overlap_error("dZ", "Y")
    cdef double loss
    cdef bint is_mse = kernel == "mean_squared_error"
    with nogil:
        if is_mse:
            loss = _mse_loop(&P[0, 0], &Y[0, 0], pdZ, n * k, act)
        else:
            loss = _bce_loop(&P[0, 0], &Y[0, 0], pdZ, n * k)
    return loss


def mean_squared_error(A, Y, activation, dZ=None):
    """Mean squared error over all elements, and the gradient before the output activation.

    A = act(Z), Y and dZ (n, k); returns the loss. See
    `fastbp.reference.mean_squared_error`.
    """
    cdef int act = _activation_code(activation, OUTPUT_ACTIVATIONS)
    if not (_nd(A) and _nd(Y) and _nd(dZ)):
        check_call("mean_squared_error", A=A, Y=Y, dZ=dZ)
    try:
        return _elementwise_loss("mean_squared_error", A, Y, act, dZ)
    except (TypeError, ValueError):
        check_call("mean_squared_error", A=A, Y=Y, dZ=dZ)
        raise


def binary_cross_entropy_with_logits(Z, Y, dZ=None):
    """Binary cross-entropy from logits, mean over all elements, and its gradient.

    Z, Y and dZ (n, k); returns the loss. See
    `fastbp.reference.binary_cross_entropy_with_logits`.
    """
    if not (_nd(Z) and _nd(Y) and _nd(dZ)):
        check_call("binary_cross_entropy_with_logits", Z=Z, Y=Y, dZ=dZ)
    try:
        return _elementwise_loss("binary_cross_entropy_with_logits", Z, Y, IDENTITY, dZ)
    except (TypeError, ValueError):
        check_call("binary_cross_entropy_with_logits", Z=Z, Y=Y, dZ=dZ)
        raise


# ---------------------------------------------------------------------------
# sgd_update

# Elementwise passes inside a call on fastbp's own threads (_pool.h) run split
# across the pool too: alone, the momentum pass of a 784-256-128-10 step took 140
# us on one thread, and 341-374 once the GEMM before it had left half of the
# gradient in the other core's cache. Elementwise: the same bits either way.
cdef enum:
    _SPLIT_MIN = 32768  # elements: below, one thread's pass takes a few microseconds


ctypedef struct _SgdJob:
    void* param
    const void* grad
    void* buf
    Py_ssize_t size
    double lr, momentum, dampening_complement, weight_decay
    bint nesterov, maximize, first_step, f64


cdef inline void _sgd_span(const _SgdJob* j, Py_ssize_t lo, Py_ssize_t size) noexcept nogil:
    """The update of elements lo .. lo + size of the job's arrays."""
    if j.f64:
        fbp_sgd_f64(<double*>j.param + lo, <const double*>j.grad + lo,
                    <double*>j.buf + lo if j.buf != NULL else NULL, size, j.lr, j.momentum,
                    j.dampening_complement, j.nesterov, j.weight_decay, j.maximize, j.first_step)
    else:
        fbp_sgd_f32(<float*>j.param + lo, <const float*>j.grad + lo,
                    <float*>j.buf + lo if j.buf != NULL else NULL, size, <float>j.lr,
                    <float>j.momentum, <float>j.dampening_complement, j.nesterov,
                    <float>j.weight_decay, j.maximize, j.first_step)


cdef void _sgd_part(void* arg, int part, int parts) noexcept nogil:
    cdef const _SgdJob* j = <const _SgdJob*>arg
    cdef Py_ssize_t lo, hi
    _slice(j.size, part, parts, j.f64, &lo, &hi)
    if lo < hi:
        _sgd_span(j, lo, hi - lo)


cdef inline void _sgd_loop(floating* param, const floating* grad, floating* buf, Py_ssize_t size,
                           floating lr, floating momentum, floating dampening_complement,
                           bint nesterov, floating weight_decay, bint maximize,
                           bint first_step) noexcept nogil:
    cdef _SgdJob j
    if fbp_pool_held >= 2 and size >= _SPLIT_MIN:
        j.param, j.grad, j.buf, j.size, j.f64 = param, grad, buf, size, floating is double
        j.lr, j.momentum, j.dampening_complement = lr, momentum, dampening_complement
        j.weight_decay, j.nesterov, j.maximize, j.first_step = (weight_decay, nesterov,
                                                                maximize, first_step)
        fbp_pool_run(_sgd_part, &j, fbp_pool_held)
    elif floating is float:
        fbp_sgd_f32(param, grad, buf, size, lr, momentum, dampening_complement, nesterov,
                    weight_decay, maximize, first_step)
    else:
        fbp_sgd_f64(param, grad, buf, size, lr, momentum, dampening_complement, nesterov,
                    weight_decay, maximize, first_step)


ctypedef struct _GemmSgdJob:
    # A layer's weight gradient in BLAS parts across fastbp's threads (`_gemm_part`),
    # each part's momentum update made by the thread that made the part.
    _GemmJob gemm
    _SgdJob sgd


cdef void _gemm_sgd_part(void* arg, int part, int parts) noexcept nogil:
    cdef const _GemmSgdJob* j = <const _GemmSgdJob*>arg
    cdef Py_ssize_t lo, hi, i, N = j.gemm.N
    _gemm_part(<void*>&j.gemm, part, parts)
    _slice(j.gemm.M if j.gemm.by_rows else N, part, parts, j.gemm.f64, &lo, &hi)
    if lo >= hi:
        return
    if j.gemm.by_rows:  # rows lo..hi of dW, one span
        _sgd_span(&j.sgd, lo * N, (hi - lo) * N)
    else:  # columns lo..hi of each row
        for i in range(j.gemm.M):
            _sgd_span(&j.sgd, i * N + lo, hi - lo)


cdef bint _gemm_sgd_split(int M, int N, int K, const floating* A, int lda, const floating* B,
                          int ldb, floating* C, floating* param, floating* buf, floating lr,
                          floating momentum, floating dampening_complement,
                          bint first_step) noexcept nogil:
    """`_gemm_sgd`'s contract where `_gemm` would split the product into BLAS parts
    across fastbp's threads: each thread updates W and its buffer on the part of
    dW (C, M x N) it made, right after making it, instead of a pass of its own
    after a second fork-join, which splits the arrays its own way (in-process,
    Emerald Rapids, 16 rounds, 32-row steps with momentum: 784-128-10 1.03x,
    784-256-128-10 and 784-512-512-10 1.05x). The same bits (the update is
    elementwise). False: not such a product; nothing was done."""
    cdef _GemmSgdJob j
    cdef int parts
    if not fbp_fold_momentum or fbp_gemm_takes(c'T', c'N', M, N, K, floating is double):
        return False  # (off, or a product for the kernel: `_gemm` then `_sgd_loop`)
    _gemm_job(&j.gemm, c'T', c'N', M, N, K, 1, A, lda, B, ldb, 0, C, N)
    parts = _gemm_split(&j.gemm)
    if not parts:
        return False
    j.sgd.param, j.sgd.grad, j.sgd.buf, j.sgd.size, j.sgd.f64 = (param, C, buf, M * N,
                                                                 floating is double)
    j.sgd.lr, j.sgd.momentum, j.sgd.dampening_complement = lr, momentum, dampening_complement
    j.sgd.weight_decay, j.sgd.nesterov, j.sgd.maximize, j.sgd.first_step = (0, False, False,
                                                                            first_step)
    fbp_pool_run(_gemm_sgd_part, &j, parts)
    return True


def _sgd_update(floating[::1] param, const floating[::1] grad,
                floating[::1] momentum_buffer, double lr, double momentum, double dampening,
                bint nesterov, double weight_decay, bint maximize, bint first_step):
    cdef Py_ssize_t size = param.shape[0]
    cdef size_t nbytes = size * sizeof(floating)
    if grad.shape[0] != size:
        raise shape_error("grad", (size,), (grad.shape[0],))
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum is not 0")
        if momentum_buffer.shape[0] != size:
            raise shape_error("momentum_buffer", (size,), (momentum_buffer.shape[0],))
    if size == 0:
        return
    cdef floating* pbuf = NULL
    if momentum_buffer is not None and momentum_buffer.shape[0]:
        pbuf = &momentum_buffer[0]
        if _overlap(&param[0], nbytes, pbuf, momentum_buffer.shape[0] * sizeof(floating), False):
            raise overlap_error("param", "momentum_buffer")
    if _overlap(&param[0], nbytes, &grad[0], nbytes, False):
        raise overlap_error("param", "grad")
    if _overlap(pbuf, nbytes, &grad[0], nbytes, False):
        raise overlap_error("momentum_buffer", "grad")
    if momentum == 0:
        pbuf = NULL
    with nogil:
        _sgd_loop(&param[0], &grad[0], pbuf, size, <floating>lr, <floating>momentum,
                  <floating>(1 - dampening), nesterov, <floating>weight_decay, maximize,
                  first_step)


def sgd_update(param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0,
               nesterov=False, weight_decay=0.0, maximize=False, first_step=False):
    """One in-place step of ``torch.optim.SGD`` on a flat parameter buffer.

    param, grad, momentum_buffer (p,); see `fastbp.reference.sgd_update`.
    """
    if not (_nd(param) and _nd(grad) and _nd(momentum_buffer)):
        check_call("sgd_update", param=param, grad=grad, momentum_buffer=momentum_buffer)
    try:
        _sgd_update(param, grad, momentum_buffer, lr, momentum, dampening, nesterov,
                    weight_decay, maximize, first_step)
    except (TypeError, ValueError):
        check_call("sgd_update", param=param, grad=grad, momentum_buffer=momentum_buffer)
        raise


# ---------------------------------------------------------------------------
# adam_update

ctypedef struct _AdamJob:
    void* param
    const void* grad
    void* m
    void* v
    void* vmax
    Py_ssize_t size
    double neg_step_size, beta1_weight, beta2, beta2_complement, bc2_sqrt, eps, l2, param_scale
    bint scale_param, maximize, f64


cdef void _adam_part(void* arg, int part, int parts) noexcept nogil:
    cdef const _AdamJob* j = <const _AdamJob*>arg
    cdef Py_ssize_t lo, hi
    _slice(j.size, part, parts, j.f64, &lo, &hi)
    if lo >= hi:
        return
    if j.f64:
        fbp_adam_f64(<double*>j.param + lo, <const double*>j.grad + lo, <double*>j.m + lo,
                     <double*>j.v + lo, <double*>j.vmax + lo if j.vmax != NULL else NULL,
                     hi - lo, j.neg_step_size, j.beta1_weight, j.beta2, j.beta2_complement,
                     j.bc2_sqrt, j.eps, j.l2, j.scale_param, j.param_scale, j.maximize)
    else:
        fbp_adam_f32(<float*>j.param + lo, <const float*>j.grad + lo, <float*>j.m + lo,
                     <float*>j.v + lo, <float*>j.vmax + lo if j.vmax != NULL else NULL,
                     hi - lo, <float>j.neg_step_size, <float>j.beta1_weight, <float>j.beta2,
                     <float>j.beta2_complement, <float>j.bc2_sqrt, <float>j.eps, <float>j.l2,
                     j.scale_param, <float>j.param_scale, j.maximize)


cdef inline void _adam_loop(floating* param, const floating* grad, floating* m, floating* v,
                            floating* vmax, Py_ssize_t size, floating neg_step_size,
                            floating beta1_weight, floating beta2, floating beta2_complement,
                            floating bc2_sqrt, floating eps, floating l2, bint scale_param,
                            floating param_scale, bint maximize) noexcept nogil:
    """The torch.optim.Adam update (_vecmath.h); vmax is NULL without amsgrad."""
    cdef _AdamJob j
    if fbp_pool_held >= 2 and size >= _SPLIT_MIN:
        j.param, j.grad, j.m, j.v, j.vmax, j.size = param, grad, m, v, vmax, size
        j.neg_step_size, j.beta1_weight, j.beta2 = neg_step_size, beta1_weight, beta2
        j.beta2_complement, j.bc2_sqrt, j.eps, j.l2 = beta2_complement, bc2_sqrt, eps, l2
        j.param_scale, j.scale_param, j.maximize = param_scale, scale_param, maximize
        j.f64 = floating is double
        fbp_pool_run(_adam_part, &j, fbp_pool_held)
    elif floating is float:
        fbp_adam_f32(param, grad, m, v, vmax, size, neg_step_size, beta1_weight, beta2,
                     beta2_complement, bc2_sqrt, eps, l2, scale_param, param_scale, maximize)
    else:
        fbp_adam_f64(param, grad, m, v, vmax, size, neg_step_size, beta1_weight, beta2,
                     beta2_complement, bc2_sqrt, eps, l2, scale_param, param_scale, maximize)


def _adam_update(floating[::1] param, const floating[::1] grad, floating[::1] exp_avg,
                 floating[::1] exp_avg_sq, floating[::1] max_exp_avg_sq, long step, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bint decoupled,
                 bint amsgrad, bint maximize):
    cdef Py_ssize_t size = param.shape[0]
    if size == 0:
        return
    cdef floating* pmax = &max_exp_avg_sq[0] if amsgrad else NULL
    cdef bint scale_param = decoupled and weight_decay != 0
    with nogil:
        _adam_loop(&param[0], &grad[0], &exp_avg[0], &exp_avg_sq[0], pmax, size,
                   <floating>(-(lr / (1 - beta1 ** step))), <floating>(1 - beta1),
                   <floating>beta2, <floating>(1 - beta2),
                   <floating>((1 - beta2 ** step) ** 0.5), <floating>eps,
                   <floating>(0 if decoupled else weight_decay), scale_param,
                   <floating>(1 - lr * weight_decay), maximize)


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                amsgrad=False, maximize=False):
    """One in-place step of ``torch.optim.Adam`` (or ``AdamW``) on a flat parameter buffer.

    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (p,); see
    `fastbp.reference.adam_update`.
    """
    # Several state arrays must be pairwise disjoint: checked in Python (a few
    # microseconds, small beside the update of any real network).
    check_call("adam_update", param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
               max_exp_avg_sq=max_exp_avg_sq if amsgrad else None)
    check_adam_state(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad)
    _adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None, step,
                 lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize)


# ---------------------------------------------------------------------------
# all_finite

cdef inline bint _all_finite_loop(const floating* x, Py_ssize_t size) noexcept nogil:
    if floating is float:
        return fbp_all_finite_f32(x, size)
    else:
        return fbp_all_finite_f64(x, size)


def _all_finite(const floating[::1] x):
    cdef bint ok = True
    if x.shape[0] == 0:
        return True
    with nogil:
        ok = _all_finite_loop(&x[0], x.shape[0])
    return ok


def all_finite(x):
    """True if no element of `x` (shape (p,)) is NaN or infinite."""
    cdef cnp.ndarray a
    cdef bint ok = True
    if _c_array(x, cnp.NPY_FLOAT32, 1, False) or _c_array(x, cnp.NPY_FLOAT64, 1, False):
        # straight from the array (no memoryview object: nothing allocated)
        a = <cnp.ndarray>x
        if cnp.PyArray_DIM(a, 0):
            with nogil:
                if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
                    ok = _all_finite_loop(<const float*>cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0))
                else:
                    ok = _all_finite_loop(<const double*>cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0))
        return ok
    if not cnp.PyArray_Check(x):  # (its typed memoryview would take None or a buffer)
        check_call("all_finite", x=x)
    try:
        return _all_finite(x)
    except (TypeError, ValueError):
        check_call("all_finite", x=x)
        raise


# ---------------------------------------------------------------------------
# mlp_gradients: the whole forward / loss / backward of a network in one call

# Layers in one network: enough for anything fastbp trains; checked at the boundary
# (fastbp._checks.MAX_LAYERS, the same number: tests/test_network.py holds them together).
cdef enum:
    MAX_LAYERS = 512
    CROSS_ENTROPY = 0
    MSE = 1
    BCE = 2


cdef inline void _layer_offsets(Py_ssize_t n, Py_ssize_t n_layers, const Py_ssize_t* sizes,
                                Py_ssize_t* w_off, Py_ssize_t* a_off) noexcept nogil:
    """w_off[l]: layer l's W in params (its b follows at w_off[l] + n_out * n_in);
    a_off[l]: layer l's (n, n_out) block in A and D; w_off[n_layers]: the parameter count."""
    cdef Py_ssize_t l, p = 0, a = 0
    for l in range(n_layers):
        w_off[l] = p
        a_off[l] = a
        p += (sizes[l] + 1) * sizes[l + 1]
        a += n * sizes[l + 1]
    w_off[n_layers] = p


cdef void _mlp_forward_loss(const floating* X, const int64_t* labels, const floating* T,
                            const floating* params, floating* A, floating* D, Py_ssize_t n,
                            Py_ssize_t n_layers, const Py_ssize_t* sizes, const Py_ssize_t* w_off,
                            const Py_ssize_t* a_off, const int* acts, int loss,
                            double* loss_out) noexcept nogil:
    """Forward through every layer into A, then the loss and its gradient dZ (into
    the last block of D)."""
    cdef Py_ssize_t l, n_in, n_out
    cdef const floating* prev = X
    cdef floating* Al
    for l in range(n_layers):
        n_in, n_out = sizes[l], sizes[l + 1]
        Al = A + a_off[l]
        _forward_layer(prev, params + w_off[l], params + w_off[l] + n_out * n_in, Al, n, n_in,
                       n_out, acts[l])
        prev = Al
    n_out = sizes[n_layers]
    l = n_layers - 1
    if loss == CROSS_ENTROPY:
        loss_out[0] = _cross_entropy_loop(A + a_off[l], labels, D + a_off[l], n, n_out)
    elif loss == MSE:
        loss_out[0] = _mse_loop(A + a_off[l], T, D + a_off[l], n * n_out, acts[l])
    else:
        loss_out[0] = _bce_loop(A + a_off[l], T, D + a_off[l], n * n_out)


cdef inline void _delta_back(floating* D, const floating* A, const floating* params,
                             Py_ssize_t n, Py_ssize_t l, const Py_ssize_t* sizes,
                             const Py_ssize_t* w_off, const Py_ssize_t* a_off,
                             const int* acts, int* e=NULL) noexcept nogil:
    """Layer l - 1's dZ from layer l's: ``dZ[l-1] = (dZ[l] @ W[l]) * act'(A[l-1])``,
    with layer l's W as it is now (before its update). With e, also the largest
    exponent fields of A[l-1] (e[0]) and of the new dZ[l-1] (e[1]), from the same
    pass (fbp_act_backward_bound)."""
    cdef Py_ssize_t n_in = sizes[l], n_out = sizes[l + 1]
    cdef floating* d = D + a_off[l - 1]
    _gemm(c'N', c'N', <int>n, <int>n_in, <int>n_out, 1, D + a_off[l], <int>n_out,
          params + w_off[l], <int>n_in, 0, d, <int>n_in)
    if e == NULL:
        _activation_backward_loop(A + a_off[l - 1], d, d, n * n_in, acts[l - 1])
    elif floating is float:
        fbp_act_backward_bound_f32(A + a_off[l - 1], d, d, n * n_in, acts[l - 1],
                                   <float>_LEAKY_SLOPE, e)
    else:
        fbp_act_backward_bound_f64(A + a_off[l - 1], d, d, n * n_in, acts[l - 1], _LEAKY_SLOPE,
                                   e)


cdef inline void _layer_gradient(const floating* X, const floating* A, const floating* D,
                                 floating* grad, Py_ssize_t n, Py_ssize_t l,
                                 const Py_ssize_t* sizes, const Py_ssize_t* w_off,
                                 const Py_ssize_t* a_off) noexcept nogil:
    """Layer l's dW = dZ.T @ input and db = column sums of dZ, into grad."""
    cdef Py_ssize_t n_in = sizes[l], n_out = sizes[l + 1]
    cdef const floating* prev = X if l == 0 else A + a_off[l - 1]
    _gemm(c'T', c'N', <int>n_out, <int>n_in, <int>n, 1, D + a_off[l], <int>n_out, prev,
          <int>n_in, 0, grad + w_off[l], <int>n_in)
    _column_sums(D + a_off[l], grad + w_off[l] + n_out * n_in, n, n_out)


cdef void _mlp_forward_backward(const floating* X, const int64_t* labels, const floating* T,
                                const floating* params, floating* A, floating* D,
                                floating* grad, Py_ssize_t n, Py_ssize_t n_layers,
                                const Py_ssize_t* sizes, const int* acts, int loss,
                                double* loss_out) noexcept nogil:
    """The composition of the kernels above (see reference.mlp_gradients); acts[l] is
    layer l's activation, the output layer's included. Inputs are valid."""
    cdef Py_ssize_t l
    cdef Py_ssize_t w_off[MAX_LAYERS + 1]
    cdef Py_ssize_t a_off[MAX_LAYERS]
    _layer_offsets(n, n_layers, sizes, w_off, a_off)
    _mlp_forward_loss(X, labels, T, params, A, D, n, n_layers, sizes, w_off, a_off, acts, loss,
                      loss_out)
    for l in range(n_layers - 1, -1, -1):
        _layer_gradient(X, A, D, grad, n, l, sizes, w_off, a_off)
        if l > 0:
            _delta_back(D, A, params, n, l, sizes, w_off, a_off, acts)


cdef inline int _max_exponent(const floating* x, Py_ssize_t size) noexcept nogil:
    """The largest exponent field over x (all ones: some element is NaN or infinite)."""
    if floating is float:
        return fbp_max_exponent_f32(x, size)
    else:
        return fbp_max_exponent_f64(x, size)


cdef inline int _ceil_log2(Py_ssize_t n) noexcept nogil:
    cdef int k = 0
    while (<Py_ssize_t>1 << k) < n:
        k += 1
    return k


cdef bint _gradients_bounded(const floating* X, const floating* A, const floating* D,
                             Py_ssize_t n, Py_ssize_t n_layers, const Py_ssize_t* sizes,
                             const Py_ssize_t* a_off, const int* e_ins,
                             const int* e_ds) noexcept nogil:
    """True when every layer's dZ and input are finite and small enough that its
    dW = dZ.T @ input and db = dZ.sum(0) cannot overflow, with a factor 2 to
    spare for rounding.

    An element with exponent field e is below 2**(e - B) in magnitude (B = 126
    for float32, 1022 for float64), so each |dW[o, j]| <= sum_k |dZ[k, o]| |X[k, j]|
    < n * 2**(eD - B) * 2**(eX - B); the largest finite float exceeds 2**(B + 1).
    e_ins[l] and e_ds[l]: layer l's input's and dZ's largest exponent fields where
    known already (from `_delta_back`), else -1 (a scan here finds them).
    """
    cdef int B = 126 if floating is float else 1022
    cdef int all_ones = 255 if floating is float else 2047
    cdef int log_n = _ceil_log2(n), e_d, e_in
    cdef Py_ssize_t l
    for l in range(n_layers):
        e_d = e_ds[l] if e_ds[l] >= 0 else _max_exponent(D + a_off[l], n * sizes[l + 1])
        e_in = (e_ins[l] if e_ins[l] >= 0
                else _max_exponent(X if l == 0 else A + a_off[l - 1], n * sizes[l]))
        if e_d == all_ones or e_in == all_ones:
            return False
        if log_n + (e_d - B) + (e_in - B) > B or log_n + (e_d - B) > B:
            return False
    return True


cdef int _deltas_checked(const floating* X, const int64_t* labels, const floating* T,
                         const floating* params, floating* A, floating* D, Py_ssize_t n,
                         Py_ssize_t n_layers, const Py_ssize_t* sizes, const Py_ssize_t* w_off,
                         const Py_ssize_t* a_off, const int* acts, int loss,
                         double* loss_out) noexcept nogil:
    """A step's forward pass, loss and every layer's delta, through the old weights:
    -1 if the loss is not finite (the step is refused), else 1 where
    `_gradients_bounded` proves the gradient finite, 0 where only a pass over it can
    tell."""
    cdef Py_ssize_t l
    cdef int e[2]
    cdef int e_ins[MAX_LAYERS]
    cdef int e_ds[MAX_LAYERS]
    _mlp_forward_loss(X, labels, T, params, A, D, n, n_layers, sizes, w_off, a_off, acts, loss,
                      loss_out)
    if not (loss_out[0] - loss_out[0] == 0):
        return -1
    e_ins[0], e_ds[n_layers - 1] = -1, -1  # X and the output layer's dZ: scanned
    for l in range(n_layers - 1, 0, -1):
        _delta_back(D, A, params, n, l, sizes, w_off, a_off, acts, e)
        e_ins[l], e_ds[l - 1] = e[0], e[1]
    return 1 if _gradients_bounded(X, A, D, n, n_layers, sizes, a_off, e_ins, e_ds) else 0


cdef int _mlp_sgd_step_loop(const floating* X, const int64_t* labels, const floating* T,
                            floating* params, floating* A, floating* D, floating* grad,
                            floating* buf, Py_ssize_t n, Py_ssize_t n_layers,
                            const Py_ssize_t* sizes, const int* acts, int loss, floating lr,
                            floating momentum, floating dampening_complement, bint nesterov,
                            floating weight_decay, bint maximize, bint first_step,
                            double* loss_out) noexcept nogil:
    """One SGD step (see reference.mlp_sgd_step). Returns 0 (applied) or 1 (the loss
    or a gradient is not finite: params and buf unchanged).

    Plain SGD folds the update into the weight-gradient GEMM,
    ``W += -lr * dZ.T @ X`` (beta = 1): the gradient is never written out nor
    read back (12-20% faster steps on the bench workloads). With momentum, where
    _smallgemm.h's kernel makes a layer's gradient on a batch of up to 128 rows,
    and for small float32 layers on up to 32 rows (fbp_gemm_sgd_takes_for), the
    update of W and its buffer is folded into the product the same way
    (`_gemm_sgd`: 1.03-1.04x on 64-128 rows); elsewhere each layer's gradient
    goes through `_sgd_loop` right after its GEMM, while it is in cache (folding
    ``buf = momentum * buf + dW`` into a BLAS GEMM measured no faster: BLAS
    scales C in a pass of its own first).

    Neither path checks the gradient itself. All deltas are computed first,
    through the old weights, and checked instead: a non-finite dZ or layer
    input makes the gradient non-finite (NaN and infinity propagate through
    the products), and `_gradients_bounded` rules out overflow inside the
    GEMMs, so a step is refused exactly when the unfolded one would be. When
    the bound does not hold, and for weight decay, nesterov and maximize, the
    step takes the unfolded path: the whole gradient, `_sgd_loop` (with a
    pass to check the gradient first only where the bound does not hold).
    """
    cdef Py_ssize_t l, i, n_in, n_out, lo, hi, n_params
    cdef Py_ssize_t w_off[MAX_LAYERS + 1]
    cdef Py_ssize_t a_off[MAX_LAYERS]
    cdef const floating* prev
    cdef floating* g
    cdef floating* bb
    cdef bint fold = not (nesterov or maximize or weight_decay != 0)
    _layer_offsets(n, n_layers, sizes, w_off, a_off)
    n_params = w_off[n_layers]
    cdef int checked = _deltas_checked(X, labels, T, params, A, D, n, n_layers, sizes, w_off,
                                       a_off, acts, loss, loss_out)
    if checked < 0:
        return 1
    cdef bint bounded = checked == 1
    if not (fold and bounded):
        for l in range(n_layers):
            _layer_gradient(X, A, D, grad, n, l, sizes, w_off, a_off)
        if not bounded and not _all_finite_loop(grad, n_params):
            return 1
        _sgd_loop(params, grad, buf, n_params, lr, momentum, dampening_complement, nesterov,
                  weight_decay, maximize, first_step)
        return 0
    for l in range(n_layers):
        n_in, n_out = sizes[l], sizes[l + 1]
        prev = X if l == 0 else A + a_off[l - 1]
        g = grad + w_off[l] + n_out * n_in  # db, in grad's bias slot
        _column_sums(D + a_off[l], g, n, n_out)
        if buf == NULL:
            _gemm(c'T', c'N', <int>n_out, <int>n_in, <int>n, -lr, D + a_off[l], <int>n_out,
                  prev, <int>n_in, 1, params + w_off[l], <int>n_in)
            bb = params + w_off[l] + n_out * n_in
            for i in range(n_out):
                bb[i] = bb[i] - lr * g[i]
        else:
            # the momentum update of W folded into its gradient's product where
            # fastbp's kernel makes it (the gradient is never written out nor read
            # back); else the product, then the update while it is in cache (beta
            # = momentum in a BLAS GEMM measured no faster: BLAS scales C in a
            # pass of its own before accumulating into it)
            lo, hi = w_off[l], w_off[l + 1]
            if (_gemm_sgd(<int>n_out, <int>n_in, <int>n, D + a_off[l], <int>n_out, prev,
                          <int>n_in, grad + lo, params + lo, buf + lo, lr, momentum,
                          dampening_complement, first_step)
                    or _gemm_sgd_split(<int>n_out, <int>n_in, <int>n, D + a_off[l],
                                       <int>n_out, prev, <int>n_in, grad + lo, params + lo,
                                       buf + lo, lr, momentum, dampening_complement,
                                       first_step)):
                lo += n_out * n_in  # the bias is left
            else:
                _gemm(c'T', c'N', <int>n_out, <int>n_in, <int>n, 1, D + a_off[l], <int>n_out,
                      prev, <int>n_in, 0, grad + lo, <int>n_in)
            _sgd_loop(params + lo, grad + lo, buf + lo, hi - lo, lr, momentum,
                      dampening_complement, False, 0, False, first_step)
    return 0


cdef int _mlp_adam_step_loop(const floating* X, const int64_t* labels, const floating* T,
                             floating* params, floating* A, floating* D, floating* grad,
                             floating* m, floating* v, floating* vmax, Py_ssize_t n,
                             Py_ssize_t n_layers, const Py_ssize_t* sizes, const int* acts,
                             int loss, long step, double lr, double beta1, double beta2,
                             double eps, double weight_decay, bint decoupled, bint maximize,
                             double* loss_out) noexcept nogil:
    """One Adam step (see reference.mlp_adam_step): the gradient, its check, then
    `_adam_loop` as `_adam_update` calls it. 0 applied, 1 refused (nothing changed);
    vmax is NULL without amsgrad.

    The check is `_mlp_sgd_step_loop`'s: where `_gradients_bounded` holds (finite
    deltas and layer inputs, too small for the products to overflow), the
    gradient is finite and its own pass (2% of a 784-256-128-10 step's samples)
    is skipped; elsewhere that pass decides."""
    cdef Py_ssize_t l
    cdef Py_ssize_t w_off[MAX_LAYERS + 1]
    cdef Py_ssize_t a_off[MAX_LAYERS]
    _layer_offsets(n, n_layers, sizes, w_off, a_off)
    cdef int checked = _deltas_checked(X, labels, T, params, A, D, n, n_layers, sizes, w_off,
                                       a_off, acts, loss, loss_out)
    if checked < 0:
        return 1
    for l in range(n_layers):
        _layer_gradient(X, A, D, grad, n, l, sizes, w_off, a_off)
    cdef Py_ssize_t n_params = w_off[n_layers]
    if checked == 0 and not _all_finite_loop(grad, n_params):
        return 1
    _adam_loop(params, grad, m, v, vmax, n_params, <floating>(-(lr / (1 - beta1 ** step))),
               <floating>(1 - beta1), <floating>beta2, <floating>(1 - beta2),
               <floating>((1 - beta2 ** step) ** 0.5), <floating>eps,
               <floating>(0 if decoupled else weight_decay), decoupled and weight_decay != 0,
               <floating>(1 - lr * weight_decay), maximize)
    return 0


cdef dict _ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
cdef dict _LOSS_CODES = {name: code for code, name in enumerate(LOSSES)}


cdef struct _NetArgs:
    # The array arguments of mlp_gradients / mlp_sgd_step, as pointers and sizes.
    Py_ssize_t n, x_cols, labels_len, t_rows, t_cols, params_len, A_len, D_len, grad_len, buf_len
    bint has_labels, has_targets, has_buf
    const void* X
    const void* labels
    const void* targets
    const void* params
    const void* A
    const void* D
    const void* grad
    const void* buf
    size_t itemsize


cdef int _net_codes(tuple sizes, tuple activations, str loss, str output, Py_ssize_t* c_sizes,
                    int* acts) except -1:
    """A network's description in C: fills c_sizes and acts (the output layer's
    last) and returns the loss code; a bare ValueError (or KeyError) when it is not
    one the kernels take."""
    cdef Py_ssize_t n_layers = len(sizes) - 1, l
    cdef int loss_code = _LOSS_CODES[loss]
    if n_layers < 1 or n_layers > MAX_LAYERS or len(activations) != n_layers - 1:
        raise ValueError
    for l in range(n_layers + 1):
        c_sizes[l] = sizes[l]
        if c_sizes[l] < 1 or c_sizes[l] > INT_MAX:
            raise ValueError
    for l in range(n_layers - 1):
        acts[l] = _ACTIVATION_CODES[activations[l]]
    acts[n_layers - 1] = _ACTIVATION_CODES[output]
    if loss_code != MSE and acts[n_layers - 1] != IDENTITY or acts[n_layers - 1] > TANH:
        raise ValueError
    return loss_code


cdef int _net_checks(const _NetArgs* g, tuple sizes, tuple activations, str loss, str output,
                     Py_ssize_t* c_sizes, int* acts) except -1:
    """The checks of `mlp_gradients` (and of `mlp_sgd_step`'s momentum buffer) in C;
    fills c_sizes and acts and returns the loss code. Any failure raises a bare
    ValueError, which the public function replaces with the reference's message.
    Labels are range-checked (without the GIL) by the caller."""
    cdef Py_ssize_t n = g.n, n_layers = len(sizes) - 1, l, n_params = 0, work = 0
    if n == 0:
        raise ValueError
    cdef int loss_code = _net_codes(sizes, activations, loss, output, c_sizes, acts)
    for l in range(n_layers):
        n_params += (c_sizes[l] + 1) * c_sizes[l + 1]
        work += n * c_sizes[l + 1]
    if (g.x_cols != c_sizes[0] or g.params_len != n_params or g.grad_len != n_params
            or g.A_len < work or g.D_len < work or n > INT_MAX):
        raise ValueError
    if g.has_buf and g.buf_len != n_params:
        raise ValueError
    if loss_code == CROSS_ENTROPY:
        if not g.has_labels or g.has_targets or g.labels_len != n:
            raise ValueError
    elif not g.has_targets or g.has_labels or g.t_rows != n or g.t_cols != c_sizes[n_layers]:
        raise ValueError
    # the outputs (A, D, grad, buf) must not overlap each other nor any input
    cdef size_t s = g.itemsize
    cdef const void* start[8]
    cdef size_t nbytes[8]
    cdef int i, j, n_spans = 5
    start[0], nbytes[0] = g.A, g.A_len * s
    start[1], nbytes[1] = g.D, g.D_len * s
    start[2], nbytes[2] = g.grad, n_params * s
    start[3], nbytes[3] = g.X, n * c_sizes[0] * s
    start[4], nbytes[4] = g.params, n_params * s
    if g.has_targets:
        start[n_spans], nbytes[n_spans] = g.targets, n * c_sizes[n_layers] * s
        n_spans += 1
    if g.has_labels:
        start[n_spans], nbytes[n_spans] = g.labels, n * sizeof(int64_t)
        n_spans += 1
    for i in range(3):
        for j in range(n_spans):
            if i != j and _overlap(start[i], nbytes[i], start[j], nbytes[j], False):
                raise ValueError
    if g.has_buf:
        for j in range(n_spans):
            if _overlap(g.buf, n_params * s, start[j], nbytes[j], False):
                raise ValueError
    return loss_code


def mlp_gradients(X, labels, targets, params, sizes, activations, loss, output, A, D, grad):
    """Loss and gradient of a whole multi-layer perceptron on a batch, in one call
    without the GIL. See `fastbp.reference.mlp_gradients`."""
    try:
        result = _gradients_direct(X, labels, targets, params, tuple(sizes), tuple(activations),
                                   loss, output, A, D, grad)
    except (TypeError, ValueError, KeyError, OverflowError):
        result = None
    if result is not None:
        return result
    # refused (arrays of another kind or layout, or a check failed): the
    # reference's checks name the problem
    check_mlp_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad)
    raise ValueError("invalid arguments to mlp_gradients")


# ---------------------------------------------------------------------------
# mlp_forward: a whole network's outputs and/or loss in one call

cdef double _mlp_outputs(const floating* X, const int64_t* labels, const floating* T,
                         const floating* params, floating* A, floating* out, Py_ssize_t n,
                         Py_ssize_t n_layers, const Py_ssize_t* sizes, const int* acts, int loss,
                         bint want_loss) noexcept nogil:
    """Forward through every layer, the last into out when there is one (else into
    A); the mean loss when want_loss (else 0); then out = what the user sees (the
    softmax or sigmoid of the logits, in place; mse's outputs as they are)."""
    cdef Py_ssize_t w_off[MAX_LAYERS + 1]
    cdef Py_ssize_t a_off[MAX_LAYERS]
    _layer_offsets(n, n_layers, sizes, w_off, a_off)
    cdef Py_ssize_t l, n_in, n_out
    cdef const floating* prev = X
    cdef floating* Z = NULL
    for l in range(n_layers):
        n_in, n_out = sizes[l], sizes[l + 1]
        Z = out if l == n_layers - 1 and out != NULL else A + a_off[l]
        _forward_layer(prev, params + w_off[l], params + w_off[l] + n_out * n_in, Z, n, n_in,
                       n_out, acts[l])
        prev = Z
    cdef double value = 0
    if want_loss:
        if loss == CROSS_ENTROPY:
            value = _cross_entropy_loop(Z, labels, NULL, n, n_out)
        elif loss == MSE:
            value = _mse_loop(Z, T, NULL, n * n_out, acts[n_layers - 1])
        else:
            value = _bce_loop(Z, T, NULL, n * n_out)
    if out != NULL:
        if loss == CROSS_ENTROPY:
            _softmax_rows(out, out, n, n_out, NULL)
        elif loss == BCE:
            _squash(out, n * n_out, SIGMOID)
    return value


cdef object _NOT_DONE = object()


cdef object _forward_direct(object X, object labels, object targets, object params, tuple sizes,
                            tuple activations, str loss, str output, object A, object out):
    """`mlp_forward` on plain ndarrays through NumPy's C API (a memoryview per array
    and the dispatch over the fused type cost more than a small network's forward).
    Returns _NOT_DONE (or raises a bare ValueError or KeyError) when the arguments
    are not of that kind or fail a check, including a label out of range: the
    reference's checks then name the problem."""
    if not cnp.PyArray_Check(X):
        return _NOT_DONE
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>X)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        return _NOT_DONE
    if not (_c_array(X, t, 2, False) and _c_array(params, t, 1, False)
            and _c_array(A, t, 1, True) and (out is None or _c_array(out, t, 2, True))
            and (labels is None or _c_array(labels, cnp.NPY_INT64, 1, False))
            and (targets is None or _c_array(targets, t, 2, False))):
        return _NOT_DONE
    cdef Py_ssize_t c_sizes[MAX_LAYERS + 1]
    cdef int acts[MAX_LAYERS]
    cdef Py_ssize_t n_layers = len(sizes) - 1, l, n_params = 0, work = 0
    cdef Py_ssize_t n = cnp.PyArray_DIM(<cnp.ndarray>X, 0)
    if n == 0 or n > INT_MAX:
        return _NOT_DONE
    cdef int loss_code = _net_codes(sizes, activations, loss, output, c_sizes, acts)
    for l in range(n_layers):
        n_params += (c_sizes[l] + 1) * c_sizes[l + 1]
        work += n * c_sizes[l + 1]
    cdef Py_ssize_t k = c_sizes[n_layers]
    if (cnp.PyArray_DIM(<cnp.ndarray>X, 1) != c_sizes[0]
            or cnp.PyArray_DIM(<cnp.ndarray>params, 0) != n_params
            or cnp.PyArray_DIM(<cnp.ndarray>A, 0) < work):
        return _NOT_DONE
    if labels is not None and (loss_code != CROSS_ENTROPY
                               or cnp.PyArray_DIM(<cnp.ndarray>labels, 0) != n):
        return _NOT_DONE
    if targets is not None and (loss_code == CROSS_ENTROPY
                                or cnp.PyArray_DIM(<cnp.ndarray>targets, 0) != n
                                or cnp.PyArray_DIM(<cnp.ndarray>targets, 1) != k):
        return _NOT_DONE
    if out is not None and (cnp.PyArray_DIM(<cnp.ndarray>out, 0) != n
                            or cnp.PyArray_DIM(<cnp.ndarray>out, 1) != k):
        return _NOT_DONE
    # the outputs (A, out) must not overlap each other nor any input
    cdef size_t s = 4 if t == cnp.NPY_FLOAT32 else 8
    cdef const void* px = cnp.PyArray_DATA(<cnp.ndarray>X)
    cdef const void* pp = cnp.PyArray_DATA(<cnp.ndarray>params)
    cdef void* pa = cnp.PyArray_DATA(<cnp.ndarray>A)
    cdef void* po = NULL if out is None else cnp.PyArray_DATA(<cnp.ndarray>out)
    cdef const void* pl = NULL if labels is None else cnp.PyArray_DATA(<cnp.ndarray>labels)
    cdef const void* pt = NULL if targets is None else cnp.PyArray_DATA(<cnp.ndarray>targets)
    cdef const void* spans[5]
    cdef size_t nbytes[5]
    spans[0], nbytes[0] = px, n * c_sizes[0] * s
    spans[1], nbytes[1] = pp, n_params * s
    spans[2], nbytes[2] = pl, 0 if pl == NULL else n * sizeof(int64_t)
    spans[3], nbytes[3] = pt, 0 if pt == NULL else n * k * s
    spans[4], nbytes[4] = po, 0 if po == NULL else n * k * s
    cdef int j
    for j in range(5):
        if _overlap(pa, cnp.PyArray_DIM(<cnp.ndarray>A, 0) * s, spans[j], nbytes[j], False):
            return _NOT_DONE
        if j < 4 and _overlap(po, nbytes[4], spans[j], nbytes[j], False):
            return _NOT_DONE
    cdef bint want_loss = labels is not None or targets is not None
    cdef bint bad_label = False
    cdef double value = 0
    cdef int threads
    with nogil:
        if pl != NULL:
            bad_label = _first_bad_label(<const int64_t*>pl, n, k) >= 0
        if not bad_label:
            # A network that trains on fastbp's own threads runs its forward passes on
            # them too, whatever the row count (judged as for a batch of 128): a pass
            # on BLAS's threads (fit's validation between epochs) would wake OpenBLAS's
            # workers, which then spin for 0.1 s into the next epoch's steps.
            threads = fbp_threads_enter(n if n < 128 else 128, n_layers, c_sizes,
                                        t == cnp.NPY_FLOAT64)
            if t == cnp.NPY_FLOAT32:
                value = _mlp_outputs(<const float*>px, <const int64_t*>pl, <const float*>pt,
                                     <const float*>pp, <float*>pa, <float*>po, n, n_layers,
                                     c_sizes, acts, loss_code, want_loss)
            else:
                value = _mlp_outputs(<const double*>px, <const int64_t*>pl, <const double*>pt,
                                     <const double*>pp, <double*>pa, <double*>po, n, n_layers,
                                     c_sizes, acts, loss_code, want_loss)
            fbp_threads_exit(threads)
    if bad_label:
        return _NOT_DONE
    return value if want_loss else None


def mlp_forward(X, labels, targets, params, sizes, activations, loss, output, A, out):
    """A whole network's outputs and/or mean loss on a batch in one call, without
    the GIL. See `fastbp.reference.mlp_forward`."""
    try:
        result = _forward_direct(X, labels, targets, params, tuple(sizes), tuple(activations),
                                 loss, output, A, out)
    except (TypeError, ValueError, KeyError, OverflowError):
        result = _NOT_DONE
    if result is not _NOT_DONE:
        return result
    check_forward_call(X, labels, targets, params, sizes, activations, loss, output, A, out)
    raise ValueError("invalid arguments to mlp_forward")


# ---------------------------------------------------------------------------
# mlp_sgd_step: one SGD step of a whole network in one call

cdef inline bint _c_array(object a, int typenum, int ndim, bint writable):
    """`a` is an ndarray of this type (or one NumPy holds equal to it: int64 labels
    made as np.longlong have a type number of their own) and dimension, in the
    machine's byte order, C-contiguous (and writable). (The type number of '>f4'
    is float32's too: read as float32, a byte-swapped array gave garbage where the
    reference raises.)"""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(arr)
    return ((t == typenum or cnp.PyArray_EquivTypenums(t, typenum))
            and cnp.PyArray_NDIM(arr) == ndim and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and cnp.PyArray_ISNOTSWAPPED(arr) and (not writable or cnp.PyArray_ISWRITEABLE(arr)))


cdef int _net_args_from_arrays(_NetArgs* g, object X, object labels, object targets,
                               object params, object A, object D, object grad,
                               object buf, bint column_targets=False,
                               bint params_written=True) except -2:
    """Fill g from plain ndarrays through NumPy's C API (no memoryview objects).
    Returns their NumPy type number, or -1 when they are not all C-contiguous
    arrays of one float type (labels int64), outputs writable (params only where
    params_written: mlp_gradients reads them). column_targets: 1-D targets stand
    for one column (a network's (n,) y for one output)."""
    if not cnp.PyArray_Check(X):
        return -1
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>X)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        return -1
    if not (_c_array(X, t, 2, False) and _c_array(params, t, 1, params_written)
            and _c_array(A, t, 1, True)
            and _c_array(D, t, 1, True) and _c_array(grad, t, 1, True)
            and (labels is None or _c_array(labels, cnp.NPY_INT64, 1, False))
            and (targets is None or _c_array(targets, t, 2, False)
                 or (column_targets and _c_array(targets, t, 1, False)))
            and (buf is None or _c_array(buf, t, 1, True))):
        return -1
    cdef cnp.ndarray a
    a = <cnp.ndarray>X
    g.n, g.x_cols, g.X = cnp.PyArray_DIM(a, 0), cnp.PyArray_DIM(a, 1), cnp.PyArray_DATA(a)
    g.has_labels = labels is not None
    g.labels, g.labels_len = NULL, 0
    if g.has_labels:
        a = <cnp.ndarray>labels
        g.labels, g.labels_len = cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0)
    g.has_targets = targets is not None
    g.targets, g.t_rows, g.t_cols = NULL, 0, 0
    if g.has_targets:
        a = <cnp.ndarray>targets
        g.targets, g.t_rows = cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0)
        g.t_cols = cnp.PyArray_DIM(a, 1) if cnp.PyArray_NDIM(a) == 2 else 1
    a = <cnp.ndarray>params
    g.params, g.params_len = cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0)
    a = <cnp.ndarray>A
    g.A, g.A_len = cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0)
    a = <cnp.ndarray>D
    g.D, g.D_len = cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0)
    a = <cnp.ndarray>grad
    g.grad, g.grad_len = cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0)
    g.has_buf = buf is not None
    g.buf, g.buf_len = NULL, 0
    if g.has_buf:
        a = <cnp.ndarray>buf
        g.buf, g.buf_len = cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0)
    g.itemsize = 4 if t == cnp.NPY_FLOAT32 else 8
    return t


cdef struct _Optim:
    # One optimizer's settings and state, for the compiled step (_run_step) and epoch loops.
    bint adam
    double lr, momentum, dampening, weight_decay, beta1, beta2, eps
    bint nesterov, maximize, decoupled, amsgrad, first_step
    long step  # Adam: the number of the epoch's first update, counting from 1
    void* buf
    void* m
    void* v
    void* vmax


cdef int _optim_step(const floating* X, const int64_t* labels, const floating* T,
                     floating* params, floating* A, floating* D, floating* grad, Py_ssize_t n,
                     Py_ssize_t n_layers, const Py_ssize_t* sizes, const int* acts, int loss,
                     const _Optim* o, Py_ssize_t k, double* loss_out) noexcept nogil:
    """The k-th (from 0) step of an epoch with optimizer o: 0 applied, 1 refused.
    With o NULL, only the loss and the gradient (into grad), as mlp_gradients: 0."""
    if o == NULL:
        _mlp_forward_backward(X, labels, T, params, A, D, grad, n, n_layers, sizes, acts, loss,
                              loss_out)
        return 0
    if o.adam:
        return _mlp_adam_step_loop(X, labels, T, params, A, D, grad, <floating*>o.m,
                                   <floating*>o.v, <floating*>o.vmax, n, n_layers, sizes, acts,
                                   loss, o.step + k, o.lr, o.beta1, o.beta2, o.eps,
                                   o.weight_decay, o.decoupled, o.maximize, loss_out)
    return _mlp_sgd_step_loop(X, labels, T, params, A, D, grad, <floating*>o.buf, n, n_layers,
                              sizes, acts, loss, <floating>o.lr, <floating>o.momentum,
                              <floating>(1 - o.dampening), o.nesterov, <floating>o.weight_decay,
                              o.maximize, o.first_step and k == 0, loss_out)


cdef object _run_step(const _NetArgs* g, int t, const _Optim* o, Py_ssize_t n_layers,
                      const Py_ssize_t* c_sizes, const int* acts, int loss_code):
    """One step with optimizer o (NULL: the gradient only) on the checked arrays g
    describes (type number t): (loss, status), or None when a label is out of range
    (the general path names it)."""
    cdef double value = 0
    cdef int status = 0, threads
    cdef bint bad_label = False
    with nogil:
        if g.has_labels:
            bad_label = _first_bad_label(<const int64_t*>g.labels, g.n, c_sizes[n_layers]) >= 0
        if not bad_label:
            threads = fbp_threads_enter(g.n, n_layers, c_sizes, t == cnp.NPY_FLOAT64)
            if t == cnp.NPY_FLOAT32:
                status = _optim_step(<const float*>g.X, <const int64_t*>g.labels,
                                     <const float*>g.targets, <float*>g.params, <float*>g.A,
                                     <float*>g.D, <float*>g.grad, g.n, n_layers, c_sizes, acts,
                                     loss_code, o, 0, &value)
            else:
                status = _optim_step(<const double*>g.X, <const int64_t*>g.labels,
                                     <const double*>g.targets, <double*>g.params, <double*>g.A,
                                     <double*>g.D, <double*>g.grad, g.n, n_layers, c_sizes, acts,
                                     loss_code, o, 0, &value)
            fbp_threads_exit(threads)
    if bad_label:
        return None
    return value, status


cdef object _sgd_step_direct(object X, object labels, object targets, object params, tuple sizes,
                             tuple activations, str loss, str output, object A, object D,
                             object grad, object buf, double lr, double momentum,
                             double dampening, bint nesterov, double weight_decay, bint maximize,
                             bint first_step, bint column_targets=False):
    """`mlp_sgd_step` on plain ndarrays, read through NumPy's C API: no memoryview
    objects, so a step allocates nothing. Returns None when the arguments are not
    of that kind or fail a check: the general path then runs (and names the error)."""
    if momentum == 0:
        buf = None
    elif buf is None:
        return None
    if nesterov and (momentum <= 0 or dampening != 0):
        return None
    cdef _NetArgs g
    cdef int t = _net_args_from_arrays(&g, X, labels, targets, params, A, D, grad, buf,
                                       column_targets)
    if t < 0:
        return None
    cdef Py_ssize_t c_sizes[MAX_LAYERS + 1]
    cdef int acts[MAX_LAYERS]
    cdef int loss_code = _net_checks(&g, sizes, activations, loss, output, c_sizes, acts)
    cdef _Optim o
    o.adam, o.lr, o.momentum, o.dampening, o.nesterov = False, lr, momentum, dampening, nesterov
    o.weight_decay, o.maximize, o.first_step, o.buf = weight_decay, maximize, first_step, <void*>g.buf
    return _run_step(&g, t, &o, len(sizes) - 1, c_sizes, acts, loss_code)


cdef object _gradients_direct(object X, object labels, object targets, object params,
                              tuple sizes, tuple activations, str loss, str output, object A,
                              object D, object grad):
    """`mlp_gradients` on plain ndarrays through NumPy's C API, as `_sgd_step_direct`
    (the memoryview path cost 40 us of a 32-row call on the digits network, more
    than a whole training step). None when the arguments are not of that kind, fail
    a check or hold a bad label: the general path then runs (and names the error)."""
    cdef _NetArgs g
    cdef int t = _net_args_from_arrays(&g, X, labels, targets, params, A, D, grad, None, False,
                                       False)
    if t < 0:
        return None
    cdef Py_ssize_t c_sizes[MAX_LAYERS + 1]
    cdef int acts[MAX_LAYERS]
    cdef int loss_code = _net_checks(&g, sizes, activations, loss, output, c_sizes, acts)
    result = _run_step(&g, t, NULL, len(sizes) - 1, c_sizes, acts, loss_code)
    return None if result is None else result[0]


def mlp_sgd_step(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                 momentum_buffer, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 maximize=False, first_step=False):
    """One SGD step of a whole network in one call without the GIL: forward, loss,
    backward and update, the update folded into the weight-gradient GEMMs where
    exact. See `fastbp.reference.mlp_sgd_step`."""
    try:
        result = _sgd_step_direct(X, labels, targets, params, tuple(sizes), tuple(activations),
                                  loss, output, A, D, grad, momentum_buffer, lr, momentum,
                                  dampening, nesterov, weight_decay, maximize, first_step)
    except (TypeError, ValueError, KeyError, OverflowError):
        result = None
    if result is not None:
        return result
    check_step_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                    momentum_buffer, momentum, nesterov, dampening)
    raise ValueError("invalid arguments to mlp_sgd_step")


# ---------------------------------------------------------------------------
# The GEMM floor (for benchmarks; not part of the kernel API)

def _gemm_floor(const floating[:, ::1] X, const floating[::1] params, tuple sizes,
                floating[::1] A, floating[::1] D, floating[::1] grad):
    """Only the GEMMs of a training step on X, through the same calls as the step
    (forward: `_forward_product`, BLAS or the small kernel as in the step; dW; dX
    for all but the first layer), in one call without the GIL: what a step would
    cost if nothing else took any time."""
    cdef Py_ssize_t n = X.shape[0], n_layers = len(sizes) - 1, l, n_in, n_out
    cdef Py_ssize_t c_sizes[MAX_LAYERS + 1]
    cdef Py_ssize_t w_off[MAX_LAYERS + 1]
    cdef Py_ssize_t a_off[MAX_LAYERS]
    if n_layers < 1 or n_layers > MAX_LAYERS:
        raise ValueError(f"1 to {MAX_LAYERS} layers")
    for l in range(n_layers + 1):
        c_sizes[l] = sizes[l]
    _layer_offsets(n, n_layers, c_sizes, w_off, a_off)
    if (X.shape[1] != c_sizes[0] or params.shape[0] != w_off[n_layers]
            or grad.shape[0] != w_off[n_layers] or A.shape[0] < a_off[n_layers - 1] + n * c_sizes[n_layers]
            or D.shape[0] < A.shape[0]):
        raise ValueError("buffers do not fit the sizes")
    cdef const floating* prev
    with nogil:
        prev = &X[0, 0]
        for l in range(n_layers):
            n_in, n_out = c_sizes[l], c_sizes[l + 1]
            _forward_product(prev, &params[0] + w_off[l], &A[0] + a_off[l], n, n_in, n_out)
            prev = &A[0] + a_off[l]
        for l in range(n_layers - 1, -1, -1):
            n_in, n_out = c_sizes[l], c_sizes[l + 1]
            prev = &X[0, 0] if l == 0 else &A[0] + a_off[l - 1]
            _gemm(c'T', c'N', <int>n_out, <int>n_in, <int>n, 1, &A[0] + a_off[l], <int>n_out,
                  prev, <int>n_in, 0, &grad[0] + w_off[l], <int>n_in)
            if l > 0:
                _gemm(c'N', c'N', <int>n, <int>n_in, <int>n_out, 1, &A[0] + a_off[l], <int>n_out,
                      &params[0] + w_off[l], <int>n_in, 0, &D[0] + a_off[l - 1], <int>n_in)


# ---------------------------------------------------------------------------
# Per-layer sums for fastbp.diagnostics (not part of the kernel API)

cdef inline double _sum_squares(bint f32, const char* a, const char* b, Py_ssize_t size,
                                bint sub) noexcept nogil:
    """fbp_sum_squares on float32 (f32) or float64 elements."""
    if f32:
        return fbp_sum_squares_f32(<const float*>a, <const float*>b, size, sub)
    return fbp_sum_squares_f64(<const double*>a, <const double*>b, size, sub)


cdef object _sums_on(int t, const void* params, const void* before, const void* grad,
                     const void* A, Py_ssize_t params_len, Py_ssize_t before_len,
                     Py_ssize_t grad_len, Py_ssize_t A_len, Py_ssize_t n, tuple sizes,
                     tuple activations, bint moved, double saturation_fraction):
    """The body of `_layer_sums` on arrays of NumPy type t."""
    cdef Py_ssize_t n_layers = len(sizes) - 1, l, n_in, n_out, lo, w_end, size
    cdef Py_ssize_t c_sizes[MAX_LAYERS + 1]
    cdef Py_ssize_t w_off[MAX_LAYERS + 1]
    cdef Py_ssize_t a_off[MAX_LAYERS]
    cdef int codes[MAX_LAYERS]
    if not 1 <= n_layers <= MAX_LAYERS or len(activations) != n_layers - 1 or n < 0:
        raise ValueError("sizes, activations and n do not describe a network and batch")
    for l in range(n_layers + 1):
        c_sizes[l] = sizes[l]
        if c_sizes[l] < 1:
            raise ValueError(f"sizes must be positive, got {sizes!r}")
    for l in range(n_layers):
        codes[l] = _activation_code(activations[l], ACTIVATIONS) if l < n_layers - 1 else -1
    _layer_offsets(n, n_layers, c_sizes, w_off, a_off)
    if (params_len != w_off[n_layers] or before_len != w_off[n_layers]
            or grad_len != w_off[n_layers] or A_len < a_off[n_layers - 1] + n * c_sizes[n_layers]):
        raise ValueError("params, before, grad or A do not fit the sizes")
    cdef cnp.npy_intp dims[2]
    dims[0], dims[1] = n_layers, 5
    out = cnp.PyArray_ZEROS(2, dims, cnp.NPY_FLOAT64, 0)
    cdef double* o = <double*>cnp.PyArray_DATA(<cnp.ndarray>out)
    cdef bint f32 = t == cnp.NPY_FLOAT32
    cdef size_t s = 4 if f32 else 8
    cdef const char* pp = <const char*>params
    cdef const char* pb = <const char*>before
    cdef const char* pg = <const char*>grad
    cdef const char* a
    with nogil:
        for l in range(n_layers):
            n_in, n_out = c_sizes[l], c_sizes[l + 1]
            lo, w_end = w_off[l], w_off[l] + n_out * n_in
            o[5 * l] = _sum_squares(f32, pg + lo * s, NULL, w_off[l + 1] - lo, False)
            o[5 * l + 1] = _sum_squares(f32, pb + lo * s, NULL, w_end - lo, False)
            if moved:
                o[5 * l + 2] = _sum_squares(f32, pp + lo * s, pb + lo * s, w_end - lo, True)
            if n == 0:
                continue
            a = <const char*>A + a_off[l] * s
            size = n * n_out
            if codes[l] == SIGMOID or codes[l] == TANH:
                # the same threshold in T as NumPy's comparison with a Python float
                if f32:
                    o[5 * l + 3] = fbp_count_saturated_f32(
                        <const float*>a, size, codes[l],
                        <float>(saturation_fraction * (0.25 if codes[l] == SIGMOID else 1.0)))
                else:
                    o[5 * l + 3] = fbp_count_saturated_f64(
                        <const double*>a, size, codes[l],
                        saturation_fraction * (0.25 if codes[l] == SIGMOID else 1.0))
            elif codes[l] == RELU:
                if f32:
                    o[5 * l + 4] = fbp_count_dead_f32(<const float*>a, n, n_out)
                else:
                    o[5 * l + 4] = fbp_count_dead_f64(<const double*>a, n, n_out)
    return out


def _layer_sums(params, before, grad, A, Py_ssize_t n, tuple sizes, tuple activations,
                bint moved, double saturation_fraction):
    """What `fastbp.diagnostics.layer_statistics` needs, in one pass without the GIL
    (its `_layer_sums_numpy` is the specification). Row l of the returned (n_layers,
    5) float64 array: the sum of squares of layer l's gradient (W and b), of its W in
    `before`, of its W's change ``params - before`` (when `moved`; else 0), the
    count of saturated activations (sigmoid, tanh) and of dead units (relu; the
    activation is 0 or less on all n rows). A holds the activations of n rows in
    `mlp_gradients`' layout; activations[l] names hidden layer l's activation.
    params, before, grad and A are C-contiguous 1-D arrays of one float type, read
    through NumPy's C API (a memoryview each cost about 3 us a call, which fit pays
    every epoch)."""
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>params) if cnp.PyArray_Check(params) else -1
    if not ((t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and _c_array(params, t, 1, False)
            and _c_array(before, t, 1, False) and _c_array(grad, t, 1, False)
            and _c_array(A, t, 1, False)):
        raise TypeError("params, before, grad and A must be C-contiguous 1-D arrays of one "
                        "float type (float32 or float64)")
    return _sums_on(t, cnp.PyArray_DATA(<cnp.ndarray>params),
                    cnp.PyArray_DATA(<cnp.ndarray>before), cnp.PyArray_DATA(<cnp.ndarray>grad),
                    cnp.PyArray_DATA(<cnp.ndarray>A), cnp.PyArray_DIM(<cnp.ndarray>params, 0),
                    cnp.PyArray_DIM(<cnp.ndarray>before, 0), cnp.PyArray_DIM(<cnp.ndarray>grad, 0),
                    cnp.PyArray_DIM(<cnp.ndarray>A, 0), n, sizes, activations, moved,
                    saturation_fraction)


# ---------------------------------------------------------------------------
# mlp_sgd_epoch: a whole epoch of SGD in one call

cdef int _reraise() except -1:
    # Returning -1 from an `except -1` function propagates the error that
    # PyErr_CheckSignals left set (a signal handler raised).
    return -1


ctypedef struct _GatherJob:
    # a batch's rows gathered from the data set, in parts across fastbp's threads
    const void* X
    void* Xb
    const int64_t* order
    Py_ssize_t rows, n_in, itemsize


cdef void _gather_part(void* arg, int part, int parts) noexcept nogil:
    cdef const _GatherJob* j = <const _GatherJob*>arg
    cdef Py_ssize_t i, row = j.n_in * j.itemsize
    for i in range(j.rows * part // parts, j.rows * (part + 1) // parts):
        memcpy(<char*>j.Xb + i * row, <const char*>j.X + j.order[i] * row, row)


cdef inline void _gather_rows(const floating* X, floating* Xb, const int64_t* order,
                              Py_ssize_t rows, Py_ssize_t n_in) noexcept nogil:
    """Xb[i] = X[order[i]] for i < rows. Inside a call on fastbp's own threads, each
    thread gathers a share of a batch of 2^15 elements or more: one thread's copy
    left the other's products to take every line of it from that thread's cache
    (in-fit steps of 784-128-10 on 64 rows ran 0.86x the speed of net.step on a
    batch in place). In-process against one thread's copy, 16 rounds, compiled
    epochs: 784-128-10 on 64 rows 1.05x (momentum 1.03x), on 128 with Adam
    1.04x; 784-256-128-10 on 64 rows with momentum 1.02x, on 128 1.03x, on 256
    1.05x."""
    cdef _GatherJob j
    j.X, j.Xb, j.order, j.rows, j.n_in, j.itemsize = X, Xb, order, rows, n_in, sizeof(floating)
    if fbp_pool_held >= 2 and rows * n_in >= _SPLIT_MIN:
        fbp_pool_run(_gather_part, &j, fbp_pool_held)
    else:
        _gather_part(&j, 0, 1)


cdef int _epoch_loop(const floating* X, const int64_t* labels, const floating* T,
                     const int64_t* order, Py_ssize_t m, Py_ssize_t batch_size,
                     floating* params, floating* A, floating* D, floating* grad,
                     floating* Xb, int64_t* Lb, floating* Tb, const _Optim* o,
                     const int8_t* stop, Py_ssize_t n_layers, const Py_ssize_t* sizes,
                     const int* acts, int loss, double* loss_sum,
                     Py_ssize_t* steps) noexcept nogil:
    """Returns 0 (epoch done), 1 (non-finite loss or gradient: batch not applied),
    2 (stop set) or 3 (a signal handler raised: its error is pending).

    A batch whose rows follow each other in X (order[lo + i] = order[lo] + i, as
    in every batch of an epoch without shuffling) is read where it is; the others
    are gathered into Xb and Lb or Tb first. The copy cost about 40 us of a 128-row
    batch of 784 inputs, as much as half of a small network's step."""
    cdef Py_ssize_t lo, i, nb, first, n_in = sizes[0], n_out = sizes[n_layers]
    cdef const floating* xs
    cdef const int64_t* ls
    cdef const floating* ts
    cdef double value
    cdef int signalled
    lo = 0
    while lo < m:
        nb = batch_size if m - lo > batch_size else m - lo
        first = order[lo]
        i = 1
        while i < nb and order[lo + i] == first + i:
            i += 1
        if i == nb:  # consecutive rows: in place
            xs = X + first * n_in
            ls = labels + first if Lb != NULL else NULL
            ts = T + first * n_out if Lb == NULL else NULL
        else:
            _gather_rows(X, Xb, order + lo, nb, n_in)
            for i in range(nb):  # and their labels or targets
                if Lb != NULL:
                    Lb[i] = labels[order[lo + i]]
                else:
                    memcpy(Tb + i * n_out, T + order[lo + i] * n_out, n_out * sizeof(floating))
            xs, ls, ts = Xb, Lb, Tb
        if _optim_step(xs, ls, ts, params, A, D, grad, nb, n_layers, sizes, acts, loss, o,
                       steps[0], &value):
            return 1
        loss_sum[0] += value * nb
        steps[0] += 1
        lo += nb
        with gil:
            signalled = PyErr_CheckSignals()
        if signalled < 0:
            return 3
        if stop[0]:
            return 2
    return 0


class _Signalled(Exception):
    """Carries what a signal handler raised during a compiled epoch past the
    argument-error handling of `mlp_sgd_epoch`."""


cdef object _run_epoch_on(int t, const void* X, const int64_t* labels, const void* targets,
                          const int64_t* order, Py_ssize_t m, Py_ssize_t batch_size, void* params,
                          void* A, void* D, void* grad, void* X_batch, int64_t* labels_batch,
                          void* targets_batch, const int8_t* stop, const _Optim* o,
                          Py_ssize_t n_layers, const Py_ssize_t* c_sizes, const int* acts,
                          int loss_code):
    """`_epoch_loop` on checked arrays of NumPy type t (float32 or float64), for both
    optimizers: (loss_sum, steps, status), or what a signal handler raised, carried
    out as _Signalled."""
    cdef double loss_sum = 0
    cdef Py_ssize_t steps = 0
    cdef int status, threads
    with nogil:
        threads = fbp_threads_enter(batch_size if batch_size < m else m, n_layers, c_sizes,
                                    t == cnp.NPY_FLOAT64)
        if t == cnp.NPY_FLOAT32:
            status = _epoch_loop(
                <const float*>X, labels, <const float*>targets, order, m, batch_size,
                <float*>params, <float*>A, <float*>D, <float*>grad, <float*>X_batch,
                labels_batch, <float*>targets_batch, o, stop, n_layers, c_sizes, acts,
                loss_code, &loss_sum, &steps)
        else:
            status = _epoch_loop(
                <const double*>X, labels, <const double*>targets, order, m, batch_size,
                <double*>params, <double*>A, <double*>D, <double*>grad, <double*>X_batch,
                labels_batch, <double*>targets_batch, o, stop, n_layers, c_sizes, acts,
                loss_code, &loss_sum, &steps)
        fbp_threads_exit(threads)
    if status == 3:
        try:
            _reraise()
        except BaseException as exc:
            raise _Signalled(exc)
    return loss_sum, steps, status


cdef struct _EpochArgs:
    # The arrays of a whole-epoch call beside the network's (_NetArgs: the batch
    # buffers stand there for X, labels and targets), as pointers and sizes.
    const void* X
    const int64_t* labels
    const void* targets
    const int64_t* order
    void* X_batch
    int64_t* labels_batch
    void* targets_batch
    const int8_t* stop
    Py_ssize_t m


cdef int _epoch_direct_checks(_EpochArgs* e, _NetArgs* g, object X, object labels,
                              object targets, object order, Py_ssize_t batch_size, object params,
                              tuple sizes, tuple activations, str loss, str output, object A,
                              object D, object grad, object X_batch, object labels_batch,
                              object targets_batch, object buf, object stop, Py_ssize_t* c_sizes,
                              int* acts, int* loss_code, const void** start,
                              size_t* nbytes, int* n_spans) except -2:
    """The checks of `check_epoch_call` on plain ndarrays read through NumPy's C
    API (no memoryview objects: that path cost about 13 us a call, 2% of a digits
    network's epoch). Fills e, g (the batch buffers in the place of X, labels and
    targets, as the steps see them), c_sizes, acts and loss_code, and the arrays'
    spans (room for 16). Returns the arrays' NumPy type number, or -1 when they are
    not all C-contiguous arrays of the kinds the kernels take, or fail a check: the
    general path then runs and names the problem. A check in C may also raise a bare
    ValueError (or KeyError), to the same end."""
    cdef cnp.ndarray a
    cdef Py_ssize_t N, m, rows, i, j, n_out, x_cols, t_cols = 0
    if (not cnp.PyArray_Check(X) or labels is None and targets is None
            or (labels is None) != (labels_batch is None)
            or (targets is None) != (targets_batch is None)):
        return -1
    # X, labels and targets as read-only inputs of the network checks; the batch
    # buffers take their places below
    cdef int t = _net_args_from_arrays(g, X, labels, targets, params, A, D, grad, buf)
    if t < 0 or not (_c_array(order, cnp.NPY_INT64, 1, False) and _c_array(X_batch, t, 2, True)
                     and _c_array(stop, cnp.NPY_INT8, 1, False)
                     and (labels_batch is None or _c_array(labels_batch, cnp.NPY_INT64, 1, True))
                     and (targets_batch is None or _c_array(targets_batch, t, 2, True))):
        return -1
    N, x_cols = g.n, g.x_cols
    e.X, e.labels, e.targets = g.X, <const int64_t*>g.labels, g.targets
    a = <cnp.ndarray>order
    e.order, e.m = <const int64_t*>cnp.PyArray_DATA(a), cnp.PyArray_DIM(a, 0)
    m = e.m
    a = <cnp.ndarray>stop
    e.stop = <const int8_t*>cnp.PyArray_DATA(a)
    if batch_size < 1 or m == 0 or cnp.PyArray_DIM(a, 0) != 1:
        return -1
    rows = batch_size if batch_size < m else m
    a = <cnp.ndarray>X_batch
    e.X_batch = cnp.PyArray_DATA(a)
    cdef Py_ssize_t b_rows = cnp.PyArray_DIM(a, 0)
    if cnp.PyArray_DIM(a, 1) != x_cols or b_rows < rows:
        return -1
    e.labels_batch, e.targets_batch = NULL, NULL
    if labels is not None:
        a = <cnp.ndarray>labels_batch
        e.labels_batch = <int64_t*>cnp.PyArray_DATA(a)
        if g.labels_len != N or cnp.PyArray_DIM(a, 0) != b_rows:
            return -1
    if targets is not None:
        a = <cnp.ndarray>targets_batch
        e.targets_batch = cnp.PyArray_DATA(a)
        t_cols = g.t_cols
        if (g.t_rows != N or cnp.PyArray_NDIM(<cnp.ndarray>targets) != 2
                or cnp.PyArray_DIM(a, 0) != b_rows or cnp.PyArray_DIM(a, 1) != t_cols):
            return -1
    for i in range(m):
        if e.order[i] < 0 or e.order[i] >= N:
            return -1
    # writable arguments must not overlap any other
    cdef size_t s = g.itemsize
    cdef bint writable[16]
    cdef const void* p[13]
    cdef size_t size[13]
    cdef bint w[13]
    p[0], size[0], w[0] = e.X, N * x_cols * s, False
    p[1], size[1], w[1] = e.labels, (N * sizeof(int64_t)) if labels is not None else 0, False
    p[2], size[2], w[2] = e.targets, N * t_cols * s, False
    p[3], size[3], w[3] = e.order, m * sizeof(int64_t), False
    p[4], size[4], w[4] = g.params, g.params_len * s, True
    p[5], size[5], w[5] = g.A, g.A_len * s, True
    p[6], size[6], w[6] = g.D, g.D_len * s, True
    p[7], size[7], w[7] = g.grad, g.grad_len * s, True
    p[8], size[8], w[8] = e.X_batch, b_rows * x_cols * s, True
    p[9], size[9], w[9] = (e.labels_batch, (b_rows * sizeof(int64_t)) if labels is not None else 0,
                           True)
    p[10], size[10], w[10] = e.targets_batch, b_rows * t_cols * s, True
    p[11], size[11], w[11] = g.buf, g.buf_len * s, True
    p[12], size[12], w[12] = e.stop, 1, False
    cdef int count = 0
    for i in range(13):
        if p[i] != NULL and size[i]:
            start[count], nbytes[count], writable[count] = p[i], size[i], w[i]
            count += 1
    for i in range(count):
        if writable[i]:
            for j in range(count):
                if i != j and _overlap(start[i], nbytes[i], start[j], nbytes[j], False):
                    return -1
    n_spans[0] = count
    # the network part, as mlp_gradients checks it, on a full batch in the buffers
    g.n, g.X = rows, e.X_batch
    if labels is not None:
        g.labels, g.labels_len = e.labels_batch, rows
    if targets is not None:
        g.targets, g.t_rows = e.targets_batch, rows
    loss_code[0] = _net_checks(g, sizes, activations, loss, output, c_sizes, acts)
    if labels is not None:
        n_out = c_sizes[len(sizes) - 1]
        with nogil:
            i = _first_bad_label(e.labels, N, n_out)
        if i >= 0:
            return -1
    return t


cdef object _epoch_direct(bint adam, object X, object labels, object targets, object order,
                          Py_ssize_t batch_size, object params, tuple sizes, tuple activations,
                          str loss, str output, object A, object D, object grad,
                          object X_batch, object labels_batch, object targets_batch, object stop,
                          double lr, double weight_decay, bint maximize, object buf,
                          double momentum, double dampening, bint nesterov, bint first_step,
                          object m, object v, object vmax, long step, double beta1,
                          double beta2, double eps, bint decoupled, bint amsgrad):
    """`mlp_sgd_epoch` (buf to first_step: SGD's state and settings; the rest unused)
    or, when adam, `mlp_adam_epoch` (m to amsgrad: Adam's) on plain ndarrays
    (`_epoch_direct_checks`), or None for the general path."""
    if adam:
        buf = None
    elif momentum == 0:
        buf = None
    elif buf is None:
        return None
    if not adam and nesterov and (momentum <= 0 or dampening != 0):
        return None
    cdef _EpochArgs e
    cdef _NetArgs g
    cdef Py_ssize_t c_sizes[MAX_LAYERS + 1]
    cdef int acts[MAX_LAYERS]
    cdef int loss_code, n_spans
    cdef const void* spans[16]
    cdef size_t span_bytes[16]
    cdef int t = _epoch_direct_checks(&e, &g, X, labels, targets, order, batch_size, params,
                                      sizes, activations, loss, output, A, D, grad, X_batch,
                                      labels_batch, targets_batch, buf, stop, c_sizes, acts,
                                      &loss_code, spans, span_bytes, &n_spans)
    if t < 0:
        return None
    cdef _Optim o
    if adam:
        # (Adam's state must not overlap any of the epoch's arrays: the spans)
        if not _adam_direct_optim(&o, t, g.params_len, m, v, vmax, step, lr, beta1, beta2, eps,
                                  weight_decay, decoupled, amsgrad, maximize, spans,
                                  span_bytes, n_spans):
            return None
    else:
        o.adam, o.lr, o.momentum, o.dampening, o.nesterov = (False, lr, momentum, dampening,
                                                             nesterov)
        o.weight_decay, o.maximize, o.first_step = weight_decay, maximize, first_step
        o.buf = <void*>g.buf
    return _run_epoch_on(t, e.X, e.labels, e.targets, e.order, e.m, batch_size, <void*>g.params,
                         <void*>g.A, <void*>g.D, <void*>g.grad, e.X_batch, e.labels_batch,
                         e.targets_batch, e.stop, &o, len(sizes) - 1, c_sizes, acts, loss_code)


def mlp_sgd_epoch(X, labels, targets, order, batch_size, params, sizes, activations, loss, output,
                  A, D, grad, X_batch, labels_batch, targets_batch, momentum_buffer, stop, lr,
                  momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
                  first_step=False):
    """One epoch of mini-batch SGD on a whole network in one call, without the GIL
    but for a signal check after every batch. See `fastbp.reference.mlp_sgd_epoch`."""
    result = None
    try:
        if not isinstance(batch_size, bool):
            result = _epoch_direct(False, X, labels, targets, order, batch_size, params,
                                   tuple(sizes), tuple(activations), loss, output, A, D, grad,
                                   X_batch, labels_batch, targets_batch, stop, lr, weight_decay,
                                   maximize, momentum_buffer, momentum, dampening, nesterov,
                                   first_step, None, None, None, 1, 0, 0, 0, False, False)
    except _Signalled as signalled:
        raise signalled.args[0] from None
    except (TypeError, ValueError, KeyError, OverflowError):
        result = None
    if result is not None:
        return result
    # refused (arrays of another kind or layout, or a check in C failed, or a
    # conversion did): the reference's checks name the problem
    check_epoch_call(X, labels, targets, order, batch_size, params, sizes, activations, loss,
                     output, A, D, grad, X_batch, labels_batch, targets_batch, momentum_buffer,
                     momentum, nesterov, dampening, stop)
    raise ValueError("invalid arguments to mlp_sgd_epoch")

# ---------------------------------------------------------------------------
# mlp_adam_step and mlp_adam_epoch: Adam (AdamW) steps of a whole network

cdef int _adam_state_checks(Py_ssize_t n_params, const void* m, Py_ssize_t m_len, const void* v,
                            Py_ssize_t v_len, const void* vmax, Py_ssize_t vmax_len, size_t s,
                            long step, const void** others, const size_t* other_bytes,
                            int n_others) except -1:
    """Adam's state beside a whole-network call, in C (bare ValueError on failure):
    sizes, step >= 1, and no state array overlapping another nor any of `others`."""
    cdef const void* start[3]
    cdef int i, j, count = 3 if vmax != NULL else 2
    cdef size_t nbytes = n_params * s
    if m_len != n_params or v_len != n_params or vmax != NULL and vmax_len != n_params or step < 1:
        raise ValueError
    start[0], start[1], start[2] = m, v, vmax
    for i in range(count):
        for j in range(count):
            if i != j and _overlap(start[i], nbytes, start[j], nbytes, False):
                raise ValueError
        for j in range(n_others):
            if other_bytes[j] and _overlap(start[i], nbytes, others[j], other_bytes[j], False):
                raise ValueError
    return 0


cdef int _net_spans(const _NetArgs* g, const void** start, size_t* nbytes) noexcept:
    """The arrays of g as (address, bytes) spans; returns how many."""
    cdef size_t s = g.itemsize
    cdef int k = 5
    start[0], nbytes[0] = g.X, g.n * g.x_cols * s
    start[1], nbytes[1] = g.params, g.params_len * s
    start[2], nbytes[2] = g.A, g.A_len * s
    start[3], nbytes[3] = g.D, g.D_len * s
    start[4], nbytes[4] = g.grad, g.grad_len * s
    if g.has_labels:
        start[k], nbytes[k] = g.labels, g.labels_len * sizeof(int64_t)
        k += 1
    if g.has_targets:
        start[k], nbytes[k] = g.targets, g.t_rows * g.t_cols * s
        k += 1
    return k


cdef object _adam_step_direct(object X, object labels, object targets, object params, tuple sizes,
                              tuple activations, str loss, str output, object A, object D,
                              object grad, object m, object v, object vmax, long step, double lr,
                              double beta1, double beta2, double eps, double weight_decay,
                              bint decoupled, bint amsgrad, bint maximize,
                              bint column_targets=False):
    """`mlp_adam_step` on plain ndarrays through NumPy's C API (nothing allocated),
    or None for the general path, as `_sgd_step_direct`."""
    cdef _NetArgs g
    cdef int t = _net_args_from_arrays(&g, X, labels, targets, params, A, D, grad, None,
                                       column_targets)
    if t < 0:
        return None
    cdef Py_ssize_t c_sizes[MAX_LAYERS + 1]
    cdef int acts[MAX_LAYERS]
    cdef int loss_code = _net_checks(&g, sizes, activations, loss, output, c_sizes, acts)
    cdef const void* spans[7]
    cdef size_t span_bytes[7]
    cdef int n_spans = _net_spans(&g, spans, span_bytes)
    cdef _Optim o
    if not _adam_direct_optim(&o, t, g.params_len, m, v, vmax, step, lr, beta1, beta2, eps,
                              weight_decay, decoupled, amsgrad, maximize, spans, span_bytes,
                              n_spans):
        return None
    return _run_step(&g, t, &o, len(sizes) - 1, c_sizes, acts, loss_code)


cdef bint _adam_direct_optim(_Optim* o, int t, Py_ssize_t n_params, object m, object v,
                             object vmax, long step, double lr, double beta1, double beta2,
                             double eps, double weight_decay, bint decoupled, bint amsgrad,
                             bint maximize, const void** spans, const size_t* span_bytes,
                             int n_spans) except -1:
    """Adam's state as plain ndarrays of NumPy type t, checked against the call's
    other arrays (`_adam_state_checks`: a bare ValueError on failure), and o filled
    for it; False when the state arrays are not C-contiguous writable arrays of type
    t (the general path then runs)."""
    if not (_c_array(m, t, 1, True) and _c_array(v, t, 1, True)):
        return False
    if amsgrad and not _c_array(vmax, t, 1, True):
        return False
    cdef void* pm = cnp.PyArray_DATA(<cnp.ndarray>m)
    cdef void* pv = cnp.PyArray_DATA(<cnp.ndarray>v)
    cdef void* pvmax = cnp.PyArray_DATA(<cnp.ndarray>vmax) if amsgrad else NULL
    _adam_state_checks(n_params, pm, cnp.PyArray_DIM(<cnp.ndarray>m, 0), pv,
                       cnp.PyArray_DIM(<cnp.ndarray>v, 0), pvmax,
                       cnp.PyArray_DIM(<cnp.ndarray>vmax, 0) if amsgrad else 0,
                       4 if t == cnp.NPY_FLOAT32 else 8, step, spans, span_bytes, n_spans)
    o.adam, o.lr, o.beta1, o.beta2, o.eps = True, lr, beta1, beta2, eps
    o.weight_decay, o.decoupled, o.maximize, o.step = weight_decay, decoupled, maximize, step
    o.m, o.v, o.vmax = pm, pv, pvmax
    return True


def mlp_adam_step(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                  exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False):
    """One Adam (AdamW) training step of a whole network in one call without the
    GIL. See `fastbp.reference.mlp_adam_step`."""
    try:
        if isinstance(step, bool):
            raise TypeError
        result = _adam_step_direct(X, labels, targets, params, tuple(sizes), tuple(activations),
                                   loss, output, A, D, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                   step, lr, beta1, beta2, eps, weight_decay,
                                   decoupled_weight_decay, amsgrad, maximize)
    except (TypeError, ValueError, KeyError, OverflowError):
        result = None
    if result is not None:
        return result
    check_adam_step_call(X, labels, targets, params, sizes, activations, loss, output, A, D, grad,
                         exp_avg, exp_avg_sq, max_exp_avg_sq, step, amsgrad)
    raise ValueError("invalid arguments to mlp_adam_step")


cdef bint _in_unit_interval(object y, object X):
    """y is a C-contiguous array of X's float type with every element in [0, 1]
    (NaN fails): binary cross-entropy's targets, which the network checks (the
    kernels take any). One pass without early exit, so that it vectorises."""
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>X)
    if not _c_array(y, t, cnp.PyArray_NDIM(<cnp.ndarray>y), False):
        return False
    cdef Py_ssize_t i, size = cnp.PyArray_SIZE(<cnp.ndarray>y)
    cdef const float* f
    cdef const double* d
    cdef bint bad = False
    if t == cnp.NPY_FLOAT32:
        f = <const float*>cnp.PyArray_DATA(<cnp.ndarray>y)
        for i in range(size):
            bad |= not (f[i] >= 0 and f[i] <= 1)
    elif t == cnp.NPY_FLOAT64:
        d = <const double*>cnp.PyArray_DATA(<cnp.ndarray>y)
        for i in range(size):
            bad |= not (d[i] >= 0 and d[i] <= 1)
    else:
        return False
    return not bad


def _net_step(net, X, y, o, bint adam):
    """`fastbp.MLP.step`'s common case in one call: `net` and an optimizer `o` it runs
    compiled (SGD, or Adam/AdamW when `adam`), plain ndarrays, a batch of the row count
    the workspace has. What `step` would pass to `mlp_sgd_step` / `mlp_adam_step` is
    read here from net and o, and o's step count advanced (step's Python around a tiny
    step: 1.6 us of 9.3 that way, 1.0 this way). The targets of a one-output network
    may be 1-D, as `step` takes them (the general path cost 10-20 us). Returns the
    loss, or None to send the call down `step`'s general path: when the case is not
    the common one, an argument fails a check, or the step was refused (a non-finite
    loss or gradient: nothing changed, and the general path repeats it to say why)."""
    if type(X) is not cnp.ndarray or type(y) is not cnp.ndarray:
        return None
    if (cnp.PyArray_NDIM(<cnp.ndarray>X) != 2
            or net._workspace_rows != cnp.PyArray_DIM(<cnp.ndarray>X, 0)):
        return None
    loss = net.loss
    if loss == "cross_entropy":
        labels, targets = y, None
    elif loss == "mse" or _in_unit_interval(y, X):
        labels, targets = None, y
    else:  # binary cross-entropy's targets outside [0, 1] (or not X's kind of array)
        return None
    train_acts = net._train_activations
    output = train_acts[len(train_acts) - 1]  # (no negative indices: wraparound is off)
    try:
        if adam:
            result = _adam_step_direct(
                X, labels, targets, net.params, net.sizes, net.activations, loss,
                output, net._A, net._D, net._grad, o.exp_avg, o.exp_avg_sq,
                o.max_exp_avg_sq, o.step_count + 1, o._lr, o.betas[0], o.betas[1], o.eps,
                o.weight_decay, o._decoupled, o.amsgrad, o.maximize, True)
        else:
            result = _sgd_step_direct(
                X, labels, targets, net.params, net.sizes, net.activations, loss,
                output, net._A, net._D, net._grad, o.momentum_buffer, o._lr,
                o.momentum, o.dampening, o.nesterov, o.weight_decay, o.maximize,
                o.step_count == 0, True)
    except (TypeError, ValueError, KeyError, OverflowError):
        return None
    if result is None or result[1]:
        return None
    o.step_count += 1
    return result[0]


def mlp_adam_epoch(X, labels, targets, order, batch_size, params, sizes, activations, loss, output,
                   A, D, grad, X_batch, labels_batch, targets_batch, exp_avg, exp_avg_sq,
                   max_exp_avg_sq, stop, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False):
    """One epoch of mini-batch Adam (AdamW) on a whole network in one call, without
    the GIL but for a signal check after every batch. See
    `fastbp.reference.mlp_adam_epoch`."""
    result = None
    try:
        if not (isinstance(batch_size, bool) or isinstance(step, bool)):
            result = _epoch_direct(True, X, labels, targets, order, batch_size, params,
                                   tuple(sizes), tuple(activations), loss, output, A, D, grad,
                                   X_batch, labels_batch, targets_batch, stop, lr, weight_decay,
                                   maximize, None, 0, 0, False, False, exp_avg, exp_avg_sq,
                                   max_exp_avg_sq, step, beta1, beta2, eps,
                                   decoupled_weight_decay, amsgrad)
    except _Signalled as signalled:
        raise signalled.args[0] from None
    except (TypeError, ValueError, KeyError, OverflowError):
        result = None
    if result is not None:
        return result
    check_adam_epoch_call(X, labels, targets, order, batch_size, params, sizes, activations,
                          loss, output, A, D, grad, X_batch, labels_batch, targets_batch,
                          exp_avg, exp_avg_sq, max_exp_avg_sq, stop, step, amsgrad)
    raise ValueError("invalid arguments to mlp_adam_epoch")

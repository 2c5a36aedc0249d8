/* The products of a dense layer without BLAS, where BLAS is slow at them. First
 * the forward product, Z = X @ W.T: small layers, small batches, and (BLAS on
 * one thread) most layers of up to 2^20 outputs. fbp_tn_takes says where, from
 * measurements.
 *
 * X is (n, n_in) and W is (n_out, n_in), both row-major: every element of Z
 * is a dot product of two contiguous rows ("TN" to a column-major BLAS).
 * OpenBLAS copies both operands into packed panels before it multiplies, and
 * for the small layers of the tiny and digits networks that packing costs
 * about as much as the product: a 32x64 by 64x128 product takes it 10.4 us,
 * against 6.0 us for the same product with W stored transposed. A per-step
 * transpose of W costs what it saves. This kernel packs only W, one panel of
 * columns at a time into a buffer on the stack, and multiplies 8 rows of X
 * (12 for a panel one vector wide) by a panel in registers: 5.2 us for that
 * product, its packing included. On one thread, it runs at 100-135 GFLOP/s
 * on layers of 64 inputs or more (float32, 128 x 784 x 256: 120), against
 * 40-100 for OpenBLAS's one thread; OpenBLAS on two threads beats it on
 * batches of 64 rows or more onto wide outputs, which keep to BLAS. A dense
 * layer's bias, and relu or leaky relu, are applied to the accumulators as
 * they are stored (the same operations as fbp_bias_act's separate pass over Z,
 * so the same bits): 2.4% off a digits-network step.
 *
 * The same kernel makes a layer's two backward products, dW = dZ.T @ X and
 * dX = dZ @ W, where OpenBLAS is slow at them: from 2^20 multiply-adds, where
 * it leaves its path for small matrices and packs both operands into panels,
 * 1.2-2.8x faster on one thread (fbp_gemm_takes_for). Only one operand is
 * packed here, and for these two products by plain copies of its rows.
 *
 * Each element is summed in the order k = 0, 1, ... of the inner dimension by
 * fused multiply-adds, z = fma(x[k], w[k], z) from z = 0. The kernel needs
 * AVX-512 (checked when the module loads); elsewhere fbp_tn_* returns 0 and
 * the caller calls sgemm/dgemm. An AVX2 version of the same kernel, timed on
 * an AVX-512 machine (Zen 4) against OpenBLAS's AVX2 (Haswell) kernels, won on
 * 32-row batches and lost 0.73-0.95x on larger ones, so AVX2 machines keep
 * BLAS.
 */
#ifndef FASTBP_SMALLGEMM_H
#define FASTBP_SMALLGEMM_H

#include <stddef.h>

#include "_pool.h"    /* fastbp's own threads */
#include "_vecmath.h" /* the activation codes */

/* The depth of a packed panel: 128 rows of W (128 x 32 floats, or 128 x 16
 * doubles) are 16 KiB, half of L1. A deeper n_in is packed and multiplied 128
 * at a time, each column's partial sum kept in Z in between (stored and
 * loaded exactly: the same bits as one pass). */
#define FBP_TN_MAX_K 128
/* Rows of X per sweep over the panels: 256 rows of a 128-deep slice of X are
 * 128 KiB (floats), which stay in L2 while every panel of W passes over them. */
#define FBP_TN_SWEEP 256
/* Rows of X per block: 8 with panels of 2 vectors (16 accumulators), 12 with
 * panels of 1, so that enough independent FMAs are in flight. Batches of a
 * multiple of 8 rows leave no short tail block (6 rows left 2 of 32 to a block
 * of 4 accumulators, latency-bound: 8 measured 3-8% faster on 30-128 rows). */
#define FBP_TN_ROWS 8
#define FBP_TN_ROWS1 12

/* 1: the CPU has AVX-512 and the kernel is on where fbp_tn_takes says; 2: on
 * for every shape (tests); 0: BLAS does every product. Set when the module
 * loads (fbp_tn_init); tests and benchmarks switch it. */
static int fbp_tn_on = 0;
/* 1: a weight gradient on the kernel takes SGD's momentum update along
 * (GEMM_SGD below); 0: it is made, then the update applied in a pass of its
 * own. Tests and benchmarks switch it. */
static int fbp_fold_momentum = 1;

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h> /* dladdr, to find BLAS's thread count */
#define FBP_HAVE_DLADDR 1
#endif

/* The number of threads of the BLAS that the caller would otherwise call, read
 * at every product (set_num_threads and threadpoolctl change it at any time):
 * fbp_tn_find_blas_threads finds the library's own getter when the module
 * loads. Without one, fbp_tn_takes assumes a BLAS on several threads. */
static int (*fbp_blas_threads)(void) = NULL;
/* Its setter, found with it for OpenBLAS (the library the pool's calls set to
 * one thread, fbp_threads_enter); NULL for other libraries. */
static void (*fbp_blas_set_threads)(int) = NULL;

/* fn: a function of the library that calls BLAS (SciPy's cython_blas); the
 * getter is looked up in it and the libraries it loaded: OpenBLAS (SciPy's
 * prefixed builds first), MKL, BLIS. 1 if found. (BLIS's getter returns a
 * 64-bit count, read through an int: the same value on x86-64, where the low
 * half of the return register holds it.) */
static int fbp_tn_find_blas_threads(const void *fn)
{
#ifdef FBP_HAVE_DLADDR
    static const char *names[][2] = {
        {"scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"},
        {"scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"},
        {"openblas_get_num_threads", "openblas_set_num_threads"},
        {"openblas_get_num_threads64_", "openblas_set_num_threads64_"},
        {"MKL_Get_Max_Threads", NULL}, {"bli_thread_get_num_threads", NULL}};
    Dl_info info;
    void *lib, *getter = NULL, *setter = NULL;
    if (fn == NULL || !dladdr(fn, &info) || info.dli_fname == NULL)
        return 0;
    lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (lib == NULL)
        return 0;
    for (size_t i = 0; getter == NULL && i < sizeof(names) / sizeof(names[0]); i++) {
        getter = dlsym(lib, names[i][0]);
        setter = getter != NULL && names[i][1] != NULL ? dlsym(lib, names[i][1]) : NULL;
    }
    dlclose(lib); /* (RTLD_NOLOAD: the library stays, loaded by its importer) */
    fbp_blas_threads = (int (*)(void))getter;
    fbp_blas_set_threads = (void (*)(int))setter;
    return getter != NULL;
#else
    (void)fn;
    return 0;
#endif
}

/* Whether this kernel beats BLAS on the shape. It runs on one thread, so the
 * answer depends on BLAS's thread count. Measured on an AVX-512 machine (Intel
 * Cascade Lake, SciPy's OpenBLAS 0.3.30; every product with its bias pass;
 * ratios are BLAS's time over the kernel's):
 * - Everywhere: n_in <= 128 up to 2^22 multiply-adds (1.2-2.2x against BLAS on
 *   two threads); but not a last layer of 16 outputs or fewer on fewer than
 *   128 rows (one partly empty vector per row: 0.74-0.99x on 32 rows).
 * - Deeper inputs, BLAS on several threads: where BLAS cannot use its second
 *   thread well: 17-32 outputs on 32-128 rows (1.1-1.7x), and in float32,
 *   8-32 rows onto 128 outputs or more, up to 2^24 multiply-adds (1.1-2.0x;
 *   float64's panels are half as wide, and dgemm's two threads win there,
 *   0.78-0.92x). On 64 rows or more and wider outputs, BLAS's two threads
 *   win (0.5-0.9x).
 * - Deeper inputs, BLAS on one thread: on 32 rows or more, wherever n_in <= 256,
 *   or there are at most 64 outputs, or few outputs in all (n * n_out <= 32768):
 *   1.1-2.3x; but at most 2^20 outputs in all (4096 x 64 x 1024: 0.67x), and
 *   BLAS's blocking of X wins on deep inputs onto many outputs (512 x 2048 x
 *   256: 0.92x). On 8-31 rows, onto 128 outputs or more: 1.5-3.5x.
 * - Fewer than 8 rows (beyond the first rule): BLAS, whose matrix-vector path
 *   reads W once, where the kernel packs it first (0.3-0.9x).
 * threads: BLAS's thread count (0: unknown, taken as several), or
 * FBP_TN_READ_THREADS to read it now; f64: the product is in float64. */
#define FBP_TN_READ_THREADS (-1)
static inline int fbp_tn_takes_for(ptrdiff_t n, ptrdiff_t n_in, ptrdiff_t n_out, int threads,
                                   int f64)
{
    double mac = (double)n * (double)n_in * (double)n_out, outputs = (double)n * (double)n_out;
    if (n_in < 1 || (n_out <= 16 && n < 128))
        return 0;
    if (n_in <= 128 && mac <= 4194304.0)
        return 1;
    if (n < 8)
        return 0;
    if (threads == FBP_TN_READ_THREADS)
        threads = fbp_blas_threads != NULL ? fbp_blas_threads() : 0;
    if (threads != 1)
        return (!f64 && n <= 32 && n_out >= 128 && mac <= 16777216.0)
               || (n_out <= 32 && n >= 32 && n <= 128);
    if (n < 32)
        return n_out >= 128 && outputs <= 32768.0;
    return outputs <= 1048576.0 && (n_in <= 256 || n_out <= 64 || outputs <= 32768.0);
}

/* The kernel's choice for the next product: the rule above with BLAS's thread
 * count as it is now, or every shape in the tests' mode. */
static inline int fbp_tn_takes(ptrdiff_t n, ptrdiff_t n_in, ptrdiff_t n_out, int f64)
{
    if (fbp_tn_on == 2)
        return n_in >= 1;
    return fbp_tn_takes_for(n, n_in, n_out, FBP_TN_READ_THREADS, f64);
}

/* Whether the kernel beats BLAS on C (M x N) = op(A) @ op(B) over K, in the
 * row-major terms of the module's _gemm ('N' / 'T'). The forward product ('N',
 * 'T') goes by the rule above. A layer's weight gradient dZ.T @ input ('T', 'N';
 * K is the batch) and input gradient dZ @ W ('N', 'N'; M is the batch) go by
 * one rule, measured on an AVX-512 machine (Intel Emerald Rapids, SciPy's
 * OpenBLAS 0.3.30), batches of 8-256 rows, 32-1024 inputs and 10-1024 outputs;
 * ratios are BLAS's time over the kernel's:
 * - Below 2^20 multiply-adds, OpenBLAS's path for small matrices, which packs
 *   nothing, wins or ties (0.5-1.1x). Above it, OpenBLAS packs both operands.
 * - BLAS on one thread: from 2^20 up to 2^26 multiply-adds in float32 (1.2-2.8x,
 *   falling to 1.04-1.15x at 2^26; 0.94x at 2^28, where the kernel's lack of
 *   blocking for L2 shows); in float64 up to 2^24 (1.1-1.6x), and only on
 *   batches of 32 rows or more (0.5-1.0x on 8 for the weight gradient).
 * - BLAS on two threads: float32 from 2^20 to below 2^22 (1.04-2.6x; from 2^22
 *   on, 0.5-1.1x); in float64 dgemm's two threads win or tie nearly everywhere.
 * - On fastbp's own threads (parts: the pool's thread count, BLAS on one thread)
 *   a product is split into parts, and each part must pass the lower bound.
 *   While the pool split small batches' forward products by the batch's rows, a
 *   weight gradient there was kept to batches of 128 rows or more (784-256-128-10
 *   steps with it on the kernel, against BLAS's parts: 0.90x on 32 rows, 0.98x
 *   on 64), since each line of W that the update wrote was first taken from the
 *   other core's cache. Split by the layer's units (fbp_split_by_units), that is
 *   gone, and the kernel takes them from 32 rows too (in-process, 16 rounds,
 *   32-row steps against BLAS's parts: 784-128-10 SGD 1.04x, momentum 1.22x,
 *   Adam 1.16x; 784-256-128-10 1.03x, 1.06x, 0.97x; 784-512-512-10 SGD 1.17x).
 * (TT products do not occur in a layer: BLAS.) */
static inline int fbp_gemm_takes_for(char transa, char transb, ptrdiff_t M, ptrdiff_t N,
                                     ptrdiff_t K, int threads, int f64, int parts)
{
    double mac = (double)M * (double)N * (double)K;
    ptrdiff_t batch = transa == 'T' ? K : M;
    if (transa == 'N' && transb == 'T')
        return fbp_tn_takes_for(M, K, N, threads, f64);
    if (transb != 'N' || mac / (parts > 1 ? parts : 1) < 1048576.0)
        return 0;
    if (threads == FBP_TN_READ_THREADS)
        threads = fbp_blas_threads != NULL ? fbp_blas_threads() : 0;
    if (threads == 1)
        return f64 ? batch >= 32 && mac <= 16777216.0 : mac <= 67108864.0;
    return !f64 && mac < 4194304.0;
}

/* The same for a weight gradient with SGD's momentum update folded in (GEMM_SGD),
 * only on batches that fit one panel of the kernel (K <= FBP_TN_MAX_K: on 256 rows,
 * the partial sums of two panels kept in C, the fold measured 0.956x the product
 * and a pass of its own). Against the product and a pass of its own, in-process,
 * Emerald Rapids: on one thread 784-256-128-10 on 32 rows 1.12x, on 128 rows
 * 1.032x, 784-128-10 on 64 rows 1.040x; on fastbp's own threads (each part's
 * update made by the thread that made it) 784-256-128-10 on 128 rows 1.033x, on
 * 64 rows 1.037x and 1.128x, 784-128-10 on 64 rows 1.032x and 1.042x.
 * Below 2^20 multiply-adds, where OpenBLAS's small-matrix path makes the plain
 * product faster (0.6-1.0x), the fold still wins on one thread where the pass it
 * saves is large beside the product: float32 batches of up to 16 rows onto 64
 * units or more from 2^16 multiply-adds, and of up to 32 rows onto 128 or more from
 * 2^17. In C, Emerald Rapids, against BLAS's product and fbp_sgd's pass, over four
 * sweeps (BLAS on one thread and on two, pinned and not; n x n_in x n_out): 32 x 64
 * x 128 (the digits network's first layer) 0.99-1.21x, 32 x 32 x 128 1.06-1.12x,
 * 32 x 128 x 128 1.02-1.15x, 32 x 32 x 256 1.10-1.20x, 16 x 64 x 64 1.08-1.23x,
 * 16 x 128 x 64 1.04-1.43x, 8 x 32 x 256 1.29-1.48x, 8 x 128 x 64 1.12-1.48x; not
 * 32 rows onto 64 units (32 x 64 x 64 0.94-1.15x, 32 x 128 x 64 0.99-1.14x), fewer
 * units or multiply-adds (32 x 64 x 32 0.93x, 16 x 64 x 32 0.94x, 32 x 128 x 10
 * 0.73x) nor more rows (64 x 64 x 128 1.02x, 128 x 64 x 64 0.96x).
 * A digits-network epoch (64-128-10, 32 rows, momentum): 1.025-1.028x. */
static inline int fbp_gemm_sgd_takes_for(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads,
                                         int f64, int parts)
{
    double mac = (double)M * (double)N * (double)K;
    if (!f64 && parts <= 1 && K <= 32 && M >= (K <= 16 ? 64 : 128) && mac < 1048576.0
        && mac >= (K <= 16 ? 65536.0 : 131072.0))
        return 1;
    return K <= FBP_TN_MAX_K && fbp_gemm_takes_for('T', 'N', M, N, K, threads, f64, parts);
}

/* The kernel's choice for the next backward product: none when it is off, every
 * shape in the tests' mode, else the rule above as things are now. */
static inline int fbp_gemm_takes(char transa, char transb, ptrdiff_t M, ptrdiff_t N,
                                 ptrdiff_t K, int f64)
{
    if (fbp_tn_on != 1)
        return fbp_tn_on == 2 && K >= 1;
    return fbp_gemm_takes_for(transa, transb, M, N, K, FBP_TN_READ_THREADS, f64,
                              fbp_pool_held);
}

/* The kernel's choice for the next folded weight gradient (none when it is off; in
 * the tests' mode, any batch of one panel). */
static inline int fbp_gemm_sgd_takes(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int f64)
{
    if (fbp_tn_on != 1)
        return fbp_tn_on == 2 && K >= 1 && K <= FBP_TN_MAX_K;
    return fbp_gemm_sgd_takes_for(M, N, K, FBP_TN_READ_THREADS, f64, fbp_pool_held);
}

/* Whether products on a batch of `batch` rows, inside a call on fastbp's own
 * threads, are split across them by the layer's units (rows of W: the columns of
 * a forward product, the rows of a weight gradient) rather than by the batch's
 * rows: so that each thread reads and updates the same rows of each W in every
 * step (a line of W read by both cores in the forward product, then written by
 * one in the update, must first be taken from the other core's cache: on a
 * 2-core VM a 16 KB buffer written by one core and read by the other cost 3.6 us
 * against 0.27). In-process, Intel Emerald Rapids, 2 cores, steps split by
 * units against split by the batch's rows (10 rounds; the same bits):
 * - 784-128-10: on 32 rows plain SGD 1.22x, momentum 1.61x (by rows, the pool
 *   had been 1.45x slower than one thread; now 1.14x faster), Adam 1.36x; on 64
 *   rows 1.12x, 1.55x, 1.15x; on 128 rows 1.05x, 1.41x, 1.10x;
 * - 784-256-128-10: on 32 rows 1.15x, 1.56x, 1.22x; on 64 rows 1.09x, 1.57x,
 *   1.18x; on 128 rows 1.12x, 1.32x, 1.17x;
 * - 784-512-512-10 on 128 rows: plain SGD 1.02x, momentum 0.99x;
 * - on 256 rows and more, mixed in an earlier run (0.88-1.12x, and 0.88x for
 *   an identical path in this one): not there. fbp_split_units = 0 switches it
 *   off (tests). */
static int fbp_split_units = 1;

static inline int fbp_split_by_units(ptrdiff_t batch)
{
    return fbp_split_units && batch < 256;
}

/* Where part k of `parts` of range(size) starts (k = parts: size) when a product or
 * a pass is split across the pool: at k * size / parts rounded to the nearest
 * multiple of `unit`. The kernel's parts (NAME##_part) and the module's (its
 * _slice: BLAS's parts, the optimizer passes) cut here alike, so that a layer's
 * units fall to the same thread in every product. */
static inline ptrdiff_t fbp_split_at(ptrdiff_t size, int k, int parts, ptrdiff_t unit)
{
    ptrdiff_t at = (size * k / parts + unit / 2) / unit * unit;
    return k == parts || at > size ? size : at;
}

/* 1: a whole-network call (a step, an epoch, a gradient) runs on fastbp's own
 * threads where fbp_pool_takes says; 2: wherever BLAS has several threads (tests);
 * 0: never. Tests and benchmarks switch it. */
static int fbp_own_threads = 1;
/* Calls that ran on the pool so far (for tests; only the pool's holder counts). */
static long fbp_own_threads_calls = 0;

/* Whether a call on batches of n rows through layers sizes[0] -> ... ->
 * sizes[n_layers] is faster on fastbp's own threads (_pool.h: BLAS on one thread,
 * every product split across the pool) than with BLAS's `threads` threads.
 * Measured on two AVX-512 machines, 2 cores, SciPy's OpenBLAS 0.3.30; steps,
 * float32, plain SGD unless marked:
 * - before the backward products had the kernel (Intel Cascade Lake), the gain
 *   was the forward kernel's, split by rows (128 x 784 x 256: 227-232 us against
 *   327-348 for OpenBLAS's two threads), on batches of 32-128 rows where it took
 *   every deep layer: 784-128-10 on 32-64 rows 1.10-1.26x, 784-256-128-10 on
 *   32-128 rows 1.04-1.30x; 256 rows and more lost (0.90-0.93x);
 * - with the backward products on the kernel too (Intel Emerald Rapids), against
 *   BLAS's threads: 784-256-128-10 on 192 rows 1.14x, on 256 rows 1.07x (with
 *   momentum 1.17x), on 512 rows 1.08x, on 1,024 rows 1.09x; 784-128-10 on 256
 *   rows 1.24x; 784-512-512-10 on 128 rows 1.12x, on 256 rows 1.04x; 784-1024-10
 *   on 256 rows 1.04x; 64-256-256-10 on 256 rows 1.36x; and even: 64-128-10 on
 *   128 rows 1.01x, 64-32-10 on 32 rows 1.00x (products of a few microseconds,
 *   nothing to split), 1024-1024-1024-10 on 256 rows 1.01x and 4096-4096-4096 on
 *   512 rows 1.00x (products of 2^28 multiply-adds and more, where BLAS's own
 *   two threads do as well as two halves);
 * - float64 lost on the first machine (784-256-128-10 on 32 rows 0.84x). With the
 *   backward kernel and products split by units (Emerald Rapids, 8-10 rounds,
 *   against dgemm's two threads): 784-256-128-10 on 128 rows plain SGD
 *   1.17-1.20x, momentum 1.38x, Adam 1.46x, on 64 rows with momentum 1.36x, on
 *   32 rows 1.13x; 784-128-10 on 32 rows 1.16x, on 64 rows 1.26x, on 128 rows
 *   with Adam 1.35x; 300-64-10 on 64 rows 1.48x; 1024-256-10 on 128 rows 1.21x;
 *   784-300-100-10 on 128 rows 1.12x; 784-512-512-10 on 64 rows 1.11x; but
 *   even or worse with a layer above 2^25 multiply-adds (784-400-10 on 128 rows
 *   1.01x, 784-512-512-10 on 128 rows 0.89-0.98x with plain SGD, 1.10x with
 *   momentum) or on more rows (784-256-128-10 on 192 rows 1.01x, on 256 1.00x,
 *   on 512 1.03x, on 1,024 1.00x; 784-1024-10 on 256 1.02x);
 * - so: batches of 32-1,024 rows (float64: up to 128) with a layer of 2^20
 *   multiply-adds or more and none of 2^28 or more (float64: above 2^25). Not
 *   fewer than 32 rows. */
static int fbp_pool_takes(ptrdiff_t n, ptrdiff_t n_layers, const ptrdiff_t *sizes, int f64,
                          int threads)
{
    int big = 0;
    if (fbp_tn_on != 1 || threads < 2 || n < 32 || n > (f64 ? 128 : 1024))
        return 0;
    for (ptrdiff_t l = 0; l < n_layers; l++) {
        double mac = (double)n * (double)sizes[l] * (double)sizes[l + 1];
        if (f64 ? mac > 33554432.0 : mac >= 268435456.0)
            return 0;
        big |= mac >= 1048576.0;
    }
    return big;
}

/* At the start of a whole-network call: when it runs on fastbp's own threads,
 * takes the pool, sets BLAS to one thread and returns its thread count before
 * (for fbp_threads_exit); else 0, and the call runs as before. */
static int fbp_threads_enter(ptrdiff_t n, ptrdiff_t n_layers, const ptrdiff_t *sizes, int f64)
{
    int threads;
    if (!fbp_own_threads || fbp_blas_threads == NULL || fbp_blas_set_threads == NULL)
        return 0;
    threads = fbp_blas_threads();
    if (threads < 2 || (fbp_own_threads == 1 && !fbp_pool_takes(n, n_layers, sizes, f64, threads)))
        return 0;
    if (!fbp_pool_begin(threads))
        return 0;
    fbp_blas_set_threads(1);
    fbp_own_threads_calls++;
    return threads;
}

/* At the end of the call: BLAS's thread count back, and the pool. */
static void fbp_threads_exit(int threads)
{
    if (!threads)
        return;
    fbp_blas_set_threads(threads);
    fbp_pool_end();
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>

/* P[k * pw + jj] = W[jj * n_in + k] for jj < w, and 0 for w <= jj < pw: rows
 * of W into columns of the panel P. Blocks of 8 x 8 floats (4 x 4 doubles)
 * are transposed in registers (a scalar copy cost as much as the product on
 * a 32-row batch; AVX's 256-bit shuffles suffice). Columns of P past W's
 * last row go through the same transposes from a row of zeros: copied one by
 * one, the zero padding compiled to a memset call per row of P, and a last
 * layer of 10 outputs (a panel of 16) took 2.5x as long as one of 16 (32x128
 * by 128x10: 2.8 us against BLAS's 1.2). Shuffles issue on one port only
 * (Intel), so the transposes trade them for loads with 128-bit inserts and for
 * blends, which issue on three: 12 shuffles per 8 x 8 block instead of 24
 * packs 128 x 64 floats in 0.75 us instead of 1.0 (a 32x64 by 64x128 forward
 * product: 5.75 -> 5.26 us). */
/* Columns k .. k + 7 of 8 rows of floats (r[i] + k) to 8 columns of p (pw apart). */
__attribute__((target("avx512f"), always_inline))
static inline void fbp_transpose_block_f32(const float *const *r, ptrdiff_t k, float *p,
                                           ptrdiff_t pw)
{
    /* columns k .. k + 3 of rows i and i + 4 in the low and high 128-bit lanes of
     * one register: the loads with inserts do what a third stage of cross-lane
     * shuffles would */
#define FBP_ROWPAIR(i, c)                                                   \
    _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(r[i] + k + (c))), \
                         _mm_loadu_ps(r[(i) + 4] + k + (c)), 1)
    __m256 r0 = FBP_ROWPAIR(0, 0), r1 = FBP_ROWPAIR(1, 0);
    __m256 r2 = FBP_ROWPAIR(2, 0), r3 = FBP_ROWPAIR(3, 0);
    __m256 r4 = FBP_ROWPAIR(0, 4), r5 = FBP_ROWPAIR(1, 4);
    __m256 r6 = FBP_ROWPAIR(2, 4), r7 = FBP_ROWPAIR(3, 4);
#undef FBP_ROWPAIR
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    /* shuffle(a, b, 0x44) and (a, b, 0xee) through one shuffle and two blends */
    __m256 v0 = _mm256_shuffle_ps(t0, t2, 0x4e), v1 = _mm256_shuffle_ps(t1, t3, 0x4e);
    __m256 v2 = _mm256_shuffle_ps(t4, t6, 0x4e), v3 = _mm256_shuffle_ps(t5, t7, 0x4e);
    _mm256_storeu_ps(p, _mm256_blend_ps(t0, v0, 0xcc));
    _mm256_storeu_ps(p + pw, _mm256_blend_ps(t2, v0, 0x33));
    _mm256_storeu_ps(p + 2 * pw, _mm256_blend_ps(t1, v1, 0xcc));
    _mm256_storeu_ps(p + 3 * pw, _mm256_blend_ps(t3, v1, 0x33));
    _mm256_storeu_ps(p + 4 * pw, _mm256_blend_ps(t4, v2, 0xcc));
    _mm256_storeu_ps(p + 5 * pw, _mm256_blend_ps(t6, v2, 0x33));
    _mm256_storeu_ps(p + 6 * pw, _mm256_blend_ps(t5, v3, 0xcc));
    _mm256_storeu_ps(p + 7 * pw, _mm256_blend_ps(t7, v3, 0x33));
}

/* A 4 x 4 block of doubles, the same way. */
__attribute__((target("avx512f"), always_inline))
static inline void fbp_transpose_block_f64(const double *const *r, ptrdiff_t k, double *p,
                                           ptrdiff_t pw)
{
    /* columns k + c and k + c + 1 of rows i and i + 2, as above */
#define FBP_ROWPAIR(i, c)                                                   \
    _mm256_insertf128_pd(_mm256_castpd128_pd256(_mm_loadu_pd(r[i] + k + (c))), \
                         _mm_loadu_pd(r[(i) + 2] + k + (c)), 1)
    __m256d r0 = FBP_ROWPAIR(0, 0), r1 = FBP_ROWPAIR(1, 0);
    __m256d r2 = FBP_ROWPAIR(0, 2), r3 = FBP_ROWPAIR(1, 2);
#undef FBP_ROWPAIR
    _mm256_storeu_pd(p, _mm256_unpacklo_pd(r0, r1));
    _mm256_storeu_pd(p + pw, _mm256_unpackhi_pd(r0, r1));
    _mm256_storeu_pd(p + 2 * pw, _mm256_unpacklo_pd(r2, r3));
    _mm256_storeu_pd(p + 3 * pw, _mm256_unpackhi_pd(r2, r3));
}

/* Zeros for the rows of a panel past W's last (FBP_TN_MAX_K: a panel's depth). */
static const float fbp_zero_row_f32[FBP_TN_MAX_K] __attribute__((aligned(64)));
static const double fbp_zero_row_f64[FBP_TN_MAX_K] __attribute__((aligned(64)));

/* The packing itself, per dtype: groups of B columns of P (pw is a multiple of B),
 * blocks of B x B through the transposes above, a depth kc not a multiple of B
 * finished one by one. */
#define FBP_DEFINE_PACK(T, S, B)                                                         \
__attribute__((target("avx512f")))                                                       \
static void fbp_pack_##S(const T *W, ptrdiff_t ld, ptrdiff_t kc, ptrdiff_t w, T *P,      \
                         ptrdiff_t pw)                                                   \
{                                                                                        \
    for (ptrdiff_t jj = 0; jj < pw; jj += B) {                                           \
        const T *r[B];                                                                   \
        ptrdiff_t k = 0;                                                                 \
        for (int c = 0; c < B; c++)                                                      \
            r[c] = jj + c < w ? W + (jj + c) * ld : fbp_zero_row_##S;                    \
        for (; k + B <= kc; k += B)                                                      \
            fbp_transpose_block_##S(r, k, P + k * pw + jj, pw);                          \
        for (; k < kc; k++)                                                              \
            for (int c = 0; c < B; c++)                                                  \
                P[k * pw + jj + c] = r[c][k];                                            \
    }                                                                                    \
}

FBP_DEFINE_PACK(float, f32, 8)
FBP_DEFINE_PACK(double, f64, 4)

/* fbp_tn_on = 1 if the CPU has AVX-512 (the kernel's instructions), else 0. */
static int fbp_tn_init(void)
{
    fbp_tn_on = fbp_cpu_avx512();
    return fbp_tn_on;
}

/* One kernel per dtype, called through ENTRY (the forward product, with its bias and
 * activation) and GEMM (any product of the three shapes a layer makes, where
 * fbp_gemm_takes says). V: the vector type, L: its lanes; a panel is 2 vectors wide
 * (PW = 2 L columns). LOAD/SET1/FMA/ZERO: the intrinsics; STORE(p, v, w): the first
 * w lanes of v to p; LOADW(p, w): the first w lanes of p, zeros after; ADD/MAX/MUL
 * and SELGT(v, a): v where v > 0, else a.
 *
 * In row-major terms the kernel makes C (m x n) = alpha * op(A) @ op(B) + beta * C
 * (beta 0 or 1) over an inner dimension of kdim:
 * - op(A)'s element (r, k) is A[r * a_rs + k * a_ks], read one at a time and
 *   broadcast: X of the forward product (a_ks = 1), dZ.T of a weight gradient
 *   (a_rs = 1, dZ read down its columns), dZ of an input gradient;
 * - op(B) is packed into panels: by the transposes above where its columns are
 *   contiguous (W.T of the forward product), by plain copies where its rows are
 *   (the layer's input of a weight gradient, W of an input gradient).
 * Each element is summed in the order k = 0, 1, ..., kdim - 1 by fused multiply-adds
 * from zero; with alpha = 1 and beta = 0 a deep product's partial sums wait in C
 * between panels and go on from there (the same bits as one pass), otherwise each
 * panel's sum is added as alpha * sum + C, as BLAS does with its blocks of k. */
#define FBP_DEFINE_TN(ENTRY, GEMM, GEMM_SGD, NAME, T, V, L, TARGET, LOAD, SET1, FMA, ZERO, \
                      STORE, PACK, LOADW, ADD, SUB, MAX, MUL, SELGT)                     \
/* act(v + bias) as fbp_bias_act does it, one rounding per operation: relu is            \
 * max(0, v), which gives v for NaN and -0 as `v < 0 ? 0 : v` does; leaky relu           \
 * keeps v where v > 0, else v * slope (NaN stays NaN). */                               \
__attribute__((target(TARGET), always_inline))                                           \
static inline V NAME##_finish(V v, V bias, int act, V slope)                             \
{                                                                                        \
    v = ADD(v, bias);                                                                    \
    if (act == FBP_RELU)                                                                 \
        v = MAX(ZERO(), v);                                                              \
    else if (act == FBP_LEAKY_RELU)                                                      \
        v = SELGT(v, MUL(v, slope));                                                     \
    return v;                                                                            \
}                                                                                        \
                                                                                         \
/* Rows k of op(B) (B[k * ld + j]) into the panel P, pw wide, zeros after w columns. */  \
__attribute__((target(TARGET)))                                                          \
static void NAME##_copy(const T *B, ptrdiff_t ld, ptrdiff_t kc, ptrdiff_t w, T *P,       \
                        ptrdiff_t pw)                                                    \
{                                                                                        \
    for (ptrdiff_t k = 0; k < kc; k++) {                                                 \
        STORE(P + k * pw, LOADW(B + k * ld, w < L ? w : L), L);                          \
        if (pw > L)                                                                      \
            STORE(P + k * pw + L, LOADW(B + k * ld + L, w > L ? w - L : 0), L);          \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* A momentum SGD update folded into a weight gradient's product (GEMM_SGD): param   \
 * and buf are laid out as C, which is c; each element of the product, as it would    \
 * be stored, goes instead into buf = buf * momentum + dc * g (buf = g on the first   \
 * step) and param = param - lr * buf, fbp_sgd's operations in its order. */          \
typedef struct {                                                                         \
    const T *c;                                                                          \
    T *param, *buf;                                                                      \
    T lr, momentum, dc;                                                                  \
    int first;                                                                           \
} NAME##_upd;                                                                            \
                                                                                         \
/* R rows of op(A) (element (r, k) at X[r * rs + k * ks]) times kc rows of the panel P,  \
 * into R rows of C (ldc apart), w columns. The sums start from zero, or (init) from     \
 * the partial sums C holds; stored as they are, or with the bias and act when b is not  \
 * NULL, or as alpha * sum + C (add), or alpha * sum; or, when u is not NULL (alpha 1,   \
 * nothing added), not stored but applied as u's update. */                              \
__attribute__((target(TARGET), always_inline))                                           \
static inline void NAME##_rows(const T *X, ptrdiff_t rs, ptrdiff_t ks, ptrdiff_t kc,     \
                               const T *P, T *C, ptrdiff_t ldc, ptrdiff_t w, const int R, \
                               const int NV, int init, int add, T alpha, const T *b,     \
                               int act, T slope, const NAME##_upd *u)                    \
{                                                                                        \
    V a0[FBP_TN_ROWS1], a1[FBP_TN_ROWS1];                                                \
    for (int r = 0; r < R; r++) {                                                        \
        if (!init) {                                                                     \
            a0[r] = ZERO();                                                              \
            a1[r] = ZERO();                                                              \
        } else {                                                                         \
            a0[r] = LOADW(C + r * ldc, w < L ? w : L);                                   \
            a1[r] = NV == 2 ? LOADW(C + r * ldc + L, w - L) : ZERO();                    \
        }                                                                                \
    }                                                                                    \
    /* unrolled: one k per pass issued 29 uops for 16 FMAs, near the 4 per cycle    */   \
    /* the front end allocates; 4 per pass: 5-7% faster (32x64x128: 6.2 -> 5.8 us) */   \
    _Pragma("GCC unroll 4")                                                              \
    for (ptrdiff_t k = 0; k < kc; k++) {                                                 \
        V p0 = LOAD(P + k * NV * L), p1 = NV == 2 ? LOAD(P + k * NV * L + L) : p0;       \
        for (int r = 0; r < R; r++) {                                                    \
            V x = SET1(X[r * rs + k * ks]);                                              \
            a0[r] = FMA(x, p0, a0[r]);                                                   \
            if (NV == 2)                                                                 \
                a1[r] = FMA(x, p1, a1[r]);                                               \
        }                                                                                \
    }                                                                                    \
    if (u != NULL) {                                                                     \
        const ptrdiff_t off = C - u->c;                                                  \
        const V vm = SET1(u->momentum), vdc = SET1(u->dc), vlr = SET1(u->lr);            \
        for (int r = 0; r < R; r++) {                                                    \
            T *pb = u->buf + off + r * ldc, *pp = u->param + off + r * ldc;              \
            for (int h = 0; h < NV; h++) {                                               \
                const ptrdiff_t wh = h == 0 ? (w < L ? w : L) : w - L;                   \
                V g = h == 0 ? a0[r] : a1[r], v = g;                                     \
                if (!u->first)                                                           \
                    v = ADD(MUL(LOADW(pb + h * L, wh), vm), MUL(vdc, g));                \
                STORE(pb + h * L, v, wh);                                                \
                STORE(pp + h * L, SUB(LOADW(pp + h * L, wh), MUL(vlr, v)), wh);          \
            }                                                                            \
        }                                                                                \
        return;                                                                          \
    }                                                                                    \
    if (b != NULL) { /* (with a bias, alpha is 1 and nothing is added: ENTRY) */         \
        V b0 = LOADW(b, w < L ? w : L), b1 = NV == 2 ? LOADW(b + L, w - L) : b0;         \
        V vs = SET1(slope);                                                              \
        for (int r = 0; r < R; r++) {                                                    \
            a0[r] = NAME##_finish(a0[r], b0, act, vs);                                   \
            if (NV == 2)                                                                 \
                a1[r] = NAME##_finish(a1[r], b1, act, vs);                               \
        }                                                                                \
    } else if (add) {                                                                    \
        V va = SET1(alpha);                                                              \
        for (int r = 0; r < R; r++) {                                                    \
            a0[r] = FMA(va, a0[r], LOADW(C + r * ldc, w < L ? w : L));                   \
            if (NV == 2)                                                                 \
                a1[r] = FMA(va, a1[r], LOADW(C + r * ldc + L, w - L));                   \
        }                                                                                \
    } else if (alpha != 1) {                                                             \
        V va = SET1(alpha);                                                              \
        for (int r = 0; r < R; r++) {                                                    \
            a0[r] = MUL(va, a0[r]);                                                      \
            a1[r] = MUL(va, a1[r]);                                                      \
        }                                                                                \
    }                                                                                    \
    for (int r = 0; r < R; r++) {                                                        \
        if (w >= 2 * L) {                                                                \
            STORE(C + r * ldc, a0[r], L);                                                \
            STORE(C + r * ldc + L, a1[r], L);                                            \
        } else if (w > L) {                                                              \
            STORE(C + r * ldc, a0[r], L);                                                \
            STORE(C + r * ldc + L, a1[r], w - L);                                        \
        } else {                                                                         \
            STORE(C + r * ldc, a0[r], w);                                                \
        }                                                                                \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* Rows 0 .. m - 1 of op(A) times one packed panel (NV vectors wide, kc deep) into C's   \
 * columns j0 .. j0 + w - 1 (C and b already offset by j0; X by the panel's first k). */ \
__attribute__((target(TARGET), always_inline))                                           \
static inline void NAME##_panel(const T *X, ptrdiff_t m, ptrdiff_t rs, ptrdiff_t ks,     \
                                ptrdiff_t kc, const T *P, T *C, ptrdiff_t ldc,           \
                                ptrdiff_t w, const int NV, int init, int add, T alpha,   \
                                const T *b, int act, T slope, const NAME##_upd *u)       \
{                                                                                        \
    const int B = NV == 2 ? FBP_TN_ROWS : FBP_TN_ROWS1;                                  \
    ptrdiff_t i = 0;                                                                     \
    /* The common cases first, every flag a constant in NAME##_rows: full-width panels  \
     * of a plain product, of a folded update, of a product added into C (plain SGD's   \
     * fold, W += -lr * dZ.T @ X), and of a relu layer's forward product. With the      \
     * flags read at run time, the accumulators were spilled around the stores: in C    \
     * on one thread (Emerald Rapids, alternating rounds), 32 x 64 x 128 products       \
     * 1.07-1.11x faster this way (forward, weight gradient, folded update), 32 x 64 x  \
     * 32 1.08-1.19x, 32 x 128 x 10 input gradients 1.21x; 1.00-1.04x from 2^22         \
     * multiply-adds. Added into C: 1.03-1.16x over 2^13-2^23 multiply-adds (128 x 784 \
     * x 64, a 784-input layer's, 1.086x). The same operations, so the same bits. */     \
    if (w == NV * L && !init && !add && alpha == 1 && b == NULL) {                       \
        if (u == NULL)                                                                   \
            for (; i + B <= m; i += B)                                                   \
                NAME##_rows(X + i * rs, rs, ks, kc, P, C + i * ldc, ldc, NV * L, B, NV, 0, \
                            0, 1, NULL, FBP_IDENTITY, 0, NULL);                          \
        else                                                                             \
            for (; i + B <= m; i += B)                                                   \
                NAME##_rows(X + i * rs, rs, ks, kc, P, C + i * ldc, ldc, NV * L, B, NV, 0, \
                            0, 1, NULL, FBP_IDENTITY, 0, u);                             \
    } else if (w == NV * L && !init && add && b == NULL && u == NULL) {                  \
        for (; i + B <= m; i += B)                                                       \
            NAME##_rows(X + i * rs, rs, ks, kc, P, C + i * ldc, ldc, NV * L, B, NV, 0, 1, \
                        alpha, NULL, FBP_IDENTITY, 0, NULL);                             \
    } else if (w == NV * L && !init && !add && alpha == 1 && b != NULL                   \
               && act == FBP_RELU) {                                                     \
        for (; i + B <= m; i += B)                                                       \
            NAME##_rows(X + i * rs, rs, ks, kc, P, C + i * ldc, ldc, NV * L, B, NV, 0, 0, \
                        1, b, FBP_RELU, 0, NULL);                                        \
    }                                                                                    \
    for (; i + B <= m; i += B)                                                           \
        NAME##_rows(X + i * rs, rs, ks, kc, P, C + i * ldc, ldc, w, B, NV, init, add,    \
                    alpha, b, act, slope, u);                                            \
    X += i * rs;                                                                         \
    C += i * ldc;                                                                        \
    switch (m - i) {                                                                     \
    /* the rows left, up to 11: one case each, so that R is a constant */                \
    FBP_TN_TAIL(NAME, 11) FBP_TN_TAIL(NAME, 10) FBP_TN_TAIL(NAME, 9)                     \
    FBP_TN_TAIL(NAME, 8) FBP_TN_TAIL(NAME, 7) FBP_TN_TAIL(NAME, 6)                       \
    FBP_TN_TAIL(NAME, 5) FBP_TN_TAIL(NAME, 4) FBP_TN_TAIL(NAME, 3)                       \
    FBP_TN_TAIL(NAME, 2) FBP_TN_TAIL(NAME, 1)                                            \
    default: break;                                                                      \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* One product for NAME##_block, in the terms above. */                                  \
typedef struct {                                                                         \
    const T *A;                                                                          \
    ptrdiff_t a_rs, a_ks;                                                                \
    const T *B;                                                                          \
    ptrdiff_t ldb;                                                                       \
    int b_rows; /* 1: op(B)[k, j] = B[k * ldb + j]; 0: B[j * ldb + k] */                 \
    T *C;                                                                                \
    ptrdiff_t ldc, m, n, kdim;                                                           \
    T alpha;                                                                             \
    int beta;                                                                            \
    const T *b; /* a forward product's bias (alpha 1, beta 0), or NULL */                \
    int act;                                                                             \
    T slope;                                                                             \
    const NAME##_upd *u; /* a folded update (alpha 1, beta 0), or NULL */                \
} NAME##_job;                                                                            \
                                                                                         \
/* Rows r0 .. r1 - 1 and columns c0 .. c1 - 1 of C, FBP_TN_SWEEP rows of op(A) at a      \
 * time: panels of 2 vectors (of 1 for a last panel of L columns or fewer), each packed  \
 * FBP_TN_MAX_K rows of op(B) at a time. */                                              \
__attribute__((target(TARGET)))                                                          \
static void NAME##_block(const NAME##_job *job, ptrdiff_t r0, ptrdiff_t r1, ptrdiff_t c0,  \
                         ptrdiff_t c1)                                                   \
{                                                                                        \
    T P[FBP_TN_MAX_K * 2 * L] __attribute__((aligned(64)));                              \
    const NAME##_job Q = *job, *q = &Q; /* (a copy: C's stores cannot alias it) */      \
    const int cont = q->alpha == 1 && !q->beta; /* partial sums go on in C */            \
    for (ptrdiff_t i0 = r0; i0 < r1; i0 += FBP_TN_SWEEP) {                               \
        ptrdiff_t m = r1 - i0 < FBP_TN_SWEEP ? r1 - i0 : FBP_TN_SWEEP;                   \
        const T *Xs = q->A + i0 * q->a_rs;                                               \
        T *Cs = q->C + i0 * q->ldc;                                                      \
        for (ptrdiff_t j = c0; j < c1; j += 2 * L) {                                     \
            ptrdiff_t w = c1 - j < 2 * L ? c1 - j : 2 * L;                               \
            int nv = w > L ? 2 : 1;                                                      \
            for (ptrdiff_t k0 = 0; k0 < q->kdim; k0 += FBP_TN_MAX_K) {                   \
                ptrdiff_t kc = q->kdim - k0 < FBP_TN_MAX_K ? q->kdim - k0 : FBP_TN_MAX_K; \
                const T *bias = q->b != NULL && k0 + kc == q->kdim ? q->b + j : NULL;    \
                /* (a folded update: the partial sums of a deep product wait in C) */    \
                const NAME##_upd *u = k0 + kc == q->kdim ? q->u : NULL;                  \
                int init = cont && k0 > 0, add = !cont && (k0 > 0 || q->beta);           \
                if (q->b_rows)                                                           \
                    NAME##_copy(q->B + k0 * q->ldb + j, q->ldb, kc, w, P, nv * L);       \
                else                                                                     \
                    PACK(q->B + j * q->ldb + k0, q->ldb, kc, w, P, nv * L);              \
                /* op(A) is read along its rows (a_ks = 1) or its columns (a_rs = 1): */ \
                /* each with its stride a constant (a variable one: 1-3% slower) */      \
                if (nv == 2 && q->a_ks == 1)                                             \
                    NAME##_panel(Xs + k0, m, q->a_rs, 1, kc, P, Cs + j, q->ldc, w, 2,    \
                                 init, add, q->alpha, bias, q->act, q->slope, u);        \
                else if (nv == 2)                                                        \
                    NAME##_panel(Xs + k0 * q->a_ks, m, 1, q->a_ks, kc, P, Cs + j, q->ldc, \
                                 w, 2, init, add, q->alpha, bias, q->act, q->slope, u);  \
                else if (q->a_ks == 1)                                                   \
                    NAME##_panel(Xs + k0, m, q->a_rs, 1, kc, P, Cs + j, q->ldc, w, 1,    \
                                 init, add, q->alpha, bias, q->act, q->slope, u);        \
                else                                                                     \
                    NAME##_panel(Xs + k0 * q->a_ks, m, 1, q->a_ks, kc, P, Cs + j, q->ldc, \
                                 w, 1, init, add, q->alpha, bias, q->act, q->slope, u);  \
            }                                                                            \
        }                                                                                \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* A product split across fastbp's pool (_pool.h), by rows of C or by its columns        \
 * (FBP_SPLIT_BY_ROWS), cut by fbp_split_at at multiples of FBP_SPLIT_UNIT. Each element \
 * is the same FMA chain as on one thread, so the same bits. */                          \
static void NAME##_part(void *arg, int part, int parts)                                  \
{                                                                                        \
    const NAME##_job *q = (const NAME##_job *)arg;                                       \
    const ptrdiff_t by_rows = FBP_SPLIT_BY_ROWS(q), size = by_rows ? q->m : q->n;        \
    const ptrdiff_t unit = FBP_SPLIT_UNIT(q, by_rows, L);                                \
    const ptrdiff_t lo = fbp_split_at(size, part, parts, unit);                          \
    const ptrdiff_t hi = fbp_split_at(size, part + 1, parts, unit);                      \
    if (lo >= hi)                                                                        \
        return;                                                                          \
    if (by_rows)                                                                         \
        NAME##_block(q, lo, hi, 0, q->n);                                                \
    else                                                                                 \
        NAME##_block(q, 0, q->m, lo, hi);                                                \
}                                                                                        \
                                                                                         \
/* The job on this thread, or across the pool when this call holds it and the product   \
 * is large enough to split (2^18 multiply-adds). */                                     \
static void NAME##_run(NAME##_job *q)                                                    \
{                                                                                        \
    const ptrdiff_t by_rows = FBP_SPLIT_BY_ROWS(q);                                      \
    ptrdiff_t units = (by_rows ? q->m : q->n) / FBP_SPLIT_UNIT(q, by_rows, L);           \
    if (fbp_pool_held >= 2 && units >= 2                                                 \
        && (double)q->m * q->n * q->kdim >= 262144.0) {                                  \
        fbp_pool_run(NAME##_part, q, units < fbp_pool_held ? (int)units : fbp_pool_held); \
        return;                                                                          \
    }                                                                                    \
    NAME##_block(q, 0, q->m, 0, q->n);                                                   \
}                                                                                        \
                                                                                         \
/* Z = X @ W.T into Z (n, n_out), then Z[i, j] = act(Z[i, j] + b[j]) when b is not       \
 * NULL (act: FBP_IDENTITY, FBP_RELU or FBP_LEAKY_RELU with its slope; the same bits     \
 * as fbp_bias_act after the product); 1 if done, 0 if the caller must use BLAS. */      \
static int ENTRY(const T *X, const T *W, T *Z, ptrdiff_t n, ptrdiff_t n_in,              \
                 ptrdiff_t n_out, const T *b, int act, T slope)                          \
{                                                                                        \
    NAME##_job q = {X, n_in, 1, W, n_in, 0, Z, n_out, n, n_out, n_in, 1, 0, b,           \
                    b == NULL ? FBP_IDENTITY : act, slope, NULL};                        \
    if (!fbp_tn_on || !fbp_tn_takes(n, n_in, n_out, sizeof(T) == 8))                     \
        return 0;                                                                        \
    NAME##_run(&q);                                                                      \
    return 1;                                                                            \
}                                                                                        \
                                                                                         \
/* C (M x N) = alpha * op(A) @ op(B) + beta * C, row-major, op given by 'N' / 'T' (the   \
 * arguments of the module's _gemm), where fbp_gemm_takes says and beta is 0 or 1;       \
 * 1 if done, 0 if the caller must use BLAS. */                                          \
static int GEMM(char transa, char transb, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, T alpha, \
                const T *A, ptrdiff_t lda, const T *B, ptrdiff_t ldb, T beta, T *C,      \
                ptrdiff_t ldc)                                                           \
{                                                                                        \
    NAME##_job q = {A, transa == 'N' ? lda : 1, transa == 'N' ? 1 : lda, B, ldb,         \
                    transb == 'N', C, ldc, M, N, K, alpha, beta != 0, NULL,              \
                    FBP_IDENTITY, 0, NULL};                                              \
    if (M < 1 || N < 1 || K < 1 || (beta != 0 && beta != 1)                              \
        || !fbp_gemm_takes(transa, transb, M, N, K, sizeof(T) == 8))                     \
        return 0;                                                                        \
    NAME##_run(&q);                                                                      \
    return 1;                                                                            \
}                                                                                        \
                                                                                         \
/* A layer's weight gradient dW = dZ.T @ X (dZ (K x M), X (K x N), row-major, as GEMM's  \
 * 'T', 'N') with torch.optim.SGD's momentum update folded in: param and buf (M x N,    \
 * ldc apart, as dW) become buf = buf * momentum + dc * dW (buf = dW when first) and    \
 * param - lr * buf, the same bits as fbp_sgd after the product; C is scratch for the   \
 * partial sums of a batch deeper than a panel. Where fbp_gemm_takes says; 1 if done,   \
 * 0 if the caller must make the gradient and update apart. */                          \
static int GEMM_SGD(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const T *A, ptrdiff_t lda,     \
                    const T *B, ptrdiff_t ldb, T *C, ptrdiff_t ldc, T *param, T *buf,    \
                    T lr, T momentum, T dc, int first)                                   \
{                                                                                        \
    NAME##_upd u = {C, param, buf, lr, momentum, dc, first};                             \
    NAME##_job q = {A, 1, lda, B, ldb, 1, C, ldc, M, N, K, 1, 0, NULL, FBP_IDENTITY, 0,   \
                    &u};                                                                 \
    if (!fbp_fold_momentum || M < 1 || N < 1 || K < 1                                    \
        || !fbp_gemm_sgd_takes(M, N, K, sizeof(T) == 8))                                 \
        return 0;                                                                        \
    NAME##_run(&q);                                                                      \
    return 1;                                                                            \
}

/* Whether a product split across the pool is split by rows of C, else by its columns
 * (cut at FBP_SPLIT_UNIT): NAME##_run counts the parts and NAME##_part cuts them. A
 * forward product (op(B) = W.T: C's columns are the layer's units) goes by
 * fbp_split_by_units; the others by rows where C has 16 or more (a weight
 * gradient's rows are the layer's units too). */
#define FBP_SPLIT_BY_ROWS(q) ((q)->m >= 16 && ((q)->b_rows || !fbp_split_by_units((q)->m)))

/* Where a split product's parts are cut (multiples of this many rows or columns): a
 * layer's units (the columns of a forward product, the rows of a weight gradient,
 * op(A) = dZ.T) at whole vectors (L elements), so that both products cut W's rows
 * in the same places, and BLAS's parts of them too (the module's _slice cuts at
 * whole cache lines: 16 floats, 8 doubles), and a layer of 200 units splits
 * 96 / 104 (at panels of 2 L, rounded up: 128 / 72); a batch's rows at blocks of 8. */
#define FBP_SPLIT_UNIT(q, by_rows, L) (!(by_rows) || ((q)->b_rows && (q)->a_rs == 1) ? (L) : 8)

/* One case of NAME##_panel's switch. */
#define FBP_TN_TAIL(NAME, R)                                                             \
    case R:                                                                              \
        NAME##_rows(X, rs, ks, kc, P, C, ldc, w, R, NV, init, add, alpha, b, act, slope, \
                    u);                                                                  \
        break;

#define FBP_STORE512_PS(p, v, w) _mm512_mask_storeu_ps((p), (__mmask16)((1u << (w)) - 1u), (v))
#define FBP_STORE512_PD(p, v, w) _mm512_mask_storeu_pd((p), (__mmask8)((1u << (w)) - 1u), (v))
#define FBP_LOADW512_PS(p, w) _mm512_maskz_loadu_ps((__mmask16)((1u << (w)) - 1u), (p))
#define FBP_LOADW512_PD(p, w) _mm512_maskz_loadu_pd((__mmask8)((1u << (w)) - 1u), (p))
#define FBP_SELGT512_PS(v, a)                                                            \
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask((v), _mm512_setzero_ps(), _CMP_GT_OQ), (a), (v))
#define FBP_SELGT512_PD(v, a)                                                            \
    _mm512_mask_blend_pd(_mm512_cmp_pd_mask((v), _mm512_setzero_pd(), _CMP_GT_OQ), (a), (v))

FBP_DEFINE_TN(fbp_tn_f32, fbp_gemm_f32, fbp_gemm_sgd_f32, fbp_tn512_f32, float, __m512, 16,
              "avx512f", _mm512_load_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_setzero_ps,
              FBP_STORE512_PS, fbp_pack_f32, FBP_LOADW512_PS, _mm512_add_ps, _mm512_sub_ps,
              _mm512_max_ps, _mm512_mul_ps, FBP_SELGT512_PS)
FBP_DEFINE_TN(fbp_tn_f64, fbp_gemm_f64, fbp_gemm_sgd_f64, fbp_tn512_f64, double, __m512d, 8,
              "avx512f", _mm512_load_pd, _mm512_set1_pd, _mm512_fmadd_pd, _mm512_setzero_pd,
              FBP_STORE512_PD, fbp_pack_f64, FBP_LOADW512_PD, _mm512_add_pd, _mm512_sub_pd,
              _mm512_max_pd, _mm512_mul_pd, FBP_SELGT512_PD)
#else /* not x86-64 with GCC or clang: BLAS does every product */

static int fbp_tn_init(void) { return 0; }
static int fbp_tn_f32(const float *X, const float *W, float *Z, ptrdiff_t n,
                      ptrdiff_t n_in, ptrdiff_t n_out, const float *b, int act, float slope)
{ return 0; }
static int fbp_tn_f64(const double *X, const double *W, double *Z, ptrdiff_t n,
                      ptrdiff_t n_in, ptrdiff_t n_out, const double *b, int act, double slope)
{ return 0; }
static int fbp_gemm_f32(char transa, char transb, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,
                        float alpha, const float *A, ptrdiff_t lda, const float *B,
                        ptrdiff_t ldb, float beta, float *C, ptrdiff_t ldc)
{ return 0; }
static int fbp_gemm_f64(char transa, char transb, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K,
                        double alpha, const double *A, ptrdiff_t lda, const double *B,
                        ptrdiff_t ldb, double beta, double *C, ptrdiff_t ldc)
{ return 0; }
static int fbp_gemm_sgd_f32(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const float *A, ptrdiff_t lda,
                            const float *B, ptrdiff_t ldb, float *C, ptrdiff_t ldc, float *param,
                            float *buf, float lr, float momentum, float dc, int first)
{ return 0; }
static int fbp_gemm_sgd_f64(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const double *A,
                            ptrdiff_t lda, const double *B, ptrdiff_t ldb, double *C,
                            ptrdiff_t ldc, double *param, double *buf, double lr,
                            double momentum, double dc, int first)
{ return 0; }

#endif
#endif

/* Elementwise loops of fastbp's kernels that need what the portable x86-64
 * baseline (SSE2) lacks: a vectorisable exp, and wide integer and float
 * vectors.
 *
 * Why C and not Cython: GCC's target_clones attribute compiles a function
 * once per instruction-set level (AVX-512, AVX2, baseline) and picks the
 * clone once, when the module loads, from what the CPU has. Cython has no way
 * to put an attribute on the functions it writes, so the loops that gain
 * from 4 to 16 lanes live here, each behind one plain C call from
 * _kernels.pyx.
 *
 * Exactness: the module is built with -ffp-contract=off, so no clone fuses a
 * multiply and an add into an FMA: every clone rounds every operation as the
 * baseline does, and results are the same bits on every x86-64 machine.
 * Every exp in the kernels is fastbp's own (not libm's, whose results and
 * speed vary with the C library): fbp_expf is within 1.22 ulp of exp over
 * every float32 with a normal result (checked exhaustively), fbp_exp within
 * 1.17 ulp over 41 million float64 samples of its whole range; both give
 * exp(-inf) = 0, exp(inf) = inf, correct overflow and subnormals, and pass
 * NaN through.
 */
#ifndef FASTBP_VECMATH_H
#define FASTBP_VECMATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ifunc resolvers (what target_clones builds on) need GCC and glibc. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__GLIBC__) && !defined(FASTBP_NO_CLONES)
#define FBP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FBP_CLONES
#endif

static inline uint32_t fbp_bits_f32(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float fbp_f32_bits(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static inline uint64_t fbp_bits_f64(double x) { uint64_t u; memcpy(&u, &x, 8); return u; }
static inline double fbp_f64_bits(uint64_t u) { double x; memcpy(&x, &u, 8); return x; }

/* exp(x) in float32, branch-free so that loops over it vectorise.
 * x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite: k ln2_hi is exact), e^r by its
 * Taylor polynomial of degree 7 (truncation below 0.1 ulp), times 2^k built
 * from bits in two factors so that results in the subnormal range round once
 * and results past FLT_MAX become inf. Clamping x to [-104, 89] first keeps k
 * small (exp(-104) rounds to 0, exp(89) overflows) and lets NaN through: a
 * comparison with NaN is false. */
static inline float fbp_expf(float x)
{
    const float shift = 0x1.8p23f; /* adding it rounds to an integer */
    x = x > 89.0f ? 89.0f : x;
    x = x < -104.0f ? -104.0f : x;
    float t = x * 0x1.715476p+0f + shift;
    float k = t - shift;
    int32_t ki = (int32_t)(fbp_bits_f32(t) - fbp_bits_f32(shift));
    float r = x - k * 0x1.62e400p-1f;
    r = r - k * 0x1.7f7d1cp-20f;
    float p = (float)(1.0 / 5040);
    p = (float)(1.0 / 720) + r * p;
    p = (float)(1.0 / 120) + r * p;
    p = (float)(1.0 / 24) + r * p;
    p = (float)(1.0 / 6) + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    int32_t k1 = ki >> 1, k2 = ki - k1;
    float s1 = fbp_f32_bits((uint32_t)(k1 + 127) << 23);
    float s2 = fbp_f32_bits((uint32_t)(k2 + 127) << 23);
    return p * s1 * s2;
}

/* exp(x) in float64, the same way: k ln2_hi exact for |k| < 2^20 (fdlibm's
 * split of ln2), the Taylor polynomial of degree 13 (truncation below 0.04
 * ulp), 2^k in two factors; x clamped to [-746, 710] (exp(-746) rounds to 0,
 * exp(710) overflows). */
static inline double fbp_exp(double x)
{
    const double shift = 0x1.8p52;
    x = x > 710.0 ? 710.0 : x;
    x = x < -746.0 ? -746.0 : x;
    double t = x * 0x1.71547652b82fep+0 + shift;
    double k = t - shift;
    int64_t ki = (int64_t)(fbp_bits_f64(t) - fbp_bits_f64(shift));
    double r = x - k * 0x1.62e42feep-1;
    r = r - k * 0x1.a39ef35793c76p-33;
    double p = 1.0 / 6227020800.0;
    p = 1.0 / 479001600.0 + r * p;
    p = 1.0 / 39916800.0 + r * p;
    p = 1.0 / 3628800.0 + r * p;
    p = 1.0 / 362880.0 + r * p;
    p = 1.0 / 40320.0 + r * p;
    p = 1.0 / 5040.0 + r * p;
    p = 1.0 / 720.0 + r * p;
    p = 1.0 / 120.0 + r * p;
    p = 1.0 / 24.0 + r * p;
    p = 1.0 / 6.0 + r * p;
    p = 0.5 + r * p;
    p = 1.0 + r * p;
    p = 1.0 + r * p;
    int64_t k1 = ki >> 1, k2 = ki - k1;
    double s1 = fbp_f64_bits((uint64_t)(k1 + 1023) << 52);
    double s2 = fbp_f64_bits((uint64_t)(k2 + 1023) << 52);
    return p * s1 * s2;
}

/* x[i] = exp(x[i]) in place; sigmoid(z): 1 / (1 + e) for z >= 0, e / (1 + e)
 * below, with e = exp(-|z|), which never overflows (chosen by a select, not a
 * branch); z[i] = sigmoid(z[i]) in place. */
#define FBP_DEFINE_EXP_LOOPS(T, S, EXP)                                                  \
FBP_CLONES static void fbp_exp_##S(T *x, ptrdiff_t n)                                   \
{                                                                                        \
    for (ptrdiff_t i = 0; i < n; i++)                                                    \
        x[i] = EXP(x[i]);                                                                \
}                                                                                        \
                                                                                         \
static inline T fbp_sigmoid1_##S(T v)                                                    \
{                                                                                        \
    T e = EXP(v >= 0 ? -v : v);                                                          \
    T r = (T)1 / ((T)1 + e);                                                             \
    return v >= 0 ? r : e * r;                                                           \
}                                                                                        \
                                                                                         \
FBP_CLONES static void fbp_sigmoid_##S(T *z, ptrdiff_t n)                               \
{                                                                                        \
    for (ptrdiff_t i = 0; i < n; i++)                                                    \
        z[i] = fbp_sigmoid1_##S(z[i]);                                                   \
}

/* Row-wise softmax of Z (n, k) into out (which may be Z): every row shifted by
 * its max, exp'd, summed left to right and divided by its sum. Rows of up to
 * 16 classes go through blocks of 16 rows transposed on the stack, so that
 * every step runs across 16 rows at once; wider rows get one vectorised exp
 * over the block, then 4 rows' sums at a time (their chains of additions
 * overlap) and a row divided a vector at a time. Both orders of operations
 * within a row are the same, and so are the bits. When lse is not NULL,
 * lse[i] = log(sum(exp(Z[i]))) (libm's log, once per row). */
#define FBP_SOFTMAX_NARROW 16
#define FBP_DEFINE_SOFTMAX(T, S, LOG, EXPF)                                                 \
/* Rows z[0 .. R-1] of k <= 16 classes into the columns of t (t[j][r]; rows R..15           \
 * zero), then m[r] = the row's max, t = exp(t - m) and s[r] = the row's sum, left         \
 * to right: every step runs across 16 rows at once. */                                  \
static inline void fbp_softmax_block_##S(const T *z, int R, int k, T t[][16], T *m,      \
                                         T *s)                                           \
{                                                                                        \
    if (R == 16) {                                                                       \
        for (int j = 0; j < k; j++)                                                      \
            for (int r = 0; r < 16; r++)                                                 \
                t[j][r] = z[r * k + j];                                                  \
    } else {                                                                             \
        for (int j = 0; j < k; j++)                                                      \
            for (int r = 0; r < 16; r++)                                                 \
                t[j][r] = r < R ? z[r * k + j] : 0;                                      \
    }                                                                                    \
    for (int r = 0; r < 16; r++)                                                         \
        m[r] = t[0][r];                                                                  \
    for (int j = 1; j < k; j++)                                                          \
        for (int r = 0; r < 16; r++)                                                     \
            m[r] = t[j][r] > m[r] ? t[j][r] : m[r];                                      \
    for (int j = 0; j < k; j++)                                                          \
        for (int r = 0; r < 16; r++)                                                     \
            t[j][r] = EXPF(t[j][r] - m[r]);                                              \
    for (int r = 0; r < 16; r++)                                                         \
        s[r] = 0;                                                                        \
    for (int j = 0; j < k; j++)                                                          \
        for (int r = 0; r < 16; r++)                                                     \
            s[r] += t[j][r];                                                             \
}                                                                                        \
                                                                                         \
/* The first R columns of t back into rows of o (R x k). */                             \
static inline void fbp_softmax_unblock_##S(T t[][16], T *o, int R, int k)               \
{                                                                                        \
    if (R == 16) {                                                                       \
        for (int j = 0; j < k; j++)                                                      \
            for (int r = 0; r < 16; r++)                                                 \
                o[r * k + j] = t[j][r];                                                  \
    } else {                                                                             \
        for (int r = 0; r < R; r++)                                                      \
            for (int j = 0; j < k; j++)                                                  \
                o[r * k + j] = t[j][r];                                                  \
    }                                                                                    \
}                                                                                        \
                                                                                         \
FBP_CLONES static void fbp_softmax_rows_##S(const T *Z, T *out, ptrdiff_t n, ptrdiff_t k,  \
                                            T *lse)                                      \
{                                                                                        \
    if (k <= FBP_SOFTMAX_NARROW) {                                                       \
        T t[FBP_SOFTMAX_NARROW][16], m[16], s[16];                                       \
        for (ptrdiff_t i0 = 0; i0 < n; i0 += 16) {                                       \
            int R = n - i0 < 16 ? (int)(n - i0) : 16;                                    \
            fbp_softmax_block_##S(Z + i0 * k, R, (int)k, t, m, s);                       \
            for (int j = 0; j < (int)k; j++)                                             \
                for (int r = 0; r < 16; r++)                                             \
                    t[j][r] = t[j][r] / s[r];                                            \
            fbp_softmax_unblock_##S(t, out + i0 * k, R, (int)k);                         \
            if (lse != NULL)                                                             \
                for (int r = 0; r < R; r++)                                              \
                    lse[i0 + r] = LOG(s[r]) + m[r];                                      \
        }                                                                                \
        return;                                                                          \
    }                                                                                    \
    for (ptrdiff_t i = 0; i < n; i++) {                                                  \
        const T *z = Z + i * k;                                                          \
        T *o = out + i * k;                                                              \
        T m = z[0];                                                                      \
        for (ptrdiff_t j = 1; j < k; j++)                                                \
            m = z[j] > m ? z[j] : m;                                                     \
        for (ptrdiff_t j = 0; j < k; j++)                                                \
            o[j] = z[j] - m;                                                             \
        if (lse != NULL)                                                                 \
            lse[i] = m;                                                                  \
    }                                                                                    \
    fbp_exp_##S(out, n * k);                                                             \
    ptrdiff_t i = 0;                                                                     \
    for (; i + 4 <= n; i += 4) {                                                         \
        T *o = out + i * k;                                                              \
        T s[4] = {0, 0, 0, 0};                                                           \
        for (ptrdiff_t j = 0; j < k; j++)                                                \
            for (int r = 0; r < 4; r++)                                                  \
                s[r] += o[r * k + j];                                                    \
        for (int r = 0; r < 4; r++) {                                                    \
            for (ptrdiff_t j = 0; j < k; j++)                                            \
                o[r * k + j] = o[r * k + j] / s[r];                                      \
            if (lse != NULL)                                                             \
                lse[i + r] = LOG(s[r]) + lse[i + r];                                     \
        }                                                                                \
    }                                                                                    \
    for (; i < n; i++) {                                                                 \
        T *o = out + i * k, s = 0;                                                       \
        for (ptrdiff_t j = 0; j < k; j++)                                                \
            s += o[j];                                                                   \
        for (ptrdiff_t j = 0; j < k; j++)                                                \
            o[j] = o[j] / s;                                                             \
        if (lse != NULL)                                                                 \
            lse[i] = LOG(s) + lse[i];                                                    \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* Softmax cross-entropy of rows of up to 16 classes (k <= FBP_SOFTMAX_NARROW) and       \
 * its gradient, in one pass over blocks of 16 rows transposed as above: dZ (which       \
 * may be Z) = (softmax(Z) - onehot(y)) * scale, and the return value is the sum over    \
 * rows, in their order and in double, of lse - Z[i, y[i]] rounded to T. The same       \
 * operations in the same order as fbp_softmax_rows followed by _kernels.pyx's           \
 * _cross_entropy_loop (the same bits); fused, a 32 x 10 batch takes 1.2 us against     \
 * 1.5, 128 x 10 4.6 us against 6.0. Labels must be valid (0 <= y[i] < k). On CPUs       \
 * with AVX-512, fbp_softmax_xent_##S runs the version below instead. */                \
FBP_CLONES static double fbp_softmax_xent_any_##S(const T *Z, const int64_t *y, T *dZ,  \
                                                  ptrdiff_t n, ptrdiff_t k, T scale)     \
{                                                                                        \
    T t[FBP_SOFTMAX_NARROW][16], m[16], s[16], zy[16];                                   \
    int yy[16], kk = (int)k;                                                             \
    double total = 0;                                                                    \
    for (ptrdiff_t i0 = 0; i0 < n; i0 += 16) {                                           \
        int R = n - i0 < 16 ? (int)(n - i0) : 16;                                        \
        const T *z = Z + i0 * k;                                                         \
        for (int r = 0; r < 16; r++)                                                     \
            yy[r] = r < R ? (int)y[i0 + r] : 0;                                          \
        for (int r = 0; r < R; r++) /* before dZ (which may be Z) is written */          \
            zy[r] = z[r * k + yy[r]];                                                    \
        fbp_softmax_block_##S(z, R, kk, t, m, s);                                        \
        for (int j = 0; j < kk; j++)                                                     \
            for (int r = 0; r < 16; r++) {                                               \
                T q = t[j][r] / s[r];                                                    \
                q = yy[r] == j ? q - 1 : q;                                              \
                t[j][r] = q * scale;                                                     \
            }                                                                            \
        fbp_softmax_unblock_##S(t, dZ + i0 * k, R, kk);                                  \
        for (int r = 0; r < R; r++)                                                      \
            total += (double)((LOG(s[r]) + m[r]) - zy[r]);                               \
    }                                                                                    \
    return total;                                                                        \
}

FBP_DEFINE_EXP_LOOPS(float, f32, fbp_expf)
FBP_DEFINE_EXP_LOOPS(double, f64, fbp_exp)
FBP_DEFINE_SOFTMAX(float, f32, logf, fbp_expf)
FBP_DEFINE_SOFTMAX(double, f64, log, fbp_exp)

/* 1: fbp_softmax_xent_* runs its AVX-512 version below (the CPU has AVX-512, read
 * when the module loads by fbp_vec512_init); 0: the version above. Tests switch it. */
static int fbp_vec512_on = 0;

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define FBP_HAVE_VEC512 1

/* Whether the CPU (and the OS's saving of its registers) has AVX-512F, which every
 * AVX-512 kernel here and in _smallgemm.h needs; read when the module loads. */
static int fbp_cpu_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? 1 : 0;
}

/* fbp_expf and fbp_exp on AVX-512 vectors: the same operations in the same order
 * (no FMA), so the same bits in every lane. min(c, x) is x > c ? c : x and max(c, x)
 * is x < c ? c : x, NaN passing through as in the scalar selects. */
__attribute__((target("avx512f"), always_inline))
static inline __m512 fbp_expf_v16(__m512 x)
{
    const __m512 shift = _mm512_set1_ps(0x1.8p23f);
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    __m512 t = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(0x1.715476p+0f)), shift);
    __m512 k = _mm512_sub_ps(t, shift);
    __m512i ki = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(shift));
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(k, _mm512_set1_ps(0x1.62e400p-1f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(k, _mm512_set1_ps(0x1.7f7d1cp-20f)));
    static const float c[7] = {(float)(1.0 / 720), (float)(1.0 / 120), (float)(1.0 / 24),
                               (float)(1.0 / 6), 0.5f, 1.0f, 1.0f};
    __m512 p = _mm512_set1_ps((float)(1.0 / 5040));
    for (int i = 0; i < 7; i++)
        p = _mm512_add_ps(_mm512_set1_ps(c[i]), _mm512_mul_ps(r, p));
    __m512i k1 = _mm512_srai_epi32(ki, 1), k2 = _mm512_sub_epi32(ki, k1);
    __m512i bias = _mm512_set1_epi32(127);
    __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k1, bias), 23));
    __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k2, bias), 23));
    return _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
}

__attribute__((target("avx512f"), always_inline))
static inline __m512d fbp_exp_v8(__m512d x)
{
    const __m512d shift = _mm512_set1_pd(0x1.8p52);
    x = _mm512_min_pd(_mm512_set1_pd(710.0), x);
    x = _mm512_max_pd(_mm512_set1_pd(-746.0), x);
    __m512d t = _mm512_add_pd(_mm512_mul_pd(x, _mm512_set1_pd(0x1.71547652b82fep+0)), shift);
    __m512d k = _mm512_sub_pd(t, shift);
    __m512i ki = _mm512_sub_epi64(_mm512_castpd_si512(t), _mm512_castpd_si512(shift));
    __m512d r = _mm512_sub_pd(x, _mm512_mul_pd(k, _mm512_set1_pd(0x1.62e42feep-1)));
    r = _mm512_sub_pd(r, _mm512_mul_pd(k, _mm512_set1_pd(0x1.a39ef35793c76p-33)));
    static const double c[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0,
                                 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    __m512d p = _mm512_set1_pd(1.0 / 6227020800.0);
    for (int i = 0; i < 13; i++)
        p = _mm512_add_pd(_mm512_set1_pd(c[i]), _mm512_mul_pd(r, p));
    __m512i k1 = _mm512_srai_epi64(ki, 1), k2 = _mm512_sub_epi64(ki, k1);
    __m512i bias = _mm512_set1_epi64(1023);
    __m512d s1 = _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_add_epi64(k1, bias), 52));
    __m512d s2 = _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_add_epi64(k2, bias), 52));
    return _mm512_mul_pd(_mm512_mul_pd(p, s1), s2);
}

/* The lane-wise pieces of the block below, per lane count: each lane's row start
 * (0, k, 2k, ...) and the block's labels, as 32-bit indices; a lane mask of label j. */
__attribute__((target("avx512f"), always_inline))
static inline __m512i fbp_rows_v16(int k)
{
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                14, 15), _mm512_set1_epi32(k));
}
__attribute__((target("avx512f"), always_inline))
static inline __m256i fbp_rows_v8(int k)
{
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(k));
}
__attribute__((target("avx512f"), always_inline))
static inline __m512i fbp_labels_v16(const int64_t *y, __mmask16 live)
{
    __m256i lo = _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64((__mmask8)live, y));
    __m256i hi = _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64((__mmask8)(live >> 8), y + 8));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
__attribute__((target("avx512f"), always_inline))
static inline __m256i fbp_labels_v8(const int64_t *y, __mmask8 live)
{
    return _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64(live, y));
}
#define FBP_IADD_16(a, j) _mm512_add_epi32((a), _mm512_set1_epi32(j))
#define FBP_IADD_8(a, j) _mm256_add_epi32((a), _mm256_set1_epi32(j))
#define FBP_IADDV_16(a, b) _mm512_add_epi32((a), (b))
#define FBP_IADDV_8(a, b) _mm256_add_epi32((a), (b))
#define FBP_EQ_16(yv, j) _mm512_cmpeq_epi32_mask((yv), _mm512_set1_epi32(j))
#define FBP_EQ_8(yv, j) _mm512_cmpeq_epi64_mask(_mm512_cvtepi32_epi64(yv), _mm512_set1_epi64(j))

/* fbp_softmax_xent_any_* on AVX-512, the same operations in the same order (the
 * same bits): a block of L rows is gathered straight into L-lane vectors, one per
 * class, and dZ scattered back from them, where the version above transposes
 * through arrays on the stack (its scalar stores, then vector loads of them, stall
 * store forwarding). A 32 x 10 float32 batch: 0.55 us against 0.91; 128 x 10: 2.3
 * against 3.6. Most of what is left is the k divisions and k exps per block, and
 * one libm log per row. P: ps or pd; M: the mask type. */
#define FBP_DEFINE_XENT512(T, S, V, L, M, P, EXPV, LOG)                                  \
__attribute__((target("avx512f")))                                                       \
static double fbp_softmax_xent512_##S(const T *Z, const int64_t *y, T *dZ, ptrdiff_t n,  \
                                      ptrdiff_t k, T scale)                              \
{                                                                                        \
    const int kk = (int)k;                                                               \
    const V zero = _mm512_setzero_##P(), one = _mm512_set1_##P(1);                      \
    const V vs = _mm512_set1_##P(scale);                                                 \
    V t[FBP_SOFTMAX_NARROW];                                                             \
    T m_[L], s_[L], zy_[L];                                                              \
    const __typeof__(fbp_rows_v##L(0)) rows = fbp_rows_v##L(kk);                         \
    double total = 0;                                                                    \
    for (ptrdiff_t i0 = 0; i0 < n; i0 += L) {                                            \
        const int R = n - i0 < L ? (int)(n - i0) : L;                                    \
        const M live = (M)(R == L ? ~0u : (1u << R) - 1u);                               \
        const T *z = Z + i0 * k;                                                         \
        T *o = dZ + i0 * k;                                                              \
        const __typeof__(rows) yv = fbp_labels_v##L(y + i0, live);                       \
        /* Z[i, y[i]] before dZ (which may be Z) is written */                           \
        V zy = _mm512_mask_i32gather_##P(zero, live, FBP_IADDV_##L(rows, yv), z, sizeof(T)); \
        for (int j = 0; j < kk; j++)                                                     \
            t[j] = _mm512_mask_i32gather_##P(zero, live, FBP_IADD_##L(rows, j), z,       \
                                             sizeof(T));                                 \
        V m = t[0], s = zero;                                                            \
        for (int j = 1; j < kk; j++)                                                     \
            m = _mm512_max_##P(t[j], m); /* t > m ? t : m */                             \
        for (int j = 0; j < kk; j++) {                                                   \
            t[j] = EXPV(_mm512_sub_##P(t[j], m));                                        \
            s = _mm512_add_##P(s, t[j]);                                                 \
        }                                                                                \
        for (int j = 0; j < kk; j++) {                                                   \
            V q = _mm512_div_##P(t[j], s);                                               \
            q = _mm512_mask_sub_##P(q, FBP_EQ_##L(yv, j), q, one);                       \
            _mm512_mask_i32scatter_##P(o, live, FBP_IADD_##L(rows, j),                   \
                                       _mm512_mul_##P(q, vs), sizeof(T));                \
        }                                                                                \
        _mm512_storeu_##P(m_, m);                                                        \
        _mm512_storeu_##P(s_, s);                                                        \
        _mm512_storeu_##P(zy_, zy);                                                      \
        for (int r = 0; r < R; r++)                                                      \
            total += (double)((LOG(s_[r]) + m_[r]) - zy_[r]);                            \
    }                                                                                    \
    return total;                                                                        \
}

FBP_DEFINE_XENT512(float, f32, __m512, 16, __mmask16, ps, fbp_expf_v16, logf)
FBP_DEFINE_XENT512(double, f64, __m512d, 8, __mmask8, pd, fbp_exp_v8, log)
#endif

/* Reads whether the CPU has AVX-512 (when the module loads). */
static int fbp_vec512_init(void)
{
#ifdef FBP_HAVE_VEC512
    fbp_vec512_on = fbp_cpu_avx512();
#endif
    return fbp_vec512_on;
}

/* Softmax cross-entropy of narrow rows and its gradient: fbp_softmax_xent_any_##S's
 * result, on AVX-512 where the CPU has it. */
#ifdef FBP_HAVE_VEC512
#define FBP_XENT512_CALL(S) \
    if (fbp_vec512_on)      \
        return fbp_softmax_xent512_##S(Z, y, dZ, n, k, scale);
#else
#define FBP_XENT512_CALL(S)
#endif
#define FBP_DEFINE_XENT(T, S)                                                            \
static double fbp_softmax_xent_##S(const T *Z, const int64_t *y, T *dZ, ptrdiff_t n,     \
                                   ptrdiff_t k, T scale)                                 \
{                                                                                        \
    FBP_XENT512_CALL(S)                                                                  \
    return fbp_softmax_xent_any_##S(Z, y, dZ, n, k, scale);                              \
}
FBP_DEFINE_XENT(float, f32)
FBP_DEFINE_XENT(double, f64)

/* z[i] = tanh(z[i]) in place. The Taylor series of tanh below |z| = 0.55, where
 * 1 - 2 / (exp(2|z|) + 1) would cancel, that formula above (it reaches exactly
 * 1 where tanh rounds to 1, and exp's overflow to inf gives 1 too); NaN passes
 * through. At most 3 ulp from the double tanh (tested). */
FBP_CLONES static void fbp_tanh_f32(float *z, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        float v = z[i], a = fabsf(v), a2 = a * a;
        float p = (float)(-443861162.0 / 1856156927625.0);
        p = (float)(6404582.0 / 10854718875.0) + a2 * p;
        p = (float)(-929569.0 / 638512875.0) + a2 * p;
        p = (float)(21844.0 / 6081075.0) + a2 * p;
        p = (float)(-1382.0 / 155925.0) + a2 * p;
        p = (float)(62.0 / 2835.0) + a2 * p;
        p = (float)(-17.0 / 315.0) + a2 * p;
        p = (float)(2.0 / 15.0) + a2 * p;
        p = (float)(-1.0 / 3.0) + a2 * p;
        float series = a + a * a2 * p;
        float formula = 1.0f - 2.0f / (fbp_expf(2.0f * a) + 1.0f);
        z[i] = copysignf(a < 0.55f ? series : formula, v);
    }
}

/* The same for float64, with the 18 Taylor terms after x that reach 0.04 ulp at
 * |z| = 0.55 (coefficients 2^2n (2^2n - 1) B_2n / (2n)!, highest first, each the
 * double nearest the exact fraction). At most 3 ulp from the exact tanh
 * (tested against long double). */
static const double fbp_tanh_series_f64[18] = {
    0x1.2efe8db3aff1fp-24, -0x1.75cde6563fed9p-23, 0x1.cd299de4ae6bbp-22,
    -0x1.1c77df95c1c0dp-20, 0x1.5ef2da474e5b7p-19, -0x1.b0f72d3ee24e9p-18,
    0x1.0b132d39a6050p-16, -0x1.497d8eea25259p-15, 0x1.967e18afcafadp-14,
    -0x1.f57d7734d1664p-13, 0x1.3558248036744p-11, -0x1.7da36452b75e3p-10,
    0x1.d6d3d0e157de0p-9, -0x1.226e355e6c23dp-7, 0x1.664f4882c10fap-6,
    -0x1.ba1ba1ba1ba1cp-5, 0x1.1111111111111p-3, -0x1.5555555555555p-2};

FBP_CLONES static void fbp_tanh_f64(double *z, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) {
        double v = z[i], a = fabs(v), a2 = a * a;
        /* Horner written out: a loop over the table would stop vectorisation */
        const double *c = fbp_tanh_series_f64;
        double p = c[0];
        p = c[1] + a2 * p;
        p = c[2] + a2 * p;
        p = c[3] + a2 * p;
        p = c[4] + a2 * p;
        p = c[5] + a2 * p;
        p = c[6] + a2 * p;
        p = c[7] + a2 * p;
        p = c[8] + a2 * p;
        p = c[9] + a2 * p;
        p = c[10] + a2 * p;
        p = c[11] + a2 * p;
        p = c[12] + a2 * p;
        p = c[13] + a2 * p;
        p = c[14] + a2 * p;
        p = c[15] + a2 * p;
        p = c[16] + a2 * p;
        p = c[17] + a2 * p;
        double series = a + a * a2 * p;
        double formula = 1.0 - 2.0 / (fbp_exp(2.0 * a) + 1.0);
        z[i] = copysign(a < 0.55 ? series : formula, v);
    }
}

/* fbp_max_exponent_S: the largest exponent field over x (all ones: some
 * element is NaN or infinite). fbp_all_finite_S: whether no element is NaN or
 * infinite, i.e. whether that field is not all ones. Both from the largest
 * element with its sign bit cleared, read as an unsigned integer (U, of T's
 * width): a larger exponent field is a larger integer, so that element's field
 * is the largest one. Integer max reductions vectorise without -ffast-math.
 * Two operations per element: shifting and masking each element before the
 * max took 1.8x as long. */
#define FBP_DEFINE_SCANS(T, S, U, SHIFT, MASK)                                           \
static inline U fbp_max_magnitude_##S(const T *x, ptrdiff_t n)                          \
{                                                                                        \
    const U *u = (const U *)x;                                                           \
    const U magnitude = ~((U)1 << (sizeof(U) * 8 - 1));                                  \
    U e = 0;                                                                             \
    for (ptrdiff_t i = 0; i < n; i++) {                                                  \
        U f = u[i] & magnitude;                                                          \
        e = f > e ? f : e;                                                               \
    }                                                                                    \
    return e;                                                                            \
}                                                                                        \
                                                                                         \
FBP_CLONES static int fbp_max_exponent_##S(const T *x, ptrdiff_t n)                     \
{                                                                                        \
    return (int)((fbp_max_magnitude_##S(x, n) >> SHIFT) & MASK);                         \
}                                                                                        \
                                                                                         \
FBP_CLONES static int fbp_all_finite_##S(const T *x, ptrdiff_t n)                       \
{                                                                                        \
    return ((fbp_max_magnitude_##S(x, n) >> SHIFT) & MASK) != MASK;                      \
}

FBP_DEFINE_SCANS(float, f32, uint32_t, 23, 0xffu)
FBP_DEFINE_SCANS(double, f64, uint64_t, 52, 0x7ffu)

/* 8 doubles: the lanes of fbp_sum_squares_* and fbp_mse_* (below). */
typedef double fbp_v8d __attribute__((vector_size(64)));

/* Their 32 lanes added pairwise in a fixed order (lane j + w into lane j), so that
 * every clone gives the same bits. */
static inline double fbp_fold32(double *lane)
{
    for (int w = 16; w >= 1; w /= 2)
        for (int j = 0; j < w; j++)
            lane[j] += lane[j + w];
    return lane[0];
}

/* Activation codes, in the order of fastbp._checks.ACTIVATIONS (_kernels.pyx
 * takes its names for them from here). */
enum { FBP_IDENTITY = 0, FBP_SIGMOID = 1, FBP_TANH = 2, FBP_RELU = 3, FBP_LEAKY_RELU = 4 };

/* The elementwise loops of the training step, once per dtype: T is float or
 * double, S the suffix. Each is one exported function with target_clones
 * whose body calls an inline span with constant flags, so that every
 * combination compiles to its own branch-free, vectorised loop (a branch on
 * the sign of random data mispredicts half the time). The arithmetic is
 * exactly that of the reference, in its order. sigmoid, tanh and softmax are
 * not here: they have their own loops above, for both dtypes. */
#define FBP_DEFINE_LOOPS(T, S, SQRT)                                                     \
static inline T fbp_activate_##S(T z, int act, T slope)                                 \
{                                                                                        \
    if (act == FBP_RELU)                                                                 \
        return z < 0 ? (T)0 : z; /* NaN passes through, as in PyTorch */                 \
    if (act == FBP_LEAKY_RELU)                                                           \
        return z > 0 ? z : z * slope;                                                    \
    return z;                                                                            \
}                                                                                        \
                                                                                         \
static inline void fbp_bias_act_span_##S(T *Z, const T *b, ptrdiff_t n, ptrdiff_t m,    \
                                         int act, T slope)                               \
{                                                                                        \
    for (ptrdiff_t i = 0; i < n; i++) {                                                  \
        T *z = Z + i * m;                                                                \
        for (ptrdiff_t j = 0; j < m; j++)                                                \
            z[j] = fbp_activate_##S(z[j] + b[j], act, slope);                            \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* Z[i, j] = act(Z[i, j] + b[j]) for identity, relu and leaky relu. */                   \
FBP_CLONES static void fbp_bias_act_##S(T *Z, const T *b, ptrdiff_t n, ptrdiff_t m,     \
                                        int act, T slope)                                \
{                                                                                        \
    if (act == FBP_RELU)                                                                 \
        fbp_bias_act_span_##S(Z, b, n, m, FBP_RELU, slope);                              \
    else if (act == FBP_LEAKY_RELU)                                                      \
        fbp_bias_act_span_##S(Z, b, n, m, FBP_LEAKY_RELU, slope);                        \
    else                                                                                 \
        fbp_bias_act_span_##S(Z, b, n, m, FBP_IDENTITY, slope);                          \
}                                                                                        \
                                                                                         \
/* act'(z) from a = act(z). */                                                           \
static inline T fbp_derivative_##S(T a, int act, T slope)                               \
{                                                                                        \
    if (act == FBP_SIGMOID)                                                              \
        return a * ((T)1 - a);                                                           \
    if (act == FBP_TANH)                                                                 \
        return (T)1 - a * a;                                                             \
    if (act == FBP_RELU)                                                                 \
        return (T)(a > 0);                                                               \
    if (act == FBP_LEAKY_RELU)                                                           \
        return a > 0 ? (T)1 : slope;                                                     \
    return 1;                                                                            \
}                                                                                        \
                                                                                         \
/* out (m) = column sums of M (n, m), row after row (each column from 0, in the     */   \
/* order of its rows). Blocks of 64 columns keep their sums in registers down all  */   \
/* the rows: adding into out itself chained every row's additions through a store  */   \
/* and a load (32x128: 0.42 us, 0.14 us in blocks).                                */   \
FBP_CLONES static void fbp_column_sums_##S(const T *M, T *out, ptrdiff_t n, ptrdiff_t m) \
{                                                                                        \
    ptrdiff_t j0 = 0;                                                                    \
    for (; j0 + 64 <= m; j0 += 64) {                                                     \
        T acc[64] = {0};                                                                 \
        for (ptrdiff_t i = 0; i < n; i++)                                                \
            for (int j = 0; j < 64; j++)                                                 \
                acc[j] += M[i * m + j0 + j];                                             \
        memcpy(out + j0, acc, sizeof acc);                                               \
    }                                                                                    \
    if (j0 < m) {                                                                        \
        ptrdiff_t w = m - j0;                                                            \
        T acc[64] = {0};                                                                 \
        for (ptrdiff_t i = 0; i < n; i++)                                                \
            for (ptrdiff_t j = 0; j < w; j++)                                            \
                acc[j] += M[i * m + j0 + j];                                             \
        memcpy(out + j0, acc, w * sizeof(T));                                            \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* Sums of squares for fastbp.diagnostics, in double, over 32 lanes (element i           \
 * goes to lane i mod 32, as 4 vectors of 8 so that 4 chains of additions run at         \
 * once: one chain was bound by the latency of its additions; the lanes are added        \
 * in a fixed order at the end), so that every clone gives the same bits. GCC's          \
 * vector types make the lanes explicit (a plain loop over them did not                  \
 * vectorise: 0.65 ns per element). sub: the sum of (a[i] - b[i])^2 with the             \
 * difference rounded to T first, as NumPy's a - b is. */                                \
typedef T fbp_v8_##S __attribute__((vector_size(8 * sizeof(T))));                        \
static inline fbp_v8d fbp_square8_##S(const T *a, const T *b, int sub)                   \
{                                                                                        \
    fbp_v8_##S va, vb;                                                                   \
    memcpy(&va, a, sizeof va);                                                           \
    if (sub) {                                                                           \
        memcpy(&vb, b, sizeof vb);                                                       \
        va = va - vb;                                                                    \
    }                                                                                    \
    fbp_v8d x = __builtin_convertvector(va, fbp_v8d);                                    \
    return x * x;                                                                        \
}                                                                                        \
                                                                                         \
FBP_CLONES static double fbp_sum_squares_##S(const T *a, const T *b, ptrdiff_t size,     \
                                             int sub)                                    \
{                                                                                        \
    fbp_v8d acc[4] = {{0}, {0}, {0}, {0}};                                               \
    ptrdiff_t i = 0;                                                                     \
    for (; i + 32 <= size; i += 32)                                                      \
        for (int v = 0; v < 4; v++)                                                      \
            acc[v] += fbp_square8_##S(a + i + 8 * v, sub ? b + i + 8 * v : NULL, sub);   \
    double lane[32];                                                                     \
    memcpy(lane, acc, sizeof lane);                                                      \
    for (int j = 0; i < size; i++, j++) {                                                \
        double x = sub ? (double)(T)(a[i] - b[i]) : (double)a[i];                        \
        lane[j] += x * x;                                                                \
    }                                                                                    \
    return fbp_fold32(lane);                                                             \
}                                                                                        \
                                                                                         \
/* Mean squared error: returns the sum over i of (A[i] - Y[i])^2, each square            \
 * rounded to T as the reference's R * R is, added in double over the 32 lanes of        \
 * fbp_sum_squares (in one chain of additions, as before, the loss and gradient took      \
 * 5.4 ns per element); and when dZ is not NULL, dZ[i] = (A[i] - Y[i]) * scale *         \
 * act'(A[i]) with act'(a) computed as fbp_derivative does: the reference's              \
 * operations in its order, so the same bits. dZ may be A. */                            \
__attribute__((always_inline)) /* into each clone: compiled once, it ran 4x slower */    \
static inline double fbp_mse_span_##S(const T *A, const T *Y, T *dZ, ptrdiff_t size,     \
                                      int act, T scale)                                  \
{                                                                                        \
    fbp_v8d acc[4] = {{0}, {0}, {0}, {0}};                                               \
    ptrdiff_t i = 0;                                                                     \
    for (; i + 32 <= size; i += 32)                                                      \
        for (int v = 0; v < 4; v++) {                                                    \
            fbp_v8_##S a, y;                                                             \
            memcpy(&a, A + i + 8 * v, sizeof a);                                         \
            memcpy(&y, Y + i + 8 * v, sizeof y);                                         \
            fbp_v8_##S r = a - y;                                                        \
            acc[v] += __builtin_convertvector(r * r, fbp_v8d);                           \
            if (dZ != NULL) {                                                            \
                fbp_v8_##S g = r * scale;                                                \
                if (act == FBP_SIGMOID)                                                  \
                    g = g * (a * ((T)1 - a));                                            \
                else if (act == FBP_TANH)                                                \
                    g = g * ((T)1 - a * a);                                              \
                memcpy(dZ + i + 8 * v, &g, sizeof g);                                    \
            }                                                                            \
        }                                                                                \
    double lane[32];                                                                     \
    memcpy(lane, acc, sizeof lane);                                                      \
    for (int j = 0; i < size; i++, j++) {                                                \
        T a = A[i], r = a - Y[i];                                                        \
        lane[j] += (double)(r * r);                                                      \
        if (dZ != NULL)                                                                  \
            dZ[i] = r * scale * fbp_derivative_##S(a, act, 0);                           \
    }                                                                                    \
    return fbp_fold32(lane);                                                             \
}                                                                                        \
                                                                                         \
/* act: FBP_IDENTITY, FBP_SIGMOID or FBP_TANH (the output activations of mse). */        \
FBP_CLONES static double fbp_mse_##S(const T *A, const T *Y, T *dZ, ptrdiff_t size,      \
                                     int act, T scale)                                   \
{                                                                                        \
    if (dZ == NULL)                                                                      \
        return fbp_mse_span_##S(A, Y, NULL, size, FBP_IDENTITY, scale);                  \
    if (act == FBP_SIGMOID)                                                              \
        return fbp_mse_span_##S(A, Y, dZ, size, FBP_SIGMOID, scale);                     \
    if (act == FBP_TANH)                                                                 \
        return fbp_mse_span_##S(A, Y, dZ, size, FBP_TANH, scale);                        \
    return fbp_mse_span_##S(A, Y, dZ, size, FBP_IDENTITY, scale);                        \
}                                                                                        \
                                                                                         \
/* How many of the m columns of A (n, m) (relu outputs) are dead: 0 or less on           \
 * every row (NaN counts as alive, as in NumPy's max). Row after row over blocks         \
 * of columns, so that the comparisons run across a row; a block stops early             \
 * once all its columns are alive. */                                                    \
FBP_CLONES static ptrdiff_t fbp_count_dead_##S(const T *A, ptrdiff_t n, ptrdiff_t m)     \
{                                                                                        \
    ptrdiff_t dead = 0;                                                                  \
    for (ptrdiff_t j0 = 0; j0 < m; j0 += 256) {                                          \
        ptrdiff_t w = m - j0 < 256 ? m - j0 : 256;                                       \
        unsigned char alive[256] = {0};                                                  \
        for (ptrdiff_t i = 0; i < n; i++) {                                              \
            const T *row = A + i * m + j0;                                               \
            unsigned char all = 1;                                                       \
            for (ptrdiff_t j = 0; j < w; j++) {                                          \
                alive[j] |= !(row[j] <= 0);                                              \
                all &= alive[j];                                                         \
            }                                                                            \
            if (all)                                                                     \
                break;                                                                   \
        }                                                                                \
        for (ptrdiff_t j = 0; j < w; j++)                                                \
            dead += !alive[j];                                                           \
    }                                                                                    \
    return dead;                                                                         \
}                                                                                        \
                                                                                         \
/* How many activations A (sigmoid or tanh outputs) have a derivative below              \
 * `below`: A * (1 - A) for sigmoid, 1 - A * A for tanh, computed in T. */               \
FBP_CLONES static ptrdiff_t fbp_count_saturated_##S(const T *A, ptrdiff_t size, int act,  \
                                                    T below)                             \
{                                                                                        \
    ptrdiff_t count = 0;                                                                 \
    if (act == FBP_SIGMOID) {                                                            \
        for (ptrdiff_t i = 0; i < size; i++)                                             \
            count += A[i] * ((T)1 - A[i]) < below;                                       \
    } else {                                                                             \
        for (ptrdiff_t i = 0; i < size; i++)                                             \
            count += (T)1 - A[i] * A[i] < below;                                         \
    }                                                                                    \
    return count;                                                                        \
}                                                                                        \
                                                                                         \
static inline void fbp_sgd_span_##S(T *param, const T *grad, T *buf, ptrdiff_t size,    \
                                    T lr, T momentum, T dampening_complement,            \
                                    int nesterov, T weight_decay, int maximize,          \
                                    int first_step)                                      \
{                                                                                        \
    for (ptrdiff_t i = 0; i < size; i++) {                                               \
        T g = maximize ? -grad[i] : grad[i];                                             \
        if (weight_decay != 0)                                                           \
            g = g + weight_decay * param[i];                                             \
        if (buf != NULL) {                                                               \
            if (first_step)                                                              \
                buf[i] = g;                                                              \
            else                                                                         \
                buf[i] = buf[i] * momentum + dampening_complement * g;                   \
            g = nesterov ? g + momentum * buf[i] : buf[i];                               \
        }                                                                                \
        param[i] = param[i] - lr * g;                                                    \
    }                                                                                    \
}                                                                                        \
                                                                                         \
static inline void fbp_sgd_kinds_##S(T *param, const T *grad, T *buf, ptrdiff_t size,   \
                                     T lr, T momentum, T dampening_complement,           \
                                     int nesterov, T weight_decay)                       \
{                                                                                        \
    if (buf == NULL)                                                                     \
        fbp_sgd_span_##S(param, grad, NULL, size, lr, 0, 0, 0, weight_decay, 0, 0);      \
    else if (nesterov)                                                                   \
        fbp_sgd_span_##S(param, grad, buf, size, lr, momentum, dampening_complement, 1,  \
                         weight_decay, 0, 0);                                            \
    else                                                                                 \
        fbp_sgd_span_##S(param, grad, buf, size, lr, momentum, dampening_complement, 0,  \
                         weight_decay, 0, 0);                                            \
}                                                                                        \
                                                                                         \
/* One in-place torch.optim.SGD step; buf is NULL without momentum. The steady   */      \
/* state (not the first step, not maximizing) runs loops specialised by constant */      \
/* flags (up to 8x faster than the general loop); the rest the general loop.     */      \
FBP_CLONES static void fbp_sgd_##S(T *param, const T *grad, T *buf, ptrdiff_t size,     \
                                   T lr, T momentum, T dampening_complement,             \
                                   int nesterov, T weight_decay, int maximize,           \
                                   int first_step)                                       \
{                                                                                        \
    if (maximize || first_step)                                                          \
        fbp_sgd_span_##S(param, grad, buf, size, lr, momentum, dampening_complement,     \
                         nesterov, weight_decay, maximize, first_step);                  \
    else if (weight_decay == 0)                                                          \
        fbp_sgd_kinds_##S(param, grad, buf, size, lr, momentum, dampening_complement,    \
                          nesterov, 0);                                                  \
    else                                                                                 \
        fbp_sgd_kinds_##S(param, grad, buf, size, lr, momentum, dampening_complement,    \
                          nesterov, weight_decay);                                       \
}                                                                                        \
                                                                                         \
/* The torch.optim.Adam update per element; the flags are constants at each  */        \
/* call below, so every combination compiles to its own branch-free loop.     */        \
static inline void fbp_adam_span_##S(T *param, const T *grad, T *m, T *v, T *vmax,      \
                                     ptrdiff_t size, T neg_step_size, T beta1_weight,    \
                                     T beta2, T beta2_complement, T bc2_sqrt, T eps,     \
                                     T l2, int scale_param, T param_scale, int maximize, \
                                     int low_weight, int amsgrad)                        \
{                                                                                        \
    for (ptrdiff_t i = 0; i < size; i++) {                                               \
        T g = maximize ? -grad[i] : grad[i];                                             \
        T p = param[i], mi, vi;                                                          \
        if (scale_param) /* decoupled weight decay (AdamW) */                            \
            p = p * param_scale;                                                         \
        if (l2 != 0) /* weight decay added to the gradient (Adam) */                     \
            g = g + l2 * p;                                                              \
        /* torch's lerp, in the form it uses for weights below and above 1/2 */          \
        if (low_weight)                                                                  \
            mi = m[i] + beta1_weight * (g - m[i]);                                       \
        else                                                                             \
            mi = g - (g - m[i]) * ((T)1 - beta1_weight);                                 \
        vi = v[i] * beta2 + beta2_complement * g * g;                                    \
        m[i] = mi;                                                                       \
        v[i] = vi;                                                                       \
        if (amsgrad) { /* torch.maximum: a NaN on either side stays */                   \
            T vm = vmax[i];                                                              \
            vi = vm > vi || vm != vm ? vm : vi;                                          \
            vmax[i] = vi;                                                                \
        }                                                                                \
        T denom = SQRT(vi) / bc2_sqrt + eps;                                             \
        param[i] = p + neg_step_size * (mi / denom);                                     \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* The torch.optim.Adam update; vmax is NULL without amsgrad. The usual cases */        \
/* (beta1 > 1/2, not maximizing) run loops specialised by constant flags (4-5x */       \
/* faster than one general loop); the rest the general one.                    */       \
FBP_CLONES static void fbp_adam_##S(T *param, const T *grad, T *m, T *v, T *vmax,       \
                                    ptrdiff_t size, T neg_step_size, T beta1_weight,     \
                                    T beta2, T beta2_complement, T bc2_sqrt, T eps,      \
                                    T l2, int scale_param, T param_scale, int maximize)  \
{                                                                                        \
    int low = beta1_weight < (T)0.5;                                                     \
    if (!(low && !maximize))                                                             \
        fbp_adam_span_##S(param, grad, m, v, vmax, size, neg_step_size, beta1_weight,    \
                          beta2, beta2_complement, bc2_sqrt, eps, l2, scale_param,       \
                          param_scale, maximize, low, vmax != NULL);                     \
    else if (scale_param && vmax == NULL) /* AdamW */                                    \
        fbp_adam_span_##S(param, grad, m, v, NULL, size, neg_step_size, beta1_weight,    \
                          beta2, beta2_complement, bc2_sqrt, eps, 0, 1, param_scale, 0,  \
                          1, 0);                                                         \
    else if (scale_param)                                                                \
        fbp_adam_span_##S(param, grad, m, v, vmax, size, neg_step_size, beta1_weight,    \
                          beta2, beta2_complement, bc2_sqrt, eps, 0, 1, param_scale, 0,  \
                          1, 1);                                                         \
    else if (l2 == 0 && vmax == NULL)                                                    \
        fbp_adam_span_##S(param, grad, m, v, NULL, size, neg_step_size, beta1_weight,    \
                          beta2, beta2_complement, bc2_sqrt, eps, 0, 0, 1, 0, 1, 0);     \
    else if (l2 == 0)                                                                    \
        fbp_adam_span_##S(param, grad, m, v, vmax, size, neg_step_size, beta1_weight,    \
                          beta2, beta2_complement, bc2_sqrt, eps, 0, 0, 1, 0, 1, 1);     \
    else if (vmax == NULL)                                                               \
        fbp_adam_span_##S(param, grad, m, v, NULL, size, neg_step_size, beta1_weight,    \
                          beta2, beta2_complement, bc2_sqrt, eps, l2, 0, 1, 0, 1, 0);    \
    else                                                                                 \
        fbp_adam_span_##S(param, grad, m, v, vmax, size, neg_step_size, beta1_weight,    \
                          beta2, beta2_complement, bc2_sqrt, eps, l2, 0, 1, 0, 1, 1);    \
}

FBP_DEFINE_LOOPS(float, f32, sqrtf)
FBP_DEFINE_LOOPS(double, f64, sqrt)

/* fbp_act_backward_S: out = dA * act'(z), from the outputs A = act(z); out may be
 * dA. fbp_act_backward_bound_S: the same (the same bits), and in e[0] and e[1] the
 * largest exponent field over A and over out, as fbp_max_exponent would (all ones:
 * some element is NaN or infinite). A training step needs both for its finiteness
 * bound (_gradients_bounded in _kernels.pyx): a hidden layer's outputs A are the
 * next layer's input, and out its dZ. Two scans of their own took 2.4% of a
 * digits-network step; here the values are in registers already. One loop serves
 * both: with mag a constant NULL (fbp_act_backward) the tracking compiles away. */
#define FBP_DEFINE_ACT_BACKWARD(T, S, U, SHIFT, MASK)                                    \
__attribute__((always_inline))                                                           \
static inline void fbp_act_backward_span_##S(const T *A, const T *dA, T *out,            \
                                             ptrdiff_t size, int act, T slope, U *mag)   \
{                                                                                        \
    const U magnitude = ~((U)1 << (sizeof(U) * 8 - 1));                                  \
    U ma = 0, mo = 0;                                                                    \
    for (ptrdiff_t i = 0; i < size; i++) {                                               \
        T a = A[i], o = dA[i] * fbp_derivative_##S(a, act, slope);                       \
        out[i] = o;                                                                      \
        if (mag != NULL) {                                                               \
            U ua, uo;                                                                    \
            memcpy(&ua, &a, sizeof ua);                                                  \
            memcpy(&uo, &o, sizeof uo);                                                  \
            ua &= magnitude;                                                             \
            uo &= magnitude;                                                             \
            ma = ua > ma ? ua : ma;                                                      \
            mo = uo > mo ? uo : mo;                                                      \
        }                                                                                \
    }                                                                                    \
    if (mag != NULL) {                                                                   \
        mag[0] = ma;                                                                     \
        mag[1] = mo;                                                                     \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* the span with act a constant in each case */                                          \
__attribute__((always_inline))                                                           \
static inline void fbp_act_backward_switch_##S(const T *A, const T *dA, T *out,          \
                                               ptrdiff_t size, int act, T slope, U *mag) \
{                                                                                        \
    switch (act) {                                                                       \
    case FBP_RELU:                                                                       \
        fbp_act_backward_span_##S(A, dA, out, size, FBP_RELU, slope, mag); break;        \
    case FBP_LEAKY_RELU:                                                                 \
        fbp_act_backward_span_##S(A, dA, out, size, FBP_LEAKY_RELU, slope, mag); break;  \
    case FBP_SIGMOID:                                                                    \
        fbp_act_backward_span_##S(A, dA, out, size, FBP_SIGMOID, slope, mag); break;     \
    case FBP_TANH:                                                                       \
        fbp_act_backward_span_##S(A, dA, out, size, FBP_TANH, slope, mag); break;        \
    default: fbp_act_backward_span_##S(A, dA, out, size, FBP_IDENTITY, slope, mag);      \
    }                                                                                    \
}                                                                                        \
                                                                                         \
FBP_CLONES static void fbp_act_backward_##S(const T *A, const T *dA, T *out,             \
                                            ptrdiff_t size, int act, T slope)            \
{                                                                                        \
    fbp_act_backward_switch_##S(A, dA, out, size, act, slope, NULL);                     \
}                                                                                        \
                                                                                         \
FBP_CLONES static void fbp_act_backward_bound_##S(const T *A, const T *dA, T *out,       \
                                                  ptrdiff_t size, int act, T slope,      \
                                                  int *e)                                \
{                                                                                        \
    U mag[2];                                                                            \
    fbp_act_backward_switch_##S(A, dA, out, size, act, slope, mag);                      \
    e[0] = (int)((mag[0] >> SHIFT) & MASK);                                              \
    e[1] = (int)((mag[1] >> SHIFT) & MASK);                                              \
}

FBP_DEFINE_ACT_BACKWARD(float, f32, uint32_t, 23, 0xffu)
FBP_DEFINE_ACT_BACKWARD(double, f64, uint64_t, 52, 0x7ffu)

/* log(1 + e) in double for e in [0, 1], the range of e = exp(-|z|) in the binary
 * cross-entropy: 2 atanh(s) = t (1 + q) with t = 2s = 2e / (2 + e), which lies in
 * [0, 2/3] and loses nothing however small e is, and q = sum over j >= 1 of
 * s^2j / (2j + 1) (to j = 16: the rest is below 2e-17; four chains over s^8, since
 * one chain of 16 steps was bound by its latency). The rounding error of 2 + e is
 * recovered exactly and corrected for (1 / (2 + e) = (2 - t) / 4), and t q is added
 * to t last, so the error is about that of one division and one addition: within
 * 1.2 ulp over 40 million samples of [0, 1], subnormals included (against long
 * double log1pl). Branch-free, so that loops over it vectorise (libm's log1pf was
 * 44% of a 61 ns element); NaN passes through. */
static inline double fbp_log1p_unit(double e)
{
    double d = 2.0 + e, d_err = e - (d - 2.0); /* d + d_err = 2 + e exactly */
    double t = (2.0 * e) / d;
    double x = 0.25 * (t * t), x2 = x * x, x4 = x2 * x2;
    double c[4];
    for (int r = 0; r < 4; r++) { /* c[r]: the terms j = r + 1 (mod 4), over x^4 */
        c[r] = 1.0 / (2 * (r + 13) + 1);
        for (int k = 2; k >= 0; k--)
            c[r] = 1.0 / (2 * (r + 4 * k + 1) + 1) + x4 * c[r];
    }
    double q = x * ((c[0] + x * c[1]) + x2 * (c[2] + x * c[3]));
    return t + (t * q - t * d_err * (2.0 - t) * 0.25);
}

/* Binary cross-entropy from logits: returns the sum over i of max(z, 0) - z t +
 * log(1 + exp(-|z|)), the first part in T as the reference computes it, the log
 * in double (fbp_log1p_unit), added in double over 32 lanes folded as in
 * fbp_sum_squares; and when dZ is not NULL, dZ[i] = (sigmoid(z) - t) * scale, with
 * sigmoid(z) from the same e as fbp_sigmoid1 computes it (the same bits). A block
 * of 32 is read into locals before dZ is written, so that dZ may be Z or Y and the
 * loop still vectorises (no run-time alias check). */
#define FBP_DEFINE_BCE(T, S, EXP)                                                        \
__attribute__((always_inline))                                                           \
static inline double fbp_bce1_##S(T z, T t, T *dz, T scale)                              \
{                                                                                        \
    T e = EXP(z >= 0 ? -z : z);                                                          \
    if (dz != NULL) {                                                                    \
        T r = (T)1 / ((T)1 + e);                                                         \
        *dz = ((z >= 0 ? r : e * r) - t) * scale;                                        \
    }                                                                                    \
    return (double)((z > 0 ? z : (T)0) - z * t) + fbp_log1p_unit((double)e);            \
}                                                                                        \
                                                                                         \
__attribute__((always_inline)) /* into each clone, as fbp_mse_span */                   \
static inline double fbp_bce_span_##S(const T *Z, const T *Y, T *dZ, ptrdiff_t size,     \
                                      T scale)                                           \
{                                                                                        \
    double lane[32] = {0};                                                               \
    T z[32], t[32];                                                                      \
    ptrdiff_t i = 0;                                                                     \
    for (; i + 32 <= size; i += 32) {                                                    \
        memcpy(z, Z + i, sizeof z);                                                      \
        memcpy(t, Y + i, sizeof t);                                                      \
        for (int j = 0; j < 32; j++)                                                     \
            lane[j] += fbp_bce1_##S(z[j], t[j], dZ != NULL ? dZ + i + j : NULL, scale);  \
    }                                                                                    \
    for (int j = 0; i < size; i++, j++)                                                  \
        lane[j] += fbp_bce1_##S(Z[i], Y[i], dZ != NULL ? dZ + i : NULL, scale);          \
    return fbp_fold32(lane);                                                             \
}                                                                                        \
                                                                                         \
FBP_CLONES static double fbp_bce_##S(const T *Z, const T *Y, T *dZ, ptrdiff_t size,      \
                                     T scale)                                            \
{                                                                                        \
    if (dZ == NULL)                                                                      \
        return fbp_bce_span_##S(Z, Y, NULL, size, scale);                                \
    return fbp_bce_span_##S(Z, Y, dZ, size, scale);                                      \
}

FBP_DEFINE_BCE(float, f32, fbp_expf)
FBP_DEFINE_BCE(double, f64, fbp_exp)

#endif

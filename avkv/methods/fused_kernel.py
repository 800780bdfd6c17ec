"""The element-wise work of the fused all-query attention (:func:`avkv.methods.allquery.attention_with_sums`) as
one compiled pass per tile, built lazily with the system C compiler and loaded with :mod:`ctypes`.

Why: at long prompts the torch version of a tile step (causal mask, row max, subtract, exp2, row sum, rescale
factor) streams the tile through memory six times, and the column sums' product reads the chunk buffer once more
per row vector; that traffic, not arithmetic, was the fused route's excess over SDPA's kernel
(``results/bench/README.md``). Here each row of a tile is read once for its max and once (from L1) for exp2 and its
sum, masked columns are never touched but zeroed, and the column sums are one multiply-add per element and declared
row vector, four rows at a time (each row read once, front to back; blocks of four zero-weight rows skipped). The
matrix products stay in torch's BLAS (MKL).

Paths: the row max and exp2 with explicit SIMD (AVX-512 or AVX2+FMA, whichever the compiler targets with
``-march=native``; a CPU with neither gets the plain C loops, which the compiler vectorises as it can), unless
``AVKV_FUSED_SIMD=0``; the probability buffer written with streaming stores when it exceeds
:data:`STREAM_MIN_BYTES` (8 MB: it does not stay in cache, and must not evict the tile being worked on), ordinary
stores below (a buffer that stays in L3 is read back from there); ``AVKV_FUSED_STREAM=0``/``1`` forces either.
``fused_features()`` in the library says which paths the build has; the self-check runs the process's SIMD choice
with and without streaming stores.

The C source is below (plain C, no torch headers: no ninja and no build of the extension toolchain). It is
compiled once per source, compiler and CPU into ``<repo>/.cache/kernels/`` (``AVKV_KERNEL_DIR`` overrides); the
compiler is ``$CC`` or ``cc``. Nothing needs it: when the build or the load fails, :func:`lib` warns once and
returns None and the fused route runs its torch ops instead (the route used is recorded in
:class:`avkv.methods.allquery.PrefillStats` ``.route``). ``AVKV_FUSED_KERNEL=0`` turns it off.

Exactness: exp2 is a degree-7 polynomial of the fraction (truncation < 6e-9 relative) times 2^n, i.e. within about
two fp32 ulps of ``torch.exp2`` (the SIMD version evaluates the same polynomial with fused multiply-adds);
arguments below −126 give 0. Sums are accumulated in another order than torch's.
``tests/methods/test_fused_kernel.py`` checks both functions against references written from the definition.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = r"""
#include <math.h>
#include <string.h>
#include <stdint.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

enum { OPT_SIMD = 1, OPT_STREAM = 2 };

/* 2^t on [-0.5, 0.5]: the degree-7 Taylor polynomial (truncation < 6e-9 relative) */
#define E7 1.525273380405984e-05f
#define E6 1.5403530393381606e-04f
#define E5 1.3333558146428443e-03f
#define E4 9.618129107628477e-03f
#define E3 5.550410866482158e-02f
#define E2 2.402265069591007e-01f
#define E1 6.931471805599453e-01f
#define E0 1.0f

/* 2^x for x <= 0: 2^n * P(t), n = round(x), t = x - n in [-0.5, 0.5]; arguments below -126 give 0. */
static inline float exp2_neg(float x) {
    float xc = x < -126.0f ? -126.0f : x;
    float n = (xc + 12582912.0f) - 12582912.0f;
    float t = xc - n;
    float p = E7;
    p = p * t + E6; p = p * t + E5; p = p * t + E4; p = p * t + E3; p = p * t + E2; p = p * t + E1; p = p * t + E0;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return x < -126.0f ? 0.0f : p * s;
}

static float plain_max(const float *x, long n) {
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (long j = 0; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
    return mx;
}

static float plain_exp2_sum(float *x, long n, float mt) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (long j = 0; j < n; ++j) {
        float p = exp2_neg(x[j] - mt);
        x[j] = p;
        sum += p;
    }
    return sum;
}

/* The explicit-SIMD versions of the row max and of exp2 + row sum (AVX-512 or AVX2+FMA, whichever the compiler
   targets; none: the plain loops below, which the compiler vectorises as it can). */
#if defined(__AVX512F__)
#define SIMD_WIDTH 16
static inline __m512 v_exp2_neg(__m512 x) {
    __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 t = _mm512_sub_ps(xc, n);
    __m512 p = _mm512_set1_ps(E7);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(E6));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(E5));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(E4));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(E3));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(E2));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(E1));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(E0));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
    return _mm512_maskz_mul_ps(ok, p, _mm512_castsi512_ps(e));
}
static float simd_max(const float *x, long n) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    long j = 0;
    for (; j + 32 <= n; j += 32) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + j));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + j + 16));
    }
    for (; j < n; j += 16) {
        __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        m0 = _mm512_mask_max_ps(m0, k, m0, _mm512_maskz_loadu_ps(k, x + j));
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}
static float simd_exp2_sum(float *x, long n, float mt) {
    __m512 m = _mm512_set1_ps(mt), s0 = _mm512_setzero_ps(), s1 = s0;
    long j = 0;
    for (; j + 32 <= n; j += 32) {
        __m512 p0 = v_exp2_neg(_mm512_sub_ps(_mm512_loadu_ps(x + j), m));
        __m512 p1 = v_exp2_neg(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16), m));
        _mm512_storeu_ps(x + j, p0);
        _mm512_storeu_ps(x + j + 16, p1);
        s0 = _mm512_add_ps(s0, p0);
        s1 = _mm512_add_ps(s1, p1);
    }
    for (; j < n; j += 16) {
        __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        __m512 p = _mm512_maskz_mov_ps(k, v_exp2_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), m)));
        _mm512_mask_storeu_ps(x + j, k, p);
        s0 = _mm512_add_ps(s0, p);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define SIMD_WIDTH 8
static inline __m256 v_exp2_neg(__m256 x) {
    __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
    __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 t = _mm256_sub_ps(xc, n);
    __m256 p = _mm256_set1_ps(E7);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(E6));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(E5));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(E4));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(E3));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(E2));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(E1));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(E0));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 ok = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_GE_OQ);
    return _mm256_and_ps(ok, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static float simd_max(const float *x, long n) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    long j = 0;
    for (; j + 16 <= n; j += 16) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + j + 8));
    }
    for (; j + 8 <= n; j += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
    float mx = hmax8(_mm256_max_ps(m0, m1));
    for (; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
    return mx;
}
static float simd_exp2_sum(float *x, long n, float mt) {
    __m256 m = _mm256_set1_ps(mt), s0 = _mm256_setzero_ps(), s1 = s0;
    long j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 p0 = v_exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(x + j), m));
        __m256 p1 = v_exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), m));
        _mm256_storeu_ps(x + j, p0);
        _mm256_storeu_ps(x + j + 8, p1);
        s0 = _mm256_add_ps(s0, p0);
        s1 = _mm256_add_ps(s1, p1);
    }
    for (; j + 8 <= n; j += 8) {
        __m256 p = v_exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(x + j), m));
        _mm256_storeu_ps(x + j, p);
        s0 = _mm256_add_ps(s0, p);
    }
    float sum = hsum8(_mm256_add_ps(s0, s1));
    for (; j < n; ++j) { float p = exp2_neg(x[j] - mt); x[j] = p; sum += p; }
    return sum;
}
#else
#define SIMD_WIDTH 0
static float simd_max(const float *x, long n) { return plain_max(x, n); }
static float simd_exp2_sum(float *x, long n, float mt) { return plain_exp2_sum(x, n, mt); }
#endif

/* Which paths this build has: bit 0 the explicit SIMD (its width in bits 8..), bit 1 streaming stores. */
long fused_features(void) {
    long f = SIMD_WIDTH ? (OPT_SIMD | ((long)SIMD_WIDTH << 8)) : 0;
#if defined(__AVX__)
    f |= OPT_STREAM;
#endif
    return f;
}

static inline long visible(long a, long i, long b, long T) {  /* keys of tile [b, b+T) that query a+i sees */
    long v = a + i + 1 - b;
    return v < 0 ? 0 : (v > T ? T : v);
}

/* Copy n floats to dst, with streaming (non-temporal) stores when `stream` and the CPU has them. */
static void copy_row(float *dst, const float *src, long n, int stream) {
    long j = 0;
    if (stream) {
#if defined(__AVX512F__)
        for (; j < n && ((uintptr_t)(dst + j) & 63); ++j) dst[j] = src[j];
        for (; j + 16 <= n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
#elif defined(__AVX__)
        for (; j < n && ((uintptr_t)(dst + j) & 31); ++j) dst[j] = src[j];
        for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
#endif
    }
    if (j < n) memcpy(dst + j, src + j, (size_t)(n - j) * sizeof(float));
}

/* One tile of the online softmax. s: [M, T] logits in log2 units (row stride lds), row q = gi*r + i is query a+i of
   the group's head gi, the tile's keys are [b, b+T). m_in: the rows' running max (NULL on the chunk's first tile).
   Writes m_out (the new max), p = 2^(s - m_out) into s (0 where the key is not visible) and copies the row into
   keep (row stride ldk; streaming stores under OPT_STREAM: a buffer that does not stay in cache must not evict the
   tile); l = l*f + sum(p) with f = 2^(m_in - m_out), and scales acc's rows by f. opts & OPT_SIMD: the max and exp2
   with explicit SIMD (when this build has it). */
static void tile_softmax(float *s, long lds, float *keep, long ldk, long M, long r, long T, long a, long b,
                         const float *m_in, float *m_out, float *l, float *acc, long Dv, int opts) {
    int simd = SIMD_WIDTH && (opts & OPT_SIMD);
    for (long q = 0; q < M; ++q) {
        long v = visible(a, q % r, b, T);
        float *row = s + q * lds;
        float mo = m_in ? m_in[q] : -INFINITY;
        float mx = v ? (simd ? simd_max(row, v) : plain_max(row, v)) : -INFINITY;
        float mt = mx > mo ? mx : mo;
        float sum = v ? (simd ? simd_exp2_sum(row, v, mt) : plain_exp2_sum(row, v, mt)) : 0.0f;
        if (v < T) memset(row + v, 0, (size_t)(T - v) * sizeof(float));
        copy_row(keep + q * ldk, row, T, opts & OPT_STREAM);
        if (m_in) {
            float fa = exp2f(mo - mt);
            l[q] = l[q] * fa + sum;
            if (fa != 1.0f)
                for (long d = 0; d < Dv; ++d) acc[q * Dv + d] *= fa;
        } else {
            l[q] = sum;
            memset(acc + q * Dv, 0, (size_t)Dv * sizeof(float));
        }
        m_out[q] = mt;
    }
}

typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                        const float *, const int *, const float *, const int *, const float *, float *, const int *);

/* Row-major C[m][n] = A[m][k] B'[k][n] + beta C, B' = B^T when bt (B stored [n][k], row stride ldb), else B
   ([k][n], row stride ldb); through the column-major BLAS as C^T = B'^T A^T. */
static void gemm_rm(sgemm_t g, int m, int n, int k, const float *A, int lda, const float *B, int ldb, int bt,
                    float beta, float *C, int ldc) {
    const float one = 1.0f;
    g(bt ? "T" : "N", "N", &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* dst[j] += sum_i c[i] * P[i][j] for the rows of one head (P row stride ldp, zero where a row sees no key), tile by
   tile: c[tt * r + i] is row i's weight in tile tt. Four rows at a time, each row read once from start to end. */
static void col_sums(const float *P, long ldp, long r, long a, long e, long tile, const float *c, float *dst) {
    long nt = (e + tile - 1) / tile;
    for (long i0 = 0; i0 < r; i0 += 4) {
        long n = r - i0 < 4 ? r - i0 : 4;
        const float *p0 = P + i0 * ldp, *p1 = n > 1 ? p0 + ldp : p0, *p2 = n > 2 ? p0 + 2 * ldp : p0,
                    *p3 = n > 3 ? p0 + 3 * ldp : p0;
        for (long tt = 0; tt < nt; ++tt) {
            long b = tt * tile, T = b + tile < e ? tile : e - b;
            const float *ct = c + tt * r + i0;
            float c0 = ct[0], c1 = n > 1 ? ct[1] : 0.0f, c2 = n > 2 ? ct[2] : 0.0f, c3 = n > 3 ? ct[3] : 0.0f;
            if (c0 == 0.0f && c1 == 0.0f && c2 == 0.0f && c3 == 0.0f) continue;
            long nv = visible(a, i0 + n - 1, b, T);
            const float *q0 = p0 + b, *q1 = p1 + b, *q2 = p2 + b, *q3 = p3 + b;
            float *d = dst + b;
#pragma omp simd
            for (long j = 0; j < nv; ++j) d[j] += c0 * q0[j] + c1 * q1[j] + c2 * q2[j] + c3 * q3[j];
        }
    }
}

/* Causal attention with its all-query statistics (avkv.methods.allquery.attention_with_sums), fp32.
   q: [H, S, D] (strides qh, qs), k: [kvH, S, D] (kh_, ks), v: [kvH, S, Dv] (vh, vs), last dims contiguous; query
   head h reads KV head h / (H/kvH). a2 = scale * log2(e). w: [R, S] row weights. Writes out [S, H, Dv], lse [H, S]
   (natural log-sum-exps) and adds to sums [H, R, S] (zeroed by the caller). ws: workspace of
   fused_workspace(H, kvH, S, D, Dv, chunk, tile) floats. Rows go in chunks of `chunk` positions; per KV head its
   g*chunk query rows see the keys in tiles of `tile`: logits (BLAS), softmax and P.V (BLAS) on a tile that stays
   in cache, the probabilities kept in a [g*chunk, S] buffer that the column sums read once the rows' normalisers
   are final (one 4-row pass per head and row vector, fused_features / OPT_* for opts). */
long fused_workspace(long H, long kvH, long S, long D, long Dv, long chunk, long tile) {
    long M = (H / kvH) * chunk, nt = (S + tile - 1) / tile;
    return M * (D + tile + S + Dv + 1) + nt * M + nt * chunk;
}

int fused_attention(sgemm_t g, const float *q, long qh, long qs, const float *k, long kh_, long ks,
                    const float *v, long vh, long vs, long H, long kvH, long S, long D, long Dv, float a2,
                    long chunk, long tile, const float *w, long R, float *out, float *lse, float *sums,
                    float *ws, long ws_len, long opts) {
    long G = H / kvH, Mmax = G * chunk, ntmax = (S + tile - 1) / tile;
    if (G * kvH != H || chunk < 1 || tile < 1 || ws_len < fused_workspace(H, kvH, S, D, Dv, chunk, tile))
        return -1;
    float *Q = ws, *hot = Q + Mmax * D, *keep = hot + Mmax * tile, *acc = keep + Mmax * S, *l = acc + Mmax * Dv;
    float *ms = l + Mmax, *coef = ms + ntmax * Mmax;
    for (long a = 0; a < S; a += chunk) {
        long e = a + chunk < S ? a + chunk : S, r = e - a, M = G * r;
        for (long kv = 0; kv < kvH; ++kv) {
            const float *K = k + kv * kh_, *V = v + kv * vh;
            for (long gi = 0; gi < G; ++gi)                       /* the group's query rows, scaled */
                for (long i = 0; i < r; ++i) {
                    const float *src = q + (kv * G + gi) * qh + (a + i) * qs;
                    float *dst = Q + (gi * r + i) * D;
                    for (long d = 0; d < D; ++d) dst[d] = src[d] * a2;
                }
            long t = 0;
            for (long b = 0; b < e; b += tile, ++t) {
                long T = b + tile < e ? tile : e - b;
                gemm_rm(g, (int)M, (int)T, (int)D, Q, (int)D, K + b * ks, (int)ks, 1, 0.0f, hot, (int)T);
                tile_softmax(hot, T, keep + b, S, M, r, T, a, b, t ? ms + (t - 1) * M : NULL, ms + t * M, l, acc,
                             Dv, (int)opts);
                gemm_rm(g, (int)M, (int)Dv, (int)T, hot, (int)T, V + b * vs, (int)vs, 0, 1.0f, acc, (int)Dv);
            }
            const long nt = t;
            const float *m = ms + (nt - 1) * M;
#if defined(__SSE2__)
            _mm_sfence();
#endif
            for (long gi = 0; gi < G; ++gi) {
                long h = kv * G + gi;
                for (long i = 0; i < r; ++i) {
                    long qq = gi * r + i;
                    float inv = 1.0f / l[qq];
                    float *o = out + ((a + i) * H + h) * Dv;
                    for (long d = 0; d < Dv; ++d) o[d] = acc[qq * Dv + d] * inv;
                    lse[h * S + a + i] = (m[qq] + log2f(l[qq])) * 0.6931471805599453f;
                }
                for (long kk = 0; kk < R; ++kk) {           /* the column sums: row weights w / l, rescaled per tile */
                    for (long tt = 0; tt < nt; ++tt)
                        for (long i = 0; i < r; ++i) {
                            long qq = gi * r + i;
                            coef[tt * r + i] = w[kk * S + a + i] / l[qq] * exp2f(ms[tt * M + qq] - m[qq]);
                        }
                    col_sums(keep + gi * r * S, S, r, a, e, tile, coef, sums + (h * R + kk) * S);
                }
            }
        }
    }
    return 0;
}
"""

FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fPIC", "-shared", "-std=c99"]
_STATE: dict = {}


def kernel_dir() -> Path:
    """Where the built library lives: ``$AVKV_KERNEL_DIR`` or ``<repo>/.cache/kernels``."""
    env = os.environ.get("AVKV_KERNEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "kernels"


def _cpu_key() -> str:
    """The CPU's feature flags (``-march=native`` code must not run on another CPU sharing the cache)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str, flags: list[str] | None = None) -> Path:
    flags = FLAGS if flags is None else flags
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE, " ".join(flags), version, _cpu_key()]).encode()).hexdigest()[:16]
    d = kernel_dir()
    so = d / f"fused_tile-{key}.so"
    if so.exists():
        return so
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        src, out = Path(tmp) / "fused_tile.c", Path(tmp) / "fused_tile.so"
        src.write_text(SOURCE)
        res = subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        os.replace(out, so)                                   # atomic: concurrent builders never see half a file
    return so


def _sgemm():
    """The address of the BLAS ``sgemm_`` torch's CPU library carries (MKL in the CPU wheels), or None."""
    path = Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def load(flags: list[str] | None = None):
    """Build (once per source, compiler, flags and CPU; ``flags``: the compiler flags, :data:`FLAGS` by default) and
    load the library, without the self-check; raises on failure."""
    gemm = _sgemm()
    if gemm is None:
        raise RuntimeError(f"no sgemm_ in torch's CPU library (torch {torch.__version__})")
    so = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"), flags)))
    p, i = ctypes.c_void_p, ctypes.c_long
    so.fused_attention.argtypes = [p, p, i, i, p, i, i, p, i, i, i, i, i, i, i, ctypes.c_float, i, i, p, i,
                                   p, p, p, p, i, i]
    so.fused_attention.restype = ctypes.c_int
    so.fused_workspace.argtypes = [i] * 7
    so.fused_workspace.restype = i
    so.fused_features.argtypes = []
    so.fused_features.restype = i
    so.features = int(so.fused_features())
    so.gemm = gemm
    return so


def lib():
    """The loaded kernel library, or None (disabled, no compiler, no BLAS symbol, build, load or self-check failed:
    warned once)."""
    if os.environ.get("AVKV_FUSED_KERNEL", "1") == "0":
        return None
    if "lib" not in _STATE:
        _STATE["lib"] = None
        try:
            so = load()
            _self_check(so)
            _STATE["lib"] = so
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            warnings.warn(f"avkv: the fused all-query kernel is not used ({err}); the fused route runs torch ops "
                          "(slower, same results). AVKV_FUSED_KERNEL=0 silences this.", RuntimeWarning, stacklevel=2)
    return _STATE["lib"]


def _self_check(so) -> None:
    """Once per process: the kernel agrees with the torch version on a small GQA problem (a compiled kernel must
    never be wrong silently), on the path the process will run (explicit SIMD or not, :func:`options`) with and
    without streaming stores (which one a layer takes depends on its length); rows of 70 keys in tiles of 16 and
    24 cover the SIMD loops' remainders."""
    from avkv.methods.allquery import attention_with_sums
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 70, 16, generator=g), torch.randn(2, 70, 16, generator=g), torch.randn(2, 70, 16, generator=g)
    w = torch.rand(2, 70, generator=g)
    for tile in (16, 24):
        ref = attention_with_sums(q, k, v, 0.25, w, chunk=8, tile=tile, kernel=False)
        for stream in (False, True):
            got = fused_attention(so, q, k, v, 0.25, w, chunk=8, tile=tile, stream=stream)
            for x, y in zip(got, ref):
                if not torch.allclose(x, y, atol=1e-5, rtol=1e-4):
                    raise RuntimeError(f"self-check failed (tile {tile}, stream {stream}, "
                                       f"max diff {float((x - y).abs().max()):.3g})")


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 with a contiguous last dimension (other strides are passed to the kernel)."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


#: option bits of the C function (its OPT_* enum)
OPT_SIMD, OPT_STREAM = 1, 2
#: probability buffers larger than this are written with streaming stores (they do not stay in cache)
STREAM_MIN_BYTES = 8 << 20


def options(so, buffer_bytes: int, simd: bool | None = None, stream: bool | None = None) -> int:
    """The C function's option bits for a probability buffer of ``buffer_bytes``: explicit SIMD unless
    ``AVKV_FUSED_SIMD=0`` (``simd`` overrides), streaming stores above :data:`STREAM_MIN_BYTES` (``stream`` or
    ``AVKV_FUSED_STREAM=0``/``1`` override); a path the build lacks (``so.features``) is never asked for."""
    if simd is None:
        simd = os.environ.get("AVKV_FUSED_SIMD", "1") != "0"
    if stream is None:
        env = os.environ.get("AVKV_FUSED_STREAM", "auto")
        stream = buffer_bytes > STREAM_MIN_BYTES if env == "auto" else env != "0"
    return ((OPT_SIMD if simd else 0) | (OPT_STREAM if stream else 0)) & so.features


def fused_attention(so, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, w: torch.Tensor,
                    chunk: int, tile: int, simd: bool | None = None, stream: bool | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C version of :func:`avkv.methods.allquery.attention_with_sums` (``w``: the row weights [R, S]):
    ``out`` [S, H, Dv] (fp32), ``lse`` [H, S], ``sums`` [H, R, S]. ``simd`` / ``stream``: see :func:`options`."""
    H, S, D = q.shape
    kvH, Dv = k.shape[0], v.shape[-1]
    q, k, v, w = _rows(q), _rows(k), _rows(v), w.float().contiguous()
    out = torch.empty(S, H, Dv)
    lse = torch.empty(H, S)
    sums = torch.zeros(H, w.shape[0], S)
    n = so.fused_workspace(H, kvH, S, D, Dv, chunk, tile)
    ws = torch.empty(n)
    opts = options(so, (H // kvH) * chunk * S * 4, simd, stream)
    rc = so.fused_attention(so.gemm, _ptr(q), q.stride(0), q.stride(1), _ptr(k), k.stride(0), k.stride(1), _ptr(v),
                            v.stride(0), v.stride(1), H, kvH, S, D, Dv, scale * 1.4426950408889634, chunk, tile,
                            _ptr(w), w.shape[0], _ptr(out), _ptr(lse), _ptr(sums), _ptr(ws), n, opts)
    if rc != 0:
        raise ValueError(f"fused kernel: bad shapes H={H} kvH={kvH} chunk={chunk} tile={tile}")
    return out, lse, sums


__all__ = ["lib", "load", "kernel_dir", "fused_attention", "options", "SOURCE", "STREAM_MIN_BYTES"]

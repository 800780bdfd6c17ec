"""The element-wise work of the fused all-query attention (:func:`avkv.methods.allquery.attention_with_sums`) as
one compiled pass per tile, built lazily with the system C compiler and loaded with :mod:`ctypes`.

Why: at long prompts the torch version of a tile step (causal mask, row max, subtract, exp2, row sum, rescale
factor) streams the tile through memory six times, and the column sums' product reads the chunk buffer once more
per row vector; that traffic, not arithmetic, was the fused route's excess over SDPA's kernel
(``results/bench/README.md``). Here each row of a tile is read once for its max and once (from L1) for exp2 and its
sum, masked columns are never touched but zeroed, and the column sums are one multiply-add per element and declared
row vector, skipping rows whose weight is zero. The matrix products stay in torch (MKL).

The C source is below (plain C, no torch headers: no ninja and no build of the extension toolchain). It is
compiled once per source, compiler and CPU into ``<repo>/.cache/kernels/`` (``AVKV_KERNEL_DIR`` overrides); the
compiler is ``$CC`` or ``cc``. Nothing needs it: when the build or the load fails, :func:`lib` warns once and
returns None and the fused route runs its torch ops instead (the route used is recorded in
:class:`avkv.methods.allquery.PrefillStats` ``.route``). ``AVKV_FUSED_KERNEL=0`` turns it off.

Exactness: exp2 is a degree-7 polynomial of the fraction (truncation < 6e-9 relative) times 2^n, i.e. within about
two fp32 ulps of ``torch.exp2``; arguments below −126 give 0. Sums are accumulated in another order than torch's.
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
#include <immintrin.h>

/* 2^x for x <= 0: 2^n * P(t), n = round(x), t = x - n in [-0.5, 0.5], P the degree-7 Taylor polynomial of 2^t. */
static inline float exp2_neg(float x) {
    float xc = x < -126.0f ? -126.0f : x;
    float n = (xc + 12582912.0f) - 12582912.0f;
    float t = xc - n;
    float p = 1.525273380405984e-05f;
    p = p * t + 1.5403530393381606e-04f;
    p = p * t + 1.3333558146428443e-03f;
    p = p * t + 9.618129107628477e-03f;
    p = p * t + 5.550410866482158e-02f;
    p = p * t + 2.402265069591007e-01f;
    p = p * t + 6.931471805599453e-01f;
    p = p * t + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return x < -126.0f ? 0.0f : p * s;
}

static inline long visible(long a, long i, long b, long T) {  /* keys of tile [b, b+T) that query a+i sees */
    long v = a + i + 1 - b;
    return v < 0 ? 0 : (v > T ? T : v);
}

/* Copy n floats to dst with streaming (non-temporal) stores where the CPU has them: the chunk buffer is read back
   only after the chunk's last tile, so it must not evict the tile being worked on. */
static void stream_copy(float *dst, const float *src, long n) {
    long j = 0;
#if defined(__AVX512F__)
    for (; j < n && ((uintptr_t)(dst + j) & 63); ++j) dst[j] = src[j];
    for (; j + 16 <= n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
#elif defined(__AVX__)
    for (; j < n && ((uintptr_t)(dst + j) & 31); ++j) dst[j] = src[j];
    for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
#endif
    for (; j < n; ++j) dst[j] = src[j];
}

/* One tile of the online softmax, in place. s: [M, T] logits in log2 units (cache-resident scratch), row q = gi*r + i
   is query a+i of the group's head gi, the tile's keys are [b, b+T). m_in: the rows' running max (NULL on the
   chunk's first tile). Writes m_out (the new max), p = 2^(s - m_out) into s (0 where the key is not visible) and
   into keep (row stride ldk, streamed), l = l*f + sum(p) with f = 2^(m_in - m_out), and scales acc's rows by f. */
static void tile_softmax(float *s, float *keep, long ldk, long M, long r, long T, long a, long b,
                         const float *m_in, float *m_out, float *l, float *acc, long Dv) {
    for (long q = 0; q < M; ++q) {
        long v = visible(a, q % r, b, T);
        float *row = s + q * T;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (long j = 0; j < v; ++j) mx = row[j] > mx ? row[j] : mx;
        float mo = m_in ? m_in[q] : -INFINITY;
        float mt = mx > mo ? mx : mo;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (long j = 0; j < v; ++j) {
            float p = exp2_neg(row[j] - mt);
            row[j] = p;
            sum += p;
        }
        if (v < T) memset(row + v, 0, (size_t)(T - v) * sizeof(float));
        stream_copy(keep + q * ldk, row, v);
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

/* Causal attention with its all-query statistics (avkv.methods.allquery.attention_with_sums), fp32.
   q: [H, S, D] (strides qh, qs), k: [kvH, S, D] (kh_, ks), v: [kvH, S, Dv] (vh, vs), last dims contiguous; query
   head h reads KV head h / (H/kvH). a2 = scale * log2(e). w: [R, S] row weights. Writes out [S, H, Dv], lse [H, S]
   (natural log-sum-exps) and adds to sums [H, R, S] (zeroed by the caller). ws: workspace of
   fused_workspace(H, kvH, S, D, Dv, chunk, tile) floats. Rows go in chunks of `chunk` positions; per KV head its
   g*chunk query rows see the keys in tiles of `tile`: logits (BLAS), softmax and P.V (BLAS) on a tile that stays
   in cache, the probabilities streamed into a [g*chunk, S] buffer that the column sums read once the rows'
   normalisers are final. */
long fused_workspace(long H, long kvH, long S, long D, long Dv, long chunk, long tile) {
    long M = (H / kvH) * chunk, nt = (S + tile - 1) / tile;
    return M * (D + tile + S + Dv + 1) + nt * M;
}

int fused_attention(sgemm_t g, const float *q, long qh, long qs, const float *k, long kh_, long ks,
                    const float *v, long vh, long vs, long H, long kvH, long S, long D, long Dv, float a2,
                    long chunk, long tile, const float *w, long R, float *out, float *lse, float *sums,
                    float *ws, long ws_len) {
    long G = H / kvH, Mmax = G * chunk, nt = (S + tile - 1) / tile;
    if (G * kvH != H || chunk < 1 || tile < 1 || ws_len < fused_workspace(H, kvH, S, D, Dv, chunk, tile))
        return -1;
    float *Q = ws, *hot = Q + Mmax * D, *keep = hot + Mmax * tile, *acc = keep + Mmax * S, *l = acc + Mmax * Dv;
    float *ms = l + Mmax;
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
                tile_softmax(hot, keep + b, S, M, r, T, a, b, t ? ms + (t - 1) * M : NULL, ms + t * M, l, acc, Dv);
                gemm_rm(g, (int)M, (int)Dv, (int)T, hot, (int)T, V + b * vs, (int)vs, 0, 1.0f, acc, (int)Dv);
            }
            const float *m = ms + (t - 1) * M;
            _mm_sfence();
            for (long gi = 0; gi < G; ++gi)
                for (long i = 0; i < r; ++i) {
                    long qq = gi * r + i, h = kv * G + gi;
                    float inv = 1.0f / l[qq];
                    float *o = out + ((a + i) * H + h) * Dv;
                    for (long d = 0; d < Dv; ++d) o[d] = acc[qq * Dv + d] * inv;
                    lse[h * S + a + i] = (m[qq] + log2f(l[qq])) * 0.6931471805599453f;
                    const float *row = keep + qq * S;
                    for (long kk = 0; kk < R; ++kk) {              /* the column sums, tile by tile */
                        float c = w[kk * S + a + i] * inv;
                        if (c == 0.0f) continue;
                        float *dst = sums + (h * R + kk) * S;
                        long tt = 0;
                        for (long b = 0; b < e; b += tile, ++tt) {
                            long nv = visible(a, i, b, b + tile < e ? tile : e - b);
                            float cc = c * exp2f(ms[tt * M + qq] - m[qq]);
#pragma omp simd
                            for (long j = 0; j < nv; ++j) dst[b + j] += cc * row[b + j];
                        }
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


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), version, _cpu_key()]).encode()).hexdigest()[:16]
    d = kernel_dir()
    so = d / f"fused_tile-{key}.so"
    if so.exists():
        return so
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        src, out = Path(tmp) / "fused_tile.c", Path(tmp) / "fused_tile.so"
        src.write_text(SOURCE)
        res = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
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


def load():
    """Build (once per source, compiler and CPU) and load the library, without the self-check; raises on failure."""
    gemm = _sgemm()
    if gemm is None:
        raise RuntimeError(f"no sgemm_ in torch's CPU library (torch {torch.__version__})")
    so = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"))))
    p, i = ctypes.c_void_p, ctypes.c_long
    so.fused_attention.argtypes = [p, p, i, i, p, i, i, p, i, i, i, i, i, i, i, ctypes.c_float, i, i, p, i,
                                   p, p, p, p, i]
    so.fused_attention.restype = ctypes.c_int
    so.fused_workspace.argtypes = [i] * 7
    so.fused_workspace.restype = i
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
    never be wrong silently)."""
    from avkv.methods.allquery import attention_with_sums
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 70, 16, generator=g), torch.randn(2, 70, 16, generator=g), torch.randn(2, 70, 16, generator=g)
    w = torch.rand(2, 70, generator=g)
    got = fused_attention(so, q, k, v, 0.25, w, chunk=8, tile=16)
    ref = attention_with_sums(q, k, v, 0.25, w, chunk=8, tile=16, kernel=False)
    for x, y in zip(got, ref):
        if not torch.allclose(x, y, atol=1e-5, rtol=1e-4):
            raise RuntimeError(f"self-check failed (max diff {float((x - y).abs().max()):.3g})")


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 with a contiguous last dimension (other strides are passed to the kernel)."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_attention(so, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, w: torch.Tensor,
                    chunk: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C version of :func:`avkv.methods.allquery.attention_with_sums` (``w``: the row weights [R, S]):
    ``out`` [S, H, Dv] (fp32), ``lse`` [H, S], ``sums`` [H, R, S]."""
    H, S, D = q.shape
    kvH, Dv = k.shape[0], v.shape[-1]
    q, k, v, w = _rows(q), _rows(k), _rows(v), w.float().contiguous()
    out = torch.empty(S, H, Dv)
    lse = torch.empty(H, S)
    sums = torch.zeros(H, w.shape[0], S)
    n = so.fused_workspace(H, kvH, S, D, Dv, chunk, tile)
    ws = torch.empty(n)
    rc = so.fused_attention(so.gemm, _ptr(q), q.stride(0), q.stride(1), _ptr(k), k.stride(0), k.stride(1), _ptr(v),
                            v.stride(0), v.stride(1), H, kvH, S, D, Dv, scale * 1.4426950408889634, chunk, tile,
                            _ptr(w), w.shape[0], _ptr(out), _ptr(lse), _ptr(sums), _ptr(ws), n)
    if rc != 0:
        raise ValueError(f"fused kernel: bad shapes H={H} kvH={kvH} chunk={chunk} tile={tile}")
    return out, lse, sums


__all__ = ["lib", "load", "kernel_dir", "fused_attention", "SOURCE"]

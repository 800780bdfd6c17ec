"""The compiled fused all-query kernel (avkv/methods/fused_kernel.py): equal to the definition at a realistic head
size with the strided queries transformers hands over, and never needed: a failed build warns once and the fused
route runs its torch ops, which the prefill's statistics record."""
import math
import platform
import warnings

import pytest
import torch

from avkv import lse_attention
from avkv.methods import allquery, fused_kernel
from tests.methods.test_allquery import _Module, reference

def _built():
    try:
        return fused_kernel.load()
    except (OSError, RuntimeError):
        return None


RAW = _built()                       # the library as built, before its self-check (what the tests below check)
needs_kernel = pytest.mark.skipif(RAW is None, reason="the fused kernel did not build here")


def _check_definition(so, S, chunk, tile, simd=None, stream=None):
    g = torch.Generator().manual_seed(S + tile)
    H, kvH, D = 14, 2, 64
    q = torch.randn(S, H, D, generator=g).mul(2).transpose(0, 1)
    k, v = torch.randn(kvH, S, D, generator=g), torch.randn(kvH, S, D, generator=g)
    rows = torch.stack([torch.ones(S), (torch.arange(S) < S // 3).float(), torch.rand(S, generator=g)])
    scale = D ** -0.5
    out, lse, sums = fused_kernel.fused_attention(so, q, k, v, scale, rows, chunk, tile, simd=simd, stream=stream)
    A = reference(q, k, scale)
    ref_out = torch.einsum("hij,hjd->ihd", A, v.double().repeat_interleave(H // kvH, 0))
    assert torch.allclose(out.double(), ref_out, atol=1e-5), (out.double() - ref_out).abs().max()
    logits = torch.einsum("hid,hjd->hij", q.double(), k.double().repeat_interleave(H // kvH, 0)) * scale
    ref_lse = logits.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf).logsumexp(-1)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)
    ref_sums = torch.einsum("rs,hst->hrt", rows.double(), A)
    assert torch.allclose(sums.double(), ref_sums, rtol=1e-5, atol=1e-6), (sums.double() - ref_sums).abs().max()


@needs_kernel
@pytest.mark.parametrize("S,chunk,tile", [(300, 32, 1024), (300, 32, 64), (257, 5, 48)])
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("stream", [True, False])
def test_kernel_equals_the_definition(S, chunk, tile, simd, stream):
    """D = 64, 7 query heads per KV head (the 0.5B grouping), queries laid out [S, H, D] and viewed [H, S, D]
    (non-contiguous, as after transformers' transpose), AccKV-like rows with zero weights (skipped rows): output,
    log-sum-exps and every row-weighted column sum against the float64 causal softmax matrix; with and without the
    explicit-SIMD softmax and the streaming stores (rows of 1 to 1024 keys: every SIMD remainder)."""
    _check_definition(RAW, S, chunk, tile, simd, stream)


def test_the_paths_are_chosen_by_size_and_environment(monkeypatch):
    """Streaming stores only for a buffer above STREAM_MIN_BYTES, SIMD unless AVKV_FUSED_SIMD=0, the environment
    forcing either, and never a path the build lacks."""
    class Lib:
        features = fused_kernel.OPT_SIMD | fused_kernel.OPT_STREAM
    monkeypatch.delenv("AVKV_FUSED_SIMD", raising=False)
    monkeypatch.delenv("AVKV_FUSED_STREAM", raising=False)
    big, small = fused_kernel.STREAM_MIN_BYTES + 4, fused_kernel.STREAM_MIN_BYTES
    assert fused_kernel.options(Lib, big) == fused_kernel.OPT_SIMD | fused_kernel.OPT_STREAM
    assert fused_kernel.options(Lib, small) == fused_kernel.OPT_SIMD
    monkeypatch.setenv("AVKV_FUSED_STREAM", "1")
    monkeypatch.setenv("AVKV_FUSED_SIMD", "0")
    assert fused_kernel.options(Lib, small) == fused_kernel.OPT_STREAM
    monkeypatch.setenv("AVKV_FUSED_STREAM", "0")
    assert fused_kernel.options(Lib, big) == 0
    Lib.features = 0
    assert fused_kernel.options(Lib, big, simd=True, stream=True) == 0


# builds for other CPUs than this one's -march=native: baseline x86-64 (no AVX: neither path), Haswell (AVX2+FMA)
_ARCHES = {"x86-64": 0, "haswell": fused_kernel.OPT_SIMD | (8 << 8) | fused_kernel.OPT_STREAM}


@needs_kernel
@pytest.mark.parametrize("arch", sorted(_ARCHES))
def test_other_cpu_builds_equal_the_definition(arch, monkeypatch, tmp_path):
    """The source built for a CPU without AVX (the plain loops, ordinary stores) and for one with AVX2 but no
    AVX-512 (8-wide SIMD): each declares the paths it has and gives the definition."""
    if arch == "haswell" and not {"avx2", "fma"} <= set(fused_kernel._cpu_key().split()):
        pytest.skip("this CPU cannot run an AVX2 build")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 builds")
    monkeypatch.setenv("AVKV_KERNEL_DIR", str(tmp_path))
    flags = [f for f in fused_kernel.FLAGS if not f.startswith(("-march", "-mprefer"))] + [f"-march={arch}"]
    so = fused_kernel.load(flags)
    assert so.features == _ARCHES[arch]
    for simd in (True, False):
        _check_definition(so, 300, 32, 64, simd=simd, stream=True)


@pytest.fixture
def broken_compiler(monkeypatch, tmp_path):
    """A fresh kernel state whose build fails (no such compiler, an empty kernel folder)."""
    monkeypatch.delenv("AVKV_FUSED_KERNEL", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("AVKV_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(fused_kernel, "_STATE", {})


def test_a_failed_build_warns_once_and_the_torch_ops_run(broken_compiler):
    """The build fails: one RuntimeWarning naming the cause, then silence; the fused route still gives the
    definition through its torch ops, kernel=True refuses, and the prefill's statistics say fused/torch."""
    with pytest.warns(RuntimeWarning, match="fused all-query kernel is not used"):
        assert fused_kernel.lib() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_kernel.lib() is None and allquery.fused_impl("cpu") == "torch"
        g = torch.Generator().manual_seed(0)
        H, kvH, S, D = 6, 2, 130, 16
        q, k, v = (torch.randn(1, n, S, D, generator=g) for n in (H, kvH, kvH))
        m = _Module()
        m._avkv_stats_sink = {"modality": None, "methods": [], "rows": {}}
        lse_attention.stats_attention(m, q, k, v, None, scaling=0.3)
        st = lse_attention.take(m, S)
        assert st.route == "fused/torch"
        assert torch.allclose(st.sums[:, 0].double(), reference(q[0], k[0], 0.3).sum(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="kernel=True"):
        allquery.attention_with_sums(q[0], k[0], v[0], 0.3, kernel=True)


@needs_kernel
def test_the_route_used_is_recorded(monkeypatch):
    """With the kernel built (and past its self-check), the prefill's statistics say fused/c."""
    monkeypatch.delenv("AVKV_FUSED_KERNEL", raising=False)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 130, 16, generator=g) for n in (6, 2, 2))
    m = _Module()
    m._avkv_stats_sink = {"modality": None, "methods": [], "rows": {}}
    lse_attention.stats_attention(m, q, k, v, None, scaling=0.3)
    assert lse_attention.take(m, 130).route == "fused/c"


@needs_kernel
def test_a_wrong_kernel_fails_its_self_check(monkeypatch, tmp_path):
    """A kernel whose results differ from the torch ops' is not used (warned), whatever the build did."""
    monkeypatch.delenv("AVKV_FUSED_KERNEL", raising=False)
    monkeypatch.setattr(fused_kernel, "_STATE", {})
    real = fused_kernel.fused_attention

    def off(*a, **kw):
        out, lse, sums = real(*a, **kw)
        return out, lse, sums * 1.001
    monkeypatch.setattr(fused_kernel, "fused_attention", off)
    with pytest.warns(RuntimeWarning, match="self-check failed"):
        assert fused_kernel.lib() is None

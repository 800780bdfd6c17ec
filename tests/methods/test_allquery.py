"""All-query statistics (issue 18): the prefill-captured log-sum-exp route and the chunked-softmax route against a
float64 reference written from the definition, and the engine route against the recomputing one on a tiny model."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from avkv import lse_attention
from avkv.methods import allquery
from avkv.methods.base import accumulated_scores, attention_sums
from tests.methods.helpers import make_view


def reference(q, k, scale):
    """The causal softmax attention matrix [H, S, S] in float64, from the definition: A[h, i, j] =
    exp(s·q_i·k_j) / Σ_{j'≤i} exp(s·q_i·k_j') for j ≤ i, 0 otherwise; query head h reads KV head h // (H/kvH)."""
    H, S, _ = q.shape
    g = H // k.shape[0]
    A = torch.zeros(H, S, S, dtype=torch.float64)
    for h in range(H):
        logits = (q[h].double() @ k[h // g].double().T) * scale
        for i in range(S):
            e = torch.exp(logits[i, : i + 1] - logits[i, : i + 1].max())
            A[h, i, : i + 1] = e / e.sum()
    return A


def captured(view):
    """The view with statistics as the prefill's kernel captures them (the fused kernel's own log-sum-exps)."""
    q = view.queries(0, view.seq_len)
    _, lse = lse_attention._kernel(q[None], view.keys[None], view.values[None], view.scaling)
    return replace(view, stats=allquery.PrefillStats(q, lse[0].float()))


# seq not a multiple of any chunk, head dims that are not multiples of 8 (no alignment padding is needed)
SHAPES = [dict(kv_heads=1, groups=1, seq=33, dim=8), dict(kv_heads=2, groups=3, seq=50, dim=12),
          dict(kv_heads=4, groups=2, seq=71, dim=5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [1, 7, 16, 128])
@pytest.mark.parametrize("route", ["lse", "softmax"])
def test_column_sums_equal_the_definition(shape, chunk, route):
    v = make_view(seed=chunk, **shape)
    ref = reference(v.queries(0, v.seq_len), v.keys, v.scaling).sum(1)          # summed over queries: [H, S]
    w = captured(v) if route == "lse" else v
    assert route == "softmax" or allquery.usable(w) is not None
    got = accumulated_scores(w, chunk=chunk).double()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (got - ref).abs().max()
    S = v.seq_len
    norm = accumulated_scores(w, chunk=chunk, normalize=True).double()
    assert torch.allclose(norm, ref / torch.arange(S, 0, -1, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("route", ["lse", "softmax"])
def test_weighted_and_block_sums_equal_the_definition(route):
    v = make_view(kv_heads=2, groups=3, seq=45, dim=8)
    S = v.seq_len
    g = torch.Generator().manual_seed(1)
    rw, cw = torch.rand(S, generator=g), torch.rand(S, generator=g)
    masks = {"a": (torch.rand(S, generator=g) > 0.4, torch.rand(S, generator=g) > 0.5),
             "b": (torch.arange(S) % 3 == 0, torch.arange(S) < 20), "none": (torch.zeros(S, dtype=torch.bool),
                                                                         torch.ones(S, dtype=torch.bool))}
    A = reference(v.queries(0, S), v.keys, v.scaling) * rw.double()[None, :, None] * cw.double()[None, None, :]
    w = captured(v) if route == "lse" else v
    cols, blocks = attention_sums(w, 8, rw, cw, masks)
    assert torch.allclose(cols.double(), A.sum(1), rtol=1e-5, atol=1e-5)
    for name, (rows, cm) in masks.items():
        ref = torch.stack([A[h][rows][:, cm].sum() for h in range(v.num_heads)])
        assert torch.allclose(blocks[name].double(), ref, rtol=1e-5, atol=1e-6), name
    plain, none = attention_sums(w, 8)
    assert none == {} and torch.allclose(plain.double(), A.new_tensor(0).add(
        reference(v.queries(0, S), v.keys, v.scaling).sum(1)), rtol=1e-5, atol=1e-5)


def test_memory_cap_shrinks_chunks_to_single_rows():
    v = captured(make_view(seq=40))
    ref = reference(v.queries(0, 40), v.keys, v.scaling).sum(1)
    assert torch.allclose(accumulated_scores(v, chunk=128, max_elements=1).double(), ref, rtol=1e-5, atol=1e-5)


def test_stale_or_foreign_statistics_are_not_used():
    """Statistics of another length (a sub-view, a later chunk) fall back to recomputation instead of being misread."""
    v = make_view(seq=30)
    w = captured(v)
    short = replace(w, keys=w.keys[:, :20], values=w.values[:, :20])
    assert allquery.usable(short) is None
    ref = reference(v.queries(0, 20), v.keys[:, :20], v.scaling).sum(1)
    assert torch.allclose(accumulated_scores(short).double(), ref, rtol=1e-5, atol=1e-5)


def test_a_wrong_log_sum_exp_is_detected():
    """The test above can fail: statistics off by a constant change every column sum."""
    v = captured(make_view(seq=30))
    bad = replace(v, stats=allquery.PrefillStats(v.stats.queries, v.stats.lse + 0.1))
    ref = reference(v.queries(0, 30), v.keys, v.scaling).sum(1)
    assert not torch.allclose(accumulated_scores(bad).double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- the registered attention
class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3


@pytest.mark.parametrize("masked", [False, True])
def test_stats_attention_output_is_sdpa_and_lse_is_the_definition(masked):
    g = torch.Generator().manual_seed(0)
    H, kvH, S, D = 6, 2, 57, 16
    q, k, v = (torch.randn(1, n, S, D, generator=g) for n in (H, kvH, kvH))
    m = _Module()
    m._avkv_stats_sink = {}
    mask = None
    if masked:                                  # a padded prompt: the model passes a mask, nothing is captured
        allowed = torch.ones(S, S, dtype=torch.bool).tril()
        allowed[:, :3] = False
        allowed[:3, :3] = torch.eye(3, dtype=torch.bool)
        mask = allowed[None, None]
    out, _ = lse_attention.stats_attention(m, q, k, v, mask, scaling=0.3)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask,
                                         is_causal=mask is None, scale=0.3).transpose(1, 2)
    assert torch.equal(out, ref.contiguous()) if not masked else torch.allclose(out, ref, atol=1e-6)
    st = lse_attention.take(m, S)
    if masked:
        assert st is None
        return
    logits = (q[0].double() @ k[0].double().repeat_interleave(3, 0).transpose(1, 2)) * 0.3
    lse = logits.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf).logsumexp(-1)
    assert torch.allclose(st.lse.double(), lse, atol=1e-5) and torch.equal(st.queries, q[0])
    assert lse_attention.take(m, S) is None                       # consumed


# ------------------------------------------------------------------------------------- engine, tiny model
def _kept(monkeypatch, ad, enc, method, stats: bool):
    """The indices every layer keeps, and the answer, with or without the prefill-captured statistics."""
    from avkv.engine import Compressor, Engine
    seen, used = {}, []
    apply = Compressor._apply
    take = lse_attention.take

    def spy_apply(self, module, cache, i, sel, modality):          # the prefill selections
        seen[i] = sel.indices.clone()
        return apply(self, module, cache, i, sel, modality)

    def spy_take(module, S):
        st = take(module, S)
        used.append(st is not None)
        return st
    monkeypatch.setattr(Compressor, "_apply", spy_apply)
    monkeypatch.setattr(lse_attention, "take", spy_take)
    if not stats:
        monkeypatch.setattr(lse_attention, "wants_stats", lambda m: False)
    g = Engine(ad, method, budget=0.4, max_new_tokens=3).generate(enc)
    monkeypatch.undo()
    return seen, g, used


@pytest.mark.parametrize("name", ["h2o", "lookm", "d2o", "kvmerge", "observed_attention", "acckv", "flowmm"])
def test_engine_route_keeps_the_same_entries(monkeypatch, one_thread, name):
    from avkv.config import compose, instantiate
    from tests.conftest import adapter, av_prompt
    ad = adapter("qwen2_5_omni")
    enc = ad.encode(av_prompt())
    method = instantiate(compose([f"method={name}"]).method)
    assert lse_attention.wants_stats(method)
    a, ga, used = _kept(monkeypatch, ad, enc, method, stats=True)
    assert used and all(used), "every layer's statistics came from its prefill"
    b, gb, unused = _kept(monkeypatch, ad, enc, instantiate(compose([f"method={name}"]).method), stats=False)
    assert not any(unused)
    assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)
    assert ga.token_ids == gb.token_ids
    assert torch.allclose(ga.first_logits, gb.first_logits, atol=1e-5)
    assert ad.text_config()._attn_implementation == "sdpa"       # restored after the request

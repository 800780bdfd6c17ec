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
def _kept(monkeypatch, ad, enc, method, stats: bool, route: str | None = None, passes: list | None = None):
    """The indices every layer keeps, and the answer, with or without the prefill-captured statistics (on the
    prefill ``route`` when given; ``passes`` collects the recomputing passes that ran)."""
    from avkv.engine import Compressor, Engine
    seen, used = {}, []
    if route is not None:
        monkeypatch.setattr(allquery, "prefill_route", lambda *a: route)
    if passes is not None:
        real = allquery.column_pass
        monkeypatch.setattr(allquery, "column_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
    apply = Compressor._apply
    take = lse_attention.take

    def spy_apply(self, module, cache, i, sel, modality):          # the prefill selections
        seen[i] = sel.indices.clone()
        return apply(self, module, cache, i, sel, modality)

    def spy_take(module, S, sink=None):
        st = take(module, S, sink)
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
    assert ga.token_ids == gb.token_ids and "allquery_route" not in gb.record      # nothing captured: no route
    assert torch.allclose(ga.first_logits, gb.first_logits, atol=1e-5)
    assert ad.text_config()._attn_implementation == "sdpa"       # restored after the request


# ------------------------------------------------------------------------ the fused route (the prefill's attention)
FUSED_TILINGS = [dict(chunk=1, tile=4), dict(chunk=7, tile=5), dict(chunk=16, tile=64), dict(chunk=32, tile=2048)]


def _kernels():
    from avkv.methods import fused_kernel
    return [False, pytest.param(True, marks=pytest.mark.skipif(fused_kernel.lib() is None,
                                                                reason="the fused kernel did not build here"))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tiling", FUSED_TILINGS)
@pytest.mark.parametrize("kernel", _kernels())
def test_fused_attention_equals_the_definition(shape, tiling, kernel):
    """Output, log-sum-exps and row-weighted column sums of the chunked attention against the float64 matrix: rows
    not a multiple of the chunk, tiles smaller than the chunk (the online softmax rescales), GQA; the torch ops and
    the compiled kernel (:mod:`avkv.methods.fused_kernel`)."""
    v = make_view(seed=tiling["chunk"], **shape)
    q, S = v.queries(0, v.seq_len), v.seq_len
    g = torch.Generator().manual_seed(3)
    rows = torch.cat([torch.ones(1, S), torch.rand(2, S, generator=g)])
    val = torch.randn(v.num_kv_heads, S, 7, generator=g)                      # Dv ≠ D
    out, lse, sums = allquery.attention_with_sums(q, v.keys, val, v.scaling, rows, kernel=kernel, **tiling)
    A = reference(q, v.keys, v.scaling)
    ref_out = torch.einsum("hij,hjd->ihd", A, val.double().repeat_interleave(v.groups, 0))
    assert out.shape == (S, v.num_heads, 7) and torch.allclose(out.double(), ref_out, atol=1e-5)
    logits = torch.einsum("hid,hjd->hij", q.double(), v.keys.double().repeat_interleave(v.groups, 0)) * v.scaling
    ref_lse = logits.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf).logsumexp(-1)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)
    ref_sums = torch.einsum("rs,hst->hrt", rows.double(), A)
    assert torch.allclose(sums.double(), ref_sums, rtol=1e-5, atol=1e-5), (sums.double() - ref_sums).abs().max()


def test_fused_attention_memory_cap_and_inputs_untouched():
    """A cap of one row's logits shrinks the chunk to single rows; the caller's queries are never scaled in place."""
    v = make_view(kv_heads=1, groups=1, seq=20)
    q = v.queries(0, 20)
    q0 = q.clone()
    _, _, sums = allquery.attention_with_sums(q, v.keys, v.values, v.scaling, chunk=128, max_elements=1)
    assert torch.equal(q, q0)
    assert torch.allclose(sums[:, 0].double(), reference(q, v.keys, v.scaling).sum(1), rtol=1e-5, atol=1e-5)


def fused(view, rows=None):
    """The view with statistics as the fused prefill captures them (its sums for ``rows``, plain sums first)."""
    S = view.seq_len
    rows = torch.ones(1, S) if rows is None else torch.cat([torch.ones(1, S), rows])
    q = view.queries(0, S)
    _, lse, sums = allquery.attention_with_sums(q, view.keys, view.values, view.scaling, rows)
    return replace(view, stats=allquery.PrefillStats(q, lse, rows, sums))


def _modality(S):
    from avkv.schema import AUDIO, TEXT, VIDEO
    mod = torch.full((S,), TEXT, dtype=torch.long)
    mod[5:20], mod[24:34] = VIDEO, AUDIO
    return mod


@pytest.mark.parametrize("name", ["acckv", "acckv_focus_other", "flowmm"])
def test_fused_sums_serve_acckv_and_flowmm(monkeypatch, name):
    """AccKV's redistributed column sums and text→video/audio blocks, FlowMM's media↔text blocks: served from the
    sums the fused prefill accumulated for the rows the method declared (no recomputation: the lse pass is
    disabled), equal to the definition."""
    from avkv.methods.acckv import AccKV
    from avkv.methods.flowmm import FlowMM
    S = 45
    v = replace(make_view(kv_heads=2, groups=3, seq=S, dim=8), modality=_modality(S))
    method = {"acckv": AccKV(), "acckv_focus_other": AccKV(redistributed_focus=False), "flowmm": FlowMM()}[name]
    w = fused(v, method.all_query_rows(v.modality))
    expect = method.layer_statistics(v) if name != "flowmm" else method.cross_modal_ratio(v)   # softmax route
    A = reference(v.queries(0, S), v.keys, v.scaling)
    monkeypatch.setattr(allquery, "column_pass", lambda *a, **k: pytest.fail("recomputed instead of served"))
    got = method.layer_statistics(w) if name != "flowmm" else method.cross_modal_ratio(w)
    if name == "flowmm":
        mod = v.modality
        vis, txt = method.media_mask(mod), mod == 0
        ref = float(((A[:, vis][:, :, txt].sum((1, 2)) + A[:, txt][:, :, vis].sum((1, 2))) / S).mean())
        assert got == pytest.approx(ref, rel=1e-5) and got == pytest.approx(expect, rel=1e-5)
        return
    pos = torch.arange(S, dtype=torch.float64)
    ref_cols = (A * (pos + 1)[None, :, None] / (S - pos)[None, None, :]).sum(1)
    assert torch.allclose(got[0].double(), ref_cols, rtol=1e-5, atol=1e-6)
    assert got[1] == pytest.approx(expect[1], rel=1e-5) and got[2] == pytest.approx(expect[2], rel=1e-5)


def test_undeclared_rows_fall_back_to_the_lse_pass(monkeypatch):
    """Sums the fused prefill did not accumulate come from its log-sum-exps (still the definition)."""
    S = 40
    v = fused(make_view(seq=S))
    calls = []
    real = allquery.column_pass
    monkeypatch.setattr(allquery, "column_pass", lambda *a, **k: calls.append(a[3] if len(a) > 3 else None) or real(*a, **k))
    rw = torch.rand(S, generator=torch.Generator().manual_seed(0))
    cols, _ = attention_sums(v, 8, rw)
    assert len(calls) == 1
    A = reference(v.queries(0, S), v.keys, v.scaling)
    assert torch.allclose(cols.double(), (A * rw.double()[None, :, None]).sum(1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(accumulated_scores(v).double(), A.sum(1), rtol=1e-5, atol=1e-5) and len(calls) == 1


def test_stats_attention_fused_route(monkeypatch):
    """The registered function on the fused route: SDPA's output up to fp32 rounding, the column sums and the
    declared rows of the installed method captured with the queries."""
    from avkv.methods.flowmm import FlowMM
    g = torch.Generator().manual_seed(0)
    H, kvH, S, D = 6, 2, 130, 16
    q, k, v = (torch.randn(1, n, S, D, generator=g) for n in (H, kvH, kvH))
    m = _Module()
    mod = _modality(S)
    m._avkv_stats_sink = {"modality": mod, "methods": [FlowMM()], "rows": {}}
    assert allquery.prefill_route(q.device, H, kvH, D, S) == "fused"
    out, _ = lse_attention.stats_attention(m, q, k, v, None, scaling=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True).transpose(1, 2)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    st = lse_attention.take(m, S)
    assert torch.equal(st.queries, q[0]) and st.sums is not None
    declared = FlowMM().all_query_rows(mod)                        # [ones, media rows, text rows]: ones once
    assert torch.equal(declared[0], torch.ones(S)) and torch.equal(st.row_weights, declared)
    A = reference(q[0], k[0], 0.3)
    assert torch.allclose(st.sums.double(), torch.einsum("rs,hst->hrt", st.row_weights.double(), A), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["h2o", "lookm", "d2o", "kvmerge", "observed_attention", "acckv", "flowmm"])
def test_engine_fused_route_keeps_what_the_lse_route_keeps(monkeypatch, one_thread, name):
    """The fused prefill (its own attention in place of SDPA's kernel) against the lse route (SDPA's kernel, then a
    pass): every statistic is served from the prefill (no recomputing pass), the kept entries and the answer are
    the same, the first logits equal up to fp32 rounding."""
    from avkv.config import compose, instantiate
    from tests.conftest import adapter, av_prompt
    ad = adapter("qwen2_5_omni")
    enc = ad.encode(av_prompt())
    passes = []
    a, ga, used = _kept(monkeypatch, ad, enc, instantiate(compose([f"method={name}"]).method), True, "fused", passes)
    assert used and all(used) and not passes, "the fused prefill served every statistic"
    assert ga.record["allquery_route"] == f"fused/{allquery.fused_impl('cpu')}"          # which one ran
    b, gb, _ = _kept(monkeypatch, ad, enc, instantiate(compose([f"method={name}"]).method), True, "lse")
    assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)
    assert ga.token_ids == gb.token_ids and gb.record["allquery_route"] == "lse"
    assert torch.allclose(ga.first_logits, gb.first_logits, atol=1e-5)

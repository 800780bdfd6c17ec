"""Every method against a short loop-style reference on seeded tensors (the KVCache-Factory pattern), plus the
properties every method must have: the kept count matches the budget and the best-scored entries are kept."""
import math

import pytest
import torch

from avkv.methods.adakv import AdaKV
from avkv.methods.base import AUDIO, TEXT, VIDEO, Selection
from avkv.methods.d2o import D2O
from avkv.methods.fastv import FastV
from avkv.methods.full import Full
from avkv.methods.h2o import H2O
from avkv.methods.kvmerge import KVMerge, segment_ids
from avkv.methods.lookm import LookM
from avkv.methods.pyramidkv import PyramidKV
from avkv.methods.random import Random
from avkv.methods.snapkv import SnapKV
from avkv.methods.streamingllm import StreamingLLM
from avkv.methods.testing import make_request
from tests.methods.helpers import make_view, naive_attention, naive_gqa_mean, naive_snapkv_scores, naive_topk


def kept_lists(sel: Selection) -> list[list[int]]:
    return [(sel.indices[h] if sel.valid is None else sel.indices[h][sel.valid[h]]).tolist()
            for h in range(sel.indices.shape[0])]


def cosine(a, b):
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


# ------------------------------------------------------------------------------------------ references
def test_snapkv_matches_reference():
    v = make_view(seq=60, n_keep=20)
    ref = naive_snapkv_scores(v, window=8)
    sel = SnapKV(window=8).compress(v)
    assert kept_lists(sel) == [naive_topk(ref[h].tolist(), 20, 8) for h in range(2)]


def test_h2o_matches_reference():
    v = make_view(seq=60, n_keep=20)
    acc = naive_gqa_mean(naive_attention(v).sum(1), 2)                 # column sums over all prompt queries
    sel = H2O().compress(v)
    assert kept_lists(sel) == [naive_topk(acc[h].tolist(), 20, 10) for h in range(2)]


def test_h2o_fixed_decode_accumulates_and_evicts_one():
    torch.manual_seed(0)
    state = {}
    v = make_view(seq=40, n_keep=12, state=state)
    h2o = H2O(recent_share=0.25)
    sel = h2o.compress(v)
    acc = naive_gqa_mean(naive_attention(v).sum(1), 2)
    kept = sel.indices
    # one decode step: the cache is the 12 kept entries + one new token
    g = torch.Generator().manual_seed(9)
    newk, newv, newq = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g), torch.randn(4, 1, 8, generator=g)
    K = torch.cat([v.keys.gather(1, kept[..., None].expand(-1, -1, 8)), newk], 1)
    V = torch.cat([v.values.gather(1, kept[..., None].expand(-1, -1, 8)), newv], 1)
    from avkv.methods.base import LayerView
    dv = LayerView(layer_idx=0, num_layers=4, keys=K, values=V, modality=torch.zeros(13, dtype=torch.long),
                   n_keep=12, num_heads=4, scaling=v.scaling, state=state, generator=v.generator,
                   query_fn=lambda a, b: newq)
    out = h2o.decode_step(dv)
    for h in range(2):
        logits = [[float(newq[qh, 0] @ K[h, j]) * v.scaling for j in range(13)] for qh in (2 * h, 2 * h + 1)]
        row = [sum(math.exp(x - max(lg)) / sum(math.exp(y - max(lg)) for y in lg) for lg in [l]) for l in logits
               for x in l]
        row = [(row[j] + row[13 + j]) / 2 for j in range(13)]           # GQA mean of the two query heads
        scores = [float(acc[h, j]) for j in kept[h].tolist()] + [0.0]
        scores = [s + r for s, r in zip(scores, row)]
        assert out.indices[h].tolist() == naive_topk(scores, 12, 3)    # recent = round(0.25 * 12)
    assert out.indices.shape == (2, 12)
    assert StreamingLLM().decode_step(dv).indices[0].tolist() == [0, 1, 2, 3] + list(range(5, 13))


def test_streamingllm_and_random():
    v = make_view(seq=50, n_keep=15)
    assert kept_lists(StreamingLLM(sink=4).compress(v)) == [[0, 1, 2, 3] + list(range(39, 50))] * 2
    r1, r2 = Random(window=5).compress(v), Random(window=5).compress(make_view(seq=50, n_keep=15))
    assert torch.equal(r1.indices, r2.indices)                          # seeded per sample
    assert all(set(range(45, 50)) <= set(k) and len(k) == 15 for k in kept_lists(r1))


def test_pyramidkv_matches_reference_per_layer():
    state = {}
    for layer in range(4):
        v = make_view(seq=60, n_keep=30, layer_idx=layer, num_layers=4, state=state)
        sel = PyramidKV(scorer=SnapKV(window=8)).compress(v)
        lo = (30 - 8) / 20
        hi = 2 * (30 - 8) - lo
        n = round(hi - layer * (hi - lo) / 3) + 8
        assert abs(sel.indices.shape[1] - n) <= 1
        ref = naive_snapkv_scores(v, 8)
        assert kept_lists(sel) == [naive_topk(ref[h].tolist(), sel.indices.shape[1], 8) for h in range(2)]


def test_adakv_matches_reference():
    v = make_view(kv_heads=3, groups=2, seq=70, n_keep=20)
    ref = naive_snapkv_scores(v, 8)
    base, floor = 12, 0.2
    flat = sorted(((float(ref[h, j]), j, h) for h in range(3) for j in range(62)), key=lambda t: (-t[0], -t[1], -t[2]))
    won = [0, 0, 0]
    for _, _, h in flat[: 3 * base]:
        won[h] += 1
    cap = [c * (1 - floor) + floor * base for c in won]
    sel = AdaKV(scorer=SnapKV(window=8), floor=floor).compress(v)
    kept = kept_lists(sel)
    assert sum(len(k) for k in kept) == 3 * 20
    for h in range(3):
        assert abs(len(kept[h]) - 8 - cap[h]) < 1
        assert kept[h] == naive_topk(ref[h].tolist(), len(kept[h]), 8)


def test_lookm_matches_reference():
    mod = torch.full((60,), TEXT)
    mod[5:40] = VIDEO
    v = make_view(seq=60, n_keep=30, modality=mod)
    acc = naive_gqa_mean(naive_attention(v).sum(1), 2)
    sel = LookM().compress(v)
    recent = 15
    for h in range(2):
        text_first = [float(acc[h, j]) - (0 if int(mod[j]) == TEXT else 1e6) for j in range(60)]
        keep = naive_topk(text_first, 30, recent)
        assert sel.indices[h].tolist() == keep
        n_text = sum(1 for j in range(60 - recent) if int(mod[j]) == TEXT)
        assert sum(1 for j in keep[:-recent] if int(mod[j]) == TEXT) == min(n_text, 15)   # text first
        # pivot merge, loop reference
        K, V = v.keys[h].double(), v.values[h].double()
        newK, newV, cnt = [K[j].clone() for j in keep], [V[j].clone() for j in keep], [1] * 30
        for e in range(60):
            if e in keep:
                continue
            sims = [cosine(K[e], K[j]) for j in keep]
            b = sims.index(max(sims))
            newK[b] += (K[e] + K[keep[b]]) / 2
            newV[b] += (V[e] + V[keep[b]]) / 2
            cnt[b] += 1
        assert torch.allclose(sel.keys[h].double(), torch.stack([k / c for k, c in zip(newK, cnt)]), atol=1e-5)
        assert torch.allclose(sel.values[h].double(), torch.stack([x / c for x, c in zip(newV, cnt)]), atol=1e-5)


def test_lookm_keep_all_text_reproduces_the_official_mask():
    mod = torch.full((60,), VIDEO)
    mod[:20] = TEXT
    v = make_view(seq=60, n_keep=12, modality=mod)
    sel = LookM(keep_all_text=True).compress(v)
    assert sel.indices.shape[1] == 20 + 6                              # every text entry + the recent window
    assert set(range(20)) <= set(sel.indices[0].tolist())


def test_kvmerge_matches_reference():
    v = make_view(seq=50, n_keep=14, dim=6)
    w, m = 4, 10
    sel = KVMerge(window=w, pivot_score="accumulated").compress(v)
    acc = naive_gqa_mean(naive_attention(v).sum(1), 2)
    P = 46
    for h in range(2):
        K, V = v.keys[h].double(), v.values[h].double()
        adj = [(cosine(K[j], K[j + 1]), j) for j in range(P - 1)]
        cuts = sorted(adj, key=lambda t: (t[0], -t[1]))[: m - 1]       # least similar pairs, later first on ties
        starts = sorted([0] + [j + 1 for _, j in cuts])
        segs = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [P])]
        pivots = [max(seg, key=lambda j: (float(acc[h, j]), j)) for seg in segs]
        d2 = [sum(float((K[j] - K[p]).pow(2).sum()) for j in seg if j != p) for seg, p in zip(segs, pivots)]
        nd = sum(1 for seg, p in zip(segs, pivots) for j in seg if float((K[j] - K[p]).pow(2).sum()) > 0)
        s2 = sum(d2) / max(nd, 1)
        assert sel.indices[h].tolist() == pivots + list(range(P, 50))
        for i, (seg, p) in enumerate(zip(segs, pivots)):
            wts = [math.exp(-float((K[j] - K[p]).pow(2).sum()) / (2 * s2)) for j in seg]
            mk = sum(wt * K[j] for wt, j in zip(wts, seg)) / sum(wts)
            mv = sum(wt * V[j] for wt, j in zip(wts, seg)) / sum(wts)
            assert torch.allclose(sel.keys[h, i].double(), mk, atol=1e-5)
            assert torch.allclose(sel.values[h, i].double(), mv, atol=1e-5)
        assert torch.equal(sel.keys[h, m:], v.keys[h, P:])


def test_segment_ids_cut_at_least_similar_pairs():
    K = torch.tensor([[[1.0, 0], [1, 0.1], [0, 1], [0.1, 1], [-1, 0]]])
    assert segment_ids(K, 3).tolist() == [[0, 0, 1, 1, 2]]


def test_d2o_layer_budgets_and_gated_merge():
    state = {}
    d2o = D2O(recent_share=0.5, sink=2)
    views = [make_view(seed=s, seq=60, n_keep=20, layer_idx=s, num_layers=3, state=state) for s in range(3)]
    dens = []
    for v in views:
        d2o.observe(v)
        acc = naive_attention(v).sum(1)                                # [H, S]
        var = acc.var(dim=-1)
        nv = (var - var.min()) / (var.max() - var.min() + 1e-6)
        dens.append(float(nv.mean()))
    sels = [d2o.compress(v) for v in views]
    e = [math.exp(-d) for d in dens]
    want = [x / sum(e) * 3 * 20 for x in e]
    sizes = [s.indices.shape[1] for s in sels]
    assert sum(sizes) == 60 and all(abs(a - b) < 1 for a, b in zip(sizes, want))
    for v, s in zip(views, sels):
        acc = naive_gqa_mean(naive_attention(v).sum(1), 2)
        n = s.indices.shape[1]
        for h in range(2):
            sc = [math.inf if j < 2 else float(acc[h, j]) for j in range(60)]
            assert s.indices[h].tolist() == naive_topk(sc, n, round(0.5 * n))
        assert s.info["threshold"] is not None and -1 <= s.info["threshold"] <= 1


def test_fastv_needs_layers_and_keeps_cache_in_unit_use():
    v = make_view(seq=30, n_keep=10)
    sel = FastV(layer=2).compress(v)                                  # no request: ranks nothing, keeps all
    assert sel.indices.shape == (2, 30)
    with pytest.raises(ValueError):
        FastV(layer=0)
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        FastV().begin(make_request(3, num_layers=1))


def test_fastv_asks_the_engine_to_prune_from_its_layer():
    """FastV declares hidden-state pruning and its plan names the first pruned layer; it never hooks the model."""
    mod = torch.full((40,), TEXT)
    mod[4:30] = VIDEO
    assert FastV.prunes_hidden_states and not SnapKV.prunes_hidden_states
    assert FastV(layer=2, ratio=0.5).begin(make_request(mod, num_layers=4)).prune_from == 2
    assert FastV(layer=3, ratio=0.5).begin(make_request(mod, num_layers=3)).prune_from == 2   # shallow model
    # budget mode: the latest K' <= K whose drop count fits in the media tokens
    assert FastV(layer=3).begin(make_request(mod, n_keep=10, num_layers=4)).prune_from == 1


# ------------------------------------------------------------------------------------------ properties
ALL = [SnapKV(window=8), H2O(), StreamingLLM(), Random(window=8), PyramidKV(scorer=SnapKV(window=8)),
       AdaKV(scorer=SnapKV(window=8)), LookM(), KVMerge(window=8), KVMerge(window=8, pivot_score="window")]


@pytest.mark.parametrize("method", ALL, ids=lambda m: f"{m.name}")
@pytest.mark.parametrize("n_keep", [1, 9, 25, 64])
def test_kept_count_matches_budget(method, n_keep):
    mod = torch.full((64,), TEXT)
    mod[8:40] = AUDIO
    state = {}
    total = 0
    for layer in range(4):
        v = make_view(seq=64, n_keep=n_keep, layer_idx=layer, num_layers=4, state=state, modality=mod)
        sel = method.compress(v)
        n = sel.valid.sum() if sel.valid is not None else sel.indices.numel()
        total += int(n)
        if sel.keys is not None:
            assert sel.keys.shape == sel.indices.shape + (8,)
        for row in kept_lists(sel):
            assert len(set(row)) == len(row) and all(0 <= j < 64 for j in row)
    assert total == 4 * 2 * n_keep                                      # mean over layers and heads = budget


def test_d2o_kept_count_matches_budget():
    state = {}
    views = [make_view(seed=s, seq=64, n_keep=16, layer_idx=s, num_layers=4, state=state) for s in range(4)]
    d2o = D2O()                                  # one instance: its scratch is its own (LayerView.scratch)
    for v in views:
        d2o.observe(v)
    assert sum(d2o.compress(v).indices.numel() for v in views) == 4 * 2 * 16


def naive_streaming_scores(v, sink=4):
    """StreamingLLM from its definition: the sinks first, then the most recent positions."""
    S = v.seq_len
    row = [float(S + 1) if j < sink else float(j) for j in range(S)]
    return torch.tensor([row] * v.num_kv_heads)


NAIVE_SCORES = {
    "snapkv": lambda v: naive_snapkv_scores(v, window=8),
    "h2o": lambda v: naive_gqa_mean(naive_attention(v).sum(1), v.num_kv_heads),   # all-query column sums
    "streamingllm": naive_streaming_scores,
}


@pytest.mark.parametrize("method", [SnapKV(window=8), H2O(), StreamingLLM()], ids=lambda m: m.name)
@pytest.mark.parametrize("n_keep", [12, 20, 40])
def test_highest_scoring_entries_are_kept(method, n_keep):
    """Scores from the loop references (not the method's own ``score``): every kept prefix entry scores at least
    as high as every evicted one, and the protected recent window is kept."""
    v = make_view(seq=64, n_keep=n_keep)
    sel = method.compress(v)
    scores = NAIVE_SCORES[method.name](v)
    w = {"snapkv": 8, "h2o": round(0.5 * n_keep), "streamingllm": 0}[method.name]   # window / recent share
    for h, kept in enumerate(kept_lists(sel)):
        assert len(kept) == n_keep
        kept_s = [float(scores[h, j]) for j in kept if j < 64 - w]
        lost_s = [float(scores[h, j]) for j in range(64 - w) if j not in kept]
        assert min(kept_s) >= max(lost_s) - 1e-6
        assert set(range(64 - w, 64)) <= set(kept)


def test_full_keeps_everything():
    v = make_view(seq=10)
    assert Full().is_noop() and Full().compress(v).indices.shape == (2, 10)

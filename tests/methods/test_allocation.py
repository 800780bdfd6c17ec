"""Allocation wrappers: counts against loop references, and composition with several scorers."""
import math

import pytest
import torch

from avkv.methods.adakv import AdaKV
from avkv.methods.allocation import (HeadAllocation, LayerAllocation, ModalityAllocation, adaptive_head_counts,
                                     pyramid_budgets)
from avkv.methods.base import AUDIO, MODALITIES, TEXT, VIDEO
from avkv.methods.h2o import H2O
from avkv.methods.pyramidkv import PyramidKV
from avkv.methods.random import Random
from avkv.methods.snapkv import SnapKV
from tests.methods.helpers import make_view, naive_h2o_scores, naive_snapkv_scores, naive_topk


def naive_pyramid(B, w, L, n, beta):
    """methods.md §6 formula, real-valued."""
    lo = (B - w) / beta
    hi = 2 * (B - w) - lo
    if hi >= n - w:
        hi = n - w
        lo = 2 * (B - w) - hi
    step = (hi - lo) / (L - 1)
    return [hi - l * step + w for l in range(L)]


@pytest.mark.parametrize("B,w,L,n", [(200, 32, 8, 1000), (100, 8, 28, 700), (60, 32, 5, 100)])
def test_pyramid_budgets_follow_formula_and_keep_the_mean(B, w, L, n):
    got = pyramid_budgets(B, w, L, n, beta=20)
    ref = naive_pyramid(B, w, L, n, 20)
    assert sum(got) == L * B                                        # the mean is exactly the budget
    assert all(abs(g - r) <= 1 for g, r in zip(got, ref))
    assert got == sorted(got, reverse=True)


def test_pyramid_budgets_uniform_when_prompt_short_or_single_layer():
    assert pyramid_budgets(80, 8, 4, 100) == [80] * 4                 # n < 2(B - w): KVCache-Factory's fallback
    assert pyramid_budgets(30, 8, 1, 1000) == [30]


def naive_adakv_counts(scores, base, floor):
    R, P = len(scores), len(scores[0])
    flat = sorted(((float(scores[h][j]), j, h) for h in range(R) for j in range(P)), key=lambda t: (-t[0], -t[1], -t[2]))
    won = [0] * R
    for _, _, h in flat[: R * base]:
        won[h] += 1
    return [c * (1 - floor) + floor * base for c in won]


def test_adaptive_head_counts_match_global_topk():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(4, 50, generator=g) ** torch.tensor([[1.0], [3.0], [0.3], [1.0]])   # heads differ
    for base, floor in [(10, 0.2), (25, 0.5), (50, 0.0)]:
        got = adaptive_head_counts(scores, base, floor)
        ref = naive_adakv_counts(scores.tolist(), base, floor)
        assert int(got.sum()) == 4 * base
        assert all(abs(a - b) < 1 for a, b in zip(got.tolist(), ref))
        assert int(got.min()) >= int(floor * base)


# ------------------------------------------------------------------------------------------ composition
SCORERS = [SnapKV(window=4), H2O(decode_policy="grow"), Random(window=4)]


@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: s.name)
def test_layer_allocation_composes(scorer):
    state = {}
    sizes = []
    for layer in range(4):
        v = make_view(seq=80, n_keep=30, layer_idx=layer, num_layers=4, state=state)
        sel = LayerAllocation(scorer).compress(v)
        sizes.append(sel.indices.shape[1])
        assert sel.info["layer_budget"] == sizes[-1]
        inner = scorer.compress(make_view(seq=80, n_keep=sizes[-1], layer_idx=layer, num_layers=4))
        assert torch.equal(sel.indices, inner.indices)                # the scorer decides which entries
    assert sum(sizes) == 4 * 30 and sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def naive_scores(scorer, v):
    """The scorer's scores from the loop references (None for Random: its scores are its generator's draws)."""
    if isinstance(scorer, SnapKV):
        return naive_snapkv_scores(v, window=scorer.window, kernel=scorer.kernel)
    if isinstance(scorer, H2O):
        return naive_h2o_scores(v)
    return None


@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: s.name)
def test_head_allocation_composes(scorer):
    v = make_view(kv_heads=4, groups=2, seq=60, n_keep=20)
    sel = HeadAllocation(scorer, floor=0.2).compress(v)
    w = min(scorer.protected(v), 20)
    counts = sel.valid.sum(1) if sel.valid is not None else torch.full((4,), sel.indices.shape[1])
    assert int(counts.sum()) == 4 * 20                                 # the layer's budget, split over heads
    scores = naive_scores(scorer, make_view(kv_heads=4, groups=2, seq=60, n_keep=20))
    for h in range(4):
        kept = sel.indices[h] if sel.valid is None else sel.indices[h][sel.valid[h]]
        assert set(range(60 - w, 60)) <= set(kept.tolist()) and kept.unique().numel() == kept.numel()
        if scores is not None:
            assert kept.tolist() == naive_topk(scores[h].tolist(), int(counts[h]), w)
    if scores is not None:                                              # AdaKV's global top-k, loop-counted
        ref = naive_adakv_counts([row[: 60 - w] for row in scores.tolist()], 20 - w, 0.2)
        assert all(abs(int(c) - w - r) < 1 for c, r in zip(counts.tolist(), ref))


@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: s.name)
def test_modality_allocation_composes(scorer):
    mod = torch.full((90,), TEXT)
    mod[10:60] = VIDEO
    mod[60:75] = AUDIO
    v = make_view(seq=90, n_keep=30, modality=mod)
    shares = {"text": 0.2, "video": 0.6, "audio": 0.2}
    sel = ModalityAllocation(scorer, shares=shares).compress(v)
    w = min(scorer.protected(v), 30)
    assert sel.indices.shape == (2, 30)
    budget = sel.info["modality_budget"]
    assert sum(budget.values()) == 30 - w
    avail = {name: int((mod[: 90 - w] == c).sum()) for c, name in enumerate(MODALITIES)}
    ref = {"text": 0.2 * (30 - w), "video": 0.6 * (30 - w), "audio": 0.2 * (30 - w)}   # no modality is capped here
    assert all(abs(budget.get(m, 0) - ref[m]) < 1 for m in ref) and all(budget.get(m, 0) <= avail[m] for m in ref)
    scores = naive_scores(scorer, make_view(seq=90, n_keep=30, modality=mod))
    for h in range(2):
        prefix = [j for j in sel.indices[h].tolist() if j < 90 - w]
        for c, name in enumerate(MODALITIES):
            got = [j for j in prefix if int(mod[j]) == c]
            assert len(got) == budget.get(name, 0)
            if scores is not None:
                pool = [j for j in range(90 - w) if int(mod[j]) == c]
                best = sorted(pool, key=lambda j: (-float(scores[h, j]), -j))[: len(got)]
                assert sorted(got) == sorted(best)


def test_modality_allocation_fixed_shares():
    mod = torch.full((50,), TEXT)
    mod[:30] = VIDEO
    sel = ModalityAllocation(SnapKV(window=4), shares={"video": 1.0}).compress(make_view(seq=50, n_keep=14,
                                                                                         modality=mod))
    assert sel.info["modality_budget"] == {"video": 10}


def test_pyramidkv_and_adakv_are_wrapped_snapkv():
    assert isinstance(PyramidKV().scorer, SnapKV) and isinstance(AdaKV().scorer, SnapKV)
    v = make_view(kv_heads=4, seq=100, n_keep=40)
    sel = AdaKV().compress(v)
    assert sel.valid is None or int(sel.valid.sum()) == 4 * 40
    assert LayerAllocation(H2O()).decode_policy == "fixed"          # wrappers report their scorer's policy
    with pytest.raises(ValueError):
        AdaKV(scorer=H2O())                                          # ragged heads + fixed decode: refused


def test_layer_allocation_fixed_weights():
    state = {}
    wrap = LayerAllocation(SnapKV(window=4), schedule="weights", weights=[3, 1, 1, 1])
    sizes = [wrap.compress(make_view(seq=80, n_keep=20, layer_idx=i, num_layers=4, state=state)).indices.shape[1]
             for i in range(4)]
    assert sizes == [40, 14, 13, 13]                                    # mean 20, remainders to the first
    with pytest.raises(ValueError):
        LayerAllocation(SnapKV(), schedule="weights", weights=[1, 2]).compress(make_view(num_layers=4))


def test_wrapped_h2o_keeps_its_scores_for_fixed_decoding():
    mod = torch.full((60,), TEXT)
    mod[:30] = VIDEO
    for wrap in (ModalityAllocation(H2O(), shares={"text": 0.5, "video": 0.5}), LayerAllocation(H2O())):
        state = {}
        v = make_view(seq=60, n_keep=20, modality=mod, state=state)
        sel = wrap.compress(v)
        st = state[("scratch", id(wrap.scorer))][("h2o", "scores", 0)]        # H2O's own scratch
        assert st["scores"].shape == sel.indices.shape
        ref = naive_h2o_scores(v).float()                                   # loop reference, not H2O().score
        assert torch.allclose(st["scores"], ref.gather(1, sel.indices), rtol=1e-4, atol=1e-5)


def test_head_allocation_safeguard_rule_is_kvpress_adakv():
    """floor_rule=safeguard from kvpress AdaKVPress's definition: each head's top max(1, int(α·B)) entries are kept
    (the window, always kept, among them), then the lowest kvH·(S − B) of all other entries are dropped at once."""
    from avkv.methods.adakv import AdaKV
    v = make_view(kv_heads=3, groups=2, seq=70, n_keep=30)
    w, B, S, alpha = 8, 30, 70, 0.2
    ref = naive_snapkv_scores(v, w)
    for a in (alpha, 0.5):
        n_safe = max(1, int(B * a))
        s = {(h, j): (math.inf if j >= S - w else float(ref[h, j])) for h in range(3) for j in range(S)}
        for h in range(3):
            for j in sorted(range(S), key=lambda j: (-s[(h, j)], -j))[:n_safe]:
                s[(h, j)] = math.inf
        order = sorted(s, key=lambda hj: (s[hj], hj[1], hj[0]))            # worst first
        dropped = set(order[: 3 * (S - B)])
        want = [[j for j in range(S) if (h, j) not in dropped] for h in range(3)]
        sel = AdaKV(scorer=SnapKV(window=w), floor=a, floor_rule="safeguard").compress(v)
        got = [sorted(set(sel.indices[h][sel.valid[h]].tolist() if sel.valid is not None else sel.indices[h].tolist()))
               for h in range(3)]
        assert got == want, a
        assert sum(len(g) for g in got) == 3 * B

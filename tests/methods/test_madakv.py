"""MadaKV: proxy importance, demand and per-modality quotas against a naive reference; budget conservation."""
import pytest
import torch

from avkv.methods.base import MODALITIES, allocate_integer
from avkv.methods.madakv import MadaKV
from avkv.methods.testing import make_view, modality_ids, naive_attention

SPEC = [("text", 6), ("video", 60), ("audio", 20), ("text", 14)]
L = 6


def naive_psi(view, P):
    A = naive_attention(view)[:, -P:].sum(1)
    return A.view(view.num_kv_heads, -1, view.seq_len).mean(1)


def naive_coverage(values, theta):
    vals = sorted(values.tolist(), reverse=True)
    tot, acc = sum(vals), 0.0
    if tot <= 0:
        return 0
    for n, x in enumerate(vals, 1):
        acc += x
        if acc >= theta * tot - 1e-12:
            return n
    return len(vals)


def test_first_layer_matches_naive_reference():
    mod = modality_ids(SPEC)
    P, theta = 8, 0.5
    view = make_view(mod, 60, seed=1, num_layers=L)
    sel = MadaKV(proxy=P, theta=theta).compress(view)
    psi = naive_psi(view, P)
    S = view.seq_len
    cand = torch.arange(S) < S - P
    for h in range(view.num_kv_heads):
        demand = P + sum(naive_coverage(psi[h][cand & (mod == m)], theta) for m in range(len(MODALITIES)))
        assert sel.info["per_head"][h] == demand
        kept = sel.indices[h][sel.valid[h]] if sel.valid is not None else sel.indices[h]
        assert kept.numel() == demand
        assert set(range(S - P, S)) <= set(kept.tolist())                      # proxy always kept
        present = [m for m in range(4) if bool((cand & (mod == m)).any())]
        pref = torch.stack([psi[h][cand & (mod == m)].sum() for m in present])
        avail = torch.tensor([int((cand & (mod == m)).sum()) for m in present])
        quota = allocate_integer(pref, demand - P, 0, avail)
        for m, qm in zip(present, quota.tolist()):
            pos = (cand & (mod == m)).nonzero().flatten()
            top = set(pos[psi[h][pos].topk(qm).indices].tolist())
            got = {j for j in kept.tolist() if j < S - P and mod[j] == m}
            assert got == top, (h, m)


@pytest.mark.parametrize("mode", ["full", "hcc", "mpa"])
@pytest.mark.parametrize("budget", [20, 40, 70])
def test_per_head_budgets_sum_to_layer_totals_and_global_budget(mode, budget):
    mod = modality_ids(SPEC)
    m = MadaKV(proxy=8, theta=0.9, mode=mode)
    state, grand = {}, 0
    for layer in range(L):
        view = make_view(mod, budget, seed=20 + layer, layer_idx=layer, num_layers=L, state=state)
        sel = m.compress(view)
        per_head = sel.info["per_head"]
        real = sel.valid.sum(1).tolist() if sel.valid is not None else [sel.indices.shape[1]] * view.num_kv_heads
        assert real == per_head
        assert sum(per_head) == sel.info["layer_total"]
        for h in range(view.num_kv_heads):                                   # no duplicates among real entries
            kept = sel.indices[h][: per_head[h]]
            assert kept.unique().numel() == per_head[h]
        grand += sel.info["layer_total"]
    assert grand == L * view.num_kv_heads * budget


def test_compensation_follows_the_recurrence():
    mod = modality_ids(SPEC)
    for norm in (True, False):
        m = MadaKV(proxy=8, theta=0.6, hcc_norm_heads=norm)
        state, phis, totals = {}, [], []
        for layer in range(L - 1):
            sel = m.compress(make_view(mod, 30, seed=40 + layer, layer_idx=layer, num_layers=L, state=state))
            phis.append(sel.info["phi"])
            totals.append(sel.info["layer_total"])
        H = 2
        for layer in range(L - 2):
            K = totals[layer] - H * phis[layer]
            div = (H if norm else 1) * (L - 1 - layer)
            assert abs(phis[layer + 1] - max(8.0, phis[layer] - K / div)) < 1e-3


def test_coverage_count():
    psi = torch.tensor([0.5, 0.1, 0.3, 0.1])
    assert MadaKV.coverage_count(psi, 0.8) == 2
    assert MadaKV.coverage_count(psi, 0.81) == 3
    assert MadaKV.coverage_count(torch.zeros(3), 0.9) == 0

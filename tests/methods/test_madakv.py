"""MadaKV against short loops written from shared/design/methods.md §4 (not from the method's own pieces): proxy
importance ψ, θ-coverage demand, per-modality quotas inside a head, and the conserving split of L·H·B across
layers by demand (no layer falls to |P| unless its demand does; the total is exact)."""
import math

import pytest
import torch

from avkv.methods.madakv import MadaKV
from avkv.methods.testing import make_view, modality_ids, naive_attention

SPEC = [("text", 6), ("video", 60), ("audio", 20), ("text", 14)]
L = 6


def drive(method, views):
    """Compress every layer the way the engine does (deferred methods: observe all layers, then compress all)."""
    if getattr(method, "deferred", False):
        for v in views:
            method.observe(v)
    return [method.compress(v) for v in views]


def layer_views(mod, n_keep, layers, seed=0, temps=None):
    """One seeded view per layer sharing a request state; ``temps[l]`` scales layer l's queries (peaky > 1)."""
    state, views = {}, []
    for l in range(layers):
        v = make_view(mod, n_keep, seed=seed + l, layer_idx=l, num_layers=layers, state=state)
        if temps is not None:
            v._q.mul_(temps[l])                                  # query_fn reads the same tensor
        views.append(v)
    return views


# ------------------------------------------------------------------------- loops written from methods.md §4
def naive_psi(view, P):
    """ψ(i) = Σ_{j∈P} α_{j→i}, query heads averaged within each KV group: [kvH][S] lists."""
    A = naive_attention(view)
    H, S, g = view.num_heads, view.seq_len, view.groups
    out = []
    for kh in range(view.num_kv_heads):
        row = [0.0] * S
        for h in range(kh * g, (kh + 1) * g):
            for j in range(S - P, S):
                for i in range(S):
                    row[i] += float(A[h, j, i]) / g
        out.append(row)
    return out


def naive_coverage(values, theta):
    """The fewest top values whose sum reaches θ of their total."""
    vals = sorted(values, reverse=True)
    tot, acc = sum(vals), 0.0
    if tot <= 0:
        return 0
    for n, x in enumerate(vals, 1):
        acc += x
        if acc >= theta * tot - 1e-9:
            return n
    return len(vals)


def naive_demand(psi_h, mod, P, theta):
    """N = |P| + Σ_m k_m (per modality, over the positions before P), clamped to [|P|, S]."""
    S = len(psi_h)
    k = sum(naive_coverage([psi_h[i] for i in range(S - P) if int(mod[i]) == m], theta) for m in range(4))
    return min(max(P + k, P), S)


def naive_split(weights, total, caps):
    """Real-valued x_i = min(λ·w_i, cap_i) with Σ x = total (λ by bisection)."""
    if sum(weights) <= 0:
        weights = [1.0] * len(weights)
    lo, hi = 0.0, 1.0
    f = lambda lam: sum(min(lam * w, c) for w, c in zip(weights, caps))
    while f(hi) < total and hi < 1e30:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < total else (lo, mid)
    return [min(hi * w, c) for w, c in zip(weights, caps)]


def naive_quotas(pref, avail, n):
    """MPA inside a head: n slots in proportion to the modality preferences, capped by what each modality has,
    integers by largest remainder (ties to the earlier modality); a capped modality's surplus goes to the others."""
    x = naive_split(pref, n, avail)
    q = [math.floor(v + 1e-9) for v in x]
    order = sorted(range(len(x)), key=lambda i: (-(x[i] - q[i]), i))
    for i in order:
        if sum(q) >= n:
            break
        if q[i] < avail[i]:
            q[i] += 1
    return q


def kept_of(sel, h):
    return sel.indices[h][sel.valid[h]] if sel.valid is not None else sel.indices[h]


# ------------------------------------------------------------------------------------------------- tests
def test_selection_inside_each_head_matches_naive_loops():
    """ψ, demand and the per-modality top-ψ choice inside a head (whatever count the allocation gave it)."""
    mod = modality_ids(SPEC)
    P, theta = 8, 0.5
    views = layer_views(mod, 40, 3, seed=1)
    sels = drive(MadaKV(proxy=P, theta=theta), views)
    S = views[0].seq_len
    for view, sel in zip(views, sels):
        psi = naive_psi(view, P)
        demands = [naive_demand(psi[h], mod, P, theta) for h in range(view.num_kv_heads)]
        assert sel.info["demand"] == sum(demands)
        for h in range(view.num_kv_heads):
            kept = kept_of(sel, h).tolist()
            n = sel.info["per_head"][h]
            assert len(kept) == n == len(set(kept))
            assert set(range(S - P, S)) <= set(kept)                                     # the proxy is kept
            present = [m for m in range(4) if any(int(mod[i]) == m for i in range(S - P))]
            pref = [sum(psi[h][i] for i in range(S - P) if int(mod[i]) == m) for m in present]
            avail = [sum(1 for i in range(S - P) if int(mod[i]) == m) for m in present]
            for m, qm in zip(present, naive_quotas(pref, avail, n - P)):
                pos = [i for i in range(S - P) if int(mod[i]) == m]
                best = sorted(pos, key=lambda i: -psi[h][i])[:qm]
                got = [j for j in kept if j < S - P and int(mod[j]) == m]
                assert sorted(got) == sorted(best), (view.layer_idx, h, m)


@pytest.mark.parametrize("case,budget,temps", [
    ("diffuse attention, tight budget", 20, [0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0]),
    ("peaky attention, loose budget", 50, [8.0] * 8),
    ("diffuse early, peaky late", 30, [2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0]),
])
def test_budget_split_across_layers_by_demand(case, budget, temps):
    """≥ 8 layers: the per-layer totals follow L·H·B split in proportion to each layer's demand beyond |P|
    (each layer within [H·|P|, H·n]); the total is exact and no layer falls to |P| unless its demand does.
    The greedy reading fails it (early layers spend the budget, or the total falls short with peaky attention)."""
    mod = modality_ids(SPEC)
    P, theta, layers = 8, 0.9, 8
    views = layer_views(mod, budget, layers, seed=40, temps=temps)
    sels = drive(MadaKV(proxy=P, theta=theta), views)
    H, S = views[0].num_kv_heads, views[0].seq_len
    demand = [[naive_demand(row, mod, P, theta) for row in naive_psi(v, P)] for v in views]
    extra = [sum(d) - H * P for d in demand]
    want = naive_split([float(e) for e in extra], layers * H * (budget - P), [H * (S - P)] * layers)
    totals = [s.info["layer_total"] for s in sels]
    assert sum(totals) == layers * H * budget, (case, totals)                 # the budget is exact
    for l in range(layers):
        assert abs(totals[l] - H * P - want[l]) <= 1, (case, l, totals, [round(w, 1) for w in want])
        if extra[l] > 0:
            assert totals[l] > H * P, (case, l, totals)                       # no layer starved to the proxy
        per_head = sels[l].info["per_head"]
        head_want = naive_split([float(d - P) for d in demand[l]], totals[l] - H * P, [S - P] * H)
        assert all(abs(c - P - w) <= 1 for c, w in zip(per_head, head_want)), (case, l, per_head, head_want)
        assert [len(kept_of(sels[l], h)) for h in range(H)] == per_head
    assert len(set(totals)) > 1, "a demand-driven split that is uniform here tests nothing"


@pytest.mark.parametrize("mode", ["full", "hcc", "mpa"])
@pytest.mark.parametrize("allocation", ["conserve", "sequential"])
@pytest.mark.parametrize("budget", [20, 40, 70])
def test_per_head_budgets_sum_to_layer_totals_and_global_budget(mode, allocation, budget):
    mod = modality_ids(SPEC)
    views = layer_views(mod, budget, L, seed=20)
    sels = drive(MadaKV(proxy=8, theta=0.9, mode=mode, allocation=allocation), views)
    grand = 0
    for view, sel in zip(views, sels):
        per_head = sel.info["per_head"]
        real = sel.valid.sum(1).tolist() if sel.valid is not None else [sel.indices.shape[1]] * view.num_kv_heads
        assert real == per_head
        assert sum(per_head) == sel.info["layer_total"]
        for h in range(view.num_kv_heads):                                   # no duplicates among real entries
            assert kept_of(sel, h).unique().numel() == per_head[h]
        grand += sel.info["layer_total"]
    assert grand == L * views[0].num_kv_heads * budget


def test_sequential_ablation_follows_the_notes_recurrence():
    mod = modality_ids(SPEC)
    for norm in (True, False):
        views = layer_views(mod, 30, L, seed=40)
        sels = drive(MadaKV(proxy=8, theta=0.6, allocation="sequential", hcc_norm_heads=norm), views)
        phis = [s.info["phi"] for s in sels]
        totals = [s.info["layer_total"] for s in sels]
        H = 2
        for layer in range(L - 2):
            K = totals[layer] - H * phis[layer]
            div = (H if norm else 1) * (L - 1 - layer)
            assert abs(phis[layer + 1] - max(8.0, phis[layer] - K / div)) < 1e-3


def test_conserve_needs_every_layer_observed():
    mod = modality_ids(SPEC)
    with pytest.raises(RuntimeError, match="observed"):
        MadaKV(proxy=8).compress(make_view(mod, 30, num_layers=L))


def test_coverage_count():
    psi = torch.tensor([0.5, 0.1, 0.3, 0.1])
    assert MadaKV.coverage_count(psi, 0.8) == 2
    assert MadaKV.coverage_count(psi, 0.81) == 3
    assert MadaKV.coverage_count(torch.zeros(3), 0.9) == 0

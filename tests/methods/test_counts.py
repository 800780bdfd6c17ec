"""The allocation toolkit (avkv/methods/counts.py): the one integer apportioner and the one ragged selector, each
against a short naive reference written from its definition (docs/methods.md, *Integer budgets*)."""
import math

import pytest
import torch

from avkv.methods.counts import (apportion, group_topk, mask_to_indices, modality_budgets, ragged_topk,
                                 rows_to_mask)
from tests.methods.helpers import naive_topk


def naive_apportion(weights, total, lo, hi):
    """From the definition: integer bounds, total clipped into [Σlo, Σhi]; quotas clip(λ·w, lo, hi) with Σ = total
    (λ by bisection; zero weights stay at lo unless the positive ones saturate, then they share the rest equally;
    all-zero weights count as equal); floors, then one unit each to the largest remainders, ties to the earlier."""
    n = len(weights)
    lo = [math.ceil(v) for v in lo]
    hi = [max(math.floor(h), l) if h != math.inf else math.inf for h, l in zip(hi, lo)]
    total = int(min(max(total, sum(lo)), sum(hi)))
    w = [max(0.0, float(v)) for v in weights]
    if sum(w) <= 0:
        w = [1.0] * n

    def fill(ws, los, his, tot):
        f = lambda lam: [min(max(lam * a, b), c) if a > 0 else b for a, b, c in zip(ws, los, his)]
        a, b = 0.0, 1.0
        while sum(f(b)) < tot and b < 1e30:
            b *= 2
        for _ in range(300):
            m = (a + b) / 2
            a, b = (m, b) if sum(f(m)) < tot else (a, m)
        return f(b)

    q = fill(w, lo, hi, total)
    if total - sum(q) > 1e-6:                        # positive weights saturated: the zero weights share the rest
        z = [i for i in range(n) if w[i] == 0]
        qz = fill([1.0] * len(z), [q[i] for i in z], [hi[i] for i in z], sum(q[i] for i in z) + total - sum(q))
        for i, v in zip(z, qz):
            q[i] = v
    q = [round(v) if abs(v - round(v)) < 1e-7 else v for v in q]
    x = [math.floor(v) for v in q]
    order = sorted(range(n), key=lambda i: (-round(q[i] - x[i], 6), i))
    for i in order:
        if sum(x) >= total:
            break
        if x[i] < hi[i]:
            x[i] += 1
    return x


def test_apportion_examples_from_the_docs():
    assert apportion([2.3, 0.45], 3).tolist() == [3, 0]            # quotas 2.51, 0.49
    assert apportion([2.3, 0.45], 2).tolist() == [2, 0]
    assert apportion([1.0, 1.0, 1.0], 2).tolist() == [1, 1, 0]      # equal remainders: the earlier entries
    assert apportion([1.5, 2.5, 3.0, 0.4, 0.6], 8).tolist() == [2, 2, 3, 0, 1]   # reals summing to 8: rounded
    assert apportion([5.0, 1.0], 10, 0, [4, 100]).tolist() == [4, 6]            # a capped entry's surplus moves
    assert apportion([0.0, 1.0, 0.0], 9, 0, [100, 3, 100]).tolist() == [3, 3, 3]  # saturated: zeros share the rest
    assert apportion([1.0, 1.0], 50, 0, [10, 10]).tolist() == [10, 10]            # total clipped to Σ hi
    assert apportion([0.0, 0.0], 5, [3, 3]).tolist() == [3, 3]                  # ... and to Σ lo
    assert apportion(torch.ones(2, 3), 7).tolist() == [[2, 1, 1], [1, 1, 1]]    # any shape, row-major ties


@pytest.mark.parametrize("seed", range(6))
def test_apportion_matches_the_naive_definition(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(60):
        n = int(torch.randint(1, 9, (1,), generator=g))
        w = (torch.rand(n, generator=g) ** 3).tolist()
        if seed % 2:
            w = [0.0 if torch.rand(1, generator=g) < 0.3 else v for v in w]
        lo = torch.randint(0, 4, (n,), generator=g).tolist()
        hi = [lo[i] + int(torch.randint(0, 40, (1,), generator=g)) for i in range(n)]
        if seed % 3 == 0:
            hi = [math.inf] * n
        total = int(torch.randint(0, 160, (1,), generator=g))
        got = apportion(torch.tensor(w), total, torch.tensor(lo), None if seed % 3 == 0 else torch.tensor(hi))
        assert got.tolist() == naive_apportion(w, total, lo, hi), (w, total, lo, hi)
        want = min(max(total, sum(lo)), sum(hi))
        assert int(got.sum()) == want
        assert all(a <= x <= b for a, x, b in zip(lo, got.tolist(), hi))


def test_modality_budgets_cap_and_redistribute():
    avail = {"text": 10, "image": 0, "video": 100, "audio": 5}
    assert modality_budgets(avail, {"text": 0.5, "video": 0.25, "audio": 0.25}, 40) == \
        {"text": 10, "image": 0, "video": 25, "audio": 5}
    b = modality_budgets(avail, {"text": 1.0}, 30)                  # unshared modalities fill what is left ∝ size
    assert b == {"text": 10, "image": 0, "video": 19, "audio": 1}
    assert sum(modality_budgets(avail, {"video": 1.0}, 500).values()) == 115


@pytest.mark.parametrize("protect", [0, 3, 8])
def test_ragged_topk_is_keep_topk_per_row(protect):
    g = torch.Generator().manual_seed(2)
    s = torch.rand(4, 20, generator=g)
    s[0, 5] = s[0, 6]                                               # a tie: the later position first
    counts = [2, 9, 5, 20]
    idx, valid = ragged_topk(s, torch.tensor(counts), protect_last=protect)
    assert idx.shape == (4, 20) and valid.sum(1).tolist() == counts
    for r in range(4):
        real = idx[r][valid[r]].tolist()
        assert real == naive_topk(s[r].tolist(), counts[r], protect)
        assert (idx[r][~valid[r]] == real[-1]).all()                  # padding repeats the last real entry
    same, none = ragged_topk(s, torch.tensor([4, 4, 4, 4]), protect_last=2)
    assert none is None and same.shape == (4, 4)


def test_group_topk_splits_by_score_mass_within_group_sizes():
    #            group:  0    0    0    1    1    2   -1 (never a candidate)
    s = torch.tensor([[6.0, 0.5, 0.4, 2.0, 1.0, 0.0, 99.0],
                      [6.0, 0.5, 0.4, 2.0, 1.0, 0.0, 99.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 99.0],
                      [6.0, 0.5, 0.4, 2.0, 1.0, 0.0, 99.0]])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, -1])
    keep = group_topk(s, groups, [4, 6, 3, 0])
    # row 0: masses 6.9 : 3 : 0 of 4 -> quotas 3, 1, 0 (apportion), each group's best
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    # row 1: 6 is clipped to the 6 candidates; group 2 (zero mass) takes what the others cannot; -1 never kept
    assert keep[1].tolist() == [True] * 6 + [False]
    # row 2: all-zero mass splits equally (apportion's rule): one a group; row 3 keeps nothing
    assert keep[2].sum() == 3 and keep[2, [3, 4]].sum() == 1 and keep[2, 5] and not keep[2, 6] and not keep[3].any()
    flat = group_topk(s, groups, [3, 1, 1, 1], by_group=False)              # the row's best whatever the group
    assert flat[0].nonzero().flatten().tolist() == [0, 3, 4] and flat[1].nonzero().flatten().tolist() == [0]
    assert apportion(torch.tensor([6.9, 3.0, 0.0]), 4, 0, [3, 2, 1]).tolist() == [3, 1, 0]


def test_mask_to_indices_and_rows_to_mask():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    idx, valid = mask_to_indices(keep)
    assert idx.tolist() == [[0, 2, 3], [1, 1, 1]] and valid.tolist() == [[True] * 3, [True, False, False]]
    assert torch.equal(rows_to_mask([torch.tensor([3, 0, 2]), torch.tensor([1])], 4), keep)
    with pytest.raises(ValueError, match="keep no entry"):
        mask_to_indices(torch.tensor([[True, False], [False, False]]))

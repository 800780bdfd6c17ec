"""Shared primitives against loop-style references on seeded tensors."""
import math

import pytest
import torch

from avkv.methods.base import (accumulated_scores, attention_rows, complement, keep_topk, merge_into_nearest,
                               pool_scores, rank_positions, reduce_gqa, window_scores)
from tests.methods.helpers import make_view, naive_attention, naive_gqa_mean, naive_topk


@pytest.mark.parametrize("chunk", [1, 7, 64, 512])
def test_chunked_accumulated_scores_equal_eager_column_sums(chunk):
    v = make_view(seq=48)
    A = naive_attention(v)
    ref = A.sum(1)                                                    # column sums over all query rows
    assert torch.allclose(accumulated_scores(v, chunk=chunk).double(), ref, atol=1e-5)
    norm = accumulated_scores(v, chunk=chunk, normalize=True).double()
    assert torch.allclose(norm, ref / torch.tensor([48 - j for j in range(48)], dtype=torch.float64), atol=1e-5)


def test_accumulated_scores_memory_cap_shrinks_chunks():
    """With a tiny element budget every chunk is one row, and the result does not change."""
    v = make_view(seq=40)
    assert torch.allclose(accumulated_scores(v, chunk=512, max_elements=1),
                          accumulated_scores(v, chunk=512), atol=1e-6)


def test_accumulated_scores_on_gqa_groups_match_repeated_keys():
    v = make_view(kv_heads=2, groups=3, seq=30)
    ref = naive_attention(v).sum(1)
    assert torch.allclose(accumulated_scores(v, chunk=4).double(), ref, rtol=1e-4, atol=1e-5)


def test_window_scores_and_rows():
    v = make_view(seq=40)
    A = naive_attention(v)
    assert torch.allclose(window_scores(v, 8).double(), A[:, -8:].mean(1), atol=1e-6)
    assert torch.allclose(window_scores(v, 8, reduce="sum").double(), A[:, -8:].sum(1), atol=1e-5)
    rows = attention_rows(v, 10, 20).double()
    assert torch.allclose(rows, A[:, 10:20], atol=1e-6)
    assert torch.allclose(rows.sum(-1), torch.ones(rows.shape[:2], dtype=torch.float64), atol=1e-6)


def test_keep_topk_matches_naive_and_is_deterministic_on_ties():
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 4, (5, 30), generator=g).float()            # many ties
    for k, p in [(1, 0), (7, 0), (10, 3), (4, 6), (30, 2)]:
        got = keep_topk(s, k, protect_last=p)
        for r in range(5):
            assert got[r].tolist() == naive_topk(s[r].tolist(), k, p)
    assert torch.equal(keep_topk(s, 9), keep_topk(s.clone(), 9))
    assert rank_positions(torch.tensor([[1.0, 2.0, 2.0, 0.5]]))[0].tolist() == [2, 1, 0, 3]


def test_pool_scores_match_loops():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 17, generator=g)
    for kernel in (3, 7):
        mx, av = pool_scores(s, kernel, "max"), pool_scores(s, kernel, "avg")
        av_in = pool_scores(s, kernel, "avg", count_pad=False)
        for r in range(3):
            for j in range(17):
                win = [float(s[r, i]) for i in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= i < 17]
                assert mx[r, j] == pytest.approx(max(win))
                assert av[r, j] == pytest.approx(sum(win) / kernel, rel=1e-5)        # zero padding counted
                assert av_in[r, j] == pytest.approx(sum(win) / len(win), rel=1e-5)
    assert torch.equal(pool_scores(s, 1), s)


def test_reduce_gqa_groups_consecutive_query_heads():
    s = torch.arange(24, dtype=torch.float32).view(6, 4)
    assert torch.allclose(reduce_gqa(s, 2), naive_gqa_mean(s, 2))
    assert torch.equal(reduce_gqa(s, 2, "max"), torch.stack([s[0:3].amax(0), s[3:6].amax(0)]))


def test_complement():
    idx = torch.tensor([[0, 3, 4], [1, 2, 5]])
    assert complement(idx, 6).tolist() == [[1, 2, 5], [0, 3, 4]]


def _naive_merge(K, V, keep, evicted, mode, allowed=None, gate=None):
    """Loop reference of nearest-kept merging for one head."""
    newK = [K[j].double().clone() for j in keep]
    newV = [V[j].double().clone() for j in keep]
    cnt = [1.0] * len(keep)
    for a, e in enumerate(evicted):
        sims = []
        for b, j in enumerate(keep):
            c = float(K[e].double() @ K[j].double() / (K[e].double().norm() * K[j].double().norm()))
            sims.append(c if allowed is None or allowed[a][b] else -math.inf)
        best = max(sims)
        if best == -math.inf or (gate is not None and best < gate):
            continue
        b = sims.index(best)
        j = keep[b]
        if mode == "avg":
            ck, cv = K[e].double(), V[e].double()
        elif mode == "pivot":
            ck, cv = (K[e].double() + K[j].double()) / 2, (V[e].double() + V[j].double()) / 2
        else:
            ck, cv = K[e].double() * best, V[e].double() * best
        newK[b] += ck
        newV[b] += cv
        cnt[b] += 1
    return torch.stack([k / c for k, c in zip(newK, cnt)]), torch.stack([v / c for v, c in zip(newV, cnt)])


@pytest.mark.parametrize("mode", ["avg", "pivot", "weighted"])
def test_merge_into_nearest_matches_loop_reference(mode):
    v = make_view(seq=30, dim=6)
    keep, ev = [2, 5, 11, 20, 29], [j for j in range(30) if j not in (2, 5, 11, 20, 29)]
    K, V = v.keys[0], v.values[0]
    nk, nv = merge_into_nearest(K, V, torch.tensor(keep), torch.tensor(ev), mode=mode)
    rk, rv = _naive_merge(K, V, keep, ev, mode)
    assert torch.allclose(nk.double(), rk, atol=1e-5) and torch.allclose(nv.double(), rv, atol=1e-5)
    # gate and allowed targets
    allowed = [[(a + b) % 2 == 0 for b in range(5)] for a in range(25)]
    nk, nv = merge_into_nearest(K, V, torch.tensor(keep), torch.tensor(ev), mode=mode,
                                allowed=torch.tensor(allowed), min_similarity=0.1)
    rk, rv = _naive_merge(K, V, keep, ev, mode, allowed=allowed, gate=0.1)
    assert torch.allclose(nk.double(), rk, atol=1e-5) and torch.allclose(nv.double(), rv, atol=1e-5)


def test_average_merging_conserves_mass():
    """avg: each kept entry is the mean of itself and what it absorbed, so count-weighted sums are conserved."""
    v = make_view(seq=40, dim=5)
    K, V = v.keys[1], v.values[1]
    keep = torch.tensor([0, 7, 13, 39])
    ev = complement(keep[None], 40)[0]
    nk, nv = merge_into_nearest(K, V, keep, ev, mode="avg")
    Kn = torch.nn.functional.normalize(K, dim=-1)
    target = (Kn[ev] @ Kn[keep].T).argmax(-1)
    count = 1 + torch.bincount(target, minlength=4).double()
    assert torch.allclose((nk.double() * count[:, None]).sum(0), K.double().sum(0), atol=1e-5)
    assert torch.allclose((nv.double() * count[:, None]).sum(0), V.double().sum(0), atol=1e-5)


def test_batched_merge_equals_per_head():
    v = make_view(seq=25, dim=4, kv_heads=3, groups=1)
    keep = torch.stack([keep_topk(torch.rand(1, 25, generator=torch.Generator().manual_seed(h)), 6)[0]
                        for h in range(3)])
    ev = complement(keep, 25)
    bk, bv = merge_into_nearest(v.keys, v.values, keep, ev, mode="pivot")
    for h in range(3):
        hk, hv = merge_into_nearest(v.keys[h], v.values[h], keep[h], ev[h], mode="pivot")
        assert torch.allclose(bk[h], hk) and torch.allclose(bv[h], hv)
    with pytest.raises(ValueError):
        merge_into_nearest(v.keys, v.values, keep, ev, mode="nope")


def test_chunk_quotas_split_the_total_by_chunk_length():
    """Finch's and Chunk's per-chunk budgets (``counts.chunk_quotas``): consecutive chunks of ``size`` (the last one
    shorter), shares ∝ length by the apportioner, each within [lo, its length], summing to the total."""
    from avkv.methods.counts import chunk_quotas

    assert chunk_quotas(10, 4, 5) == [(0, 4, 2), (4, 8, 2), (8, 10, 1)]
    assert chunk_quotas(9, 4, 3, lo=1) == [(0, 4, 1), (4, 8, 1), (8, 9, 1)]           # the short chunk gets its floor
    assert chunk_quotas(7, 7, 3) == [(0, 7, 3)]
    for length, size, total, lo in [(1000, 128, 100, 0), (1000, 128, 100, 1), (37, 5, 11, 1), (64, 64, 64, 0)]:
        q = chunk_quotas(length, size, total, lo)
        assert [a for a, _, _ in q] == list(range(0, length, size)) and q[-1][1] == length
        assert sum(c for _, _, c in q) == total
        assert all(lo <= c <= b - a for a, b, c in q)
        exact = [total * (b - a) / length for a, b, _ in q]
        assert all(abs(c - e) < 1 + 1e-9 for (_, _, c), e in zip(q, exact))

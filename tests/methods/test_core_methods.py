"""full / random / streamingllm / snapkv against short naive references on seeded tensors."""
import math

import torch

from avkv.methods.base import keep_topk
from avkv.methods.random import Random
from avkv.methods.snapkv import SnapKV
from avkv.methods.streamingllm import StreamingLLM
from tests.methods.helpers import make_view


def naive_snapkv(q, k, scaling, window, kernel, n_keep):
    H, S, _ = q.shape
    kvH = k.shape[0]
    g = H // kvH
    keep = []
    for kv in range(kvH):
        agg = [0.0] * S
        for hq in range(kv * g, kv * g + g):
            score = [0.0] * S
            for i in range(S - window, S):
                logits = [float(q[hq, i] @ k[kv, j]) * scaling if j <= i else -math.inf for j in range(S)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                z = sum(e)
                for j in range(S):
                    score[j] += e[j] / z / window
            P = S - window                       # only the prefix is pooled (SnapKV code: attn[..., -w:, :-w])
            pooled = [max(score[max(0, j - kernel // 2): min(P, j + kernel // 2 + 1)]) for j in range(P)]
            for j in range(P):
                agg[j] += pooled[j] / g
        prefix = sorted(range(S - window), key=lambda j: (-agg[j], -j))[: n_keep - window]
        keep.append(sorted(prefix + list(range(S - window, S))))
    return keep


def test_snapkv_matches_naive_reference():
    for seed in range(3):
        view = make_view(seq=37, n_keep=15, seed=seed)
        q = view.queries(0, 37)
        sel = SnapKV(window=5, kernel=3).compress(view)
        assert sel.indices.tolist() == naive_snapkv(q, view.keys, view.scaling, 5, 3, 15)


def test_snapkv_avg_pooling_counts_the_padding_and_skips_the_window():
    """kvpress / SnapKV code: avg pooling of the prefix only, each window divided by the kernel (zero padding
    counted): the first prefix position is (s0 + s1 + s2) / 5 for kernel 5, the last one before the window never
    sees the window's scores."""
    from tests.methods.helpers import naive_attention, naive_gqa_mean
    view = make_view(seq=40, n_keep=12, seed=4)
    sc = SnapKV(window=6, kernel=5, pooling="avg").score(view)
    win = naive_gqa_mean(naive_attention(view)[:, 34:].mean(1), 2)
    assert torch.allclose(sc[:, 0].double(), win[:, 0:3].sum(1) / 5, atol=1e-6)
    assert torch.allclose(sc[:, 33].double(), win[:, 31:34].sum(1) / 5, atol=1e-6)
    old = SnapKV(window=6, kernel=5, pooling="avg", pool_window_columns=True, pool_count_pad=False).score(view)
    assert torch.allclose(old[:, 33].double(), win[:, 31:36].sum(1) / 5, atol=1e-6)     # window columns leak in
    assert torch.allclose(old[:, 0].double(), win[:, 0:3].sum(1) / 3, atol=1e-6)


def test_snapkv_keeps_exactly_the_budget_and_the_window():
    view = make_view(seq=50, n_keep=20)
    idx = SnapKV(window=8).compress(view).indices
    assert idx.shape == (2, 20)
    for row in idx.tolist():
        assert set(range(42, 50)) <= set(row) and row == sorted(row) and len(set(row)) == 20


def test_streamingllm_keeps_sinks_and_recent():
    view = make_view(seq=30, n_keep=10)
    idx = StreamingLLM(sink=4).compress(view).indices
    assert idx.tolist() == [[0, 1, 2, 3, 24, 25, 26, 27, 28, 29]] * 2


def test_random_is_seeded_per_sample_keeps_window_and_differs_per_head():
    a = Random(window=4).compress(make_view(seq=60, n_keep=12, seed=3)).indices
    b = Random(window=4).compress(make_view(seq=60, n_keep=12, seed=3)).indices
    c = Random(window=4).compress(make_view(seq=60, n_keep=12, seed=4)).indices
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])
    for row in a.tolist():
        assert set(range(56, 60)) <= set(row) and len(set(row)) == 12


def test_keep_topk_is_deterministic_on_ties():
    s = torch.zeros(2, 10)
    assert keep_topk(s, 3).tolist() == [[7, 8, 9], [7, 8, 9]]
    s[0, 2] = 1.0
    assert keep_topk(s, 3, protect_last=1).tolist()[0] == [2, 8, 9]

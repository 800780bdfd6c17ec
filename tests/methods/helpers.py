"""Seeded LayerViews and loop-style references for tensor-level method tests (no model needed).

The references are written from the definitions with Python loops, independently of ``avkv.methods.base``."""
from __future__ import annotations

import math

import torch

from avkv.methods.base import LayerView


def make_view(seed: int = 0, kv_heads: int = 2, groups: int = 2, seq: int = 64, dim: int = 8, n_keep: int = 20,
              layer_idx: int = 0, num_layers: int = 4, modality: torch.Tensor | None = None,
              state: dict | None = None, dtype: torch.dtype = torch.float32) -> LayerView:
    """A LayerView over seeded q/k/v; ``query_fn`` slices the seeded queries (post-RoPE by construction)."""
    g = torch.Generator().manual_seed(seed)
    H = kv_heads * groups
    q = torch.randn(H, seq, dim, generator=g).to(dtype)
    k = torch.randn(kv_heads, seq, dim, generator=g).to(dtype)
    v = torch.randn(kv_heads, seq, dim, generator=g).to(dtype)
    mod = torch.zeros(seq, dtype=torch.long) if modality is None else modality
    return LayerView(layer_idx=layer_idx, num_layers=num_layers, keys=k, values=v, modality=mod, n_keep=n_keep,
                     num_heads=H, scaling=1 / math.sqrt(dim), state={} if state is None else state,
                     generator=torch.Generator().manual_seed(seed + 1),
                     query_fn=lambda s, e: q[:, s:e])


def naive_attention(view: LayerView) -> torch.Tensor:
    """Full causal softmax attention [H, S, S], written loop-style from the definition (no shared primitives)."""
    q = view.queries(0, view.seq_len).double()
    k, S, H = view.keys.double(), view.seq_len, view.num_heads
    A = torch.zeros(H, S, S, dtype=torch.float64)
    for h in range(H):
        kh = k[h // view.groups]
        for i in range(S):
            logits = [float(q[h, i] @ kh[j]) * view.scaling for j in range(i + 1)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            z = sum(e)
            for j in range(i + 1):
                A[h, i, j] = e[j] / z
    return A


def naive_topk(scores, k: int, protect_last: int = 0) -> list[int]:
    """Sorted positions: the last ``protect_last`` plus the best others (ties: later position first)."""
    S = len(scores)
    protect = list(range(S - min(protect_last, S), S))
    rest = sorted(range(S - len(protect)), key=lambda j: (-float(scores[j]), -j))
    if len(protect) >= k:
        return sorted(protect[len(protect) - k:])
    return sorted(protect + rest[: k - len(protect)])


def naive_gqa_mean(scores_h: torch.Tensor, kv_heads: int) -> torch.Tensor:
    H = scores_h.shape[0]
    g = H // kv_heads
    out = torch.zeros(kv_heads, scores_h.shape[1], dtype=scores_h.dtype)
    for h in range(H):
        out[h // g] += scores_h[h] / g
    return out


def naive_snapkv_scores(v: LayerView, window: int = 8, kernel: int = 7, pooling: str = "max") -> torch.Tensor:
    """SnapKV from its definition (the SnapKV code's ``attn[..., -w:, :-w]``, kvpress ``SnapKVPress``): mean
    attention of the last ``window`` queries on the prefix keys only (the window's own columns dropped), pooled
    over the prefix with stride 1 and ``kernel//2`` zero padding at both ends (``max``: over the in-range
    positions; ``avg``: the sum divided by ``kernel``, padding counted), query heads averaged within each KV
    group: [kvH, S]. The window's columns carry their unpooled mean attention (they are always kept)."""
    A = naive_attention(v)
    S = v.seq_len
    P = S - window
    win = A[:, S - window:].mean(1)                                     # mean over window rows
    pooled = win.clone()
    for h in range(win.shape[0]):
        for j in range(P):
            near = [float(win[h, i]) for i in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= i < P]
            pooled[h, j] = max(near) if pooling == "max" else sum(near) / kernel
    return naive_gqa_mean(pooled, v.num_kv_heads)


def naive_h2o_scores(v: LayerView) -> torch.Tensor:
    """H2O from its definition: column sums of the causal attention over every prompt query, GQA mean: [kvH, S]."""
    return naive_gqa_mean(naive_attention(v).sum(1), v.num_kv_heads)

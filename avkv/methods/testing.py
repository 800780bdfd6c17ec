"""Seeded :class:`LayerView` objects for method unit tests (no model needed).

``make_view`` builds keys, values and queries from a seeded generator and a ``query_fn`` closure over the queries,
so a test can compare a method against a naive reference computed from the same tensors (the KVCache-Factory
pattern). ``naive_attention`` is the full causal softmax [H, S, S], materialised on purpose for references.
"""
from __future__ import annotations

from typing import Sequence

import torch

from avkv.methods.base import MODALITIES, LayerView
from avkv.methods.request import Request


def modality_ids(spec: Sequence[tuple[str, int]]) -> torch.Tensor:
    """``[("text", 4), ("video", 12), ("audio", 6), ("text", 8)]`` → modality ids [S]."""
    return torch.cat([torch.full((n,), MODALITIES.index(name), dtype=torch.long) for name, n in spec])


def make_view(modality: torch.Tensor, n_keep: int, seed: int = 0, num_heads: int = 4, num_kv_heads: int = 2,
              head_dim: int = 16, layer_idx: int = 0, num_layers: int = 4, state: dict | None = None,
              layout: dict | None = None, query_fn=None, dtype: torch.dtype = torch.float32) -> LayerView:
    g = torch.Generator().manual_seed(seed)
    S = modality.numel()
    q = torch.randn(num_heads, S, head_dim, generator=g).to(dtype)
    k = torch.randn(num_kv_heads, S, head_dim, generator=g).to(dtype)
    v = torch.randn(num_kv_heads, S, head_dim, generator=g).to(dtype)
    view = LayerView(layer_idx=layer_idx, num_layers=num_layers, keys=k, values=v, modality=modality,
                     n_keep=n_keep, num_heads=num_heads, scaling=head_dim ** -0.5,
                     state={} if state is None else state, generator=torch.Generator().manual_seed(seed + 1),
                     query_fn=query_fn or (lambda s, e: q[:, s:e]), layout=layout or {})
    view._q = q  # the queries, for naive references
    return view


def naive_attention(view: LayerView) -> torch.Tensor:
    """The full causal softmax attention of every prompt query [H, S, S] (fp32)."""
    q = view._q.float() if hasattr(view, "_q") else view.queries().float()
    k = view.keys.float().repeat_interleave(view.groups, 0)
    logits = torch.einsum("hqd,hkd->hqk", q, k) * view.scaling
    S = view.seq_len
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)


def make_request(modality: torch.Tensor | int, n_keep: int | None = None, num_layers: int = 4, num_heads: int = 4,
                 num_kv_heads: int = 2, layout: dict | None = None, split: int | None = None,
                 question_start: int | None = None, model_path: str | None = None) -> Request:
    """The :class:`~avkv.methods.request.Request` a method's ``begin`` gets, for a prompt of modality ids
    ``modality`` [n] (or n text tokens)."""
    if isinstance(modality, int):
        modality = torch.zeros(modality, dtype=torch.long)
    n = modality.numel()
    split = n if split is None else split
    return Request(n_prompt=n, split=split, n_keep=max(1, split // 4) if n_keep is None else n_keep,
                   num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, modality=modality,
                   layout=layout or {}, question_start=question_start, model_path=model_path)

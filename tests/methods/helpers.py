"""Seeded LayerView builders for tensor-level method tests (no model needed)."""
from __future__ import annotations

import torch

from avkv.methods.base import LayerView


def make_view(S: int = 40, kvH: int = 2, groups: int = 2, D: int = 8, n_keep: int = 10, seed: int = 0,
              modality: torch.Tensor | None = None, layer_idx: int = 0, num_layers: int = 2,
              state: dict | None = None) -> tuple[LayerView, torch.Tensor]:
    """A view over random post-RoPE q/k/v; returns (view, all queries [H, S, D])."""
    g = torch.Generator().manual_seed(seed)
    H = kvH * groups
    q = torch.randn(H, S, D, generator=g)
    k = torch.randn(kvH, S, D, generator=g)
    v = torch.randn(kvH, S, D, generator=g)
    mod = modality if modality is not None else torch.zeros(S, dtype=torch.long)
    view = LayerView(layer_idx=layer_idx, num_layers=num_layers, keys=k, values=v, modality=mod, n_keep=n_keep,
                     num_heads=H, scaling=D ** -0.5, state=state if state is not None else {},
                     generator=torch.Generator().manual_seed(seed + 1), query_fn=lambda a, b: q[:, a:b])
    return view, q

"""SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469): observation-window attention, pooled, top-k per KV head."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avkv.methods.base import LayerView, ScoreMethod, pool_scores, reduce_gqa, window_scores


@dataclass
class SnapKV(ScoreMethod):
    """Score prefix positions by the softmax attention of the last ``window`` prompt queries.

    Parameters
    ----------
    window : int
        Observation window (last prompt positions; always kept). 32 as in AdaKV's SnapKV code.
    kernel : int
        1-D pooling kernel over positions (7).
    pooling : str
        ``max`` (AdaKV code) or ``avg`` (KVCache-Factory default).
    gqa : str
        Reduction of query-head scores within a KV group: ``mean`` (KVCache-Factory default), ``max`` or ``sum``.

    Scores come from recomputed post-RoPE window queries and cached keys, so the method runs under SDPA
    and on M-RoPE models alike. Selection is per KV head.
    """

    name = "snapkv"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "mean"

    def score(self, view: LayerView) -> torch.Tensor:
        s = window_scores(view, self.window, reduce="mean")        # [H, S]
        s = pool_scores(s, self.kernel, self.pooling)
        return reduce_gqa(s, view.num_kv_heads, self.gqa)

"""SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469): observation-window attention, pooled, top-k per KV head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import LayerView, ScoreMethod, check_choice, pool_prefix, reduce_gqa, window_scores


@dataclass
class SnapKV(ScoreMethod):
    """Score prefix positions by the softmax attention of the last ``window`` prompt queries.

    Reference: the SnapKV code (``FasterDecoding/SnapKV``, ``snapkv_utils.py``) and kvpress 0.5.5
    ``SnapKVPress``: softmax of the window queries over every key, the window's own columns dropped
    (``attn[..., -w:, :-w]``), mean over the window rows, 1-D pooling of the prefix with zero padding counted,
    mean over the query heads of each KV group, top-k of the prefix plus the whole window. The parity suite
    (``tests/parity``) checks the kept set per KV head and the next-token logits against kvpress.

    Parameters
    ----------
    window : int
        Observation window (last prompt positions; always kept). 32 as in AdaKV's SnapKV code (kvpress: 64).
    kernel : int
        1-D pooling kernel over positions (7; kvpress: 5).
    pooling : str
        ``max`` (AdaKV code) or ``avg`` (SnapKV code, KVCache-Factory and kvpress).
    gqa : str
        Reduction of query-head scores within a KV group: ``mean`` (KVCache-Factory, kvpress), ``max`` or ``sum``.
    pool_window_columns : bool
        False (every reference): pool only the prefix before the window. True pools the whole row, window columns
        included (avkv before issue 13; kept only to reproduce old runs).
    pool_count_pad : bool
        True (every reference, torch's default): average pooling divides by ``kernel`` at the edges, the zero
        padding counted. False divides by the in-range positions (avkv before issue 13).

    Scores come from recomputed post-RoPE window queries and cached keys, so the method runs under SDPA
    and on M-RoPE models alike. Selection is per KV head.
    """

    name = "snapkv"
    kvpress: ClassVar[str | None] = "SnapKVPress"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "mean"
    pool_window_columns: bool = False
    pool_count_pad: bool = True

    def __post_init__(self) -> None:
        check_choice("pooling", self.pooling, ("max", "avg"))
        check_choice("gqa", self.gqa, ("mean", "max", "sum"))

    def score(self, view: LayerView) -> torch.Tensor:
        s = window_scores(view, self.window, reduce="mean")        # [H, S]
        s = pool_prefix(s, self.window, self.kernel, self.pooling, self.pool_count_pad, self.pool_window_columns)
        return reduce_gqa(s, view.num_kv_heads, self.gqa)

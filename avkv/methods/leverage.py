"""Leverage scores (kvpress 0.5.5 ``LeverageScorePress``; Chari & Van Durme, 2025, arXiv 2507.08143, Compactor's
query-agnostic half): keep the entries whose pre-RoPE keys are the geometric outliers of the layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import LayerView, ScoreMethod, unrotate
from avkv.methods.compactor import leverage_scores


@dataclass
class LeverageScore(ScoreMethod):
    """Score every entry by the approximate statistical leverage of its pre-RoPE key among the layer's centred keys
    (a Gaussian sketch to ``sketch`` columns, :func:`~avkv.methods.compactor.leverage_scores`); top-k per KV head.
    No queries, no attention, so it runs under every attention backend.

    kvpress z-scores the layer's scores (one mean and deviation over all KV heads); a positive affine map of the
    whole layer changes no ranking, within a head or across heads, so the scores are used as they are. The sketch
    comes from the per-sample generator (kvpress: the global RNG); pre-RoPE keys are the cached keys rotated back
    (kvpress recomputes them with ``k_proj``).

    Parameters
    ----------
    sketch : int
        Columns of the Gaussian sketch (``sketch_dimension``, 48).
    window : int
        Last prompt positions always kept (0: none, as kvpress).
    """

    name = "leverage"
    kvpress: ClassVar[str | None] = "LeverageScorePress"
    needs_rope: ClassVar[bool] = True                 # reads view.rope
    sketch: int = 48
    window: int = 0

    def __post_init__(self) -> None:
        if self.sketch < 1:
            raise ValueError(f"sketch must be >= 1, got {self.sketch}")

    def score(self, view: LayerView) -> torch.Tensor:
        cos, sin = view.rope(view.entry_positions())
        return leverage_scores(unrotate(view.keys.float(), cos, sin), self.sketch, view.generator)   # [kvH, S]

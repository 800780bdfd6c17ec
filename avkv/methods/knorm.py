"""Knorm (Devoto et al., EMNLP 2024, arXiv 2406.11430): keep the entries whose keys have the smallest L2 norm."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import LayerView, ScoreMethod


@dataclass
class Knorm(ScoreMethod):
    """Score every entry by minus the L2 norm of its (post-RoPE) key; top-k per KV head. No queries, no attention.

    Reference: kvpress 0.5.5 ``KnormPress`` (the paper's authors' implementation), checked by the parity suite
    (``tests/parity``): kept set per KV head and next-token logits. RoPE rotates pairs of coordinates, so the norm
    is the same before and after it.

    Parameters
    ----------
    window : int
        Last prompt positions always kept (0: none, as kvpress).
    """

    name = "knorm"
    kvpress: ClassVar[str | None] = "KnormPress"
    window: int = 0

    def score(self, view: LayerView) -> torch.Tensor:
        return -torch.linalg.vector_norm(view.keys.float(), dim=-1)               # [kvH, S]

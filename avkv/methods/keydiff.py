"""KeyDiff (Park et al., 2025, arXiv 2504.15364): keep the keys least similar to the layer's mean key direction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from avkv.methods.base import LayerView, ScoreMethod


@dataclass
class KeyDiff(ScoreMethod):
    """Score every entry by minus the cosine similarity of its key to the anchor, the mean of the head's
    unit-normalised keys; top-k per KV head. Query-agnostic: no queries, no attention.

    Reference: kvpress 0.5.5 ``KeyDiffPress`` (one anchor over the whole chunk; the paper also describes a
    block-wise variant for long prompts, not implemented here), checked by the parity suite (``tests/parity``).

    Parameters
    ----------
    window : int
        Last prompt positions always kept (0: none, as kvpress).
    """

    name = "keydiff"
    kvpress: ClassVar[str | None] = "KeyDiffPress"
    window: int = 0

    def score(self, view: LayerView) -> torch.Tensor:
        k = view.keys.float()                                                     # [kvH, S, D]
        anchor = F.normalize(k, p=2, dim=-1).mean(dim=1, keepdim=True)            # [kvH, 1, D]
        return -F.cosine_similarity(k, anchor, dim=-1)

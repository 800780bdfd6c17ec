"""Random eviction: a floor every scoring method must beat (``shared/design/methods.md`` §6)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avkv.methods.base import LayerView, ScoreMethod


@dataclass
class Random(ScoreMethod):
    """Keep the last ``window`` prompt entries plus uniformly random others, independently per layer and KV head.

    Parameters
    ----------
    window : int
        Recent prompt positions always kept (32, as the window of the SnapKV family).

    Randomness comes from the per-sample generator the engine seeds from the sample id, so reruns are identical.
    """

    name = "random"
    window: int = 32

    def score(self, view: LayerView) -> torch.Tensor:
        return torch.rand(view.num_kv_heads, view.seq_len, generator=view.generator).to(view.keys.device)

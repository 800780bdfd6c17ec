"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks + the most recent tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import LayerView, ScoreMethod, Selection


@dataclass
class StreamingLLM(ScoreMethod):
    """Keep the first ``sink`` positions and the most recent ``n_keep - sink``; no scores are computed.

    Parameters
    ----------
    sink : int
        Number of initial "attention sink" tokens kept (4 in the paper).
    decode_policy : str
        ``grow`` (default; decode tokens are appended) or ``fixed``: the paper's rolling window, where after each
        decode step the sinks and the most recent ``n_keep - sink`` entries are kept.
    """

    name = "streamingllm"
    kvpress: ClassVar[str | None] = "StreamingLLMPress"
    sink: int = 4
    decode_policy: str = "grow"

    def score(self, view: LayerView) -> torch.Tensor:
        S = view.seq_len
        pos = torch.arange(S, dtype=torch.float32, device=view.keys.device)
        s = pos.clone()                     # recency
        s[: min(self.sink, S)] = S + 1.0    # sinks beat everything
        return s.expand(view.num_kv_heads, S)

    def decode_step(self, view: LayerView) -> Selection | None:
        """Rolling window: the cache keeps its order (sinks first, the new token last), so the same positional
        score applies to the current cache."""
        return None if view.seq_len <= view.n_keep else self.compress(view)

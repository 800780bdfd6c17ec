"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks + the most recent tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avkv.methods.base import LayerView, ScoreMethod


@dataclass
class StreamingLLM(ScoreMethod):
    """Keep the first ``sink`` positions and the most recent ``n_keep - sink``; no scores are computed.

    Parameters
    ----------
    sink : int
        Number of initial "attention sink" tokens kept (4 in the paper).

    ``decode_policy`` is ``grow`` here (decode tokens are appended); the paper's rolling window corresponds to
    ``fixed``, which the engine logs when set.
    """

    name = "streamingllm"
    sink: int = 4
    decode_policy: str = "grow"

    def score(self, view: LayerView) -> torch.Tensor:
        S = view.seq_len
        pos = torch.arange(S, dtype=torch.float32, device=view.keys.device)
        s = pos.clone()                     # recency
        s[: min(self.sink, S)] = S + 1.0    # sinks beat everything
        return s.expand(view.num_kv_heads, S)

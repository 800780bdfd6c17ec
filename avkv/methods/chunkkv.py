"""ChunkKV (Liu et al., 2025, arXiv 2502.00299; kvpress 0.5.5 ``ChunkKVPress``): keep whole chunks of consecutive
entries, ranked by a scorer's scores summed over KV heads and averaged over the chunk."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from avkv.methods.allocation import Wrapper
from avkv.methods.base import LayerView, ScoreMethod, Selection
from avkv.methods.snapkv import SnapKV


@dataclass
class ChunkKV(Wrapper):
    """Semantic chunks: the cache is cut into chunks of ``chunk`` consecutive entries (the last one shorter), each
    scored by the mean over its entries of the scorer's scores summed over KV heads; the best chunks are kept,
    the same entries on every KV head.

    Parameters
    ----------
    scorer : ScoreMethod
        Token scores (SnapKV by default, the paper's choice). Its protected window scores (highest score) + 1, as
        kvpress's scorers pad their windows, so it is ranked like any chunk rather than forced in.
    chunk : int
        Chunk length (``chunk_length``, 20).

    Budget: chunks are taken best first while they fit in the budget; the first one that does not fit gives
    its best entries (by the summed score) to fill the budget exactly, so the layer keeps ``n_keep`` entries.
    kvpress keeps ``max(1, int(n_chunks·(1 − ratio)))`` whole chunks instead (a count that can miss the budget);
    driven to that count, the two keep the same chunks. Ties between chunks: the later chunk first (kvpress: the
    order of ``topk``).
    """

    name = "chunkkv"
    kvpress: ClassVar[str | None] = "ChunkKVPress"
    scorer: ScoreMethod = field(default_factory=SnapKV)
    chunk: int = 20

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def compress(self, view: LayerView) -> Selection:
        if not isinstance(self.scorer, ScoreMethod):
            raise TypeError(f"ChunkKV needs a ScoreMethod scorer, got {type(self.scorer).__name__}")
        S = view.seq_len
        n_keep = max(1, min(view.n_keep, S))
        scores = self.scorer.score(view).float().clone()                            # [kvH, S]
        w = self._protected(view)
        if 0 < w < S:
            scores[:, S - w:] = scores[:, : S - w].max() + 1
        total = scores.sum(0)                                                      # [S]
        L = self.chunk
        starts = torch.arange(0, S, L, device=total.device)
        ends = (starts + L).clamp(max=S)
        means = torch.stack([total[a:b].mean() for a, b in zip(starts.tolist(), ends.tolist())])
        # best chunk first; equal means: the later chunk first
        order = (len(means) - 1 - torch.sort(means.double().flip(0), descending=True, stable=True).indices).tolist()
        keep = torch.zeros(S, dtype=torch.bool, device=total.device)
        left, taken = n_keep, 0
        for c in order:
            a, b = int(starts[c]), int(ends[c])
            if b - a <= left:
                keep[a:b] = True
                left -= b - a
                taken += 1
                if left == 0:
                    break
            else:                                  # the first chunk that does not fit fills the rest
                part = total[a:b].double()
                best = (b - a - 1 - torch.sort(part.flip(0), descending=True, stable=True).indices)[:left]
                keep[a + best] = True
                left = 0
                break
        idx = torch.nonzero(keep)[:, 0]
        sel = idx[None].expand(view.num_kv_heads, -1).contiguous()
        if isinstance(self.scorer, ScoreMethod):
            self.scorer.remember(view, scores, sel)
        return Selection(indices=sel, info={"chunks_kept": taken})

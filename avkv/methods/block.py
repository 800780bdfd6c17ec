"""Block-wise selection (Simple & efficient "block" scoring, kvpress 0.5.5 ``BlockPress``): stream the cache through
a scorer block by block, keeping the budget's worth of entries at each step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from avkv.methods.allocation import Wrapper
from avkv.methods.base import LayerView, ScoreMethod, Selection, keep_topk, sub_view
from avkv.methods.random import Random


@dataclass
class Block(Wrapper):
    """Keep the first ``n_keep`` entries, then for each next block of ``block`` entries score (kept ∪ block) with
    the scorer and keep its best ``n_keep``; memory for scores is O(n_keep + block) per step.

    Parameters
    ----------
    scorer : ScoreMethod
        Any scorer that reads keys and values only (the entries it sees differ per KV head, so there are no
        queries to give it: a query-based scorer fails loudly). Its protected window is the last entries it sees.
    block : int
        Block length (``block_size``, 128).

    Differences from kvpress: the entries are passed to the scorer in cache order (kvpress passes the kept ones in
    ``topk`` order, which only matters to order-sensitive scorers such as LagKV); kvpress also hands its scorer
    hidden states gathered per head from slices of the hidden dimension, which no query-based scorer can use.
    """

    name = "block"
    kvpress: ClassVar[str | None] = "BlockPress"
    scorer: ScoreMethod = field(default_factory=Random)
    block: int = 128

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")

    def compress(self, view: LayerView) -> Selection:
        if not isinstance(self.scorer, ScoreMethod):
            raise TypeError(f"Block needs a ScoreMethod scorer, got {type(self.scorer).__name__}")
        S, kvH = view.seq_len, view.num_kv_heads
        n = max(1, min(view.n_keep, S))
        dev = view.keys.device
        kept = torch.arange(n, device=dev).expand(kvH, n)
        for i in range(n, S, self.block):
            end = min(S, i + self.block)
            cur = torch.cat([kept, torch.arange(i, end, device=dev).expand(kvH, end - i)], dim=1)
            sub = sub_view(view, cur, n)
            top = keep_topk(self.scorer.score(sub), n, protect_last=self.scorer.protected(sub))
            kept = cur.gather(1, top)
        return Selection(indices=kept.sort(dim=-1).values.contiguous())

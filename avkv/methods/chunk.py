"""Chunked scoring (kvpress 0.5.5 ``ChunkPress``): score and select inside fixed-length chunks of the cache, so the
kept entries are spread evenly over the context."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from avkv.methods.allocation import Wrapper
from avkv.methods.counts import chunk_quotas
from avkv.methods.base import LayerView, ScoreMethod, Selection, sub_view
from avkv.methods.snapkv import SnapKV


@dataclass
class Chunk(Wrapper):
    """Cut the cache into chunks of ``chunk`` consecutive entries; the scorer selects inside each chunk on its own
    (a sub-view: the chunk's keys, values and queries; causal attention inside the chunk), keeping the chunk's
    share of the budget.

    Parameters
    ----------
    scorer : ScoreMethod
        SnapKV by default. Its protected window is the end of each chunk.
    chunk : int
        Chunk length (``chunk_length``, 1024).

    Shares: the budget split in proportion to the chunk lengths, rounded with the sum preserved (the layer keeps
    exactly ``n_keep``); kvpress keeps ``max(1, int(len·(1 − ratio)))`` per chunk, the same counts whenever those
    are whole. The queries of a chunk are its own positions' queries; kvpress's SnapKV inside ``ChunkPress``
    rotates every chunk's window queries with the *last* positions of the whole prompt, which is only right for
    the last chunk — so parity is checked with scorers that read keys and values only.
    """

    name = "chunk"
    kvpress: ClassVar[str | None] = "ChunkPress"
    scorer: ScoreMethod = field(default_factory=SnapKV)
    chunk: int = 1024

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def compress(self, view: LayerView) -> Selection:
        if not isinstance(self.scorer, ScoreMethod):
            raise TypeError(f"Chunk needs a ScoreMethod scorer, got {type(self.scorer).__name__}")
        S = view.seq_len
        n = max(1, min(view.n_keep, S))
        parts = []
        for a, b, c in chunk_quotas(S, self.chunk, n, lo=1):          # ∝ length, at least 1 per chunk
            sel = self.scorer.compress(sub_view(view, slice(a, b), c))
            if sel.valid is not None or sel.keys is not None:
                raise TypeError("Chunk needs a scorer whose selections keep the same count per head, unmerged")
            parts.append(sel.indices + a)
        return Selection(indices=torch.cat(parts, dim=1))

"""TOVA (Oren et al., EMNLP 2024, arXiv 2401.06104, "Transformers are Multi-State RNNs"): token omission via
attention of the last query."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import LayerView, ScoreMethod, Selection, window_scores


@dataclass
class TOVA(ScoreMethod):
    """Score every entry by the softmax attention of the newest query, averaged over *all* query heads of the
    layer, so every KV head keeps the same positions; the newest entry is always kept.

    Reference: kvpress 0.5.5 ``TOVAPress`` (applied once, at the end of the prefill), checked by the parity suite
    (``tests/parity``). The paper's policy is a fixed-size cache: at every decode step the entry with the lowest
    attention of the new token is dropped; ``decode_policy: fixed`` runs exactly that (the newest query's
    attention over the current cache, after each decode step).

    Parameters
    ----------
    decode_policy : str
        ``grow`` (kvpress: compress once after the prefill) or ``fixed`` (the paper's rolling eviction).
    """

    name = "tova"
    kvpress: ClassVar[str | None] = "TOVAPress"
    window = 1                       # the newest entry (not a field: TOVA always keeps exactly it)
    decode_policy: str = "grow"

    def score(self, view: LayerView) -> torch.Tensor:
        s = window_scores(view, 1).mean(0)                                          # [S] head-mean, last query
        return s.expand(view.num_kv_heads, -1)

    def decode_step(self, view: LayerView) -> Selection | None:
        """After a decode step: the new token's attention over the cache; keep ``n_keep`` of it (drop the rest)."""
        return None if view.seq_len <= view.n_keep else self.compress(view)

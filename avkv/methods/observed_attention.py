"""Observed attention (kvpress ``ObservedAttentionPress``): the mean attention each entry received from the prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import LayerView, ScoreMethod, accumulated_scores, check_choice, reduce_gqa


@dataclass
class ObservedAttention(ScoreMethod):
    """Score entry j by the attention every prompt query i ≥ j paid it, divided by the number of such queries
    (n − j), averaged over the query heads of each KV group; top-k per KV head, no window.

    Reference: kvpress 0.5.5 ``ObservedAttentionPress`` (it reads the eager attention weights; here the same
    column sums come from one chunked pass on the prefill's captured queries and log-sum-exps,
    :func:`~avkv.methods.base.accumulated_scores`, so it runs under SDPA), checked by the parity suite (``tests/parity``). It is H2O's accumulated attention
    normalised by the number of queries that see each entry; avkv's ``h2o`` keeps the raw sums and a recent window
    (the H2O paper), which favours early positions.

    Parameters
    ----------
    gqa : str
        Reduction of query-head scores within a KV group (``mean`` as kvpress).
    chunk : int
        Query rows per chunk of the column pass (memory O(H·chunk·S)).
    """

    name = "observed_attention"
    kvpress: ClassVar[str | None] = "ObservedAttentionPress"
    all_query_stats = True
    window: int = 0
    gqa: str = "mean"
    chunk: int = 128

    def __post_init__(self) -> None:
        check_choice("gqa", self.gqa, ("mean", "max", "sum"))

    def score(self, view: LayerView) -> torch.Tensor:
        return reduce_gqa(accumulated_scores(view, self.chunk, normalize=True), view.num_kv_heads, self.gqa)

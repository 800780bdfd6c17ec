"""H2O, Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048): accumulated attention + recent tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avkv.methods.base import LayerView, ScoreMethod, Selection, accumulated_scores, attention_rows, keep_topk, \
    reduce_gqa


@dataclass
class H2O(ScoreMethod):
    """Keep the heavy hitters (largest attention accumulated over *all* prompt queries) plus the recent window.

    Parameters
    ----------
    sink : int
        First positions always kept (0 in H2O; D2O's code keeps 4).
    recent_share : float
        Share of the budget that goes to the most recent positions; the rest goes to heavy hitters. 0.5 is the
        MileBench/LOOK-M setting (heavy-hitter ratio 0.1 + recent ratio 0.1 of the prompt at a 20% budget).
    gqa : str
        Reduction of query-head scores within a KV group (``mean``, as KVCache-Factory).
    chunk : int
        Query rows per chunk of the accumulated-score pass (memory O(H·chunk·S), never S×S).
    decode_policy : str
        ``fixed`` (the original): after each decode step the new row's attention is added to the accumulated
        scores and the lowest-scored non-recent entry is evicted, so the cache holds its post-prefill size.
        ``grow``: decode tokens are appended and never evicted.

    Needs the attention of every prompt query (``all_query_stats``): under SDPA the prefill's own kernel gives each
    row's log-sum-exp and its queries, and one chunked column pass adds O(n²·d) (no P·V, no recomputed queries);
    otherwise recomputed queries in chunks (:func:`~avkv.methods.base.accumulated_scores`).
    """

    name = "h2o"
    all_query_stats = True
    sink: int = 0
    recent_share: float = 0.5
    gqa: str = "mean"
    chunk: int = 128
    decode_policy: str = "fixed"

    def protected(self, view: LayerView) -> int:
        return self._recent(view.n_keep, view.seq_len)

    def _recent(self, n_keep: int, seq_len: int) -> int:
        return int(round(self.recent_share * min(n_keep, seq_len)))

    def score(self, view: LayerView) -> torch.Tensor:
        s = reduce_gqa(accumulated_scores(view, self.chunk), view.num_kv_heads, self.gqa)
        return self._sinks(s)

    def compress(self, view: LayerView) -> Selection:
        return self.keep(view, self.score(view), view.n_keep)

    def keep(self, view: LayerView, scores: torch.Tensor, n_keep: int, recent: int | None = None) -> Selection:
        """Heavy hitters + recent window from ``scores`` [kvH, S]; remembers the scores for fixed decoding."""
        if recent is None:
            recent = self._recent(n_keep, view.seq_len)
        idx = keep_topk(scores, n_keep, protect_last=recent)
        self.remember(view, scores, idx, recent)
        return self.select(view, idx)

    def remember(self, view: LayerView, scores: torch.Tensor, indices: torch.Tensor, recent: int | None = None
                 ) -> None:
        if self.decode_policy == "fixed":
            if recent is None:
                recent = self.protected(view)
            view.scratch(self)[self._key(view)] = {"scores": scores.gather(1, indices), "recent": recent}

    def select(self, view: LayerView, idx: torch.Tensor) -> Selection:
        """Turn kept indices into a Selection (eviction here; LOOK-M merges the evicted entries instead)."""
        return Selection(indices=idx)

    def decode_step(self, view: LayerView) -> Selection | None:
        """One H2O decode step: accumulate the new token's attention, evict down to ``view.n_keep``."""
        key = self._key(view)
        st = view.scratch(self).get(key)
        S = view.seq_len
        row = reduce_gqa(attention_rows(view, S - 1, S)[:, 0], view.num_kv_heads, self.gqa)      # [kvH, S]
        if st is None:                       # nothing from the prefill (e.g. it kept everything)
            st = {"scores": row.new_zeros(row.shape[0], 0), "recent": self._recent(view.n_keep, S)}
        old = st["scores"]
        scores = torch.cat([old, old.new_zeros(old.shape[0], S - old.shape[1])], dim=1) + row
        if S <= view.n_keep:
            view.scratch(self)[key] = {"scores": scores, "recent": st["recent"]}
            return None
        idx = keep_topk(self._sinks(scores), view.n_keep, protect_last=st["recent"])
        view.scratch(self)[key] = {"scores": scores.gather(1, idx), "recent": st["recent"]}
        return self.select(view, idx)

    def _sinks(self, scores: torch.Tensor) -> torch.Tensor:
        if self.sink <= 0:
            return scores
        s = scores.clone()
        s[:, : self.sink] = float("inf")
        return s

    def _key(self, view: LayerView) -> tuple:
        return (self.name, "scores", view.layer_idx)

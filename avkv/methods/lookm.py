"""LOOK-M (Wan et al., EMNLP Findings 2024, arXiv 2406.18139): text-prior H2O eviction + merging of evicted KV."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avkv.methods.base import TEXT, LayerView, Selection, complement, merge_into_nearest
from avkv.methods.h2o import H2O


@dataclass
class LookM(H2O):
    """Look-Once Optimization in KV (official code ``SUSTechBruce/LOOK-M``, ``TextPivotMerge_LayerWise``).

    Scores are H2O's accumulated attention; a *text prior* pushes every non-text entry below every text entry,
    so heavy hitters are text first and media entries are kept only when the heavy-hitter budget exceeds the
    text count. Each evicted entry is then merged into its most key-similar kept entry (cosine on keys, the
    same assignment applied to values).

    Parameters
    ----------
    recent_share : float
        Share of the budget for the recent window (0.5: the scripts' hh_ratio = recent_ratio = 0.1).
    merge : str
        ``pivot`` (default, ``(x_e + x_kept)/2`` scatter-averaged into the kept entry), ``avg`` or ``weighted``
        (:func:`~avkv.methods.base.merge_into_nearest`).
    text_prior : bool
        Rank non-text entries below text entries (LOOK-M adds −65516 to image positions).
    keep_all_text : bool
        Reproduce the official code literally: its mask keeps *every* text entry (plus the recent window and
        the heavy hitters), so the cache exceeds the budget when the text alone does. Off by default: the
        budget is respected and the record shows the kept ratio either way.
    decode_policy : str
        ``grow`` by default: the official forward compresses only when ``q_len != 1`` (prefill), whatever
        ``shared/design/methods.md`` says about every step. ``fixed`` evicts one entry per decode step H2O-style
        and merges it the same way.

    Reference: the official LOOK-M code (above); its scores are H2O's accumulated attention, never pooled, so
    SnapKV's pooling convention does not arise.

    Needs all-query attention (H2O's pass on the prefill's captured log-sum-exps, so SDPA works). Media positions come
    from the modality ids, never from a hard-coded token count (the official code assumes 576 per image).
    """

    name = "lookm"
    merge: str = "pivot"
    text_prior: bool = True
    keep_all_text: bool = False
    decode_policy: str = "grow"

    @property
    def budget_mode(self) -> str:
        return "achieved" if self.keep_all_text else "held"

    @property
    def budget_reason(self) -> str | None:
        return "keep_all_text=true keeps every text entry beyond the budget" if self.keep_all_text else None

    def score(self, view: LayerView) -> torch.Tensor:
        s = super().score(view)
        if self.text_prior or self.keep_all_text:
            text = self._text(view, s.shape[-1])
            top = s.abs().max() + 1.0
            if self.text_prior:
                s = torch.where(text, s, s - top)
            if self.keep_all_text:
                s = torch.where(text, s + 2 * top, s)
        return s

    def compress(self, view: LayerView) -> Selection:
        if not self.keep_all_text:
            return super().compress(view)
        recent = self.protected(view)
        n_text = int(self._text(view, view.seq_len)[: view.seq_len - recent].sum())
        return self.keep(view, self.score(view), max(view.n_keep, n_text + recent), recent)

    def select(self, view: LayerView, idx: torch.Tensor) -> Selection:
        evicted = complement(idx, view.seq_len)
        k, v = merge_into_nearest(view.keys, view.values, idx, evicted, mode=self.merge)
        return Selection(indices=idx, keys=k, values=v, info={"merged": int(evicted.numel())})

    @staticmethod
    def _text(view: LayerView, n: int) -> torch.Tensor:
        mod = view.modality.to(view.keys.device)
        text = torch.ones(n, dtype=torch.bool, device=view.keys.device)   # decode tokens beyond the ids are text
        text[: min(n, mod.numel())] = mod[:n] == TEXT
        return text


"""CriticalKV (Feng et al., 2025, arXiv 2502.03805; kvpress 0.5.5 ``CriticalKVPress`` / ``CriticalAdaKVPress``):
re-weight a scorer's scores by how much each entry's value moves the layer output, ‖v_j·W_o‖₁."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from avkv.methods.allocation import Wrapper
from avkv.methods.counts import mask_to_indices
from avkv.methods.base import LayerView, ScoreMethod, Selection, rank_positions, repeat_kv
from avkv.methods.snapkv import SnapKV


def projected_value_norm(view: LayerView) -> torch.Tensor:
    """‖v_j W_o^h‖₁ per query head h and entry j, averaged over the query heads of each KV head: [kvH, S].

    W_o^h is query head h's slice of the output projection (``view.out_weight_fn``); one head at a time, so no
    [H, S, hidden] tensor is made."""
    if view.out_weight_fn is None:
        raise RuntimeError("CriticalKV needs the layer's output projection (view.out_weight_fn)")
    W = view.out_weight_fn()                                                     # [H, D, hidden]
    V = repeat_kv(view.values, view.groups)                                      # [H, S, D]
    out = torch.stack([(V[h].to(W.dtype) @ W[h]).float().abs().sum(-1) for h in range(view.num_heads)])
    return out.view(view.num_kv_heads, view.groups, -1).mean(1)


def _padded_scores(scorer: ScoreMethod, view: LayerView, w: int) -> torch.Tensor:
    """The scorer's scores with its protected window at (highest prefix score) + 1, kvpress's window padding."""
    s = scorer.score(view).float().clone()
    S = s.shape[-1]
    if 0 < w < S:
        s[:, S - w:] = s[:, : S - w].max() + 1
    return s


@dataclass
class CriticalKV(Wrapper, ScoreMethod):
    """Two-stage selection around any scorer: the best ``first_stage·n_keep`` entries by the scorer's own scores
    are kept outright; the rest of the budget goes to the best (score + ε)·‖v W_o‖₁.

    Parameters
    ----------
    scorer : ScoreMethod
        First-stage scores (SnapKV by default; kvpress warns to disable ExpectedAttention's own value norm).
    epsilon : float
        1e-4.
    first_stage : float
        Fraction of the budget chosen by the scorer alone (``first_stage_ratio``, 0.5).

    The scorer's protected window ranks first (as kvpress pads it) and is always kept.
    """

    name = "criticalkv"
    kvpress: ClassVar[str | None] = "CriticalKVPress"
    scorer: ScoreMethod = field(default_factory=SnapKV)
    epsilon: float = 1e-4
    first_stage: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.first_stage <= 1:
            raise ValueError(f"first_stage must be in [0, 1], got {self.first_stage}")

    def protected(self, view: LayerView) -> int:
        return self._protected(view)

    def score(self, view: LayerView) -> torch.Tensor:
        s = _padded_scores(self.scorer, view, self._protected(view))
        k1 = int(min(view.n_keep, view.seq_len) * self.first_stage)
        if self.first_stage > 0:
            k1 = max(1, k1)
        c = (s + self.epsilon) * projected_value_norm(view).to(s.device)
        if k1:
            c.scatter_(1, rank_positions(s)[:, :k1], float("inf"))
        return c


@dataclass
class CriticalAdaKV(Wrapper):
    """CriticalKV with AdaKV's head-adaptive budgets (kvpress ``CriticalAdaKVPress``).

    Each KV head first secures its best ``alpha_safeguard·n_keep`` entries; the layer's ``kvH·n_keep`` best
    scores (secured ones first) decide how many entries each head keeps (c_h); each head then keeps its best
    ``first_stage·c_h`` by the scorer's scores and fills c_h with the best (score + ε)·‖v W_o‖₁.

    Parameters
    ----------
    scorer : ScoreMethod
        SnapKV by default.
    alpha_safeguard : float
        0.2. At least one entry per head is secured even at 0 (a head with no entry cannot be stored; kvpress can
        leave one empty).
    epsilon, first_stage : float
        As :class:`CriticalKV`.

    Heads keep different counts (ragged storage, like AdaKV). The scorer's window ranks first (padded as kvpress)
    but is not forced in. Ties (secured entries, equal scores across heads): the later position, then the later
    head (kvpress: ``topk`` order).
    """

    name = "criticaladakv"
    kvpress: ClassVar[str | None] = "CriticalAdaKVPress"
    ragged_heads: ClassVar[bool] = True           # its heads keep different counts
    scorer: ScoreMethod = field(default_factory=SnapKV)
    alpha_safeguard: float = 0.2
    epsilon: float = 1e-4
    first_stage: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.alpha_safeguard <= 1:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")
        if not 0 <= self.first_stage <= 1:
            raise ValueError(f"first_stage must be in [0, 1], got {self.first_stage}")
        if self.scorer.decode_policy == "fixed":
            raise ValueError("per-head budgets leave a ragged cache: give the scorer decode_policy=grow")

    def compress(self, view: LayerView) -> Selection:
        if not isinstance(self.scorer, ScoreMethod):
            raise TypeError(f"CriticalAdaKV needs a ScoreMethod scorer, got {type(self.scorer).__name__}")
        s = _padded_scores(self.scorer, view, self._protected(view))
        kvH, S = s.shape
        n_keep = max(1, min(view.n_keep, S))
        n_safe = max(1, int(n_keep * self.alpha_safeguard))
        safe = rank_positions(s)[:, :n_safe]
        s.scatter_(1, safe, float("inf"))
        won = rank_positions(s.reshape(1, -1))[0, : kvH * n_keep] // S
        counts = torch.bincount(won, minlength=kvH)                                  # c_h, sum kvH·n_keep
        order = rank_positions(s)
        c = (s + self.epsilon) * projected_value_norm(view).to(s.device)
        pos = torch.arange(S, device=s.device)[None]
        first = (counts.float() * self.first_stage).long()
        stage1 = torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, pos < first[:, None])
        c = c.masked_fill(stage1, float("inf"))
        final = rank_positions(c)
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(1, final, pos < counts[:, None])
        idx, valid = mask_to_indices(keep)
        return Selection(indices=idx, valid=valid, info={"head_counts": counts.tolist()})

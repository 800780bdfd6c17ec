"""Allocation wrappers: how many entries each layer, KV head or modality keeps, composed with any scorer.

A wrapper takes a scorer (any :class:`~avkv.methods.base.ScoreMethod`; the per-layer wrapper takes any
:class:`~avkv.methods.base.Method`) and decides only the counts; the scorer decides which entries. So
PyramidKV is ``LayerAllocation(SnapKV)``, AdaKV is ``HeadAllocation(SnapKV)``, and the same wrappers give
pyramid-H2O, AdaKV-H2O or per-modality SnapKV without copying any allocation code (kvpress-style wrappers,
``shared/design/anchors.md`` §1).

* :class:`LayerAllocation`: per-layer counts from a schedule (PyramidKV's linear pyramid, or fixed weights).
* :class:`HeadAllocation`: AdaKV — a global top-k across the KV heads of a layer decides each head's share,
  with a floor; heads keep different counts (the selection is padded with a ``valid`` mask, the engine stores it
  per head without padding).
* :class:`ModalityAllocation`: fixed shares of the budget per modality, else proportional to each modality's size.

The window (``scorer.protected(view)``) is always kept and counts toward every budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Sequence

import torch

from avkv.methods.base import MODALITIES, LayerView, Method, ScoreMethod, Selection, rank_positions, warn_once
from avkv.methods.counts import apportion, mask_to_indices, modality_budgets, ragged_topk
from avkv.methods.request import PrefillPlan, Request


# ------------------------------------------------------------------------------------------------ counting
def pyramid_budgets(n_keep: int, window: int, num_layers: int, seq_len: int, beta: float = 20.0) -> list[int]:
    """PyramidKV per-layer kept counts (window included), ``shared/design/methods.md`` §6.

    With B = ``n_keep`` (the per-layer average) and w the window: min = (B − w)/β, max = 2(B − w) − min, and
    layer l keeps max − l·(max − min)/(L − 1) prefix entries plus w; if max ≥ n − w, max = n − w and
    min = 2(B − w) − max. As in KVCache-Factory, a prompt shorter than 2(B − w) gets the uniform budget.

    Difference from KVCache-Factory: it floors min and the step to integers, which makes the layers keep more
    than B on average; here the schedule is real-valued and rounded by :func:`~avkv.methods.counts.apportion`
    (L·(B − w) in all), so the mean over layers is exactly B (the budget the run reports).
    """
    w = min(window, n_keep, seq_len)
    base = n_keep - w
    prefix = seq_len - w
    L = num_layers
    if L <= 1 or base <= 0 or seq_len < 2 * base:
        return [n_keep] * L
    lo = base / beta
    hi = 2 * base - lo
    if hi >= prefix:
        hi = prefix
        lo = 2 * base - hi
    step = (hi - lo) / (L - 1)
    counts = apportion(torch.tensor([hi - l * step for l in range(L)]).clamp(0, prefix), L * base, 0, prefix)
    return [int(c) + w for c in counts]


def adaptive_head_counts(scores: torch.Tensor, base: int, floor: float = 0.2) -> torch.Tensor:
    """AdaKV per-head capacities (window excluded) from prefix scores [kvH, P].

    All heads' scores are pooled and the global top ``kvH·base`` decides how many entries c_h each head wins;
    the capacity is c_h·(1 − floor) + floor·base, so every head keeps at least ``floor·base``. KVCache-Factory
    rounds each head independently and floors ``floor·base``; here :func:`~avkv.methods.counts.apportion` rounds
    them to the layer total kvH·base exactly. Ties between heads are broken deterministically (later position,
    then later head).
    """
    R, P = scores.shape
    base = max(0, min(int(base), P))
    flat = scores.detach().reshape(1, R * P)
    top = rank_positions(flat)[0, : R * base]
    won = torch.bincount(top // P, minlength=R).to(torch.float64)
    return apportion(won * (1 - floor) + floor * base, R * base, 0, P)


def safeguard_head_counts(scores: torch.Tensor, n_keep: int, window: int, floor: float = 0.2
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """kvpress ``AdaKVPress``'s allocation: each head first keeps its ``max(1, int(floor·n_keep))`` best entries
    (the always-kept window counts toward them), then the layer's remaining budget goes to the best of all heads'
    other prefix entries at once, so the layer keeps kvH·``n_keep`` in total.

    Returns the scores with each head's safeguarded prefix entries raised to +inf (so a per-head top-k keeps them)
    and the per-head prefix counts (window excluded).
    """
    R, S = scores.shape
    w = min(window, S)
    P = S - w
    n_safe = max(1, int(n_keep * floor)) if floor > 0 else 0
    extra = max(0, min(n_safe - w, P))                          # safeguarded entries beyond the window
    s = scores.detach().to(torch.float64).clone()
    if extra > 0:
        top = rank_positions(s[:, :P])[:, :extra]
        s[:, :P] = s[:, :P].scatter(1, top, math.inf)
    base = max(0, n_keep - w)
    flat = s[:, :P].reshape(1, R * P)
    won = rank_positions(flat)[0, : R * base]
    return s, torch.bincount(won // P, minlength=R)


# ------------------------------------------------------------------------------------------------ wrappers
class Wrapper(Method):
    """Base of the allocation wrappers: everything but the counts is the scorer's."""

    scorer: Method

    @property
    def requires_attentions(self) -> bool:  # type: ignore[override]
        return self.scorer.requires_attentions

    @property
    def decode_policy(self) -> str:  # type: ignore[override]
        return self.scorer.decode_policy

    @property
    def deferred(self) -> bool:  # type: ignore[override]
        return self.scorer.deferred

    @property
    def budget_mode(self) -> str:  # type: ignore[override]
        return getattr(self.scorer, "budget_mode", "held")

    @property
    def budget_reason(self) -> str | None:  # type: ignore[override]
        return getattr(self.scorer, "budget_reason", None)

    def observe(self, view: LayerView) -> None:
        self.scorer.observe(view)

    @property
    def prunes_hidden_states(self) -> bool:  # type: ignore[override]
        return self.scorer.prunes_hidden_states

    @property
    def prefill_attention(self) -> bool:  # type: ignore[override]
        return self.scorer.prefill_attention

    def begin(self, request: Request) -> PrefillPlan | None:
        return self.scorer.begin(request)

    def end(self) -> None:
        self.scorer.end()

    def decode_step(self, view: LayerView) -> Selection | None:
        return self.scorer.decode_step(view)

    def _protected(self, view: LayerView) -> int:
        """The scorer's always-kept window, never more than the budget."""
        w = self.scorer.protected(view) if isinstance(self.scorer, ScoreMethod) else 0
        return max(0, min(w, view.n_keep, view.seq_len))


@dataclass
class LayerAllocation(Wrapper):
    """Per-layer budgets around any method: each layer's ``n_keep`` comes from a schedule, the mean stays B.

    Parameters
    ----------
    scorer : Method
        The method that selects within each layer (SnapKV for PyramidKV; any method composes).
    schedule : str
        ``pyramid`` (PyramidKV, :func:`pyramid_budgets`) or ``weights`` (counts ∝ ``weights``).
    beta : float
        PyramidKV's β: the last layer keeps (B − w)/β prefix entries (20 in KVCache-Factory).
    weights : list of float, optional
        Relative per-layer budgets for ``schedule=weights`` (normalised to mean 1).
    """

    scorer: Method
    schedule: str = "pyramid"
    beta: float = 20.0
    weights: Sequence[float] | None = None

    name = "layer_allocation"

    def layer_budget(self, view: LayerView) -> int:
        L, S = view.num_layers, view.seq_len
        st = view.scratch(self)
        key = (view.n_keep, S)
        cached = st.get(key)
        if cached is None:
            if self.schedule == "pyramid":
                cached = pyramid_budgets(view.n_keep, self._protected(view), L, S, self.beta)
            elif self.schedule == "weights":
                if self.weights is None or len(self.weights) != L:
                    raise ValueError(f"schedule=weights needs {L} per-layer weights, got {self.weights}")
                w = torch.tensor([float(x) for x in self.weights], dtype=torch.float64)
                cached = apportion(w, L * view.n_keep, 1, S).tolist()
            else:
                raise ValueError(f"schedule must be 'pyramid' or 'weights', got {self.schedule!r}")
            st[key] = cached
            uniform = len(set(cached)) == 1
            st["layer_schedule"] = "uniform" if uniform else self.schedule
            if uniform and self.schedule == "pyramid" and L > 1:
                warn_once(("pyramid", "uniform", L), "%s: the prompt is too short for the pyramid (n < 2(B − w)) or "
                          "the budget leaves nothing beyond the window; every layer keeps the same count "
                          "(records: layer_schedule=uniform)", self.name)
        return int(cached[view.layer_idx])

    def compress(self, view: LayerView) -> Selection:
        n = self.layer_budget(view)
        sel = self.scorer.compress(replace(view, n_keep=n))
        sel.info.setdefault("layer_budget", n)
        sel.record["layer_schedule"] = view.scratch(self)["layer_schedule"]
        return sel


@dataclass
class HeadAllocation(Wrapper):
    """AdaKV's head-adaptive budgets around any scorer: heads of a layer compete for the layer's budget.

    Parameters
    ----------
    scorer : ScoreMethod
        Gives per-KV-head scores (SnapKV for AdaKV) and the protected window.
    floor : float
        α: every head keeps at least α·(B − w) prefix entries (KVCache-Factory default 0.2).
    floor_rule : str
        ``mix`` (AdaKV paper / KVCache-Factory: capacity = won·(1 − α) + α·(B − w) beyond the window) or
        ``safeguard`` (kvpress 0.5.5 ``AdaKVPress``: each head keeps its top ``int(α·B)`` entries, the window among
        them, then one global top-k over every head's other entries; :func:`safeguard_head_counts`).

    Heads keep different counts, so the selection is padded to the largest head with a ``valid`` mask; the
    engine stores each head's entries without the padding (bytes held = entries kept).
    """

    scorer: ScoreMethod
    floor: float = 0.2
    floor_rule: str = "mix"

    name = "head_allocation"
    ragged_heads: ClassVar[bool] = True           # its heads keep different counts

    def __post_init__(self) -> None:
        if self.floor_rule not in ("mix", "safeguard"):
            raise ValueError(f"floor_rule must be 'mix' or 'safeguard', got {self.floor_rule!r}")
        if self.scorer.decode_policy == "fixed":
            raise ValueError("per-head budgets leave a ragged (per-head) cache, and fixed-size decoding over it is "
                             "not implemented: give the scorer decode_policy=grow")

    def compress(self, view: LayerView) -> Selection:
        if not isinstance(self.scorer, ScoreMethod):
            raise TypeError(f"HeadAllocation needs a ScoreMethod scorer, got {type(self.scorer).__name__}")
        scores = self.scorer.score(view)
        S = view.seq_len
        w = self._protected(view)
        base = max(0, min(view.n_keep, S) - w)
        if self.floor_rule == "safeguard":
            scores, counts = safeguard_head_counts(scores, min(view.n_keep, S), w, self.floor)
        else:
            counts = adaptive_head_counts(scores[:, : S - w], base, self.floor)
        idx, valid = ragged_topk(scores, counts + w, w)
        return Selection(indices=idx, valid=valid, info={"head_counts": (counts + w).tolist()})


@dataclass
class ModalityAllocation(Wrapper):
    """Per-modality budgets around any scorer: each modality gets a share of the budget beyond the window.

    Parameters
    ----------
    scorer : ScoreMethod
        Ranks entries within each modality.
    shares : dict, optional
        Fixed shares, e.g. ``{text: 0.5, video: 0.25, audio: 0.25}`` (normalised). When None they are
        proportional to each modality's size (every modality compressed alike).

    A modality with fewer entries than its share keeps all of them and the rest goes to the others
    (:func:`modality_budgets`); every KV head keeps the same count of each modality.
    """

    scorer: ScoreMethod
    shares: dict[str, float] | None = None

    name = "modality_allocation"

    def _shares(self, view: LayerView) -> dict[str, float] | None:
        return dict(self.shares) if self.shares is not None else None

    def compress(self, view: LayerView) -> Selection:
        if not isinstance(self.scorer, ScoreMethod):
            raise TypeError(f"ModalityAllocation needs a ScoreMethod scorer, got {type(self.scorer).__name__}")
        scores = self.scorer.score(view)
        S = view.seq_len
        w = self._protected(view)
        P = S - w
        base = max(0, min(view.n_keep, S) - w)
        mod = view.modality[:P].to(scores.device)
        available = {name: int((mod == i).sum()) for i, name in enumerate(MODALITIES)}
        shares = self._shares(view)
        if shares is None:
            shares = {m: float(c) for m, c in available.items()}
        unknown = set(shares) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities in shares: {sorted(unknown)} (known: {MODALITIES})")
        budget = modality_budgets(available, shares, base)
        order = rank_positions(scores[:, :P])                                 # [R, P] best first
        mo = mod[order]
        wins = torch.zeros_like(order, dtype=torch.bool)
        for i, name in enumerate(MODALITIES):
            is_m = mo == i
            wins |= is_m & (is_m.cumsum(-1) <= budget[name])
        keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        keep[:, :P] = torch.zeros_like(wins).scatter_(1, order, wins)
        idx, _ = mask_to_indices(keep)
        self.scorer.remember(view, scores, idx)
        return Selection(indices=idx, info={"modality_budget": {m: c for m, c in budget.items() if c}})

"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): drop media tokens from the hidden states after layer K."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from avkv.methods.base import (MODALITIES, TEXT, LayerView, Method, Selection, attention_rows, rank_positions,
                               warn_once)
from avkv.methods.request import PrefillPlan, Request

log = logging.getLogger("avkv")


@dataclass
class FastV(Method):
    """Token pruning inside the prefill (official code ``pkunlp-icler/FastV``), not a cache eviction.

    At the end of layer K−1 the attention row of the last token of the compressed chunk, averaged over heads,
    ranks the media (non-text) tokens; before layer K the lowest-ranked ones are removed from the hidden states,
    so layers ≥ K never compute them and their caches never hold them. Layers < K keep the full cache. Kept
    tokens keep their original position ids. This changes the later layers' computation (the record says so:
    ``hidden_state_pruning: true``), unlike every eviction method.

    Parameters
    ----------
    layer : int
        K, the first pruned layer (2 in the paper; the demo uses 3), the latest one used. On a model with ≤ K layers
        (the tiny test models) pruning happens before the last layer (a warning, once); the record keeps both
        ``fastv_layer`` and ``fastv_layer_requested``.
    ratio : float, optional
        R, the fraction of media tokens dropped (paper: 0.5; the method then declares ``budget_mode: achieved``).
        None: K and R are chosen so that the mean kept KV over layers matches the budget [ours,
        ``shared/design/methods.md`` §6]: R = (s − B)·L / ((L − K)·N_media) with the requested K, and when that
        needs R > 1, the latest K' < K for which R ≤ 1 (layers < K always keep everything, so an earlier pruning
        layer is the only way to reach a small budget). When even K = 1, R = 1 keeps more than the budget, the
        record says ``budget_infeasible: true`` and the engine records the ratio achieved.
    modalities : list of str
        Which tokens may be dropped: every non-text modality (the paper prunes image tokens; for audio/video
        models all non-text tokens).

    Mechanics: FastV declares ``prunes_hidden_states``; :meth:`begin` returns a plan pruning from layer K and the
    selection of layer K−1 names the kept chunk positions (``Selection.hidden_keep``); the engine slices the hidden
    states, rotary embeddings, position ids and mask of the chunk before layers ≥ K (:mod:`avkv.compressor`). The
    attention row comes from this layer's recomputed last query and cached keys (works under SDPA and eager).
    """

    name = "fastv"
    prunes_hidden_states = True
    layer: int = 2
    ratio: float | None = None
    modalities: list = field(default_factory=lambda: ["image", "video", "audio"])

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ValueError(f"FastV needs K ≥ 1 (the ranking uses layer K−1's attention), got {self.layer}")
        self._req: dict = {}

    @property
    def budget_mode(self) -> str:
        return "held" if self.ratio is None else "achieved"

    @property
    def budget_reason(self) -> str | None:
        return None if self.ratio is None else f"ratio={self.ratio} fixes the dropped fraction, not the budget"

    def media_mask(self, modality: torch.Tensor) -> torch.Tensor:
        """The droppable positions of the chunk ``modality`` [S]: every configured non-text modality, except the
        ranking (last) token."""
        codes = [i for i, m in enumerate(MODALITIES) if m in self.modalities and i != TEXT]
        media = torch.zeros(modality.shape, dtype=torch.bool, device=modality.device)
        for c in codes:
            media |= modality == c
        if media.numel():
            media[-1] = False
        return media

    def fit_layer(self, S: int, n_keep: int, n_media: int, L: int, K: int) -> tuple[int, bool]:
        """The latest pruning layer K' ≤ K whose drop count (S − n_keep)·L/(L − K') fits in the media tokens, and
        whether even K' = 1 (R = 1) keeps more than the budget (infeasible)."""
        need = max(0, S - n_keep) * L
        while K > 1 and need > (L - K) * n_media:
            K -= 1
        return K, need > (L - K) * n_media

    # ---------------------------------------------------------------------------------- request lifecycle
    def begin(self, request: Request) -> PrefillPlan:
        L, K = request.num_layers, self.layer
        if K >= L:                           # a shallow (tiny) model: prune before its last layer, and say so
            K = L - 1
            if K < 1:
                raise ValueError(f"FastV needs at least 2 decoder layers, the model has {L}")
            warn_once(("fastv", "depth", self.layer, L), "FastV: K=%d but the model has %d decoder layers; pruning "
                      "before layer %d", self.layer, L, K)
        split, n_keep = int(request.split), int(request.n_keep)
        infeasible = False
        if self.ratio is None:
            n_media = int(self.media_mask(torch.as_tensor(request.modality)[:split]).sum())
            fit, infeasible = self.fit_layer(split, n_keep, n_media, L, K)
            if fit < K:
                warn_once(("fastv", "fit", self.layer, L), "FastV: the budget needs pruning before layer %d (K=%d "
                          "keeps more than the budget on this model); the record has fastv_layer", fit, K)
            if infeasible:
                warn_once(("fastv", "infeasible", L), "FastV: even pruning every media token from layer 1 keeps "
                          "more than the budget; the record says budget_infeasible and has the ratio achieved")
            K = fit
        self._req = {"K": K, "n_keep": n_keep, "num_layers": L, "ranked": False, "infeasible": infeasible}
        return PrefillPlan(prune_from=K)

    def end(self) -> None:
        self._req = {}

    # -------------------------------------------------------------------------------------------- ranking
    def compress(self, view: LayerView) -> Selection:
        """Keeps every entry of every layer; in layer K−1 the selection also names the chunk positions whose hidden
        states go on to layer K (``hidden_keep``), which the engine prunes from there on."""
        S = view.seq_len
        sel = Selection(indices=torch.arange(S, device=view.keys.device).expand(view.num_kv_heads, S))
        if self._req and view.layer_idx == self._req["K"] - 1 and not self._req["ranked"]:
            self._req["ranked"] = True
            sel.hidden_keep, sel.record = self._rank(view)
        return sel

    def _rank(self, view: LayerView) -> tuple[torch.Tensor, dict]:
        req = self._req
        S = view.seq_len
        media = self.media_mask(view.modality[:S].to(view.keys.device))
        n_media = int(media.sum())
        L, K = req["num_layers"], req["K"]
        if self.ratio is not None:
            R = float(self.ratio)
        elif n_media == 0:
            R = 0.0
        else:
            R = (S - req["n_keep"]) * L / ((L - K) * n_media)
        infeasible = self.ratio is None and (req["infeasible"] or R > 1.0 + 1e-9 or
                                             (n_media == 0 and req["n_keep"] < S))
        R = min(1.0, max(0.0, R))
        drop = int(round(n_media * R))
        row = attention_rows(view, S - 1, S)[:, 0].mean(0)                  # [S] head-averaged last row
        ranked = rank_positions(row.masked_fill(~media, float("inf"))[None])[0]   # non-media rank first
        keep = torch.ones(S, dtype=torch.bool, device=view.keys.device)
        if drop:
            keep[ranked[S - drop:]] = False                          # the lowest-attended media tokens
        record = dict(hidden_state_pruning=True, fastv_layer=K, fastv_layer_requested=self.layer, fastv_ratio=R,
                      fastv_pruned_tokens=drop, fastv_media_tokens=n_media, budget_infeasible=bool(infeasible))
        return keep.nonzero()[:, 0], record

"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): drop media tokens from the hidden states after layer K."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from avkv.methods.base import (MODALITIES, TEXT, LayerView, Method, Selection, attention_rows, rank_positions,
                               warn_once)

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

    Mechanics: :meth:`begin` registers forward pre-hooks on the decoder layers ≥ K (they slice the hidden
    states, rotary embeddings, position ids and mask of the chunk) and :meth:`end` removes them. The
    attention row comes from this layer's recomputed last query and cached keys (works under SDPA and eager).
    """

    name = "fastv"
    layer: int = 2
    ratio: float | None = None
    modalities: list = field(default_factory=lambda: ["image", "video", "audio"])

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ValueError(f"FastV needs K ≥ 1 (the ranking uses layer K−1's attention), got {self.layer}")
        self._handles: list = []
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
    def begin(self, request: dict) -> None:
        self.end()
        layers = request.get("layers")
        if layers is None:
            raise ValueError("FastV needs the decoder layers in the request (the engine passes 'layers')")
        L, K = len(layers), self.layer
        if K >= L:                           # a shallow (tiny) model: prune before its last layer, and say so
            K = L - 1
            if K < 1:
                raise ValueError(f"FastV needs at least 2 decoder layers, the model has {L}")
            warn_once(("fastv", "depth", self.layer, L), "FastV: K=%d but the model has %d decoder layers; pruning "
                      "before layer %d", self.layer, L, K)
        split = int(request.get("split", request.get("n_prompt")))
        n_keep, modality = request.get("n_keep"), request.get("modality")
        infeasible = False
        if self.ratio is None and n_keep is not None and modality is not None:
            n_media = int(self.media_mask(torch.as_tensor(modality)[:split]).sum())
            fit, infeasible = self.fit_layer(split, int(n_keep), n_media, L, K)
            if fit < K:
                warn_once(("fastv", "fit", self.layer, L), "FastV: the budget needs pruning before layer %d (K=%d "
                          "keeps more than the budget on this model); the record has fastv_layer", fit, K)
            if infeasible:
                warn_once(("fastv", "infeasible", L), "FastV: even pruning every media token from layer 1 keeps "
                          "more than the budget; the record says budget_infeasible and has the ratio achieved")
            K = fit
        self._req = {"state": request["state"], "split": split, "K": K, "n_keep": n_keep, "num_layers": L,
                     "keep": None, "done": set(), "infeasible": infeasible}
        for i in range(K, L):
            self._handles.append(layers[i].register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))

    def end(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -------------------------------------------------------------------------------------------- ranking
    def compress(self, view: LayerView) -> Selection:
        S = view.seq_len
        if self._req and self._req["n_keep"] is None:
            self._req["n_keep"] = view.n_keep
        if self._req and view.layer_idx == self._req["K"] - 1 and self._req["keep"] is None:
            self._rank(view)
        return Selection(indices=torch.arange(S, device=view.keys.device).expand(view.num_kv_heads, S))

    def _rank(self, view: LayerView) -> None:
        req = self._req
        S = view.seq_len
        media = self.media_mask(view.modality[:S].to(view.keys.device))
        n_media = int(media.sum())
        L, K = req["num_layers"], req["K"]
        if self.ratio is not None:
            R = float(self.ratio)
        elif n_media == 0 or req["n_keep"] is None:
            R = 0.0
        else:
            R = (S - req["n_keep"]) * L / ((L - K) * n_media)
        infeasible = self.ratio is None and (req["infeasible"] or R > 1.0 + 1e-9 or
                                             (n_media == 0 and req["n_keep"] is not None and req["n_keep"] < S))
        R = min(1.0, max(0.0, R))
        drop = int(round(n_media * R))
        row = attention_rows(view, S - 1, S)[:, 0].mean(0)                  # [S] head-averaged last row
        ranked = rank_positions(row.masked_fill(~media, float("inf"))[None])[0]   # non-media rank first
        keep = torch.ones(S, dtype=torch.bool, device=view.keys.device)
        if drop:
            keep[ranked[S - drop:]] = False                          # the lowest-attended media tokens
        req["keep"] = keep.nonzero()[:, 0]
        positions = req["state"].setdefault("layer_positions", {})
        for i in range(K, L):
            positions[i] = req["keep"]
        req["state"].setdefault("record", {}).update(
            hidden_state_pruning=True, fastv_layer=K, fastv_layer_requested=self.layer, fastv_ratio=R,
            fastv_pruned_tokens=drop, fastv_media_tokens=n_media, budget_infeasible=bool(infeasible))

    # -------------------------------------------------------------------------------------------- pruning
    def _pre_hook(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            req = self._req
            keep = req.get("keep")
            if keep is None or i in req["done"]:
                return None                          # not the compressed chunk (suffix, decode) or nothing ranked
            h = args[0] if args else kwargs["hidden_states"]
            S = req["split"]
            if i == req["K"] and h.shape[1] != S:
                return None
            req["done"].add(i)
            if i == req["K"]:
                h = h[:, keep]
            args, kwargs = _slice_inputs(args, kwargs, h, keep, S)
            return args, kwargs
        return hook


def _slice_inputs(args: tuple, kwargs: dict, h: torch.Tensor, keep: torch.Tensor, S: int
                  ) -> tuple[tuple, dict]:
    """The decoder-layer inputs of the chunk restricted to ``keep``: hidden states, rotary cos/sin, position
    ids (1-D or M-RoPE) and a 4-D mask, each only where it is sized for the full chunk."""
    kwargs = dict(kwargs)
    if args:
        args = (h,) + tuple(args[1:])
    else:
        kwargs["hidden_states"] = h
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        kwargs["position_embeddings"] = tuple(_take(t, keep, -2, S) for t in pe)
    pid = kwargs.get("position_ids")
    if pid is not None:
        kwargs["position_ids"] = _take(pid, keep, -1, S)
    mask: Any = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        kwargs["attention_mask"] = _take(_take(mask, keep, -1, S), keep, -2, S)
    return args, kwargs


def _take(t: torch.Tensor, keep: torch.Tensor, dim: int, S: int) -> torch.Tensor:
    return t.index_select(dim, keep.to(t.device)) if t.shape[dim] == S else t

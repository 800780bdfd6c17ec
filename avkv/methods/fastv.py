"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): drop media tokens from the hidden states after layer K."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from avkv.methods.base import MODALITIES, TEXT, LayerView, Method, Selection, attention_rows, rank_positions

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
        K, the first pruned layer (2 in the paper; the demo uses 3). On a model with ≤ K layers (the tiny test
        models) pruning happens before the last layer; the record keeps both ``fastv_layer`` and
        ``fastv_layer_requested``.
    ratio : float, optional
        R, the fraction of media tokens dropped (paper: 0.5). None: chosen so that the mean kept KV over layers
        matches the budget, R = (s − B)·L / ((L − K)·N_media), clamped to [0, 1] [ours,
        ``shared/design/methods.md`` §6]; when even R = 1 cannot reach the budget, the record shows the ratio
        achieved.
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
        self._warned_k: int | None = None           # warnings once per run, not once per sample
        self._warned_budget = False

    # ---------------------------------------------------------------------------------- request lifecycle
    def begin(self, request: dict) -> None:
        self.end()
        layers = request.get("layers")
        if layers is None:
            raise ValueError("FastV needs the decoder layers in the request (the engine passes 'layers')")
        K = self.layer
        if K >= len(layers):                 # a shallow (tiny) model: prune before its last layer, and say so
            K = len(layers) - 1
            if K < 1:
                raise ValueError(f"FastV needs at least 2 decoder layers, the model has {len(layers)}")
            if self._warned_k != K:
                log.warning("FastV: K=%d but the model has %d decoder layers; pruning before layer %d",
                            self.layer, len(layers), K)
                self._warned_k = K
        split = int(request.get("split", request.get("n_prompt")))
        self._req = {"state": request["state"], "split": split, "K": K,
                     "n_keep": request.get("n_keep"), "num_layers": len(layers), "keep": None, "done": set()}
        for i in range(K, len(layers)):
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
        codes = [i for i, m in enumerate(MODALITIES) if m in self.modalities and i != TEXT]
        mod = view.modality[:S].to(view.keys.device)
        media = torch.zeros(S, dtype=torch.bool, device=view.keys.device)
        for c in codes:
            media |= mod == c
        media[S - 1] = False                                      # the ranking token itself is kept
        n_media = int(media.sum())
        L, K = req["num_layers"], req["K"]
        if self.ratio is not None:
            R = float(self.ratio)
        elif n_media == 0 or req["n_keep"] is None:
            R = 0.0
        else:
            R = (S - req["n_keep"]) * L / ((L - K) * n_media)
        if R > 1.0 and not self._warned_budget:      # layers < K always keep everything
            log.warning("FastV: the budget needs more than every media token dropped from layer %d on (R=%.2f); "
                        "the cache keeps more than the budget (the record's kv_bytes_ratio has the true figure)",
                        K, R)
            self._warned_budget = True
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
        req["state"]["record"] = {"hidden_state_pruning": True, "fastv_layer": K, "fastv_layer_requested": self.layer,
                                  "fastv_ratio": R, "fastv_pruned_tokens": drop, "fastv_media_tokens": n_media}

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

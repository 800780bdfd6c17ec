"""KVzip (Kim et al., 2025, arXiv 2505.23416, "Query-Agnostic KV Cache Compression with Context
Reconstruction"): an entry matters as much as the model needs it to repeat the context."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.counts import mask_to_indices
from avkv.methods.base import LayerView, Method, Selection, rank_positions
from avkv.methods.request import ReconstructionPlan


@dataclass
class KVzip(Method):
    """Scores from a context reconstruction, then one selection over every layer and head.

    After the prefill the engine runs the reconstruction (``avkv/reconstruct.py``): per context chunk of
    ``chunk`` entries, the decoder reads "repeat the previous context" + the assistant preamble + the chunk again,
    over the cache. In every layer, each reconstruction query of every query head attends (softmax) over a
    subset of the cache: the first ``min(sink, a)`` entries, the chunk ``[a, b)`` being repeated, and the
    reconstruction tokens themselves (causal). An entry of the chunk scores the **maximum** of that attention
    over the reconstruction queries and over the query heads of its KV head's group (GQA: max, not mean). With
    ``plus_normalization`` (KVzip+), each weight is first divided by the norm of the query token's hidden state
    and multiplied by ``‖v W_o‖`` of the entry under that query head.

    Selection: the first ``sink`` entries always stay; the other entries of *all* layers and KV heads compete in
    one top-k for ``Σ_layers kvH · n_keep`` places (``layerwise``: one top-k per layer over its heads, the layer's
    ``kvH · n_keep``), so layers and heads keep different counts (stored per head, ragged) and the budget is
    held on average.

    Reference: kvpress 0.5.5 ``KVzipPress`` (``layerwise=False``, ``n_sink=4``, ``chunk_size=2048``), checked by
    the parity suite (``tests/parity``). Arbitrary there, reproduced here: the chat template's prefix (``prefix:
    template``: tokens before a user message's content, rendered with the template's default system prompt) is
    never reconstructed, so its entries after the sinks score 0 and go first; the repeat instructions are the
    two English sentences below; a later chunk's instruction ends with the previous chunk's last 8 entries
    (``tail``); the sinks join the softmax only from the second chunk on when there is no prefix (``min(sink,
    a)``). kvpress masks the dropped keys, avkv removes them. Differences [ours]: ties are broken by position
    (the later entry wins); with ``sink: 0`` every head keeps its best entry (a head is never empty); media
    positions are repeated as the decoder's input embeddings (kvpress is text-only).

    Parameters
    ----------
    sink : int
        Entries at the start that are always kept (kvpress ``n_sink``).
    chunk : int
        Context entries reconstructed per forward (``chunk_size``).
    layerwise : bool
        One selection per layer (uniform layer budgets) instead of the global one.
    plus_normalization : bool
        KVzip+ (``kvzip_plus_normalization``).
    prefix : str | int
        ``template`` (kvpress) or a fixed count of leading entries that are not reconstructed.
    tail : int
        Entries of the previous chunk repeated in a later chunk's instruction (kvpress ``prev_postfix_size``).
    repeat_prompt, repeat_part_prompt : str
        Instruction text of the first / the later chunks (plain text: control strings in it are escaped).
    """

    name = "kvzip"
    kvpress: ClassVar[str | None] = "KVzipPress"
    ragged_heads: ClassVar[bool] = True           # its heads keep different counts
    deferred: ClassVar[bool] = True
    needs_reconstruction: ClassVar[bool] = True
    sink: int = 4
    chunk: int = 2048
    layerwise: bool = False
    plus_normalization: bool = False
    prefix: str | int = "template"
    tail: int = 8
    repeat_prompt: str = "\n\nRepeat the previous context exactly."
    repeat_part_prompt: str = "\n\nRepeat the part of the previous context exactly, starting with"
    decode_policy: str = "grow"

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.sink < 0 or self.tail < 0:
            raise ValueError(f"kvzip: chunk must be ≥ 1 and sink, tail ≥ 0 (got {self.chunk}, {self.sink}, "
                             f"{self.tail})")
        if not (self.prefix == "template" or (isinstance(self.prefix, int) and self.prefix >= 0)):
            raise ValueError(f"kvzip: prefix must be 'template' or a count ≥ 0, got {self.prefix!r}")

    def reconstruction_plan(self) -> ReconstructionPlan:
        """The reconstruction the engine runs after the prefill (``avkv/reconstruct.py``)."""
        return ReconstructionPlan(chunk=int(self.chunk), tail=int(self.tail), repeat_prompt=self.repeat_prompt,
                                  repeat_part_prompt=self.repeat_part_prompt,
                                  prefix=None if self.prefix == "template" else int(self.prefix))

    # -------------------------------------------------------------------------------- scoring
    def observe(self, view: LayerView) -> None:
        layers = view.scratch(self).setdefault("layers", {})
        layers[view.layer_idx] = {"n_keep": view.n_keep, "scores": torch.zeros(
            view.num_kv_heads, view.seq_len, dtype=torch.float32, device=view.keys.device)}

    def score_reconstruction(self, rv) -> None:
        """Max attention of the reconstruction queries on the chunk ``[rv.start, rv.end)`` (``ReconstructionView``)."""
        layer = rv.scratch(self).get("layers", {}).get(rv.layer_idx)
        if layer is None:
            raise RuntimeError("KVzip.score_reconstruction before observe() on this layer")
        a, b, s = rv.start, rv.end, rv.split
        H, T, D = rv.queries.shape
        kvH = rv.keys.shape[0]
        g = H // kvH
        sink = min(self.sink, a)
        cols = torch.cat([torch.arange(sink), torch.arange(a, b), torch.arange(s, s + T)]).to(rv.keys.device)
        k = rv.keys[:, cols].float()                                                  # [kvH, C, D]
        q = rv.queries.float().reshape(kvH, g * T, D)
        logits = torch.bmm(q, k.transpose(1, 2)).mul_(rv.scaling).view(kvH, g, T, -1)
        C = logits.shape[-1]
        own = torch.ones(T, T, dtype=torch.bool, device=logits.device).triu(1)       # later reconstruction tokens
        hide = torch.zeros(T, C, dtype=torch.bool, device=logits.device)
        hide[:, C - T:] = own
        w = logits.masked_fill_(hide, float("-inf")).softmax(-1)                      # [kvH, g, T, C]
        if self.plus_normalization:
            w = w / rv.hidden.float().norm(dim=-1)[None, None, :, None]
            wo = rv.out_weight_fn().float().view(kvH, g, D, -1)                     # [kvH, g, D, hidden]
            vo = torch.einsum("hcd,hgdj->hgcj", rv.values[:, cols].float(), wo).norm(dim=-1)   # [kvH, g, C]
            w = w * vo[:, :, None, :]
        layer["scores"][:, a:b] = w[..., sink:sink + (b - a)].amax(dim=(1, 2)).to(layer["scores"].device)

    # -------------------------------------------------------------------------------- selection
    def keep_masks(self, scratch: dict, num_layers: int) -> dict[int, torch.Tensor]:
        """Keep mask ``[kvH, S]`` of every layer, from every layer's scores in this instance's per-request
        ``scratch`` (``view.scratch(self)``; computed once per request)."""
        if "keep" in scratch:
            return scratch["keep"]
        layers = scratch.get("layers", {})
        ids = sorted(layers)
        if len(ids) != num_layers:
            raise RuntimeError(f"KVzip saw {len(ids)} of {num_layers} layers before compressing")
        dev = layers[ids[0]]["scores"].device
        scores = torch.stack([layers[i]["scores"].to(dev) for i in ids])               # [L, kvH, S]
        L, kvH, S = scores.shape
        n_keep = [min(int(layers[i]["n_keep"]), S) for i in ids]
        protect = torch.zeros(L, kvH, S, dtype=torch.bool, device=dev)
        protect[..., : min(self.sink, min(n_keep))] = True
        if self.sink == 0:                                   # a head is never empty: its best entry stays
            protect.scatter_(2, scores.argmax(-1, keepdim=True), True)
        s = scores.double().masked_fill(protect, math.inf)
        keep = torch.zeros(L * kvH * S, dtype=torch.bool, device=dev)
        if self.layerwise:
            for li in range(L):
                won = rank_positions(s[li].reshape(1, -1))[0, : kvH * n_keep[li]] + li * kvH * S
                keep[won] = True
        else:
            keep[rank_positions(s.reshape(1, -1))[0, : kvH * sum(n_keep)]] = True
        keep = keep.view(L, kvH, S)
        scratch["keep"] = {i: keep[j] for j, i in enumerate(ids)}
        return scratch["keep"]

    def compress(self, view: LayerView) -> Selection:
        keep = self.keep_masks(view.scratch(self), view.num_layers)[view.layer_idx].to(view.keys.device)
        idx, valid = mask_to_indices(keep)
        return Selection(indices=idx, valid=valid, info={"layer_kept": int(keep.sum())})

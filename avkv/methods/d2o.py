"""D2O, Dynamic Discriminative Operations (Wan et al., ICLR 2025, arXiv 2406.13035)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.counts import apportion
from avkv.methods.base import LayerView, Selection, accumulated_scores, complement, merge_into_nearest, reduce_gqa
from avkv.methods.h2o import H2O


@dataclass
class D2O(H2O):
    """Layer-level budgets from attention density, H2O eviction inside each layer, and a compensation step
    that merges an evicted entry back into its most similar kept entry when their keys are similar enough.

    Follows the official code (``AIoT-MLSys-Lab/d2o``, ``modeling_llama3_7b_13b_d2o.py`` /
    ``modeling_llama3_new.py``):

    * density of layer l: per query head, the variance over keys of the accumulated attention (column sums of
      the prompt attention); min-max normalised across heads, averaged → v_l;
    * layer budgets ∝ softmax(−v) over layers (sparser attention → fewer entries), L·B in all, each within
      [1%, 100%] of the prompt (integers by the harness's apportioner, :func:`~avkv.methods.counts.apportion`);
    * per layer: the first ``sink`` entries, the heavy hitters and the recent window are kept (H2O);
    * each evicted entry is merged into its most cosine-similar kept entry when that similarity reaches a
      threshold τ, an EMA over calls of the mean best similarity (τ ← α·τ + (1 − α)·mean); contribution
      cos·x (LOOK-M's ``weighted`` mode, scatter-mean with the kept entry).

    Parameters
    ----------
    recent_share : float
        Share of each layer's budget for the recent window (the code splits hh/recent in the ratio of its two
        arguments; 0.5 for equal ratios).
    sink : int
        First positions always kept (4 in the code).
    ema : float
        α of the threshold EMA (0.5 in the code: ``alpha = belta = 0.5``).
    decode_policy : str
        ``fixed`` as in the code: after each decode step the new token's attention is accumulated, the lowest
        non-recent entry is evicted and merged back under the same threshold.

    Differences from the code, chosen for budget honesty and SDPA support [ours]: the code compresses at the
    first decode step and leaves layers 0, 1 and L−1 uncompressed (the kept ratio then exceeds the budget);
    here every layer is compressed at the end of prefill (the engine's deferred pass, once every layer's density
    is known) and the budgets average exactly B before clamping. The code gates merging per evicted slot on the
    mean over heads; here each head's evicted entry is gated on its own similarity. Scores come from the chunked
    all-query pass, not from eager attention weights.
    """

    name = "d2o"
    deferred: ClassVar[bool] = True
    sink: int = 4
    ema: float = 0.5
    decode_policy: str = "fixed"

    def observe(self, view: LayerView) -> None:
        acc = accumulated_scores(view, self.chunk)                              # [H, S]
        var = acc.var(dim=-1)
        v = (var - var.min()) / (var.max() - var.min() + 1e-6)
        view.scratch(self).setdefault("layers", {})[view.layer_idx] = {
            "scores": self._sinks(reduce_gqa(acc, view.num_kv_heads, self.gqa)), "density": float(v.mean()),
            "seq_len": view.seq_len, "n_keep": view.n_keep}

    def compress(self, view: LayerView) -> Selection:
        layers = view.scratch(self).get("layers", {})
        if view.layer_idx not in layers:
            raise RuntimeError("D2O.compress needs observe() on this layer first (the engine's deferred pass)")
        n = self.layer_budgets(view)[view.layer_idx]
        sel = self.keep(view, layers[view.layer_idx]["scores"], n)
        sel.info.update(layer_budget=n, density=layers[view.layer_idx]["density"])
        return sel

    def layer_budgets(self, view: LayerView) -> dict[int, int]:
        """Kept entries per layer from every observed layer's density (computed once per request)."""
        key = "budgets"
        if key not in view.scratch(self):
            layers = view.scratch(self)["layers"]
            ids = sorted(layers)
            if len(ids) != view.num_layers:
                raise RuntimeError(f"D2O saw {len(ids)} of {view.num_layers} layers before compressing")
            dens = torch.tensor([layers[i]["density"] for i in ids], dtype=torch.float64)
            S = torch.tensor([layers[i]["seq_len"] for i in ids], dtype=torch.float64)
            B = torch.tensor([layers[i]["n_keep"] for i in ids], dtype=torch.float64)
            want = torch.softmax(-dens, 0) * len(ids) * B                       # mean over layers = B
            counts = apportion(want, int(B.sum()), (0.01 * S).clamp(min=1), S)    # within [1 % of n, n]
            view.scratch(self)[key] = dict(zip(ids, counts.tolist()))
        return view.scratch(self)[key]

    def select(self, view: LayerView, idx: torch.Tensor) -> Selection:
        evicted = complement(idx, view.seq_len)
        key = ("tau", view.layer_idx)

        def threshold(best: torch.Tensor) -> float:
            mean = float(torch.nanmean(best)) if best.numel() else 0.0
            tau = view.scratch(self).get(key)
            tau = mean if tau is None else self.ema * tau + (1 - self.ema) * mean
            view.scratch(self)[key] = tau
            return tau

        k, v = merge_into_nearest(view.keys, view.values, idx, evicted, mode="weighted", min_similarity=threshold)
        return Selection(indices=idx, keys=k, values=v, info={"threshold": view.scratch(self).get(key)})

"""FlowMM (arXiv 2511.05534): cross-modal information-flow-guided KV merging.

Specification: ``shared/design/methods.md`` §3 (full text read; high confidence except the merge function and τ).

From the paper [paper]:
  * per-layer cross-modal ratio ρ^l = (1/H) Σ_h (A_{v→t} + A_{t→v}) / A^{l,h} (Eq. 6-7), with A^{l,h} the head's
    total attention mass (= the number of query rows);
  * merge mode: cross-modal when ρ^l > θ, intra-modal otherwise; θ best in [0.2, 0.3];
  * importance I(i) = Σ_{j∈P} α_{j→i} from proxy tokens P near the end of the prompt (Eq. 8);
  * pivots = the top-B tokens by I per head; every other token merges into its most key-similar pivot
    (cosine, Eq. 9-10), restricted to the same modality in intra-modal layers; pivots with I > τ are "sensitive"
    and receive no merges.

Our reading [ours] (each a field):
  * ``theta=0.25`` (middle of the paper's best range);
  * ``proxy=32`` last prompt positions, clipped to the trailing text run (``clip_proxy_to_text``), always kept;
    pivots B = n_keep − |P|; P tokens are neither pivots nor merge targets;
  * τ per head = the 90th percentile of I over its pivots (``tau_mode='quantile'``, ``tau_quantile=0.9``);
    ``tau_mode='absolute'`` uses ``tau_abs``;
  * merge function: LOOK-M ``pivot`` averaging (each merged token contributes (x_i + x_pivot)/2, the pivot
    becomes the scatter-mean with itself); ``weighted`` is available;
  * a non-pivot without an admissible pivot is evicted;
  * ρ online, in query chunks over all prompt rows (``rho_source='online'``); ``rho_source='offline'`` reads the
    per-layer ρ from ``calibration_file`` written by ``scripts/calibrate_flowmm.py``;
  * the visual side V of ρ is every non-text modality in ``media`` (image, video and, for audio-video models,
    audio); intra-modal merging keeps each modality id apart (audio never merges into video there);
  * GQA: query-head importances are averaged within each KV group; ρ averages over query heads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from avkv.methods.allquery import row_matrix
from avkv.methods.base import check_choice
from avkv.methods.base import (MODALITIES, TEXT, LayerView, Method, Selection, attention_sums, keep_topk,
                               merge_into_nearest, reduce_gqa, window_scores)


@dataclass
class FlowMM(Method):
    """Pivot selection by proxy importance + sensitivity-gated, flow-guided (intra/cross-modal) merging.

    Reference: spec only (``shared/design/methods.md`` §3). The importance I is the unpooled proxy attention
    (:func:`~avkv.methods.base.window_scores`, Eq. 8), so SnapKV's pooling convention does not arise.

    Parameters
    ----------
    theta : float
        Cross-modal merging when ρ^l > θ (0.25) [ours, paper's best range 0.2-0.3].
    proxy : int
        Proxy tokens |P| (32) [ours].
    clip_proxy_to_text : bool
        Shrink P to the trailing run of text tokens (the question) [ours].
    tau_mode : str
        ``quantile`` (per head, of I over the pivots) [ours] or ``absolute``.
    tau_quantile : float
        0.9: the top 10% pivots are sensitive [ours].
    tau_abs : float | None
        Threshold on I for ``tau_mode='absolute'``.
    merge_mode : str
        ``pivot`` (LOOK-M) [ours] or ``weighted``/``avg``.
    rho_source : str
        ``online`` (chunked all-query pass) [ours] or ``offline`` (``calibration_file``).
    calibration_file : str | None
        JSON with ``{"rho": [ρ per layer], ...}`` from ``scripts/calibrate_flowmm.py``.
    media : tuple[str, ...]
        Modalities on the "visual" side of ρ [ours].
    chunk : int
        Query rows per chunk of the online ρ pass.
    gqa : str
        Reduction of importances within a KV group (``mean``).
    """

    name = "flowmm"
    theta: float = 0.25
    proxy: int = 32
    clip_proxy_to_text: bool = True
    tau_mode: str = "quantile"
    tau_quantile: float = 0.9
    tau_abs: float | None = None
    merge_mode: str = "pivot"
    rho_source: str = "online"
    calibration_file: str | None = None
    media: tuple[str, ...] = ("image", "video", "audio")
    chunk: int = 128
    gqa: str = "mean"

    _rho_table: list | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def all_query_stats(self) -> bool:
        return self.rho_source == "online"

    def __post_init__(self) -> None:
        check_choice("rho_source", self.rho_source, ("online", "offline"))
        check_choice("tau_mode", self.tau_mode, ("quantile", "absolute"))
        if self.tau_mode == "absolute" and self.tau_abs is None:
            raise ValueError("tau_mode='absolute' needs tau_abs")
        self.media = tuple(self.media)
        if self.rho_source == "offline":
            if not self.calibration_file:
                raise ValueError("rho_source='offline' needs calibration_file (make one with "
                                 "scripts/calibrate_flowmm.py)")
            p = Path(self.calibration_file).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"FlowMM calibration file not found: {p} (make it with "
                                        "scripts/calibrate_flowmm.py)")
            self._rho_table = [float(x) for x in json.loads(p.read_text())["rho"]]

    # ------------------------------------------------------------------ pieces
    def media_mask(self, modality: torch.Tensor) -> torch.Tensor:
        ids = [MODALITIES.index(m) for m in self.media]
        return torch.isin(modality, torch.tensor(ids, device=modality.device))

    def _rho_blocks(self, mod: torch.Tensor) -> dict | None:
        """The media→text / text→media blocks of ρ, or None when the prompt lacks media or text (ρ = 0)."""
        vis, txt = self.media_mask(mod), mod == TEXT
        if not bool(vis.any()) or not bool(txt.any()):
            return None
        return {"vt": (vis, txt), "tv": (txt, vis)}

    def all_query_rows(self, modality: torch.Tensor) -> torch.Tensor | None:
        """The row weights of ρ's sums (the fused prefill accumulates them)."""
        blocks = self._rho_blocks(modality) if self.rho_source == "online" else None
        return None if blocks is None else row_matrix(modality.numel(), modality.device, None, blocks)

    def cross_modal_ratio(self, view: LayerView) -> float:
        """ρ^l (Eq. 6-7): share of the attention mass that flows media→text or text→media, head-averaged."""
        if self.rho_source == "offline":
            if view.layer_idx >= len(self._rho_table):
                raise ValueError(f"calibration file {self.calibration_file} has {len(self._rho_table)} layers, "
                                 f"layer {view.layer_idx} requested")
            return self._rho_table[view.layer_idx]
        blocks = self._rho_blocks(view.modality.to(view.keys.device))
        if blocks is None:
            return 0.0
        _, b = attention_sums(view, self.chunk, blocks=blocks)
        return float(((b["vt"] + b["tv"]) / view.seq_len).mean())

    def proxy_len(self, modality: torch.Tensor) -> int:
        S = modality.numel()
        p = min(self.proxy, S)
        if self.clip_proxy_to_text:
            nontext = (modality != TEXT).nonzero()
            trailing = S - (int(nontext.max()) + 1) if nontext.numel() else S
            p = max(1, min(p, trailing))
        return p

    # ------------------------------------------------------------------ compress
    def compress(self, view: LayerView) -> Selection:
        S, dev, kvH = view.seq_len, view.keys.device, view.num_kv_heads
        mod = view.modality.to(dev)
        P = min(self.proxy_len(mod), max(1, view.n_keep - 1))                        # P counts toward the budget
        imp = reduce_gqa(window_scores(view, P, reduce="sum"), kvH, self.gqa)        # [kvH, S] I(i)
        k = max(P + 1, min(view.n_keep, S)) if S > P else S
        rho = self.cross_modal_ratio(view)
        cross = rho > self.theta
        sel_idx = keep_topk(imp, k, protect_last=P)                                    # pivots ∪ P, sorted
        keys_out, vals_out = [], []
        n_sensitive = n_merged = n_evicted = 0
        in_p = torch.zeros(S, dtype=torch.bool, device=dev)
        in_p[S - P:] = True
        for h in range(kvH):
            keep = sel_idx[h]
            kept_mask = torch.zeros(S, dtype=torch.bool, device=dev)
            kept_mask[keep] = True
            evicted = (~kept_mask).nonzero().flatten()
            is_pivot = ~in_p[keep]
            piv_imp = imp[h, keep].float()
            if self.tau_mode == "quantile":
                tau = torch.quantile(piv_imp[is_pivot], self.tau_quantile) if bool(is_pivot.any()) else \
                    torch.tensor(float("inf"))
            else:
                tau = torch.tensor(float(self.tau_abs))
            sensitive = is_pivot & (piv_imp > tau)
            target_ok = is_pivot & ~sensitive                                          # [k]
            allowed = target_ok[None, :].expand(evicted.numel(), -1)
            if not cross:
                allowed = allowed & (mod[evicted][:, None] == mod[keep][None, :])
            Kh, Vh = merge_into_nearest(view.keys[h], view.values[h], keep, evicted, self.merge_mode, allowed)
            keys_out.append(Kh)
            vals_out.append(Vh)
            n_sensitive += int(sensitive.sum())
            # = allowed.any(1) without another pass over the [e, k] mask
            has_target = torch.isin(mod[evicted], mod[keep][target_ok]) if not cross else \
                target_ok.any().expand(evicted.numel())
            n_merged += int(has_target.sum())
            n_evicted += int((~has_target).sum())
        return Selection(indices=sel_idx, keys=torch.stack(keys_out), values=torch.stack(vals_out),
                         info={"rho": round(rho, 6), "mode": "cross" if cross else "intra", "proxy": P,
                               "sensitive": n_sensitive, "merged": n_merged, "evicted_unmerged": n_evicted})

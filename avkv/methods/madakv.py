"""MadaKV (ACL 2025, arXiv 2506.15724): modality-preference-adaptive eviction + hierarchical compensation.

Specification: ``shared/design/methods.md`` §4 (equations and tables from a detailed paper-notes page [2nd]).

From the paper [2nd]:
  * importance ψ(i) = Σ_{j∈P} α_{j→i} from proxy tokens P (the last prompt tokens);
  * modality preference (MPA): per head, w_m = Σ_{i∈X_m} ψ(i); the head's budget φ^l is split across modalities in
    proportion to w_m; eviction is done per modality inside each head (top-ψ within the modality);
  * demand (HCC): k_m = the fewest top-ψ tokens of modality m that cover θ·w_m;
  * compensation: K^l = Σ_h (k^{l,h} − φ^l); later layers pay for (or inherit) it: φ^{l+1} = φ^l − K^l/(L−l).

Our reading [ours] (each a field):
  * ``allocation='conserve'`` (default): scoring is deferred (:meth:`observe` keeps every layer's ψ and demands while
    its queries exist); once every layer is scored, the global budget L·H·B is split across layers in proportion to
    their demand beyond |P| (D^l − H·|P|), each layer within [H·|P|, H·n], by the project's integer apportioner
    (:func:`~avkv.methods.counts.apportion`); each layer's share is then split across its heads the same way
    (within [|P|, n]) — φ^l = (layer share)/H is the per-head layer budget and Σ_l Σ_h N^{l,h} = L·H·B exactly, so no
    layer falls to |P| unless its demand does. ``shared/design/methods.md`` §4 (turn-2 finding) explains why;
  * ``allocation='sequential'`` (ablation, the notes' literal recurrence): each layer in order keeps its demand per
    head N = clamp(|P| + Σ_m k_m, w_min, n), capped so every later layer can still keep w_min per head, and
    φ^{l+1} = φ^l − K^l/(H·(L−1−l)) (``hcc_norm_heads=True``; ``False``: the notes' form without 1/H); the last layer
    takes what is left. It is greedy (early layers can spend the budget and leave later layers |P|) and, with peaky
    attention, can end below the budget: its records then say ``budget_held: false``;
  * inside a head, the count beyond P is split between modalities by the MPA ratio (largest remainder, capped by each
    modality's count; leftover slots go to the best remaining tokens);
  * H counts KV heads (the cache's heads); query-head ψ is averaged within each KV group;
  * modalities: the notes have visual vs text; with several media modalities (audio + video) every present
    modality gets its own preference, demand and quota (the two-modality case is the paper's);
  * ``proxy=32`` (clipped to the per-head budget B, since P is always kept and counts toward it), ``theta=0.9`` (the
    paper observes ~20% of tokens carry ~90% of attention), w_min = |P|;
  * B = the per-head budget ``n_keep`` the engine gives each layer;
  * ablations: ``mode='mpa'`` (φ^l ≡ B, split by preference), ``mode='hcc'`` (modality-agnostic θ-coverage demand
    with compensation), ``mode='full'`` (both, default).

Per-head counts differ, so the selection is ragged (the engine stores it per head without padding). The record
carries each layer's total, demand, its per-head counts and φ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avkv.methods.base import check_choice
from avkv.methods.base import MODALITIES, LayerView, Method, Selection, reduce_gqa, window_scores
from avkv.methods.counts import apportion, group_topk, mask_to_indices


@dataclass
class MadaKV(Method):
    """Per-head modality budgets from proxy attention, with cross-layer compensation conserving the total budget.

    Reference: spec only (no public code; ``shared/design/methods.md`` §4). ψ is the unpooled window attention
    (:func:`~avkv.methods.base.window_scores`), so SnapKV's pooling convention does not arise; the proxy
    positions are never candidates.

    Parameters
    ----------
    proxy : int
        Proxy tokens |P| (last prompt positions, always kept) (32) [ours].
    theta : float
        Attention-coverage threshold of the demand (0.9) [ours].
    mode : str
        ``full`` (MPA + HCC), ``mpa`` (MPA only) or ``hcc`` (HCC only) — the paper's ablation rows.
    allocation : str
        ``conserve`` (deferred: L·H·B split across layers by demand) [ours] or ``sequential`` (the notes' greedy
        recurrence, an ablation).
    hcc_norm_heads : bool
        ``sequential`` only: divide the compensation by H [ours] (``False``: the notes' form).
    w_min : int | None
        Minimum kept per head (None = |P|) [ours].
    gqa : str
        Reduction of ψ within a KV group (``mean``).
    """

    name = "madakv"
    ragged_heads: ClassVar[bool] = True           # its heads keep different counts
    deferred: ClassVar[bool] = True
    proxy: int = 32
    theta: float = 0.9
    mode: str = "full"
    allocation: str = "conserve"
    hcc_norm_heads: bool = True
    w_min: int | None = None
    gqa: str = "mean"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("full", "mpa", "hcc"))
        check_choice("allocation", self.allocation, ("conserve", "sequential"))

    @property
    def needs_every_layer(self) -> bool:  # type: ignore[override]
        """``conserve`` splits the budget over every decoder layer's cache."""
        return self.allocation == "conserve"

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def coverage_count(psi: torch.Tensor, theta: float) -> int:
        """Fewest top-ψ entries whose sum reaches θ·Σψ (0 for an empty or all-zero set)."""
        if psi.numel() == 0:
            return 0
        tot = float(psi.sum())
        if tot <= 0:
            return 0
        if theta <= 0:
            return 0
        c = psi.sort(descending=True).values.double().cumsum(0)
        n = int(torch.searchsorted(c, torch.tensor([theta * float(c[-1])], dtype=c.dtype)).item()) + 1
        return min(n, psi.numel())

    def demand(self, psi: torch.Tensor, mod: torch.Tensor, cand: torch.Tensor) -> int:
        """Tokens (outside P) a head needs: Σ_m k_m (full) or the modality-agnostic coverage (hcc)."""
        if self.mode == "hcc":
            return min(self.coverage_count(psi[cand], self.theta), int(cand.sum()))
        return sum(self.coverage_count(psi[cand & (mod == m)], self.theta) for m in range(len(MODALITIES)))

    # ------------------------------------------------------------------ scoring (deferred)
    def observe(self, view: LayerView) -> None:
        """ψ and the per-head demand of this layer, while its proxy queries exist."""
        S, H, dev = view.seq_len, view.num_kv_heads, view.keys.device
        B = max(1, min(view.n_keep, S))
        P = max(1, min(self.proxy, S, B))                                # the proxy counts toward the budget
        w_min = max(P, min(S, self.w_min if self.w_min is not None else P))
        psi = reduce_gqa(window_scores(view, P, reduce="sum"), H, self.gqa).float()     # [kvH, S]
        mod = view.modality.to(dev)
        cand = torch.ones(S, dtype=torch.bool, device=dev)
        cand[S - P:] = False
        demand = torch.tensor([P + self.demand(psi[h], mod, cand) for h in range(H)], dtype=torch.long)
        view.scratch(self).setdefault("layers", {})[view.layer_idx] = {
            "psi": psi, "P": P, "w_min": w_min, "B": B, "S": S, "demand": demand.clamp(w_min, S)}

    def _scored(self, view: LayerView) -> dict:
        layers = view.scratch(self).get("layers", {})
        if view.layer_idx not in layers:
            if self.allocation == "conserve":
                raise RuntimeError("MadaKV(allocation=conserve) compresses once every layer was observed (the "
                                   f"engine's deferred pass); layer {view.layer_idx} was not")
            self.observe(view)                                # sequential: each layer on its own, in order
            layers = view.scratch(self)["layers"]
        return layers[view.layer_idx]

    def conserving_counts(self, layers: dict, H: int) -> dict[int, torch.Tensor]:
        """Per-layer, per-head kept counts: L·H·B split by demand beyond |P| across layers, then across heads
        (both within [w_min, n] per head), integers by :func:`~avkv.methods.counts.apportion`; the sum is exactly
        Σ_l H·B_l."""
        ids = sorted(layers)
        if self.mode == "mpa":
            return {i: torch.full((H,), max(layers[i]["B"], layers[i]["w_min"]), dtype=torch.long) for i in ids}
        total = sum(H * layers[i]["B"] for i in ids)
        floor = sum(H * layers[i]["w_min"] for i in ids)
        extra = torch.tensor([float((layers[i]["demand"] - layers[i]["w_min"]).sum()) for i in ids])
        room = torch.tensor([float(H * (layers[i]["S"] - layers[i]["w_min"])) for i in ids])
        shares = apportion(extra, max(0, total - floor), 0, room)
        out = {}
        for i, share in zip(ids, shares.tolist()):
            d = layers[i]
            head_extra = apportion((d["demand"] - d["w_min"]).float(), int(share), 0, d["S"] - d["w_min"])
            out[i] = head_extra + d["w_min"]
        return out

    def sequential_counts(self, view: LayerView, d: dict) -> tuple[torch.Tensor, float]:
        """The notes' literal recurrence for this layer (layers visited in order): counts and φ^l."""
        H, L, l, S = view.num_kv_heads, view.num_layers, view.layer_idx, d["S"]
        st = view.scratch(self)
        if "phi" not in st:
            st.update(phi=float(d["B"]), total=L * H * d["B"], spent=0)
        phi, w_min, demand = st["phi"], d["w_min"], d["demand"]
        if self.mode == "mpa":
            counts = torch.full((H,), int(round(min(max(d["B"], w_min), S))), dtype=torch.long)
        else:
            layers_left = L - 1 - l                                        # layers after this one
            remaining = st["total"] - st["spent"]
            if layers_left == 0 and self.hcc_norm_heads:
                # the last layer takes what is left, split over heads by demand
                tot = max(H * w_min, min(H * S, remaining))
                counts = apportion(demand.float(), tot, w_min, S)
            else:
                counts = demand
                if self.hcc_norm_heads:                                    # leave w_min per head for later layers
                    cap = remaining - layers_left * H * w_min
                    if int(counts.sum()) > cap:
                        counts = apportion(demand.float(), max(cap, H * w_min), w_min, S)
            K = float(counts.sum()) - H * phi
            if layers_left > 0:
                div = (H if self.hcc_norm_heads else 1) * layers_left
                st["phi"] = max(float(w_min), phi - K / div)
        st["spent"] += int(counts.sum())
        return counts, phi

    # ------------------------------------------------------------------ compress
    def compress(self, view: LayerView) -> Selection:
        S, dev, H = view.seq_len, view.keys.device, view.num_kv_heads
        mod = view.modality.to(dev)
        d = self._scored(view)
        st = view.scratch(self)
        P, psi = d["P"], d["psi"]
        if self.allocation == "conserve":
            if "counts" not in st:
                if len(st["layers"]) != view.num_layers:
                    raise RuntimeError(f"MadaKV saw {len(st['layers'])} of {view.num_layers} layers before "
                                       "compressing (allocation=conserve splits the budget over all of them)")
                st["counts"] = self.conserving_counts(st["layers"], H)
                st["total"] = sum(int(c.sum()) for c in st["counts"].values())
                st["spent"] = 0
                st["record"] = dict(madakv_allocation="conserve", madakv_layer_totals=[
                    int(st["counts"][i].sum()) for i in sorted(st["counts"])])
            counts = st["counts"][view.layer_idx]
            phi = float(counts.sum()) / H
            st["spent"] += int(counts.sum())
        else:
            counts, phi = self.sequential_counts(view, d)
            st["record"] = {"madakv_allocation": "sequential"}

        # beyond the proxy window (always kept): per head, quotas ∝ modality preference (MPA) or plain top-ψ
        groups = mod.long().clone()
        groups[S - P:] = -1
        keep = group_topk(psi, groups, counts - P, by_group=self.mode in ("full", "mpa"))
        keep[:, S - P:] = True
        idx, valid = mask_to_indices(keep)
        return Selection(indices=idx, valid=valid,
                         info={"layer_total": int(counts.sum()), "per_head": counts.tolist(), "phi": round(phi, 4),
                               "demand": int(d["demand"].sum()), "budget_spent": st["spent"],
                               "budget_total": st["total"]}, record=dict(st["record"]))

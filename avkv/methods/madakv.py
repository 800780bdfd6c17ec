"""MadaKV (ACL 2025, arXiv 2506.15724): modality-preference-adaptive eviction + hierarchical compensation.

Specification: ``shared/design/methods.md`` §4 (equations and tables from a detailed paper-notes page [2nd]).

From the paper [2nd]:
  * importance ψ(i) = Σ_{j∈P} α_{j→i} from proxy tokens P (the last prompt tokens);
  * modality preference (MPA): per head, w_m = Σ_{i∈X_m} ψ(i); the head's budget φ^l is split across modalities in
    proportion to w_m; eviction is done per modality inside each head (top-ψ within the modality);
  * demand (HCC): k_m = the fewest top-ψ tokens of modality m that cover θ·w_m;
  * compensation: K^l = Σ_h (k^{l,h} − φ^l); later layers pay for (or inherit) it: φ^{l+1} = φ^l − K^l/(L−l).

Our reading [ours] (each a field):
  * each layer keeps its demand: per head N = clamp(|P| + Σ_m k_m, w_min, n), split between modalities by the MPA
    ratio (largest remainder, capped by each modality's count; leftover slots go to the best remaining tokens);
    the demand is also capped so every later layer can still keep w_min per head;
  * ``hcc_norm_heads=True``: φ^{l+1} = φ^l − K^l/(H·(L−1−l)) (0-based l), which makes Σ_l Σ_h N^{l,h} = L·H·B
    exactly; the notes' formula has no 1/H, which looks like a unit slip (``False`` reproduces it);
  * the last layer takes whatever budget remains (split over its heads by demand);
  * H counts KV heads (the cache's heads); query-head ψ is averaged within each KV group;
  * modalities: the notes have visual vs text; with several media modalities (audio + video) every present
    modality gets its own preference, demand and quota (the two-modality case is the paper's);
  * ``proxy=32`` (clipped to the per-head budget B, since P is always kept and counts toward it), ``theta=0.9`` (the paper observes ~20% of tokens carry ~90% of attention), w_min = |P|;
  * B = the per-head budget ``n_keep`` the engine gives the first compressed layer;
  * ablations: ``mode='mpa'`` (φ^l ≡ B, split by preference), ``mode='hcc'`` (modality-agnostic θ-coverage demand
    with compensation), ``mode='full'`` (both, default).

Per-head counts differ, so the selection is ragged (padded indices + ``valid``). The record carries each layer's
total, its per-head counts and φ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avkv.methods.base import check_choice
from avkv.methods.base import (MODALITIES, LayerView, Method, Selection, allocate_integer, pad_ragged, reduce_gqa,
                               window_scores)


@dataclass
class MadaKV(Method):
    """Per-head modality budgets from proxy attention, with cross-layer compensation conserving the total budget.

    Parameters
    ----------
    proxy : int
        Proxy tokens |P| (last prompt positions, always kept) (32) [ours].
    theta : float
        Attention-coverage threshold of the demand (0.9) [ours].
    mode : str
        ``full`` (MPA + HCC), ``mpa`` (MPA only) or ``hcc`` (HCC only) — the paper's ablation rows.
    hcc_norm_heads : bool
        Divide the compensation by H so the total budget is conserved exactly [ours] (``False``: the notes' form).
    w_min : int | None
        Minimum kept per head (None = |P|) [ours].
    gqa : str
        Reduction of ψ within a KV group (``mean``).
    """

    name = "madakv"
    proxy: int = 32
    theta: float = 0.9
    mode: str = "full"
    hcc_norm_heads: bool = True
    w_min: int | None = None
    gqa: str = "mean"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("full", "mpa", "hcc"))

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

    def select_head(self, psi: torch.Tensor, mod: torch.Tensor, cand: torch.Tensor, n_extra: int,
                    by_modality: bool) -> torch.Tensor:
        """Choose ``n_extra`` candidates: per-modality quotas ∝ preference (MPA) or plain top-ψ; returns positions."""
        cidx = cand.nonzero().flatten()
        n_extra = max(0, min(n_extra, cidx.numel()))
        if n_extra == 0:
            return cidx[:0]
        if not by_modality:
            return cidx[psi[cidx].topk(n_extra).indices]
        present = [m for m in range(len(MODALITIES)) if bool((cand & (mod == m)).any())]
        pref = torch.stack([psi[cand & (mod == m)].sum() for m in present]).float()
        avail = torch.tensor([int((cand & (mod == m)).sum()) for m in present])
        quota = allocate_integer(pref, n_extra, 0, avail)
        chosen = []
        for m, qm in zip(present, quota.tolist()):
            if qm > 0:
                pos = (cand & (mod == m)).nonzero().flatten()
                chosen.append(pos[psi[pos].topk(qm).indices])
        out = torch.cat(chosen) if chosen else cidx[:0]
        short = n_extra - out.numel()
        if short > 0:                                                  # quotas capped: best remaining tokens
            rest = cand.clone()
            rest[out] = False
            r = rest.nonzero().flatten()
            out = torch.cat([out, r[psi[r].topk(min(short, r.numel())).indices]])
        return out

    # ------------------------------------------------------------------ compress
    def compress(self, view: LayerView) -> Selection:
        S, dev, H, L, l = view.seq_len, view.keys.device, view.num_kv_heads, view.num_layers, view.layer_idx
        mod = view.modality.to(dev)
        st = view.state.setdefault("madakv", {})
        B0 = st.get("B", max(1, min(view.n_keep, S)))
        P = max(1, min(self.proxy, S, B0))                               # the proxy counts toward the budget
        w_min = max(P, min(S, self.w_min if self.w_min is not None else P))
        psi = reduce_gqa(window_scores(view, P, reduce="sum"), H, self.gqa).float()     # [kvH, S]
        cand = torch.ones(S, dtype=torch.bool, device=dev)
        cand[S - P:] = False

        if "B" not in st:
            B = max(1, min(view.n_keep, S))
            st.update(B=B, phi=float(B), total=L * H * B, spent=0, first=l)
        B, phi = st["B"], st["phi"]

        if self.mode == "mpa":
            counts = torch.full((H,), int(round(min(max(B, w_min), S))), dtype=torch.long)
        else:
            demand = torch.tensor([P + self.demand(psi[h], mod, cand) for h in range(H)], dtype=torch.long)
            demand = demand.clamp(w_min, S)
            layers_left = L - 1 - l                                        # layers after this one
            remaining = st["total"] - st["spent"]
            if layers_left == 0 and self.hcc_norm_heads:
                # the last layer takes what is left, split over heads by demand
                tot = max(H * w_min, min(H * S, remaining))
                counts = allocate_integer(demand.float(), tot, w_min, S)
            else:
                counts = demand
                if self.hcc_norm_heads:                                    # leave w_min per head for later layers
                    cap = remaining - layers_left * H * w_min
                    if int(counts.sum()) > cap:
                        counts = allocate_integer(demand.float(), max(cap, H * w_min), w_min, S)
            K = float(counts.sum()) - H * phi
            if layers_left > 0:
                div = (H if self.hcc_norm_heads else 1) * layers_left
                st["phi"] = max(float(w_min), phi - K / div)
        st["spent"] += int(counts.sum())

        by_mod = self.mode in ("full", "mpa")
        per_head = []
        window = torch.arange(S - P, S, device=dev)
        for h in range(H):
            extra = self.select_head(psi[h], mod, cand, int(counts[h]) - P, by_mod)
            per_head.append(torch.cat([extra, window]))
        idx, valid = pad_ragged(per_head)
        return Selection(indices=idx, valid=valid,
                         info={"layer_total": int(counts.sum()), "per_head": counts.tolist(), "phi": round(phi, 4),
                               "budget_spent": st["spent"], "budget_total": st["total"]})

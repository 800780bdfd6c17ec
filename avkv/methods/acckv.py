"""AccKV (arXiv 2511.11106, AAAI 2026): adaptive focusing + cross-calibration for audio-video LLMs.

Specification: ``shared/design/methods.md`` §1. No public code exists (``hua-zi/AccKV`` is announced, not
released) and the full text was not seen; the algorithm comes from a detailed secondary summary.

From the paper (via the summary) [2nd]:
  * attention redistribution Ã[i, j] = A[i, j]·(i+1)/(n−j) over *all* prompt query rows, score S_j = Σ_i Ã[i, j];
  * adaptive focusing: W_v, W_a from the mean text→video and text→audio attention, video scores × W_v, audio
    scores × W_a; the layer's high-priority modality is argmax(W_v, W_a);
  * intra-modal average merging, never across modalities (the paper's Table 2: direct audio+video merging drops
    accuracy from 0.70 to 0.17);
  * cross-calibration: a kept low-priority token survives only if its mean key cosine with the kept
    high-priority tokens is ≥ τ (0.9 and 0.6 were tried).

Our reading [ours] (each is a field, so a run's config records it):
  * ``redistributed_focus``: the focusing means use Ã (not raw A);
  * ``per_head=False``: scores are averaged over all heads of the layer and one index set is kept per layer;
  * budget split: keep all text tokens and the last ``window``=32 positions, rank audio ∪ video jointly by the
    weighted score and keep the top rest; if text alone exceeds the budget, rank all tokens instead;
  * merging: each evicted audio/video token is averaged into its most key-similar kept token of the *same*
    modality (LOOK-M-style nearest neighbour, scatter-mean including the target: ``merge_mode='avg'``);
  * calibration runs after merging, on the merged keys, per KV head then averaged over heads; when no high-priority
    token was kept there is nothing to align with and the low-priority tokens stay;
  * ``refill=True`` (default): the slots calibration frees go to the next-best entries of the same layer by the
    weighted score (never back to an evicted one, unless nothing else is left), and the merge is redone on the final
    kept set, so "budget 0.5" holds 0.5 and AccKV is compared with the others at equal memory; ``refill=False`` is
    the summary's literal "not refilled" (the achieved ratio falls below the budget; the method then declares
    ``budget_mode: achieved``). Both record ``calibration_evicted``;
  * ``tau=0.6`` (the lower of the two values tried);
  * image tokens (absent in audio-video models) are ranked with video and merged only among images;
  * all-query statistics are computed in query chunks (``chunk``), never as an n×n matrix, so SDPA works.

Reference: spec only (no public code). Its scores are redistributed all-query attention, never pooled, so
SnapKV's pooling convention does not arise.

The record (``Selection.info``) carries the layer's high-priority modality, W_v / W_a, the kept
audio/video/text counts and the entries cross-calibration evicted (all counts summed over KV heads).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from avkv.methods.allquery import row_matrix
from avkv.methods.base import (AUDIO, IMAGE, TEXT, VIDEO, LayerView, Method, Selection, attention_sums, complement,
                               keep_topk, merge_into_nearest, modality_counts, rank_positions, reduce_gqa)
from avkv.methods.counts import mask_to_indices


@dataclass
class AccKV(Method):
    """Attention redistribution + adaptive focusing + intra-modal merging + cross-calibration.

    Parameters
    ----------
    window : int
        Last prompt positions always kept (32) [ours].
    tau : float
        Cross-calibration threshold on the mean key cosine to the kept high-priority tokens (0.6; 0.9 also tried).
    redistribution : bool
        Use Ã = A·(i+1)/(n−j) (paper's A-R); ``False`` uses raw accumulated attention (ablation).
    focusing : bool
        Weight video/audio scores by W_v/W_a (paper's A-F); ``False`` leaves scores unweighted (ablation).
    calibration : bool
        Cross-calibration (paper's C-C); ``False`` skips it (ablation).
    merge : bool
        Intra-modal merging of evicted audio/video tokens.
    merge_mode : str
        ``avg`` (evicted x averaged into the target, scatter-mean with the target) [ours]; ``pivot``/``weighted``.
    redistributed_focus : bool
        Compute W_v/W_a from Ã rather than A [ours].
    per_head : bool
        ``False``: one index set per layer from head-averaged scores [ours]; ``True``: one set per KV head.
    refill : bool
        Give the slots cross-calibration frees to the next-best entries of the layer (True) [ours, turn 2], or leave
        them empty (False: the summary's reading; the cache then holds less than the budget).
    chunk : int
        Query rows per chunk of the all-query pass.
    """

    name = "acckv"
    ragged_heads: ClassVar[bool] = True           # its heads keep different counts
    all_query_stats = True
    window: int = 32
    tau: float = 0.6
    redistribution: bool = True
    focusing: bool = True
    calibration: bool = True
    merge: bool = True
    merge_mode: str = "avg"
    redistributed_focus: bool = True
    per_head: bool = False
    refill: bool = True
    chunk: int = 128

    @property
    def budget_mode(self) -> str:
        return "achieved" if self.calibration and not self.refill else "held"

    @property
    def budget_reason(self) -> str | None:
        if self.budget_mode == "held":
            return None
        return "refill=false: the slots cross-calibration frees stay empty (the summary's 'not refilled')"

    # ------------------------------------------------------------------ scoring
    def _sum_calls(self, mod: torch.Tensor) -> list[tuple]:
        """The (row weight, column weight, blocks) of each :func:`attention_sums` call for modality ids ``mod``:
        one call, or two when the focus statistics come from the other variant."""
        S, dev = mod.numel(), mod.device
        pos = torch.arange(S, device=dev, dtype=torch.float32)
        text, vid, aud = mod == TEXT, (mod == VIDEO) | (mod == IMAGE), mod == AUDIO
        blocks = {"tv": (text, vid), "ta": (text, aud)}

        def weights(redistributed: bool):
            return ((pos + 1), 1.0 / (S - pos)) if redistributed else (None, None)
        if self.redistribution == self.redistributed_focus:
            return [(*weights(self.redistribution), blocks)]
        return [(*weights(self.redistribution), None), (*weights(self.redistributed_focus), blocks)]

    def all_query_rows(self, modality: torch.Tensor) -> torch.Tensor:
        """The row weights of :meth:`layer_statistics`' sums (the fused prefill accumulates them)."""
        return torch.cat([row_matrix(modality.numel(), modality.device, rw, bl) for rw, _, bl in self._sum_calls(modality)])

    def layer_statistics(self, view: LayerView) -> tuple[torch.Tensor, float, float]:
        """Per-head scores [H, S] and the head-averaged text→video / text→audio means (S̄_v, S̄_a)."""
        dev = view.keys.device
        mod = view.modality.to(dev)
        text, vid, aud = mod == TEXT, (mod == VIDEO) | (mod == IMAGE), mod == AUDIO
        calls = self._sum_calls(mod)          # a second pass only for focus statistics from the other variant
        cols, b = attention_sums(view, self.chunk, *calls[0])
        if len(calls) > 1:
            _, b = attention_sums(view, self.chunk, *calls[1])
        nt = int(text.sum())
        sv = float(b["tv"].mean()) / max(nt * int(vid.sum()), 1)
        sa = float(b["ta"].mean()) / max(nt * int(aud.sum()), 1)
        return cols, sv, sa

    def focus_weights(self, sv: float, sa: float, has_v: bool, has_a: bool) -> tuple[float, float]:
        if not (has_v and has_a):
            return float(has_v), float(has_a)
        tot = sv + sa
        return (0.5, 0.5) if tot <= 0 else (sv / tot, sa / tot)

    # ------------------------------------------------------------------ selection
    def compress(self, view: LayerView) -> Selection:
        S, dev, kvH = view.seq_len, view.keys.device, view.num_kv_heads
        mod = view.modality.to(dev)
        w = min(self.window, S)
        vid, aud = (mod == VIDEO) | (mod == IMAGE), mod == AUDIO
        has_v, has_a = bool(vid.any()), bool(aud.any())

        cols, sv, sa = self.layer_statistics(view)
        wv, wa = self.focus_weights(sv, sa, has_v, has_a) if self.focusing else (1.0, 1.0)
        scores = reduce_gqa(cols, kvH, "mean") if self.per_head else cols.mean(0, keepdim=True)   # [R, S]
        weight = torch.ones(S, device=dev)
        weight[vid], weight[aud] = wv, wa
        scores = scores * weight
        hi, lo = (VIDEO, AUDIO) if wv >= wa else (AUDIO, VIDEO)
        if not (has_v and has_a):
            hi, lo = (VIDEO if has_v else AUDIO if has_a else None), None

        # budget split: text ∪ window always; audio ∪ video ranked jointly for the rest
        protected = mod == TEXT
        protected[S - w:] = True
        n_prot = int(protected.sum())
        k = max(1, min(view.n_keep, S))
        if k >= n_prot:
            s = scores.masked_fill(protected, float("inf"))
            keep = keep_topk(s, k)                                                        # [R, k]
        else:                                                                             # text alone exceeds the budget
            keep = keep_topk(scores, k, protect_last=w)
        rows = keep                                                                       # [R, k]
        if keep.shape[0] == 1:
            keep = keep.expand(kvH, -1)

        window_mask = torch.zeros(S, dtype=torch.bool, device=dev)
        window_mask[S - w:] = True
        keys_out, vals_out = self._merged(view, keep, mod, vid | aud)                     # [kvH, k, D]

        calib_out = 0
        keep_col = torch.ones(keep.shape, dtype=torch.bool, device=dev)                   # [kvH, k]
        if self.calibration and lo is not None:
            km = mod[keep]                                                                # [kvH, k]
            lo_m = ((km == lo) | ((km == IMAGE) & (lo == VIDEO))) & ~window_mask[keep]
            hi_m = (km == hi) | ((km == IMAGE) & (hi == VIDEO))
            kn = F.normalize(keys_out.float(), dim=-1)                                    # [kvH, k, D]
            n_hi = hi_m.sum(1)                                                            # [kvH]
            centre = (kn * hi_m[..., None]).sum(1) / n_hi.clamp(min=1)[:, None]          # mean of kept K_hi
            c = torch.einsum("hkd,hd->hk", kn, centre)                                    # mean cosine to K_hi
            # no kept high-priority token: nothing to align with, the low-priority tokens stay [ours]
            if self.per_head:
                keep_col = ~(lo_m & (c < self.tau) & (n_hi > 0)[:, None])
            elif int(n_hi[0]) > 0:                 # shared index set: per-head mean cosine, averaged over heads
                keep_col = ~(lo_m[0] & (c.mean(0) < self.tau))[None, :].expand(kvH, -1)
            calib_out = int((~keep_col).sum())                                           # summed over heads

        refilled = restored = 0
        if bool(keep_col.all()):
            sel = Selection(indices=keep, keys=keys_out, values=vals_out)
        elif self.refill:
            # freed slots → the next-best entries of the layer; the merge is redone on the final kept set
            kept, dropped, refilled, restored = refill(scores, rows, keep_col[: rows.shape[0]])
            keep = mask_to_indices(kept)[0]
            if keep.shape[0] == 1:
                keep, dropped = keep.expand(kvH, -1), dropped.expand(kvH, -1)
                refilled, restored = refilled * kvH, restored * kvH
            keys_out, vals_out = self._merged(view, keep, mod, vid | aud, exclude=dropped)
            sel = Selection(indices=keep, keys=keys_out, values=vals_out)
        else:
            cols, valid = mask_to_indices(keep_col)              # surviving columns of keep, in order, padded
            g = cols[..., None].expand(-1, -1, keys_out.shape[-1])
            sel = Selection(indices=keep.gather(1, cols), keys=keys_out.gather(1, g), values=vals_out.gather(1, g),
                            valid=valid)

        counts = modality_counts(mod, sel.indices, sel.valid)
        sel.info = {
            "high_priority": None if hi is None else ("video" if hi == VIDEO else "audio"),
            "w_video": round(wv, 6), "w_audio": round(wa, 6),
            "kept_text": counts["text"], "kept_video": counts["video"] + counts["image"],
            "kept_audio": counts["audio"], "calibration_evicted": calib_out,
        }
        if self.refill and calib_out:
            sel.info.update(refilled=refilled, calibration_restored=restored)
        return sel

    def _merged(self, view: LayerView, keep: torch.Tensor, mod: torch.Tensor, media: torch.Tensor,
                exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the kept entries [kvH, k, D]; with ``merge``, every evicted media entry (but those in
        ``exclude`` [kvH, S]) averaged into its most key-similar kept entry of the same modality."""
        if not self.merge:
            g = keep[..., None].expand(-1, -1, view.keys.shape[-1])
            return view.keys.gather(1, g), view.values.gather(1, g)
        evicted = complement(keep, view.seq_len)                                         # [kvH, S − k]
        mergeable = media[evicted]
        if exclude is not None:
            mergeable &= ~exclude.gather(1, evicted)
        # an evicted entry with no allowed target (text, excluded, or no kept entry of its modality) is dropped
        allowed = (mod[evicted][..., None] == mod[keep][:, None, :]) & mergeable[..., None]
        return merge_into_nearest(view.keys, view.values, keep, evicted, self.merge_mode, allowed)


def refill(scores: torch.Tensor, rows: torch.Tensor, keep_col: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Give the slots cross-calibration freed to the next-best entries of the row.

    ``scores`` [R, S], ``rows`` [R, k] the kept positions, ``keep_col`` [R, k] False where calibration evicted.
    Each row's d freed slots go to its best never-kept positions (by :func:`rank_positions`); when fewer than d are
    left, the best of its evicted ones come back. Returns the final keep mask [R, S] (k per row), the evicted mask
    [R, S] (those not back), and how many slots were refilled and restored (summed over rows).
    """
    R, S = scores.shape
    taken = torch.zeros(R, S, dtype=torch.bool, device=scores.device).scatter_(1, rows, True)
    gone = torch.zeros_like(taken).scatter_(1, rows, ~keep_col)
    d = (~keep_col).sum(1, keepdim=True)                                                 # freed per row
    order = rank_positions(scores)                                                       # best first
    free = ~taken.gather(1, order)
    fill = free & (free.cumsum(1) <= d)
    short = d - fill.sum(1, keepdim=True)
    was = gone.gather(1, order)
    back = was & (was.cumsum(1) <= short)
    fill_m = torch.zeros_like(taken).scatter_(1, order, fill)
    back_m = torch.zeros_like(taken).scatter_(1, order, back)
    return (taken & ~gone) | fill_m | back_m, gone & ~back_m, int(fill.sum()), int(back.sum())

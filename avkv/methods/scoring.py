"""Score primitives of the methods: deterministic top-k, GQA reduction, attention rows of recomputed queries,
SnapKV's observation-window scores and pooling, the all-query sums (H2O, AccKV, FlowMM).

Re-exported by :mod:`avkv.methods.base`, where the methods have always imported them from.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from avkv.methods import allquery

if TYPE_CHECKING:                                   # base imports this module (ScoreMethod keeps its top-k)
    from avkv.methods.base import LayerView


def rank_positions(scores: torch.Tensor) -> torch.Tensor:
    """Positions of each row of ``scores`` [R, S] from best to worst: [R, S].

    Deterministic: equal scores are ranked by position, the later first (a stable sort of the reversed row),
    so reruns are identical whatever the kernel's own ordering and no score is perturbed.
    """
    S = scores.shape[-1]
    s = scores.detach().to(torch.float64)
    return S - 1 - torch.sort(s.flip(-1), dim=-1, descending=True, stable=True).indices


def keep_topk(scores: torch.Tensor, k: int, protect_last: int = 0) -> torch.Tensor:
    """Deterministic top-k per row of ``scores`` [R, S] → sorted indices [R, k].

    The last ``protect_last`` positions are always kept (they count toward k). Ties are broken by position
    (the later position wins, :func:`rank_positions`).
    """
    R, S = scores.shape
    k = max(1, min(int(k), S))
    s = scores.detach().to(torch.float64).clone()
    if protect_last > 0:
        s[:, S - min(protect_last, S):] = math.inf
    return rank_positions(s)[:, :k].sort(dim=-1).values


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[kvH, S, D] → [kvH*groups, S, D] (query-head order of transformers' ``repeat_kv``)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=0)


def reduce_gqa(scores: torch.Tensor, num_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Query-head scores [H, ...] → KV-head scores [kvH, ...] by mean (default) / max / sum within each group."""
    H = scores.shape[0]
    g = scores.view(num_kv_heads, H // num_kv_heads, *scores.shape[1:])
    return {"mean": g.mean(1), "max": g.amax(1), "sum": g.sum(1)}[how]


def _grouped_logits(view: LayerView, q: torch.Tensor, cols: int) -> torch.Tensor:
    """Scaled logits of query heads ``q`` [H, r, D] against the first ``cols`` keys: [H, r, cols] (fp32).

    Query heads are grouped onto their KV head by a reshape instead of repeating the keys (same head order as
    transformers' ``repeat_kv``), so no [H, S, D] copy of the cache is made.
    """
    H, r, D = q.shape
    kvH = view.num_kv_heads
    k = view.keys[:, :cols].float()                                          # [kvH, cols, D]
    qg = q.float().reshape(kvH, (H // kvH) * r, D)
    return torch.bmm(qg, k.transpose(1, 2)).mul_(view.scaling).view(H, r, cols)


def _causal_softmax_(logits: torch.Tensor, start: int) -> torch.Tensor:
    """In-place causal mask + softmax of logits [H, r, C] for query rows start..start+r-1 (key j visible iff j ≤ i)."""
    r, C = logits.shape[1], logits.shape[2]
    if start < C - 1:                                   # some row sees fewer than all C keys
        # only keys after ``start`` are hidden from any row: the mask is built and applied on those columns alone
        # (a SnapKV window of w rows touches w columns of the S, not all of them)
        qpos = torch.arange(start, start + r, device=logits.device)[:, None]
        kpos = torch.arange(start + 1, C, device=logits.device)[None, :]
        logits[..., start + 1:].masked_fill_(kpos > qpos, float("-inf"))
    return logits.softmax(-1)


def attention_rows(view: LayerView, start: int, end: int) -> torch.Tensor:
    """Causal softmax attention of prompt queries [start, end) over the chunk's keys: [H, end-start, S] (fp32)."""
    logits = _grouped_logits(view, view.queries(start, end), view.seq_len)
    return _causal_softmax_(logits, start)


def window_scores(view: LayerView, window: int, reduce: str = "mean") -> torch.Tensor:
    """SnapKV observation-window scores per query head: attention of the last ``window`` queries, [H, S].

    ``reduce`` = ``mean`` (AdaKV code) or ``sum`` (SnapKV paper) over the window rows.
    """
    S = view.seq_len
    w = max(1, min(window, S))
    a = attention_rows(view, S - w, S)
    return a.mean(1) if reduce == "mean" else a.sum(1)


def accumulated_scores(view: LayerView, chunk: int = allquery.DEFAULT_CHUNK, normalize: bool = False,
                       max_elements: int = 1 << 26) -> torch.Tensor:
    """H2O accumulated attention: column sums of the causal softmax over *all* prompt queries, [H, S].

    No S×S matrix ever exists: query rows go in chunks of complete rows (exact), keys are never repeated per query
    head, and extra memory is O(H·chunk·S) (the chunk shrinks so its logits stay under ``max_elements``). When the
    prefill captured the layer's queries and row log-sum-exps (``view.stats``), the pass is one ``exp`` of the
    logits minus the log-sum-exps per element and no query is recomputed; otherwise an exact chunked softmax over
    recomputed queries (:mod:`avkv.methods.allquery`).

    With ``normalize`` each column is divided by the number of rows that can see it (mean instead of sum).
    """
    S = view.seq_len
    out = allquery.accumulated(view, chunk, max_elements)
    if normalize:
        out = out / torch.arange(S, 0, -1, device=out.device, dtype=out.dtype)
    return out


def pool_scores(scores: torch.Tensor, kernel: int, how: str = "max", count_pad: bool = True) -> torch.Tensor:
    """1-D pooling over positions (stride 1, padding k//2) of [R, S] scores; kernel ≤ 1 returns the input.

    ``avg`` divides every window by ``kernel``, the zero padding at the edges counted (``count_pad``, torch's
    ``count_include_pad=True`` default, which the SnapKV code and kvpress use); ``count_pad=False`` divides by the
    in-range positions only. ``max`` ignores the padding either way.
    """
    if kernel <= 1:
        return scores
    x = scores.unsqueeze(1)
    if how == "max":
        y = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    elif how == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=bool(count_pad))
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {how!r}")
    return y.squeeze(1)[..., : scores.shape[-1]]


def pool_prefix(scores: torch.Tensor, window: int, kernel: int, how: str = "max", count_pad: bool = True,
                pool_window_columns: bool = False) -> torch.Tensor:
    """SnapKV's smoothing of observation-window scores [R, S]: only the prefix before the window is pooled.

    The reference code (SnapKV ``attn_weights[..., -w:, :-w]``, kvpress ``SnapKVPress``, AdaKV and
    KVCache-Factory alike) drops the window's own columns before pooling, so a prefix position next to the window
    never borrows the window's (large, self-attention) scores, and the first and last ``kernel//2`` prefix
    positions see zero padding. The window columns are returned unchanged (the window is always kept).
    ``pool_window_columns=True`` pools the whole row instead (avkv before issue 13; no reference does this).
    """
    S = scores.shape[-1]
    if pool_window_columns:
        return pool_scores(scores, kernel, how, count_pad)
    P = S - max(0, min(window, S))
    out = scores.clone()
    if P > 0:
        out[..., :P] = pool_scores(scores[..., :P], kernel, how, count_pad)
    return out


# ------------------------------------------------------------------------- all-query sums of the seed methods
def attention_sums(view: LayerView, chunk: int = allquery.DEFAULT_CHUNK, row_weight: torch.Tensor | None = None,
                   col_weight: torch.Tensor | None = None,
                   blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   max_elements: int = 1 << 26) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One chunked pass over *all* prompt query rows of the causal softmax, with O(H·chunk·S) extra memory.

    With Ã[i, j] = row_weight[i] · A[i, j] · col_weight[j] (weights default to 1) it returns

    * ``cols`` [H, S]: column sums Σ_i Ã[i, j] (H2O's accumulated score when both weights are 1);
    * ``block[name]`` [H]: Σ_{i ∈ rows, j ∈ cols} Ã[i, j] for every ``name: (rows [S] bool, cols [S] bool)``.

    Used by AccKV (redistribution and text→modality focus) and FlowMM (cross-modal ratio ρ). Every chunk of rows
    is read once: the column sums and every block's row-weighted sums are one product with a small matrix of row
    weights (:func:`avkv.methods.allquery.weighted_sums`); with ``view.stats`` the prefill's log-sum-exps are used,
    as in :func:`accumulated_scores`. The result equals the eager attention sums.
    """
    return allquery.weighted_sums(view, chunk, row_weight, col_weight, blocks, max_elements)

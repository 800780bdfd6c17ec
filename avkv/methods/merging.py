"""Merging evicted cache entries into kept ones (LOOK-M, D2O, KVMerge): :func:`merge_into_nearest`, and
:func:`complement` (the evicted positions of a selection).

Re-exported by :mod:`avkv.methods.base`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


def complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Positions of [0, size) not in ``indices`` [R, k] (per row, sorted): [R, size - k]. Rows must be duplicate-free."""
    R = indices.shape[0]
    mask = torch.ones(R, size, dtype=torch.bool, device=indices.device)
    mask.scatter_(1, indices, False)
    return torch.nonzero(mask)[:, 1].view(R, -1)


def merge_into_nearest(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, evicted: torch.Tensor,
                       mode: str = "pivot", allowed: torch.Tensor | None = None,
                       min_similarity: float | torch.Tensor | Callable[[torch.Tensor], Any] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge evicted entries into their most key-similar kept entry.

    One KV head: keys/values [S, D], keep [k], evicted [e], ``allowed`` [e, k]. Several heads at once: add a
    leading head dimension to all of them ([R, S, D], [R, k], [R, e], [R, e, k]). ``allowed`` says which kept
    entries each evicted entry may merge into (e.g. same modality only); ``min_similarity`` gates merging on
    the best cosine similarity: a float, a broadcastable tensor, or a callable that receives the best
    similarities [R, e] and returns the gate (D2O's running threshold). An evicted entry with no allowed target,
    or below the gate, is dropped. Modes:

    * ``avg``: contribution = x_e (plain average; conserves the summed mass)
    * ``pivot``: contribution = (x_e + x_target) / 2 (LOOK-M default)
    * ``weighted``: contribution = cos(k_e, k_target) · x_e (LOOK-M ``weighted``, D2O)

    The kept entry becomes the mean of itself and all contributions it receives (scatter-mean including
    itself, as ``torch.scatter_reduce(..., reduce="mean", include_self=True)`` in the LOOK-M code). Returns the
    new kept keys/values ([k, D] or [R, k, D]).
    """
    if mode not in ("avg", "pivot", "weighted"):
        raise ValueError(f"merge mode must be avg, pivot or weighted, got {mode!r}")
    single = keys.dim() == 2
    if single:
        keys, values, keep, evicted = keys[None], values[None], keep[None], evicted[None]
        allowed = None if allowed is None else allowed[None]
    R, _, D = keys.shape
    Kk = keys.gather(1, keep[..., None].expand(-1, -1, D)).float()           # [R, k, D]
    Vk = values.gather(1, keep[..., None].expand(-1, -1, D)).float()
    if evicted.shape[-1] > 0:
        Ke = keys.gather(1, evicted[..., None].expand(-1, -1, D)).float()    # [R, e, D]
        Ve = values.gather(1, evicted[..., None].expand(-1, -1, D)).float()
        sim = F.normalize(Ke, dim=-1) @ F.normalize(Kk, dim=-1).transpose(1, 2)   # [R, e, k]
        if allowed is not None:
            sim.masked_fill_(~allowed, float("-inf"))                          # in place: sim is ours
        best, target = sim.max(dim=-1)                                         # [R, e]
        ok = torch.isfinite(best)
        if min_similarity is not None:
            gate = min_similarity(best.masked_fill(~ok, float("nan"))) if callable(min_similarity) else min_similarity
            ok &= best >= gate
        w = ok.to(Kk.dtype)[..., None]                                         # dropped entries contribute 0
        tgt = target[..., None].expand(-1, -1, D)
        if mode == "avg":
            ck, cv = Ke, Ve
        elif mode == "pivot":
            ck, cv = (Ke + Kk.gather(1, tgt)) / 2, (Ve + Vk.gather(1, tgt)) / 2
        else:
            sw = torch.where(ok, best, torch.zeros_like(best))[..., None]
            ck, cv = Ke * sw, Ve * sw
        count = torch.ones(R, Kk.shape[1], 1, device=Kk.device).scatter_add_(1, target[..., None], w)
        Kk = Kk.scatter_add(1, tgt, ck * w) / count
        Vk = Vk.scatter_add(1, tgt, cv * w) / count
    Kk, Vk = Kk.to(keys.dtype), Vk.to(values.dtype)
    return (Kk[0], Vk[0]) if single else (Kk, Vk)

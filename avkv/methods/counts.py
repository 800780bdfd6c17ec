"""The allocation toolkit: how many entries each layer, head or modality keeps, and which, as integers.

Every method that splits a budget uses these (the allocation wrappers, AdaKV, PyramidKV, AudioKV, MadaKV, AccKV,
D2O, Chunk, FINCH), so one rule decides every integer count in the harness:

* :func:`apportion` — **the** integer apportioner: a total split in proportion to weights within integer bounds,
  by water-filling and then largest remainder (the rule is stated in its docstring and in ``docs/methods.md``);
* :func:`ragged_topk` / :func:`mask_to_indices` — **the** ragged selector: per-row counts (or a keep mask) to the
  ``(indices, valid)`` pair of a :class:`~avkv.methods.base.Selection` whose heads keep different counts;
* :func:`group_topk` — a count per row split over groups (modalities) in proportion to the row's score mass in
  each (:func:`apportion`), each group keeping its best (MadaKV's preference split);
* :func:`rows_to_mask`, :func:`modality_budgets` — counts helpers built on the two.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from avkv.methods.scoring import rank_positions

#: reals closer than this are equal: a quota this close to an integer is that integer, and remainders this close are
#: a tie (so float noise of the water-filling never decides a count)
TOL = 1e-9


def _bounds(b, default: float, n: int) -> torch.Tensor:
    if b is None:
        return torch.full((n,), default, dtype=torch.float64)
    return torch.as_tensor(b, dtype=torch.float64).flatten().cpu().expand(n).clone()


def _waterfill(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, total: float) -> torch.Tensor:
    """Real x_i = clip(λ·w_i, lo_i, hi_i) with Σ x = ``total`` (entries with w_i = 0 stay at lo_i); λ exact from the
    breakpoints lo_i/w_i, hi_i/w_i of the piecewise-linear Σ x(λ). Saturated (every positive weight at hi): x = hi."""
    pos = w > 0
    x = lo.clone()
    if not bool(pos.any()):
        return x
    wp, lp, hp = w[pos], lo[pos], hi[pos]
    fixed = float(lo[~pos].sum())
    f = lambda lam: torch.minimum(torch.maximum(lam[:, None] * wp[None], lp[None]), hp[None]).sum(1) + fixed
    bps = torch.cat([torch.zeros(1, dtype=torch.float64), lp / wp, hp / wp])
    bps = bps[torch.isfinite(bps)].unique()                              # sorted
    vals = f(bps)
    if total >= float(vals[-1]):                                         # saturated (or hi infinite: go past)
        if bool(torch.isfinite(hp).all()):
            x[pos] = hp
            return x
    k = int((vals <= total).sum()) - 1                                   # f(bps[k]) ≤ total < f(bps[k+1])
    a = float(bps[k])
    b = float(bps[k + 1]) if k + 1 < bps.numel() else a + 1.0
    mid = torch.tensor([(a + b) / 2], dtype=torch.float64)
    free = (mid * wp > lp) & (mid * wp < hp)                             # entries moving with λ on (a, b)
    at = torch.minimum(torch.maximum(mid * wp, lp), hp)
    clipped = float(at[~free].sum()) + fixed
    lam = (total - clipped) / float(wp[free].sum()) if bool(free.any()) else a
    x[pos] = torch.where(free, lam * wp, at)
    return x


def apportion(weights: torch.Tensor | Sequence[float], total: int, lo: torch.Tensor | int | Sequence = 0,
              hi: torch.Tensor | int | Sequence | None = None,
              rest: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Split the integer ``total`` in proportion to ``weights`` (any shape) into integers ``lo ≤ x ≤ hi``.

    The rule (the harness's only one; ``docs/methods.md``, *Integer budgets*):

    1. bounds are integers (``lo`` rounded up, ``hi`` down, default 0 and ∞); ``total`` is clipped into
       [Σ lo, Σ hi] (nothing else can be met);
    2. quotas (water-filling): q_i = clip(λ·w_i, lo_i, hi_i) with λ such that Σ q = total; negative weights
       count as 0. If the positive weights saturate at their ``hi`` first, the zero-weight entries share the rest
       the same way in proportion to ``rest`` (default: equally); all-zero weights split by ``rest`` too;
    3. integers (largest remainder, Hamilton): every entry gets ⌊q_i⌋; the total − Σ⌊q⌋ leftover units go one each
       to the entries with the largest remainder q_i − ⌊q_i⌋; equal remainders (within 1e-9) go to the earlier entry
       (row-major order of ``weights``).

    So ``apportion([2.3, 0.45], 3) == [3, 0]`` (quotas 2.51, 0.49) and ``apportion([2.3, 0.45], 2) == [2, 0]``;
    reals that already sum to an integer (``apportion(x, round(sum(x)))``) are just rounded with their sum kept.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    shape = w.shape
    w = w.detach().flatten().cpu().clamp_min(0)
    n = w.numel()
    if n == 0:
        return torch.zeros(shape, dtype=torch.long)
    lo_t = torch.ceil(_bounds(lo, 0.0, n) - TOL)
    hi_t = torch.maximum(torch.floor(_bounds(hi, math.inf, n) + TOL), lo_t)
    total = int(min(max(int(total), float(lo_t.sum())), float(hi_t.sum())))
    r = torch.ones(n, dtype=torch.float64) if rest is None else _bounds(rest, 1.0, n).clamp_min(0)
    if float(w.sum()) <= 0:
        w = r if float(r.sum()) > 0 else torch.ones(n, dtype=torch.float64)
    q = _waterfill(w, lo_t, hi_t, total)
    short = total - float(q.sum())
    if short > TOL:                                     # positive weights saturated: zero-weight entries take the rest
        z = w == 0
        rz = r[z] if float(r[z].sum()) > 0 else torch.ones(int(z.sum()), dtype=torch.float64)
        q[z] = _waterfill(rz, q[z], hi_t[z], float(q[z].sum()) + short)
    near = q.round()
    q = torch.where((q - near).abs() < TOL, near, q)
    x = q.floor()
    left = total - int(x.sum())
    frac = torch.round((q - x) / TOL)                   # remainders quantised: float noise never breaks a tie
    order = torch.sort(-frac, stable=True).indices      # largest remainder first, ties to the earlier entry
    if left > 0:
        room = order[(x[order] < hi_t[order])]
        x[room[:left]] += 1
    elif left < 0:                                      # float noise only: take back from the smallest remainders
        back = order.flip(0)
        back = back[x[back] > lo_t[back]]
        x[back[:-left]] -= 1
    return x.to(torch.long).view(shape)


def mask_to_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ragged selector: keep mask [R, S] → (``indices`` [R, kmax], ``valid`` [R, kmax] or None when every row
    keeps as many).

    Each row lists its kept positions in order, then pads to the longest row by repeating its last kept position
    (a harmless gather) with ``valid`` False. A row that keeps nothing is an error (the cache needs an entry per
    head).
    """
    R, S = keep.shape
    n = keep.sum(1)
    if R and bool((n == 0).any()):
        raise ValueError(f"rows {(n == 0).nonzero().flatten().tolist()} keep no entry; every head must keep one")
    kmax = int(n.max()) if R else 0
    pos = torch.arange(S, device=keep.device).expand(R, S)
    idx = torch.where(keep, pos, pos + S).sort(dim=-1).values[:, :kmax]
    if bool((n == kmax).all()):
        return idx, None
    valid = torch.arange(kmax, device=keep.device)[None, :] < n[:, None]
    last = idx.gather(1, (n - 1)[:, None])
    return torch.where(valid, idx, last), valid


def chunk_quotas(length: int, size: int, total: int, lo: int = 0) -> list[tuple[int, int, int]]:
    """Consecutive chunks ``[a, b)`` of ``size`` positions over ``length`` (the last one shorter) and each chunk's
    share ``c`` of ``total`` entries, in proportion to its length, each within [``lo``, its length]
    (:func:`apportion`): ``[(a, b, c), ...]``."""
    bounds = [(a, min(length, a + size)) for a in range(0, length, size)]
    lengths = torch.tensor([b - a for a, b in bounds], dtype=torch.float64)
    counts = apportion(lengths, total, lo, lengths)
    return [(a, b, c) for (a, b), c in zip(bounds, counts.tolist())]


def ragged_topk(scores: torch.Tensor, counts: torch.Tensor | Sequence[int], protect_last: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row r of ``scores`` [R, S] keeps ``counts[r]`` positions (clipped to [1, S]): the last ``protect_last``
    first (latest first when a count is smaller), then its best others by :func:`~avkv.methods.scoring.rank_positions`
    (ties to the later position). Per row it is :func:`~avkv.methods.scoring.keep_topk`; returns what
    :func:`mask_to_indices` returns for the keep mask."""
    R, S = scores.shape
    counts = torch.as_tensor(counts, dtype=torch.long).to(scores.device).clamp(1, S)
    s = scores.detach().to(torch.float64).clone()
    if protect_last > 0:
        s[:, S - min(protect_last, S):] = math.inf
    ranked = rank_positions(s)                                              # [R, S] best first
    wins = torch.arange(S, device=scores.device)[None, :] < counts[:, None]
    return mask_to_indices(torch.zeros(R, S, dtype=torch.bool, device=scores.device).scatter_(1, ranked, wins))


def group_topk(scores: torch.Tensor, groups: torch.Tensor, counts: torch.Tensor | Sequence[int],
               by_group: bool = True) -> torch.Tensor:
    """Keep mask [R, S]: row r of ``scores`` [R, S] keeps ``counts[r]`` of its candidates (positions whose
    ``groups`` [S] id is ≥ 0; a negative id is never kept), clipped to [0, number of candidates].

    ``by_group``: the row's count is split over the groups present in proportion to the row's score mass in each
    (:func:`apportion`, each group within its size; a group of zero mass shares what the others cannot take), and
    each group keeps its ``quota`` best; otherwise the row keeps its best candidates whatever their group. "Best" is
    ``torch.topk`` over the group's candidates in position order (ties as the kernel orders them — MadaKV's pick,
    kept as it was measured; :func:`ragged_topk` is the selector with the position tie rule).
    """
    R, S = scores.shape
    groups = groups.to(scores.device)
    cand = groups >= 0
    cidx = cand.nonzero().flatten()
    ids = groups[cand].unique().tolist() if by_group else []
    members = [(groups == g).nonzero().flatten() for g in ids]
    keep = torch.zeros(R, S, dtype=torch.bool, device=scores.device)
    for r, n in enumerate(torch.as_tensor(counts, dtype=torch.long).tolist()):
        n = max(0, min(int(n), cidx.numel()))
        if n == 0:
            continue
        s = scores[r]
        if not by_group:
            keep[r, cidx[s[cidx].topk(n).indices]] = True
            continue
        mass = torch.stack([s[pos].sum() for pos in members]).float()
        quota = apportion(mass, n, 0, [pos.numel() for pos in members])
        for pos, q in zip(members, quota.tolist()):
            if q > 0:
                keep[r, pos[s[pos].topk(q).indices]] = True
    return keep


def rows_to_mask(rows: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Per-row position lists (any lengths) → keep mask [len(rows), size]."""
    keep = torch.zeros(len(rows), size, dtype=torch.bool, device=rows[0].device if len(rows) else None)
    for r, pos in enumerate(rows):
        keep[r, pos] = True
    return keep


def modality_budgets(available: dict[str, int], shares: dict[str, float], total: int) -> dict[str, int]:
    """Split ``total`` entries over modalities by ``shares``, never beyond what a modality has.

    :func:`apportion` with ``hi`` = what each modality has: a modality that cannot use its share is capped and the
    surplus goes to the others in proportion to their shares, then (still short) to the modalities without a share in
    proportion to what they have. Integer counts summing to min(total, Σ available).
    """
    names = list(available)
    if not names:
        return {}
    out = apportion([max(0.0, float(shares.get(m, 0.0))) for m in names], total, 0,
                    [int(available[m]) for m in names], rest=[float(available[m]) for m in names])
    return dict(zip(names, out.tolist()))

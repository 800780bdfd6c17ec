"""Bootstrap confidence intervals and paired differences for the report.

Scores on small tasks are noisy (kvpress #83 shows non-monotonic curves on a few hundred samples), so every number
the report prints comes with a percentile-bootstrap 95% interval, and every compressed method is compared with the
full cache *on the same samples* (a paired difference), not through two independent means.

``strata`` lets one number average several tasks the way the papers' "Avg" column does (the mean of per-task
means): each bootstrap replicate resamples every task separately, then averages the task means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

N_BOOT = 2000
ALPHA = 0.05


@dataclass(frozen=True)
class Estimate:
    """A mean with its percentile-bootstrap interval; ``n`` counts the samples (paired ones for a difference)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}mean": self.mean, f"{prefix}lo": self.lo, f"{prefix}hi": self.hi, f"{prefix}n": self.n}


NAN = Estimate(float("nan"), float("nan"), float("nan"), 0)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    strata: Sequence | np.ndarray | None = None,
    n_boot: int = N_BOOT,
    alpha: float = ALPHA,
    seed: int = 0,
) -> Estimate:
    """Mean of ``values`` (or the mean of per-stratum means) with a percentile-bootstrap ``1-alpha`` interval.

    NaNs are dropped. One value gives a zero-width interval; none gives NaNs. The generator is seeded, so the
    same inputs always print the same interval.
    """
    v = np.asarray(values, dtype=np.float64)
    s = None if strata is None else np.asarray(strata, dtype=object)
    keep = ~np.isnan(v)
    v = v[keep]
    if s is not None:
        s = s[keep]
    if v.size == 0:
        return NAN
    rng = np.random.default_rng(seed)
    groups = [v] if s is None else [v[s == g] for g in _unique(s)]
    point = float(np.mean([g.mean() for g in groups]))
    reps = np.zeros(n_boot)
    for g in groups:
        idx = rng.integers(0, g.size, size=(n_boot, g.size))
        reps += g[idx].mean(axis=1)
    reps /= len(groups)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    # the percentile interval of a degenerate sample is the point itself; guard float noise
    return Estimate(point, float(min(lo, point)), float(max(hi, point)), int(v.size))


def paired_difference(
    a: dict, b: dict, strata: dict | None = None, **kw
) -> Estimate:
    """Mean of ``a[k] - b[k]`` over the keys both have (e.g. sample ids), with a bootstrap interval.

    ``strata`` maps a key to its stratum (task) for a stratified mean of per-task mean differences.
    """
    keys = [k for k in a if k in b and _finite(a[k]) and _finite(b[k])]
    if not keys:
        return NAN
    d = np.array([a[k] - b[k] for k in keys], dtype=np.float64)
    s = None if strata is None else [strata[k] for k in keys]
    return bootstrap_mean(d, strata=s, **kw)


def _finite(x) -> bool:
    try:
        return bool(np.isfinite(float(x)))
    except (TypeError, ValueError):
        return False


def _unique(s: Iterable) -> list:
    seen, out = set(), []
    for x in s:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out

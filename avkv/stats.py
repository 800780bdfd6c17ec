"""Bootstrap confidence intervals and paired differences for the report.

Scores on small tasks are noisy (kvpress #83 shows non-monotonic curves on a few hundred samples), so every number
the report prints comes with a percentile-bootstrap 95% interval, and every compressed method is compared with the
full cache *on the same samples* (a paired difference), not through two independent means.

``strata`` lets one number average several tasks the way the papers' "Avg" column does (the mean of per-task
means): each bootstrap replicate resamples every task separately, then averages the task means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

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


def bootstrap(
    rows: Sequence[np.ndarray],
    stat: Callable[[np.ndarray], np.ndarray],
    n_boot: int = N_BOOT,
    alpha: float = ALPHA,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap of a statistic averaged over strata.

    ``rows[g]`` is stratum g's ``[n_g, k]`` array of per-sample columns; ``stat`` maps ``[..., n, k]`` (a batch
    of resamples) to ``[...]``. The point estimate is the mean over strata of ``stat(rows[g])``; each replicate
    resamples every stratum with replacement.
    """
    groups = [np.asarray(g, dtype=np.float64) for g in rows if len(g)]
    if not groups:
        return NAN
    rng = np.random.default_rng(seed)
    point = float(np.mean([stat(g) for g in groups]))
    reps = np.zeros(n_boot)
    for g in groups:
        idx = rng.integers(0, g.shape[0], size=(n_boot, g.shape[0]))
        reps += stat(g[idx])
    reps /= len(groups)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    n = int(sum(g.shape[0] for g in groups))
    # the percentile interval of a degenerate sample is the point itself; guard float noise
    return Estimate(point, float(min(lo, point)), float(max(hi, point)), n)


def _mean(x: np.ndarray) -> np.ndarray:
    return x[..., 0].mean(axis=-1)


def corpus_accuracy(x: np.ndarray) -> np.ndarray:
    """``100 - WER`` (clipped at 0, as AudioKV reports ASR) from columns (errors, reference words)."""
    err, words = x[..., 0].sum(axis=-1), x[..., 1].sum(axis=-1)
    return np.maximum(0.0, 100.0 - 100.0 * err / np.maximum(words, 1e-12))


def _corpus_diff(x: np.ndarray) -> np.ndarray:
    return corpus_accuracy(x[..., 0:2]) - corpus_accuracy(x[..., 2:4])


def _split(values: np.ndarray, strata) -> list[np.ndarray]:
    if strata is None:
        return [values]
    s = np.asarray(strata, dtype=object)
    return [values[s == g] for g in _unique(s)]


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
    keep = ~np.isnan(v)
    s = None if strata is None else np.asarray(strata, dtype=object)[keep]
    v = v[keep]
    if v.size == 0:
        return NAN
    return bootstrap(_split(v[:, None], s), _mean, n_boot=n_boot, alpha=alpha, seed=seed)


def bootstrap_corpus(errors, words, strata=None, **kw) -> Estimate:
    """Corpus-level ``100 - WER`` (errors and reference words summed over the resample), per-stratum averaged."""
    x = np.column_stack([np.asarray(errors, float), np.asarray(words, float)])
    x = x[~np.isnan(x).any(axis=1)]
    if not len(x):
        return NAN
    s = None if strata is None else np.asarray(strata, dtype=object)[~np.isnan(np.column_stack(
        [np.asarray(errors, float), np.asarray(words, float)])).any(axis=1)]
    return bootstrap(_split(x, s), corpus_accuracy, **kw)


def paired_difference(
    a: dict, b: dict, strata: dict | None = None, **kw
) -> Estimate:
    """Mean of ``a[k] - b[k]`` over the keys both have (e.g. sample ids), with a bootstrap interval.

    ``strata`` maps a key to its stratum (task) for a stratified mean of per-task mean differences.
    Values may also be ``(errors, words)`` pairs: the difference is then of corpus-level ``100 - WER``, the
    same samples resampled for both sides.
    """
    keys = [k for k in a if k in b and _finite(a[k]) and _finite(b[k])]
    if not keys:
        return NAN
    s = None if strata is None else [strata[k] for k in keys]
    if isinstance(a[keys[0]], tuple):
        x = np.array([[*a[k], *b[k]] for k in keys], dtype=np.float64)
        return bootstrap(_split(x, s), _corpus_diff, **kw)
    d = np.array([a[k] - b[k] for k in keys], dtype=np.float64)
    return bootstrap_mean(d, strata=s, **kw)


def _finite(x) -> bool:
    if isinstance(x, tuple):
        return all(_finite(v) for v in x)
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

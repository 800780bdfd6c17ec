"""Budget curves: score, KV memory and decode latency against the KV fraction each point really held.

One figure per table context (experiment, model, dataset, ``table_id``: the dataset limit, ``compress_at``, seed and
every other setting alike), so points of different experiments or sample counts never share a curve. The title
names the model, dataset, metric, n and the experiment; the score axis is the metric.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _context_title(g: pd.DataFrame) -> str:
    parts = []
    if "limit" in g and g["limit"].notna().any():
        parts.append(f"limit {g['limit'].iloc[0]}")
    if "compress_at" in g and g["compress_at"].notna().any() and str(g["compress_at"].iloc[0]):
        parts.append(f"compress_at {g['compress_at'].iloc[0]}")
    return ", ".join(parts)


def plot_budget_curves(points: pd.DataFrame, out_dir: Path, avg: pd.DataFrame | None = None,
                       scale: float = 100.0) -> list[Path]:
    """Per (experiment, model, dataset, context): score vs budget per method, KV memory vs budget, decode latency
    (mean ± 95% CI) vs budget."""
    if points.empty:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    # one curve per (method, variant); the score is the task average when a dataset has several tasks
    keys = [k for k in ("experiment", "model", "dataset", "table_id") if k in points]
    groups = list(points.groupby(keys, dropna=False, sort=False))
    per_ds = pd.Series([tuple(k[:3]) for k, _ in groups]).value_counts()
    for key, g in groups:
        exp, model, dataset = key[:3]
        multi_task = g["task"].nunique() > 1
        s = g
        if multi_task and avg is not None and not avg.empty:
            sel = np.ones(len(avg), dtype=bool)
            for k, v in zip(keys, key):
                sel &= (avg[k] == v).to_numpy()
            s = avg[sel]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        kvmax = float(np.nanmax(g["kv_bytes_kept"])) if g["kv_bytes_kept"].notna().any() else 0.0
        unit, div = ("GiB", 2**30) if kvmax >= 2**30 else ("MiB", 2**20) if kvmax >= 2**20 else ("KiB", 2**10)
        for (method, variant), gm in s[s["method"] != "full"].groupby(["method", "variant"], sort=False):
            gm = gm[gm["budget"] > 0].sort_values("budget")
            if gm.empty:
                continue
            x = gm["budget_achieved"].fillna(gm["budget"]) if "budget_achieved" in gm else gm["budget"]
            err = np.vstack([gm["score_mean"] - gm["score_lo"], gm["score_hi"] - gm["score_mean"]])
            axes[0].errorbar(x, gm["score_mean"], yerr=np.nan_to_num(err), marker="o", capsize=3, label=method)
            ge = g[(g["method"] == method) & (g["variant"] == variant) & (g["budget"] > 0)]
            ge = ge.groupby("budget").mean(numeric_only=True).reset_index()
            xe = ge["budget_achieved"].fillna(ge["budget"]) if "budget_achieved" in ge else ge["budget"]
            axes[1].plot(xe, ge["kv_bytes_kept"] / div, marker="o", label=method)
            dec = ge["decode_s_per_token"] * 1e3
            if "decode_s_per_token_lo" in ge:
                derr = np.vstack([dec - ge["decode_s_per_token_lo"] * 1e3, ge["decode_s_per_token_hi"] * 1e3 - dec])
                axes[2].errorbar(xe, dec, yerr=np.clip(np.nan_to_num(derr), 0, None), marker="o", capsize=3,
                                 label=method)
            else:
                axes[2].plot(xe, dec, marker="o", label=method)
        full = s[s["method"] == "full"]
        if len(full):
            f = full.sort_values("score_n", ascending=False).iloc[0]
            axes[0].axhline(f["score_mean"], ls="--", color="k", label="full")
            fe = g[g["method"] == "full"]
            axes[1].axhline(fe["kv_bytes_kept"].mean() / div, ls="--", color="k", label="full")
            axes[2].axhline(fe["decode_s_per_token"].mean() * 1e3, ls="--", color="k", label="full")
        metric = next((m for m in g.get("metric", pd.Series(dtype=object)) if isinstance(m, str) and m), "score")
        unit_s = f" × {scale:g}" if scale != 1 else ""
        avg_s = " (task average)" if multi_task else ""
        ylabels = [f"{metric}{unit_s}{avg_s} (mean ± 95% CI)", f"KV memory kept ({unit})",
                   "decode latency (ms/token, mean ± 95% CI)"]
        for ax, yl in zip(axes, ylabels):
            ax.set_xlabel("KV held (fraction of the full cache's bytes, as measured)")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        n = sorted({int(v) for v in s["score_n"].dropna()}) if "score_n" in s else []
        n_s = "n=?" if not n else f"n={n[0]}" if len(n) == 1 else f"n={n[0]}–{n[-1]}"
        ctx = _context_title(g)
        fig.suptitle(f"{model} · {dataset} · {metric} · {n_s}  —  experiment {exp or '-'}" + (f" ({ctx})" if ctx else ""))
        fig.tight_layout()
        name = f"{safe_name(exp or 'runs')}__{safe_name(model)}__{safe_name(dataset)}"
        if per_ds[tuple(key[:3])] > 1:              # several contexts of one experiment: one file each
            name += f"__{safe_name(ctx)}__{str(key[3])[:6]}" if ctx else f"__{str(key[3])[:6]}"
        p = out_dir / f"{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def safe_name(s) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))

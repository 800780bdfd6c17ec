"""The capacity plot: decode tokens/s against the budget at one memory cap, from ``scripts/bench_capacity.py``'s
output (``results/bench/capacity/``: ``capacity.csv``, one row per measured batch, and ``meta.json``).

Per budget the point is the largest batch that fitted under the cap (``fits`` true) and the tokens/s measured at
it (the median over the benchmark's rounds); the batch is written beside each point, and the tokens/s of a batch of one at the same budget is drawn as a
second line (what compression buys at batch 1, for contrast). One figure per cap (``meta.json``'s, or the CSV's
``cap_kv_bytes`` column when there is one).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def capacity_points(rows: pd.DataFrame) -> pd.DataFrame:
    """Per budget: the largest fitting batch, its tokens/s, and batch 1's tokens/s (columns ``budget``,
    ``max_batch``, ``tokens_per_s``, ``tokens_per_s_batch1``), budgets descending."""
    out = []
    for b, g in rows.groupby("budget"):
        fit = g[g["fits"].astype(str).str.lower().isin(("true", "1"))]
        one = g[g["batch"] == 1]
        if fit.empty:
            out.append({"budget": float(b), "max_batch": 0, "tokens_per_s": float("nan"),
                        "tokens_per_s_batch1": float("nan")})
            continue
        top = int(fit["batch"].max())
        out.append({"budget": float(b), "max_batch": top,
                    "tokens_per_s": float(fit[fit["batch"] == top]["tokens_per_s"].median()),
                    "tokens_per_s_batch1": float(one["tokens_per_s"].median()) if len(one) else float("nan")})
    return pd.DataFrame(out).sort_values("budget", ascending=False).reset_index(drop=True)


def plot_capacity(src: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw ``capacity.png`` (one per cap) in ``out_dir`` from the benchmark folder (or CSV) ``src``; [] when it
    holds no rows."""
    src = Path(src)
    csv_path = src / "capacity.csv" if src.is_dir() else src
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no capacity.csv (run scripts/bench_capacity.py)")
    rows = pd.read_csv(csv_path)
    if rows.empty:
        return []
    meta_path = csv_path.parent / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if "cap_kv_bytes" not in rows:
        rows["cap_kv_bytes"] = meta.get("cap_kv_bytes", float("nan"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    caps = list(rows.groupby("cap_kv_bytes", dropna=False, sort=False))
    for cap, g in caps:
        pts = capacity_points(g)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(pts["budget"], pts["tokens_per_s"], marker="o", label="largest batch under the cap")
        ax.plot(pts["budget"], pts["tokens_per_s_batch1"], marker="s", ls="--", label="batch 1")
        for _, p in pts.iterrows():
            if p["max_batch"]:
                ax.annotate(f"B={int(p['max_batch'])}", (p["budget"], p["tokens_per_s"]), textcoords="offset points",
                            xytext=(4, 6), fontsize=8)
        ax.set_xscale("log")
        ax.set_xticks(list(pts["budget"]))
        ax.set_xticklabels([f"{b:g}" for b in pts["budget"]])
        ax.set_xlabel("budget (kept fraction of the prompt KV)")
        ax.set_ylabel("decode tokens/s (all rows of the batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        what = (f"{meta.get('method', '?')} · Qwen2.5-{str(meta.get('shape', '?')).upper()} shape, "
                f"{meta.get('layers', '?')} layers · {meta.get('length', '?')} tokens · {meta.get('device', '?')}")
        cap_s = "?" if cap != cap else f"{float(cap) / 2**20:.1f} MiB"
        ax.set_title(f"{what}\nKV allocated by the batch ≤ {cap_s}", fontsize=9)
        fig.tight_layout()
        name = "capacity.png" if len(caps) == 1 else f"capacity__{int(cap) if cap == cap else 'nocap'}.png"
        p = out_dir / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


__all__ = ["capacity_points", "plot_capacity"]

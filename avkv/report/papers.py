"""The papers' published numbers (``results/papers/*.csv``) and our points beside them."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from avkv.report.tables import budget_sort_key, budget_str, collapse_full, fmt, method_order, same_budget

# ------------------------------------------------------------------------------------------------ papers
from avkv.config import PAPERS_DIR  # noqa: E402 - results/papers in a clone, package data when installed


def paper_numbers(name: str | None = None, papers_dir: str | Path | None = None) -> pd.DataFrame:
    """The numbers the papers report (``results/papers/*.csv``), optionally one file (``flowmm_table1``)."""
    d = Path(papers_dir) if papers_dir else PAPERS_DIR
    files = [d / f"{name}.csv"] if name else sorted(d.glob("*.csv"))
    frames = [pd.read_csv(f, dtype=str, keep_default_na=False) for f in files if f.is_file()]
    if not frames:
        raise FileNotFoundError(f"no paper numbers {name or '*'} under {d}")
    df = pd.concat(frames, ignore_index=True)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    df["budget"] = pd.to_numeric(df["budget"], errors="coerce")
    return df


def beside_paper(points: pd.DataFrame, avg: pd.DataFrame | None, paper: pd.DataFrame,
                 paper_model: str | None = None, digits: int = 2) -> pd.DataFrame:
    """Our score next to the paper's, per method × budget × task: cells ``ours ± ci (paper)``.

    Columns are the paper's tasks (its own labels); ours are matched on ``task_key`` (``a|b`` lists
    alternatives, e.g. ``librispeech_long|librispeech``) and rows on ``method_key``. ``paper_model`` picks which
    of the paper's models to show (its first one by default; at smoke scale our model is a tiny stand-in, so the
    numbers only line up in shape).
    """
    pp = paper[paper["metric_kind"] == "score"] if "metric_kind" in paper else paper
    if paper_model is None and len(pp):
        paper_model = pp["model"].iloc[0]
    pp = pp[(pp["model"] == paper_model) & (pp["method_key"] != "")]
    cols = list(dict.fromkeys(zip(pp["task"], pp["task_key"])))
    ours = collapse_full(points) if points is not None and not points.empty else pd.DataFrame()
    ours_avg = collapse_full(avg) if avg is not None and not avg.empty else pd.DataFrame()
    rows = []
    keys = list(dict.fromkeys(zip(pp["method_key"], pp["budget"])))
    if not ours.empty:
        keys += [k for k in dict.fromkeys(zip(ours["method"], ours["budget"])) if k not in keys
                 and not (k[0] == "full" and any(m == "full" for m, _ in keys))]
    order = method_order([m for m, _ in keys])
    for method, budget in sorted(keys, key=lambda k: (order.index(k[0]), budget_sort_key(k[1]))):
        row = {"method": method, "budget": "–" if method == "full" else budget_str(budget)}
        for label, tkey in cols:
            paper_v = pp[(pp["method_key"] == method) & (pp["task_key"] == tkey)
                         & (same_budget(pp["budget"], budget) | (method == "full"))]["value"]
            pv = f"{paper_v.iloc[0]:.{digits}f}" if len(paper_v) and not math.isnan(paper_v.iloc[0]) else "–"
            is_avg = tkey == "Avg"
            src = ours_avg if is_avg else ours
            ov = "–"
            if not src.empty and not (tkey.startswith("Avg") and not is_avg):  # e.g. an average over budgets
                sel = src[(src["method"] == method) & ((src["budget"] == budget) | (method == "full"))]
                if not is_avg:
                    sel = sel[sel["task"].isin(tkey.split("|"))]
                if len(sel):
                    r = sel.iloc[0]
                    ov = fmt(r["score_mean"], r["score_lo"], r["score_hi"], digits)
            row[label] = f"{ov} ({pv})"
        rows.append(row)
    return pd.DataFrame(rows)


def paper_table(paper: pd.DataFrame, kind: str = "score", digits: int = 2) -> pd.DataFrame:
    """The paper's numbers as printed: rows (model, method, budget), columns its tasks in the paper's order."""
    pp = paper[paper["metric_kind"] == kind] if "metric_kind" in paper else paper
    if pp.empty:
        return pd.DataFrame()
    tasks = list(dict.fromkeys(pp["task"]))
    rows = []
    for (model, method, budget), g in pp.groupby(["model", "method", "budget"], sort=False, dropna=False):
        row = {"model": model, "method": method, "budget": "–" if (isinstance(budget, float) and math.isnan(budget))
               or method == "Full" else budget_str(budget)}
        vals = dict(zip(g["task"], g["value"]))
        for t in tasks:
            v = vals.get(t)
            row[t] = "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"
        rows.append(row)
    return pd.DataFrame(rows)


def efficiency_beside(points: pd.DataFrame, paper: pd.DataFrame | None = None, digits: int = 2) -> pd.DataFrame:
    """KV memory kept and decode latency per (model, method, budget), ours (mean over the tasks' samples) beside
    the paper's efficiency table where it has one (``kv_gib``, ``decode_ms_per_token``)."""
    rows = []
    p = collapse_full(points) if points is not None and not points.empty else pd.DataFrame()
    eff = paper[(paper["metric_kind"] == "efficiency") & paper["metric"].isin(["kv_gib", "decode_ms_per_token"])] \
        if paper is not None and "metric_kind" in paper else pd.DataFrame(columns=["method_key", "budget", "metric",
                                                                                      "value"])
    keys = list(dict.fromkeys(zip(p["method"], p["budget"]))) if not p.empty else []
    keys += [k for k in dict.fromkeys(zip(eff["method_key"], eff["budget"])) if k not in keys and k[0]]
    order = method_order([m for m, _ in keys])
    for method, budget in sorted(keys, key=lambda k: (order.index(k[0]), budget_sort_key(k[1]))):
        row = {"method": method, "budget": "–" if method == "full" else budget_str(budget)}
        sel = p[(p["method"] == method) & (p["budget"] == budget)] if not p.empty else p
        if len(sel):
            w = sel["score_n"].clip(lower=1)
            kv = float(np.average(sel["kv_bytes_kept"].fillna(0), weights=w))
            dec = float(np.average(sel["decode_s_per_token"].fillna(0), weights=w))
            row["KV kept, ours (MiB)"] = f"{kv / 2**20:.{digits + 1}f}"
            row["decode ms/token, ours"] = f"{dec * 1e3:.{digits}f}"
            row["kept ratio, ours"] = f"{float(np.average(sel['kept_ratio'].fillna(0), weights=w)):.3f}"
        else:
            row["KV kept, ours (MiB)"] = row["decode ms/token, ours"] = row["kept ratio, ours"] = "–"
        pe = eff[(eff["method_key"] == method) & ((eff["budget"] == budget) | (method == "full"))]
        for metric, label in [("kv_gib", "KV, paper (GiB)"), ("decode_ms_per_token", "decode ms/token, paper")]:
            v = pe[pe["metric"] == metric]["value"]
            row[label] = f"{v.iloc[0]:.{digits}f}" if len(v) and not math.isnan(v.iloc[0]) else "–"
        rows.append(row)
    return pd.DataFrame(rows)


"""Points: one row per (context, task, method, hyper-parameters, budget) with bootstrap intervals, the paired
difference against the full cache of the same context, and efficiency means (with intervals for latency)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from avkv import stats

# ------------------------------------------------------------------------------------------------ aggregating
#: what makes two points different: a point never pools samples across these (n and the context are in the key)
POINT_KEYS = ["experiment", "model", "dataset", "table_id", "context_id", "limit", "compress_at", "task", "method",
              "variant", "budget"]


def valid_rows(df: pd.DataFrame) -> pd.DataFrame:
    ok = df["sample_id"].notna() & (df["error"].isna() | (df["error"].astype(str) == ""))
    return df[ok]


def keyed(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    d = df.copy()
    for c in cols:
        if c not in d:
            d[c] = None
        if d[c].dtype == object or c in ("experiment", "variant", "task", "limit", "compress_at", "table_id"):
            d[c] = d[c].fillna("")
    d["budget"] = d["budget"].fillna(-1.0)  # budget_tokens runs: label them by tokens below
    if "budget_tokens" in d:
        tok = d["budget_tokens"].notna() & (d["budget"] < 0)
        d.loc[tok, "budget"] = d.loc[tok, "budget_tokens"]
    return d


def _is_corpus(g: pd.DataFrame) -> bool:
    """ASR-style samples carry (errors, reference words): score them at corpus level, as the papers do."""
    return ("errors" in g and "ref_words" in g and len(g) > 0
            and g["errors"].notna().all() and g["ref_words"].notna().all())


def _values(g: pd.DataFrame, corpus: bool, scale: float) -> dict:
    if corpus:
        return {sid: (float(e), float(w)) for sid, e, w in zip(g["sample_id"], g["errors"], g["ref_words"])}
    return {sid: float(s) * scale for sid, s in zip(g["sample_id"], g["score"])}


def _estimate(g: pd.DataFrame, corpus: bool, scale: float, n_boot: int, strata=None) -> stats.Estimate:
    if corpus:
        return stats.bootstrap_corpus(g["errors"], g["ref_words"], strata=strata, n_boot=n_boot)
    return stats.bootstrap_mean(g["score"] * scale, strata=strata, n_boot=n_boot)


def full_reference(df: pd.DataFrame) -> dict:
    """(context_id, task) → the full-cache samples of that context (all budgets pooled: full ignores it)."""
    ref: dict = {}
    v = valid_rows(df)
    for (ctx, task), g in v[v["method"] == "full"].groupby(["context_id", "task"], dropna=False):
        ref[(ctx, task)] = g.drop_duplicates("sample_id", keep="last")
    return ref


def aggregate(df: pd.DataFrame, scale: float = 100.0, n_boot: int = stats.N_BOOT) -> pd.DataFrame:
    """One row per grid point and task: score with bootstrap CI, paired Δ vs full, efficiency means.

    The score is the mean per-sample score × ``scale``, or, for ASR samples (``errors``/``ref_words``), the
    corpus-level ``100 − WER`` clipped at 0 (AudioKV's convention; ``wer`` is reported beside it).
    """
    if df.empty:
        return pd.DataFrame()
    d = keyed(df, POINT_KEYS)
    ref = full_reference(d)
    rows = []
    for key, g in d.groupby(POINT_KEYS, dropna=False, sort=False):
        row = dict(zip(POINT_KEYS, key))
        valid = valid_rows(g)
        corpus = _is_corpus(valid)
        row.update(_estimate(valid, corpus, scale, n_boot).as_dict("score_"))
        row["wer"] = (100.0 * valid["errors"].sum() / max(valid["ref_words"].sum(), 1e-12)) if corpus \
            else float("nan")
        full = ref.get((row["context_id"], row["task"]))
        if full is not None and row["method"] != "full":
            diff = stats.paired_difference(_values(valid, corpus, scale), _values(full, corpus, scale),
                                           n_boot=n_boot)
        elif full is not None:
            diff = stats.Estimate(0.0, 0.0, 0.0, len(valid))
        else:
            diff = stats.NAN
        row.update(diff.as_dict("diff_"))
        row["n_err"] = int((g["sample_id"].notna() & ~g.index.isin(valid.index)).sum())
        for c in ["kept_ratio", "kv_bytes_full", "kv_bytes_kept", "prefill_s", "decode_s_per_token", "new_tokens"]:
            row[c] = float(valid[c].mean()) if c in valid and valid[c].notna().any() else float("nan")
        row["peak_mem_bytes"] = float(valid["peak_mem_bytes"].max()) if valid["peak_mem_bytes"].notna().any() \
            else float("nan")
        for c in ("decode_s_per_token", "prefill_s"):           # latency with its bootstrap interval
            v = valid[c].dropna() if c in valid else pd.Series(dtype=float)
            est = stats.bootstrap_mean(v, n_boot=n_boot) if len(v) else stats.NAN
            row[f"{c}_lo"], row[f"{c}_hi"] = est.lo, est.hi
        row["metric"] = next((m for m in g.get("metric", pd.Series(dtype=object)) if isinstance(m, str)), None)
        row.update(budget_held_of(valid, row["method"], row["budget"]))
        shards = g.drop_duplicates("run_dir")
        row["runs"] = len(shards)
        row["shards_seen"] = int(shards["shard"].nunique())
        row["num_shards"] = int(shards["num_shards"].max())
        row["complete"] = bool(shards["complete"].all()) and row["shards_seen"] >= row["num_shards"]
        for c in ("paper", "paper_model"):
            row[c] = next((p for p in g.get(c, pd.Series(dtype=object)) if isinstance(p, str)), None)
        rows.append(row)
    return pd.DataFrame(rows)


def budget_held_of(valid: pd.DataFrame, method: str, budget: float) -> dict:
    """What a point's samples held: the mean ``budget_achieved`` (bytes held / full; older records: the same from
    ``kv_bytes_kept``/``kv_bytes_full``) and whether each sample held its budget (``budget_held``; older records:
    entries and bytes within ±1 % of the budget)."""
    if valid.empty:
        return {"budget_achieved": float("nan"), "budget_held": True}
    has = lambda c: c in valid and valid[c].notna().all()
    ach = valid["budget_achieved"] if has("budget_achieved") else valid["kv_bytes_kept"] / valid["kv_bytes_full"]
    out = {"budget_achieved": float(ach.mean()), "budget_held": True}
    if method == "full":
        return out
    if has("budget_held"):
        out["budget_held"] = bool(valid["budget_held"].astype(bool).all())
    elif 0 < budget <= 1:
        tol = 0.01 * budget + (1.0 / valid["n_prompt"] if has("n_prompt") else 0.0)
        out["budget_held"] = bool((((valid["kept_ratio"] - budget).abs() <= tol)
                                   & ((ach - budget).abs() <= tol)).all())
    return out


def average_over_tasks(df: pd.DataFrame, scale: float = 100.0, n_boot: int = stats.N_BOOT) -> pd.DataFrame:
    """The papers' ``Avg`` column: mean of per-task scores per (model, method, budget), stratified bootstrap.

    The paired ``Δ Full`` uses only samples both runs answered, task by task.
    """
    if df.empty:
        return pd.DataFrame()
    d = valid_rows(keyed(df, POINT_KEYS))
    ref = full_reference(d)
    keys = [k for k in POINT_KEYS if k != "task"]
    rows = []
    for key, g in d.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, key))
        corpus = _is_corpus(g)
        row.update(_estimate(g, corpus, scale, n_boot, strata=g["task"]).as_dict("score_"))
        a, b, strata = {}, {}, {}
        for task, gt in g.groupby("task"):
            full = ref.get((row["context_id"], task))
            if full is None:
                continue
            fa = _values(full, corpus, scale)
            for sid, v in _values(gt, corpus, scale).items():
                if sid in fa:
                    a[(task, sid)], b[(task, sid)], strata[(task, sid)] = v, fa[sid], task
        if row["method"] == "full":
            diff = stats.Estimate(0.0, 0.0, 0.0, len(g))
        else:
            diff = stats.paired_difference(a, b, strata=strata, n_boot=n_boot)
        row.update(diff.as_dict("diff_"))
        row["tasks"] = int(g["task"].nunique())
        rows.append(row)
    return pd.DataFrame(rows)


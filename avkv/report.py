"""Collect run directories into one table, print the papers' tables with confidence intervals, plot budget curves.

Usage (see ``docs/sweeps.md``)::

    avkv report runs/ --out reports/flowmm           # or: python -m avkv.report runs/ --out ...
    avkv report runs/ --paper flowmm_table1           # our numbers beside the paper's
    avkv missing experiment=flowmm_table1 smoke=tiny   # grid points not yet complete (see avkv.grid)

What it reads is the results store (``avkv/results.py``): every directory holding a ``samples.jsonl`` (one JSON line
per finished sample) next to its resolved ``config.yaml``; ``summary.json`` is written when a run completes.
Nothing is read from W&B: the files are the ground truth.

* **One long table.** Every sample of every run becomes a row with the run's coordinates (experiment, model,
  method, budget, dataset, task, shard) and the sample's fields (nested dicts such as ``kept_by_modality`` are
  flattened to ``kept_by_modality.video``). Shards of one grid point (``shard``/``num_shards``) have their own run
  directories and are merged here; a sample id seen twice (a rerun, an overlapping shard) is kept once, the last
  error-free record winning. Written as ``samples.parquet`` and ``samples.csv``.
* **Points.** One row per (context, task, method, hyper-parameters, budget): the mean score with a bootstrap 95%
  interval, the paired difference against the full cache on the same samples (with its own interval), kept
  ratio, KV bytes, prefill and decode time, peak memory, error count, and whether every shard completed.
  Failed samples (``error`` set) are excluded from means and counted in ``n_err``.
* **Tables.** Rows (model, method, budget), columns the tasks plus ``Avg`` (the mean of task means, stratified
  bootstrap) and ``Δ Full`` (paired, on the same average); Markdown and LaTeX. Scores are multiplied by
  ``--scale`` (100 by default: accuracy and ROUGE-L in percent, as the papers print them).
* **Plots.** Score vs budget per method (the full cache as a dashed line), KV memory vs budget, decode latency
  vs budget; one PNG per (model, dataset). Each method is placed at the ratio of the KV cache it really held
  (``budget_achieved``), not at its nominal budget.
* **Budgets held.** Every point says what it held (``budget_achieved``: the fraction of the full cache's bytes) and
  whether every sample held its budget (``budget_held``: entries and bytes within ±1 %, the engine's rule). In the
  tables a point that did not is listed after the ones that did, its budget cell saying what it held.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from avkv import stats

SAMPLES = "samples.jsonl"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
META = "meta.json"

SHARD_KEYS = ("shard", "num_shards")
#: where a dataset config may name its sub-task (MileBench dataset, MVBench task, ...)
TASK_KEYS = ("task", "subset", "subtask", "split_task")
SKIP_DIRS = {".submitit", "wandb", ".hydra", "__pycache__", ".git"}

#: the order methods are listed in when a preset gives none: reference first, then baselines, then papers' methods
DEFAULT_METHOD_ORDER = [
    "full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "knorm", "tova", "observed_attention",
    "keydiff", "lookm", "fastv", "d2o", "kvmerge",
    "acckv", "purekv", "flowmm", "madakv", "audiokv",
    "expected_attention", "lagkv", "cur", "compactor", "finch", "simlayerkv", "chunkkv", "criticalkv", "criticaladakv",
    "block", "chunk", "composed", "per_layer_compression", "key_rerotation", "decoding",
]

SAMPLE_NUMERIC = ["score", "kept_ratio", "kv_bytes_full", "kv_bytes_kept", "prefill_s", "decode_s_per_token",
                  "new_tokens", "peak_mem_bytes", "errors", "ref_words", "budget_achieved", "budget_target"]


# ------------------------------------------------------------------------------------------------ reading
def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory under ``paths`` that holds a ``samples.jsonl`` or a ``config.yaml`` + ``summary.json``."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            continue
        if _is_run(p):
            found.append(p)
            continue
        for d in sorted(x for x in p.rglob("*") if x.is_dir()):
            if any(part in SKIP_DIRS for part in d.relative_to(p).parts):
                continue
            if _is_run(d):
                found.append(d)
    return sorted(set(found))


def _is_run(d: Path) -> bool:
    return (d / SAMPLES).is_file() or ((d / CONFIG).is_file() and (d / SUMMARY).is_file())


def read_samples(path: Path) -> list[dict]:
    """Sample records of a ``samples.jsonl``, as the results store reads them (``avkv.results.read_records``):
    one per id, the last line written for an id wins (a failed sample rerun with ``resume.retry_failed``); a torn
    last line is ignored, lines that are not records with an id are reported and skipped."""
    from avkv.results import read_records

    return read_records(path)


def load_config(run_dir: Path) -> dict:
    p = run_dir / CONFIG
    if not p.is_file():
        return {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(p)
    return OmegaConf.to_container(cfg, resolve=False)  # the store writes it resolved already


def _get(d: Any, dotted: str, default=None):
    cur = d
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return default
    return cur


def _name_of(node: Any) -> str | None:
    """A group's option name: ``name`` / ``id`` field, else the class name of ``_target_``, else a plain string."""
    if node is None:
        return None
    if isinstance(node, str):
        return node
    if isinstance(node, dict):
        for k in ("name", "id", "key"):
            if isinstance(node.get(k), str):
                return node[k]
        t = node.get("_target_")
        if isinstance(t, str):
            return t.rsplit(".", 1)[-1].lower()
    return None


def describe(cfg: dict) -> dict:
    """The coordinates of a run in a grid, read from its resolved config (tolerant of where keys live)."""
    dataset = cfg.get("dataset")
    task = None
    if isinstance(dataset, dict):
        for k in TASK_KEYS:
            if dataset.get(k) not in (None, "", []):
                task = dataset[k]
                break
    if isinstance(task, list):
        task = ",".join(map(str, task))
    budget = cfg.get("budget", _get(cfg, "method.budget"))
    budget_tokens = cfg.get("budget_tokens", _get(cfg, "method.budget_tokens"))
    if isinstance(budget, dict):  # {mode: ratio|tokens, value}
        if budget.get("mode") == "tokens":
            budget_tokens, budget = budget.get("value"), None
        else:
            budget = budget.get("value")
    method = _label(cfg, "method")
    grid = cfg.get("grid") if isinstance(cfg.get("grid"), dict) else {}
    experiment = (grid.get("name") or cfg.get("experiment_name") or _get(cfg, "logger.group")
                  or (cfg.get("experiment") if isinstance(cfg.get("experiment"), str) else None))
    return {
        "experiment": experiment,
        "paper": grid.get("paper"),
        # a preset sweeping several of the paper's models maps each model config to the paper's name for it
        "paper_model": (grid.get("paper_models") or {}).get(_label(cfg, "model")) or grid.get("paper_model"),
        "model": _label(cfg, "model"),
        "method": method,
        "budget": 1.0 if method == "full" and budget is None else _float(budget),
        "budget_tokens": _float(budget_tokens),
        "dataset": _label(cfg, "dataset"),
        "task": task,
        "shard": int(cfg.get("shard", 0) or 0),
        "num_shards": int(cfg.get("num_shards", 1) or 1),
        "limit": cfg.get("limit", _get(cfg, "dataset.limit")),
    }


def _label(cfg: dict, group: str) -> str | None:
    """``<group>_name`` as the results store records it (unless a placeholder), else the group's own name."""
    name = cfg.get(f"{group}_name")
    if isinstance(name, str) and name and name != group:
        return name
    return _name_of(cfg.get(group))


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _strip(cfg: dict, drop: Iterable[str]) -> dict:
    """A deep copy of ``cfg`` without the dotted keys in ``drop``."""
    out = json.loads(json.dumps(cfg, default=str))
    for dotted in drop:
        parts = dotted.split(".")
        cur = out
        for p in parts[:-1]:
            cur = cur.get(p) if isinstance(cur, dict) else None
            if cur is None:
                break
        if isinstance(cur, dict):
            cur.pop(parts[-1], None)
    return out


def identities(cfg: dict) -> dict:
    """Hashes that group runs.

    * ``point_id``: the grid point's identity as the results store defines it (``avkv.results.point_hash``: the
      run hash less the shard keys); the shards of one grid point share it.
    * ``context_id``: ``point_id`` less method, budget and sub-task: runs that answer the same questions with the
      same model and settings, so the full cache of one context is the reference for every method in it.
    * ``variant``: the method's hyper-parameters (its config less its name), to tell two settings of one method
      apart in a table.
    """
    from avkv.results import identity_core, point_hash

    point = point_hash(cfg)[:12]
    base = {k: v for k, v in identity_core(cfg).items() if k not in SHARD_KEYS}
    ctx = _strip(base, ["method", "method_name", "budget", "budget_tokens", *(f"dataset.{k}" for k in TASK_KEYS)])
    method = cfg.get("method") if isinstance(cfg.get("method"), dict) else {}
    variant = _hash(_strip(method, ["name", "budget", "budget_tokens"])) if method else ""
    return {"point_id": point, "context_id": _hash(ctx), "variant": variant}


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    cfg = load_config(run_dir)
    summary = _read_json(run_dir / SUMMARY)
    info = {"run_dir": str(run_dir), "run_id": run_dir.name, **describe(cfg), **identities(cfg),
            "complete": bool(summary) and summary.get("complete", True) is not False}
    if isinstance(summary, dict):
        for k in ("metric", "higher_is_better"):
            if k in summary:
                info[k] = summary[k]
    return info, read_samples(run_dir / SAMPLES)


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _flatten(rec: dict) -> dict:
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()):
            for kk, vv in v.items():
                out[f"{k}.{kk}"] = vv
        elif isinstance(v, (dict, list)):
            out[k] = json.dumps(v, sort_keys=True, default=str)
        else:
            out[k] = v
    return out


RUN_COLUMNS = ["run_dir", "run_id", "experiment", "paper", "paper_model", "model", "method", "budget", "budget_tokens", "dataset",
               "task", "shard", "num_shards", "limit", "point_id", "context_id", "variant", "complete"]


def collect(paths: Iterable[str | Path]) -> pd.DataFrame:
    """All samples of all runs under ``paths`` as one DataFrame (one row per sample, shards merged)."""
    rows = []
    for d in find_runs(paths):
        info, samples = load_run(d)
        if not samples:  # a run that has not finished its first sample still shows as a point (n=0)
            rows.append({**info, "sample_id": None})
        for rec in samples:
            flat = {(f"sample_{k}" if k in RUN_COLUMNS else k): v for k, v in _flatten(rec).items()}
            row = {**info, **flat}
            # a multi-task run labels each sample: MVBench ``task``, MileBench ``dataset`` (one of its 29)
            label = rec.get("task") if rec.get("task") not in (None, "") else rec.get("dataset")
            if isinstance(label, str) and label:
                row["task"] = label
            row["sample_id"] = None if rec.get("sample_id") is None else str(rec["sample_id"])
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*RUN_COLUMNS, "sample_id", *SAMPLE_NUMERIC, "error"])
    df = pd.DataFrame(rows)
    for c in [*SAMPLE_NUMERIC, "budget", "budget_tokens"]:
        if c not in df:
            df[c] = np.nan
        df[c] = pd.to_numeric(df[c], errors="coerce")
    if "error" not in df:
        df["error"] = None
    df["task"] = df["task"].where(df["task"].notna(), df["dataset"])
    return dedupe(df)


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (point, task, sample id): shards merged, repeated samples kept once (last error-free wins)."""
    has_id = df["sample_id"].notna()
    ok = df["error"].isna() | (df["error"].astype(str) == "")
    d = df[has_id].assign(_ok=ok[has_id].astype(int), _order=np.arange(int(has_id.sum())))
    d = d.sort_values(["_ok", "_order"]).drop_duplicates(["point_id", "task", "sample_id"], keep="last")
    d = d.sort_values("_order").drop(columns=["_ok", "_order"])
    # points with no sample yet keep one placeholder row so they are listed as incomplete
    empty = df[~has_id & ~df["point_id"].isin(d["point_id"])].drop_duplicates("point_id")
    return pd.concat([d, empty], ignore_index=True)


def write_samples(df: pd.DataFrame, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "samples.csv"]
    df.to_csv(paths[0], index=False)
    try:
        obj = df.copy()
        for c in obj.columns:  # parquet wants one type per column
            if obj[c].dtype == object:
                obj[c] = obj[c].map(lambda x: None if x is None or (isinstance(x, float) and math.isnan(x))
                                    else str(x))
        obj.to_parquet(out / "samples.parquet", index=False)
        paths.append(out / "samples.parquet")
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        pass
    return paths


def read_table(path: str | Path) -> pd.DataFrame:
    """Read back ``samples.parquet`` / ``samples.csv`` (what notebooks start from)."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.parquet" if (path / "samples.parquet").is_file() else path / "samples.csv"
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"sample_id": str})
    for c in [*SAMPLE_NUMERIC, "budget", "budget_tokens"]:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


# ------------------------------------------------------------------------------------------------ aggregating
POINT_KEYS = ["experiment", "model", "dataset", "context_id", "task", "method", "variant", "budget"]


def _valid(df: pd.DataFrame) -> pd.DataFrame:
    ok = df["sample_id"].notna() & (df["error"].isna() | (df["error"].astype(str) == ""))
    return df[ok]


def _key(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    d = df.copy()
    for c in cols:
        if c not in d:
            d[c] = None
        if d[c].dtype == object or c in ("experiment", "variant", "task"):
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
    v = _valid(df)
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
    d = _key(df, POINT_KEYS)
    ref = full_reference(d)
    rows = []
    for key, g in d.groupby(POINT_KEYS, dropna=False, sort=False):
        row = dict(zip(POINT_KEYS, key))
        valid = _valid(g)
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
        row.update(_budget_held(valid, row["method"], row["budget"]))
        shards = g.drop_duplicates("run_dir")
        row["runs"] = len(shards)
        row["shards_seen"] = int(shards["shard"].nunique())
        row["num_shards"] = int(shards["num_shards"].max())
        row["complete"] = bool(shards["complete"].all()) and row["shards_seen"] >= row["num_shards"]
        for c in ("paper", "paper_model"):
            row[c] = next((p for p in g.get(c, pd.Series(dtype=object)) if isinstance(p, str)), None)
        rows.append(row)
    return pd.DataFrame(rows)


def _budget_held(valid: pd.DataFrame, method: str, budget: float) -> dict:
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
    d = _valid(_key(df, POINT_KEYS))
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


# ------------------------------------------------------------------------------------------------ tables
def method_order(methods: Iterable[str], preferred: Sequence[str] | None = None) -> list[str]:
    order = list(preferred or []) + [m for m in DEFAULT_METHOD_ORDER if m not in (preferred or [])]
    ms = list(dict.fromkeys(methods))
    return sorted(ms, key=lambda m: (order.index(m) if m in order else len(order), m))


def fmt(mean: float, lo: float, hi: float, digits: int = 2, latex: bool = False, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    pm = r"$\pm$" if latex else "±"
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if latex and m.startswith("-"):
        m = "$-$" + m[1:]
    half = (hi - lo) / 2 if not (math.isnan(lo) or math.isnan(hi)) else float("nan")
    if math.isnan(half):
        return m
    return f"{m} {pm} {half:.{digits}f}"


def wide_table(points: pd.DataFrame, avg: pd.DataFrame | None = None, methods: Sequence[str] | None = None,
               tasks: Sequence[str] | None = None, latex: bool = False, digits: int = 2) -> pd.DataFrame:
    """Rows (model, method, budget), columns tasks (+ Avg, Δ Full, KV held): ``mean ± half-width`` strings.

    The full cache appears once per model, whatever budget its runs carried. ``KV held`` is the fraction of the
    full cache's bytes the point really held; a point that did not hold its budget is listed after the model's
    other rows, its budget cell saying ``0.5 → held 0.36``.
    """
    if points.empty:
        return pd.DataFrame()
    p = _collapse_full(points)
    task_cols = list(tasks) if tasks else list(dict.fromkeys(p["task"]))
    task_cols = [t for t in task_cols if t in set(p["task"])]
    multi_variant = p.groupby(["model", "method", "budget"])["variant"].nunique().max() > 1
    order = method_order(p["method"], methods)
    rows = []
    a = _collapse_full(avg) if avg is not None and not avg.empty else None
    held = lambda g: "budget_held" not in g or bool(g["budget_held"].fillna(True).astype(bool).all())
    for (model, method, variant, budget), g in sorted(
            p.groupby(["model", "method", "variant", "budget"], dropna=False),
            key=lambda kv: (str(kv[0][0]), not held(kv[1]), order.index(kv[0][1]), _desc(kv[0][3]), str(kv[0][2]))):
        label = method + (f" [{variant[:6]}]" if multi_variant and variant else "")
        row = {"model": model, "method": label, "budget": "–" if method == "full" else _budget_str(budget)}
        ach = float(g["budget_achieved"].mean()) if "budget_achieved" in g else float("nan")
        if not held(g):
            row["budget"] += f" → held {ach:.2f}"
        by_task = {t: r for t, r in zip(g["task"], g.to_dict("records"))}
        for t in task_cols:
            r = by_task.get(t)
            row[t] = fmt(r["score_mean"], r["score_lo"], r["score_hi"], digits, latex) if r else "–"
        if a is not None and len(task_cols) > 1:
            ra = a[(a["model"] == model) & (a["method"] == method) & (a["variant"] == variant)
                   & (a["budget"] == budget)]
            if len(ra):
                r = ra.iloc[0]
                row["Avg"] = fmt(r["score_mean"], r["score_lo"], r["score_hi"], digits, latex)
                row["Δ Full"] = "–" if method == "full" else fmt(r["diff_mean"], r["diff_lo"], r["diff_hi"],
                                                                   digits, latex, signed=True)
        elif len(task_cols) == 1:
            r = by_task.get(task_cols[0])
            row["Δ Full"] = "–" if (method == "full" or r is None) else fmt(
                r["diff_mean"], r["diff_lo"], r["diff_hi"], digits, latex, signed=True)
        row["KV held"] = "–" if math.isnan(ach) else f"{ach:.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _same(col: pd.Series, b) -> pd.Series:
    """``col == b`` where NaN equals NaN (a paper's number over all its budgets)."""
    return (col == b) | (col.isna() & math.isnan(_num(b)))


def _desc(b) -> float:
    """Sort key: larger budgets first, unknown ones last."""
    v = _num(b)
    return math.inf if math.isnan(v) else -v


def _budget_str(b) -> str:
    b = _num(b)
    if math.isnan(b):
        return "all"  # a paper's average over its budgets
    if b < 0:
        return "?"
    if b > 1:
        return f"{int(b)} tok"
    return f"{b:g}"


def _collapse_full(p: pd.DataFrame) -> pd.DataFrame:
    """The full cache ignores the budget: keep one row per (model, context, task) for it (the largest n)."""
    if p is None or p.empty or "method" not in p:
        return p
    full = p[p["method"] == "full"]
    rest = p[p["method"] != "full"]
    keys = [k for k in ("model", "context_id", "task", "variant") if k in p]
    full = full.sort_values("score_n", ascending=False).drop_duplicates(keys).assign(budget=1.0)
    return pd.concat([full, rest], ignore_index=True)


def to_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "_no results_\n"
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in table.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(x) for x in r) + " |")
    return "\n".join(lines) + "\n"


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|")


def to_latex(table: pd.DataFrame, caption: str | None = None, label: str | None = None) -> str:
    if table.empty:
        return "% no results\n"
    cols = list(table.columns)
    esc = lambda s: (str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
                     .replace("Δ", r"$\Delta$").replace("–", "--"))
    out = [r"\begin{table}[t]", r"\centering", r"\small",
           r"\begin{tabular}{" + "l" * 3 + "r" * (len(cols) - 3) + "}", r"\toprule",
           " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    prev_model = None
    for r in table.itertuples(index=False):
        cells = [str(x) if "$" in str(x) else esc(x) for x in r]
        if prev_model is not None and r[0] != prev_model:
            out.append(r"\midrule")
        prev_model = r[0]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(r"\caption{" + esc(caption) + "}")
    if label:
        out.append(r"\label{" + label + "}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ plots
def plot_budget_curves(points: pd.DataFrame, out_dir: Path, avg: pd.DataFrame | None = None) -> list[Path]:
    """Per (model, dataset): score vs budget per method, KV memory vs budget, decode latency vs budget."""
    if points.empty:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    # one curve per (method, variant); the score is the task average when a dataset has several tasks
    src = avg if avg is not None and not avg.empty and points["task"].nunique() > 1 else points
    for (model, dataset), g in points.groupby(["model", "dataset"], dropna=False):
        s = src[(src["model"] == model) & (src["dataset"] == dataset)] if src is not points else g
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
            axes[2].plot(xe, ge["decode_s_per_token"] * 1e3, marker="o", label=method)
        full = s[s["method"] == "full"]
        if len(full):
            f = full.sort_values("score_n", ascending=False).iloc[0]
            axes[0].axhline(f["score_mean"], ls="--", color="k", label="full")
            fe = g[g["method"] == "full"]
            axes[1].axhline(fe["kv_bytes_kept"].mean() / div, ls="--", color="k", label="full")
            axes[2].axhline(fe["decode_s_per_token"].mean() * 1e3, ls="--", color="k", label="full")
        for ax, yl in zip(axes, ["score (mean ± 95% CI)", f"KV memory kept ({unit})", "decode latency (ms/token)"]):
            ax.set_xlabel("KV held (fraction of the full cache's bytes, as measured)")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{model} · {dataset}")
        fig.tight_layout()
        p = out_dir / f"{_safe(model)}__{_safe(dataset)}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _safe(s) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))


# ------------------------------------------------------------------------------------------------ papers
PAPERS_DIR = Path(__file__).resolve().parent.parent / "results" / "papers"


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
    ours = _collapse_full(points) if points is not None and not points.empty else pd.DataFrame()
    ours_avg = _collapse_full(avg) if avg is not None and not avg.empty else pd.DataFrame()
    rows = []
    keys = list(dict.fromkeys(zip(pp["method_key"], pp["budget"])))
    if not ours.empty:
        keys += [k for k in dict.fromkeys(zip(ours["method"], ours["budget"])) if k not in keys
                 and not (k[0] == "full" and any(m == "full" for m, _ in keys))]
    order = method_order([m for m, _ in keys])
    for method, budget in sorted(keys, key=lambda k: (order.index(k[0]), _desc(k[1]))):
        row = {"method": method, "budget": "–" if method == "full" else _budget_str(budget)}
        for label, tkey in cols:
            paper_v = pp[(pp["method_key"] == method) & (pp["task_key"] == tkey)
                         & (_same(pp["budget"], budget) | (method == "full"))]["value"]
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
               or method == "Full" else _budget_str(budget)}
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
    p = _collapse_full(points) if points is not None and not points.empty else pd.DataFrame()
    eff = paper[(paper["metric_kind"] == "efficiency") & paper["metric"].isin(["kv_gib", "decode_ms_per_token"])] \
        if paper is not None and "metric_kind" in paper else pd.DataFrame(columns=["method_key", "budget", "metric",
                                                                                      "value"])
    keys = list(dict.fromkeys(zip(p["method"], p["budget"]))) if not p.empty else []
    keys += [k for k in dict.fromkeys(zip(eff["method_key"], eff["budget"])) if k not in keys and k[0]]
    order = method_order([m for m, _ in keys])
    for method, budget in sorted(keys, key=lambda k: (order.index(k[0]), _desc(k[1]))):
        row = {"method": method, "budget": "–" if method == "full" else _budget_str(budget)}
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


# ------------------------------------------------------------------------------------------------ CLI
def build(paths: Sequence[str | Path], out: Path | None = None, scale: float = 100.0, paper: str | None = None,
          paper_model: str | None = None, n_boot: int = stats.N_BOOT, plots: bool = True,
          quiet: bool = False) -> dict:
    """The whole report: collect → points → tables (→ files under ``out``). Returns the frames and text."""
    df = collect(paths)
    points = aggregate(df, scale=scale, n_boot=n_boot)
    avg = average_over_tasks(df, scale=scale, n_boot=n_boot)
    res: dict[str, Any] = {"samples": df, "points": points, "avg": avg}
    if points.empty:
        res["markdown"] = "_no results found under " + ", ".join(map(str, paths)) + "_\n"
        if not quiet:
            print(res["markdown"])
        return res
    # which paper tables to print beside ours: the one asked for, else each paper the runs' presets name
    if paper is not None:
        sides = [(paper, paper_model, points, avg)]
    else:
        sides = []
        for p_name, pe in points[points["paper"].notna()].groupby("paper", sort=False) if "paper" in points else []:
            models = [m for m in pe["paper_model"].dropna().unique() if m] if "paper_model" in pe else []
            if paper_model or len(models) <= 1:
                ae = avg[avg["experiment"].isin(pe["experiment"].unique())] if not avg.empty else avg
                sides.append((p_name, paper_model or (models[0] if models else None), pe, ae))
                continue
            for m in models:                       # one table per paper model the runs stand for
                pm = pe[pe["paper_model"] == m]
                ae = avg[avg["experiment"].isin(pm["experiment"].unique()) & avg["model"].isin(pm["model"].unique())] \
                    if not avg.empty else avg
                sides.append((p_name, m, pm, ae))
    md_parts, tex_parts = [], []
    for exp, pe in points.groupby("experiment", sort=False):
        ae = avg[avg["experiment"] == exp] if not avg.empty else avg
        for ds, pd_ in pe.groupby("dataset", sort=False):
            ad = ae[ae["dataset"] == ds] if not ae.empty else ae
            title = f"{exp or 'runs'} · {ds}"
            md_parts.append(f"### {title}\n\n" + to_markdown(wide_table(pd_, ad)))
            tex_parts.append(to_latex(wide_table(pd_, ad, latex=True), caption=title,
                                      label=f"tab:{_safe(exp)}-{_safe(ds)}"))
    incomplete = points[~points["complete"]]
    if len(incomplete):
        md_parts.append("**Incomplete points** (rerun the same command to resume them):\n\n" + to_markdown(
            incomplete[["model", "method", "budget", "task", "score_n", "shards_seen", "num_shards"]]))
    for p_name, p_model, p_points, p_avg in sides:
        try:
            pn = paper_numbers(p_name)
        except FileNotFoundError as e:
            md_parts.append(f"_paper numbers not found: {e}_\n")
            continue
        side = beside_paper(p_points, p_avg, pn, paper_model=p_model)
        ref = ", ".join(sorted(set(pn["ref"])))
        shown = p_model or pn["model"].iloc[0]
        md_parts.append(f"### beside the paper ({p_name}: {ref}; paper model {shown}; cells: ours ± CI (paper))\n\n"
                        + to_markdown(side))
        several = sum(1 for s_ in sides if s_[0] == p_name) > 1
        res.setdefault("beside_paper", {})[f"{p_name} · {shown}" if several else p_name] = side
    res["markdown"] = "\n".join(md_parts)
    res["latex"] = "\n".join(tex_parts)
    if out is not None:
        out = Path(out)
        res["files"] = write_samples(df, out)
        points.to_csv(out / "points.csv", index=False)
        avg.to_csv(out / "avg.csv", index=False)
        (out / "table.md").write_text(res["markdown"])
        (out / "table.tex").write_text(res["latex"])
        res["files"] += [out / "points.csv", out / "avg.csv", out / "table.md", out / "table.tex"]
        if plots:
            res["plots"] = plot_budget_curves(points, out / "plots", avg)
            res["files"] += res["plots"]
    if not quiet:
        print(res["markdown"])
        if out is not None:
            print(f"wrote {out}/ (samples.parquet, samples.csv, points.csv, table.md, table.tex"
                  + (", plots/" if plots else "") + ")")
    return res


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("paths", nargs="*", default=["runs"], help="run directories or folders holding them")
    ap.add_argument("--out", "-o", type=Path, default=None, help="folder for tables, parquet/CSV and plots")
    ap.add_argument("--scale", type=float, default=100.0, help="multiply scores by this (default 100: percent)")
    ap.add_argument("--paper", default=None, help="paper numbers to show beside ours (results/papers/<name>.csv); "
                                                  "default: the paper named by the runs' preset")
    ap.add_argument("--paper-model", default=None, help="which of the paper's models to compare with")
    ap.add_argument("--n-boot", type=int, default=stats.N_BOOT, help="bootstrap replicates")
    ap.add_argument("--no-plots", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="avkv report", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    a = ap.parse_args(argv)
    build(a.paths, out=a.out, scale=a.scale, paper=a.paper, paper_model=a.paper_model, n_boot=a.n_boot,
          plots=not a.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reading the results store into one long table: run directories → one row per sample (shards merged).

File names, record reading and run identity come from :mod:`avkv.results` (the one results contract); this module
only finds run directories, reads their coordinates from the resolved config and flattens the records.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from avkv.identity import entry_name
from avkv.results import CONFIG, META, SAMPLES, SHARD_KEYS, SUMMARY  # noqa: F401 - the store's file names

#: where a dataset config may name its sub-task (MileBench dataset, MVBench task, ...)
TASK_KEYS = ("task", "subset", "subtask", "split_task")
SKIP_DIRS = {".submitit", "wandb", ".hydra", "__pycache__", ".git"}


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
    method = _label(cfg, "method")
    grid = cfg.get("grid") if isinstance(cfg.get("grid"), dict) else {}
    experiment = grid.get("name") or cfg.get("experiment_name")      # every composed config has experiment_name
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
        "limit": limit_label(_get(cfg, "dataset.limit"), _get(cfg, "dataset.limit_per_task")),
        "compress_at": cfg.get("compress_at"),
    }


def limit_label(limit: Any, per_task: Any = None) -> str:
    """How a run sampled its dataset, as a table shows it: ``all``, ``8``, ``2/task`` (or ``2/task, 8``)."""
    parts = [f"{int(per_task)}/task"] if isinstance(per_task, (int, float)) and per_task == per_task else []
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit == limit:
        parts.append(str(int(limit)))
    return ", ".join(parts) or "all"


def _label(cfg: dict, group: str) -> str | None:
    """``<group>_name`` as the results store records it (unless a placeholder), else the group's own name."""
    name = cfg.get(f"{group}_name")
    if isinstance(name, str) and name and name != group:
        return name
    return entry_name(cfg.get(group))


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
    * ``table_id``: ``context_id`` less the model: the points one table may hold (rows per model); two runs of
      one experiment with another ``dataset.limit``, ``compress_at`` or seed land in different tables.
    * ``variant``: the method's hyper-parameters (its config less its name), to tell two settings of one method
      apart in a table.
    """
    from avkv.results import identity_core, point_hash

    point = point_hash(cfg)[:12]
    base = {k: v for k, v in identity_core(cfg).items() if k not in SHARD_KEYS}
    ctx = _strip(base, ["method", "method_name", "budget", "budget_tokens", *(f"dataset.{k}" for k in TASK_KEYS)])
    method = cfg.get("method") if isinstance(cfg.get("method"), dict) else {}
    variant = _hash(_strip(method, ["name", "budget", "budget_tokens"])) if method else ""
    table = _strip(ctx, ["model", "model_name"])
    return {"point_id": point, "context_id": _hash(ctx), "table_id": _hash(table), "variant": variant}


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    cfg = load_config(run_dir)
    summary = _read_json(run_dir / SUMMARY)
    info = {"run_dir": str(run_dir), "run_id": run_dir.name, **describe(cfg), **identities(cfg),
            "complete": bool(summary) and summary.get("complete", True) is not False,
            "metric": _task_metric(cfg)}
    if isinstance(summary, dict):
        for k in ("metric", "higher_is_better"):
            if k in summary:
                info[k] = summary[k]
    return info, read_samples(run_dir / SAMPLES)


def _task_metric(cfg: dict) -> str | None:
    """The dataset's metric name (its task class's ``metric``), for a run that has no summary yet."""
    target = _get(cfg, "dataset._target_")
    if not isinstance(target, str):
        return None
    try:
        from hydra.utils import get_class
        return getattr(get_class(target), "metric", None)
    except Exception:  # noqa: BLE001 - a class that moved: the summary's metric, if any, is used instead
        return None


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


RUN_COLUMNS = ["run_dir", "run_id", "experiment", "paper", "paper_model", "model", "method", "budget", "budget_tokens",
               "dataset", "task", "shard", "num_shards", "limit", "compress_at", "point_id", "context_id", "table_id",
               "variant", "complete", "metric"]


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


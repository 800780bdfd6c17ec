"""One experiment = (model, method, budget, dataset) → a run directory of per-sample records and a summary.

Data flows one way: task → model adapter → engine + method → scorer → results store → tracker.

Order of a run: the config values are checked (``avkv.config.validate``), the run directory is locked (a second
process on the same grid point stops here, naming the holder), the dataset is read (zero samples is an error),
and only then the model loads.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from avkv import results
from avkv.config import CONFIG_DIR, ROOT, ConfigError, Problem, constructor_args, device_problem, instantiate, validate
from avkv.engine import Engine
from avkv.identity import entry_name
from avkv.launcher import LAUNCHER_ENV, follow_launcher, mark_launcher, process_start_time  # noqa: F401 - re-exported
from avkv.models.base import CheckpointMissing, UnsafeCheckpoint
from avkv.results import RunStore, efficiency_summary, environment_meta
from avkv.samples import (DEFAULT_MAX_NEW_TOKENS, batch_problem, batch_size, build_prompt,  # noqa: F401 - re-exported
                          require_batchable, run_batches, run_sample, sample_seed)
from avkv.tasks.base import DatasetError
from avkv.tracking import group_name, make_tracker

log = logging.getLogger("avkv")


def _make_hint(model_cfg: dict) -> str:
    if model_cfg.get("tiny_builder"):
        return "make assets  (or: python scripts/make_tiny_models.py)"
    hub = model_cfg.get("hub_id")
    return (f"download {hub} to a local folder and pass model.path=<folder>" if hub
            else "pass model.path=<a local checkpoint folder>")


def _inside(path: str | Path, folder: str | Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def ensure_tiny_checkpoint(cfg: DictConfig) -> bool:
    """Write the tiny random-weight checkpoint a ``tiny_*`` model config names when it is missing from its default
    place (``paths.models/<name>``; seconds, deterministic: the same bytes ``make assets`` writes). A checkpoint
    given elsewhere with ``model.path`` is never created. True when one was written."""
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    name, path = mcfg.get("name"), mcfg.get("path")
    conf = CONFIG_DIR / "model" / f"{name}.yaml"
    if not (mcfg.get("tiny_builder") and path and name and conf.is_file()) or (Path(path) / "config.json").exists():
        return False
    if Path(path).name != name or not _inside(path, cfg.paths.models):
        return False
    from avkv.models.tiny import ensure_tiny
    log.info("writing the tiny checkpoint %s to %s (random weights; once)", name, path)
    return ensure_tiny(conf, Path(path).parent)[1]


def ensure_fixture(cfg: DictConfig) -> bool:
    """Generate the dataset fixture a config points at when it is missing from ``paths.fixtures`` (the proxies'
    held-out sets and the tiny fixtures: deterministic, seconds; what ``make assets`` writes). A dataset root
    outside ``paths.fixtures`` is never created. True when one was written."""
    root = cfg.dataset.get("root")
    fixtures_root = OmegaConf.select(cfg, "paths.fixtures")
    if not root or not fixtures_root or Path(root).exists() or not _inside(root, fixtures_root):
        return False
    from avkv.tasks import fixtures
    name = Path(root).resolve().relative_to(Path(fixtures_root).resolve()).parts[0]
    if name not in fixtures.GENERATORS or fixtures.unavailable(name):
        return False
    log.info("generating the %s fixture under %s (once)", name, fixtures_root)
    fixtures.build(fixtures_root, only=[name])
    return True


def load_adapter(cfg: DictConfig):
    ensure_tiny_checkpoint(cfg)
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    try:
        return instantiate(cfg.model, device=cfg.device, make_hint=_make_hint(mcfg))
    except Exception as e:  # hydra wraps constructor errors; surface ours unchanged
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, (CheckpointMissing, UnsafeCheckpoint)):
            cause = cause.__cause__
        if isinstance(cause, (CheckpointMissing, UnsafeCheckpoint)):
            raise cause from None
        raise


def _group_name(cfg: DictConfig, group: str) -> str:
    """A config group entry's name (:func:`avkv.identity.entry_name`; never global Hydra state, so the same config
    gets the same name inside a Hydra app and in ``compose``), the group's own name when it has none."""
    return entry_name(cfg[group]) or group


def resolved(cfg: DictConfig) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True)
    d.pop("hydra", None)
    d["model_name"] = _group_name(cfg, "model")
    d["dataset_name"] = _group_name(cfg, "dataset")
    d["method_name"] = _group_name(cfg, "method")
    return d


def task_label(doc) -> str:
    """The sub-task a document belongs to (MVBench ``task``, MileBench ``dataset``), "" for a one-task dataset."""
    meta = getattr(doc, "meta", None) or {}
    return str(meta.get("task") or meta.get("dataset") or "")


def per_task(docs: list, n: int | None) -> list:
    """The first ``n`` documents of each sub-task (in the dataset's order); all of them when ``n`` is None."""
    if n is None:
        return list(docs)
    seen: dict[str, int] = {}
    out = []
    for d in docs:
        k = task_label(d)
        if seen.get(k, 0) < int(n):
            seen[k] = seen.get(k, 0) + 1
            out.append(d)
    return out


def load_task(cfg: DictConfig):
    """(task, documents) of a run. Without ``dataset.limit_per_task`` the loader applies ``dataset.limit``. With
    it, a dataset whose documents carry sub-tasks (MileBench, MVBench) keeps the first ``limit_per_task`` of each
    and ``limit`` is not applied (so every sub-task is there); a one-task dataset keeps the first ``limit``."""
    n = OmegaConf.select(cfg, "dataset.limit_per_task", default=None)
    if n is None:
        task = instantiate(cfg.dataset)
        return task, list(task.docs())
    limit = cfg.dataset.get("limit")
    task = instantiate(cfg.dataset, limit=None)
    docs = list(task.docs())
    if any(task_label(d) for d in docs):
        return task, per_task(docs, n)
    task.limit = limit
    return task, docs if limit is None else docs[:int(limit)]


def shard_docs(docs: list, shard: int = 0, num_shards: int = 1) -> list:
    """Shard ``shard`` of ``num_shards`` (round-robin over the dataset order, after ``limit``). Each shard is its
    own run directory (the keys are in the config hash); ``avkv report`` merges them back."""
    shard, num_shards = int(shard), int(num_shards)
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} num_shards={num_shards}: need 0 <= shard < num_shards")
    return docs[shard::num_shards]


def identity(cfg: DictConfig, method=None) -> tuple[dict, str, Path]:
    """(resolved config, run hash, run directory) of an experiment, as ``avkv.results`` defines them; one rule for
    ``run`` and ``avkv missing``."""
    res = resolved(cfg)
    method = method if method is not None else instantiate(cfg.method)
    res["method_name"] = getattr(method, "name", res["method_name"])
    return res, results.run_hash(res), results.run_dir(res)


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory ``run(cfg)`` writes (also used by ``avkv missing`` to check a grid without running it)."""
    return identity(cfg)[2]


def check_environment(cfg: DictConfig) -> None:
    """The config's values (:func:`avkv.config.validate`) and whether this torch can use its device."""
    validate(cfg)
    bad_device = device_problem(str(cfg.device))
    if bad_device is not None:
        raise ConfigError([bad_device])
    attn = str(OmegaConf.select(cfg, "model.attn_implementation", default="sdpa") or "sdpa")
    if attn != "sdpa":                              # eager / flash_attention_2: can this method run on it?
        from avkv.attention_support import attention_problem
        problem = attention_problem(instantiate(cfg.method), attn)
        if problem is not None:
            raise ConfigError([Problem("model.attn_implementation", attn, problem)])
    batch = batch_problem(cfg, instantiate(cfg.method))   # a method or model the batched decode cannot run
    if batch is not None:
        raise ConfigError([batch])
    if OmegaConf.select(cfg, "logger.name", default="none") == "wandb":
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError([Problem("logger", "wandb", "needs the wandb package: pip install 'avkv[wandb]' "
                                       "(or logger=none)")])


def setup_torch(cfg: DictConfig) -> None:
    """Threads, the global seed, and quiet transformers (what every run and the Python API do first)."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def make_engine(cfg: DictConfig, adapter, method) -> Engine:
    return Engine(adapter, method, budget=float(cfg.budget), budget_tokens=cfg.get("budget_tokens"),
                  compress_at=cfg.compress_at)


def run(cfg: DictConfig) -> dict:
    """Run (or resume) one experiment; returns the summary dict."""
    check_environment(cfg)                          # every bad value named, before anything is loaded
    setup_torch(cfg)
    method = instantiate(cfg.method)
    res, h, run_dir = identity(cfg, method)
    retry_failed = bool(OmegaConf.select(cfg, "resume.retry_failed", default=False))
    with RunStore(run_dir) as store:                # the run directory's one writer (RunLocked otherwise)
        follow_launcher()
        ensure_fixture(cfg)
        task, docs = load_task(cfg)
        docs = shard_docs(docs, cfg.get("shard", 0), cfg.get("num_shards", 1))
        if not docs:
            raise DatasetError(no_samples_message(cfg))
        adapter = load_adapter(cfg)
        engine = make_engine(cfg, adapter, method)
        bs = batch_size(cfg)
        require_batchable(engine, method, bs)
        store.prepare(OmegaConf.to_yaml(OmegaConf.create(results.stored_config(res))),
                      dict(environment_meta(ROOT, str(cfg.device), int(cfg.seed)), config_hash=h,
                           point_hash=results.point_hash(res), model=adapter.describe(), method=res["method_name"],
                           decode_policy=getattr(method, "decode_policy", "grow")))
        done = store.done_ids(retry_failed=retry_failed)
        tracker = make_tracker(dict(OmegaConf.to_container(cfg.logger, resolve=True),
                                    run_config=res, dir=str(Path(cfg.paths.runs) / "wandb")),
                               run_id=h[:32], name=run_dir.name,
                               tags=[res["model_name"], res["method_name"], res["dataset_name"],
                                     f"budget={cfg.budget}"],
                               group=group_name(cfg))
        todo = [d for d in docs if str(d.id) not in done]
        log.info("run dir %s: %d samples, %d done, %d to run%s", run_dir, len(docs), len(docs) - len(todo),
                 len(todo), " (failed ones again: resume.retry_failed)" if retry_failed else "")

        records = {str(r["sample_id"]): r for r in store.records()}
        bar = progress_bar(todo, enabled=bool(cfg.get("progress", True)), desc=res["method_name"])
        stream = ((run_sample(cfg, task, adapter, engine, doc) for doc in bar) if bs == 1
                  else run_batches(cfg, task, adapter, engine, bar, bs))
        for rec in stream:
            store.append(rec)
            tracker.log_sample(rec)
            records[rec["sample_id"]] = rec
            ok = [r for r in records.values() if r.get("error") is None]
            if ok and hasattr(bar, "set_postfix"):
                sc = [r["score"] for r in ok if r.get("score") is not None]
                bar.set_postfix(score=f"{sum(sc) / max(len(sc), 1):.3f}",
                                kept=f"{sum(r['kept_ratio'] for r in ok) / len(ok):.3f}",
                                failed=len(records) - len(ok))

        summary = summarize(results.stored_config(res), h, task, store.records(warn=True), run_dir)
        store.write_summary(summary)
        tracker.finish(summary, records=store.records())
    return dict(summary, run_dir=str(run_dir))     # the file holds it relative to the project; callers get it whole


def no_samples_message(cfg: DictConfig) -> str:
    d = cfg.dataset
    where = f"dataset {d.get('name') or d.get('_target_')} at {d.get('root')}"
    extra = []
    if d.get("limit") is not None:
        extra.append(f"dataset.limit={d.limit}")
    if d.get("limit_per_task") is not None:
        extra.append(f"dataset.limit_per_task={d.limit_per_task}")
    if int(cfg.get("num_shards", 1)) > 1:
        extra.append(f"shard={cfg.shard} of num_shards={cfg.num_shards}")
    return (f"{where} gives no samples" + (f" ({', '.join(extra)})" if extra else "")
            + ": nothing to run (an empty index file, or a filter that leaves nothing)")


def summarize(res: dict, h: str, task, records: list[dict], run_dir: Path) -> dict:
    agg = task.aggregate(records)
    eff = efficiency_summary(records)
    return {"config_hash": h, "run_dir": display_path(run_dir), "model": res["model_name"], "dataset": res["dataset_name"],
            "method": res["method_name"], "budget": res.get("budget"), "budget_tokens": res.get("budget_tokens"),
            "compress_at": res.get("compress_at"), "metric": task.metric, "score": agg.get(task.metric),
            "n": len(records), "n_failed": sum(1 for r in records if r.get("error")),
            "task": agg, **eff}


def display_path(path: str | Path) -> str:
    """``path`` relative to the project root when inside it (what committed summaries hold), else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def progress_bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="sample", dynamic_ncols=True)


def human_bytes(n: float | None) -> str:
    if n is None or n != n:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def human_seconds(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def format_summary(s: dict) -> str:
    """The end-of-run summary in human units, with where to go next (``avkv report``)."""
    pre = s.get("prefill_s") or {}
    dec = s.get("decode_s_per_token") or {}
    mem = s.get("peak_mem_bytes") or {}
    score = s.get("score")
    kept = s.get("kept_ratio_mean")
    by_mod = ", ".join(f"{m} {v:.0%}" for m, v in (s.get("kept_ratio_by_modality") or {}).items())
    runs_root = Path(str(s["run_dir"])).parent
    lines = [f"run: {display_path(s['run_dir'])}",
             f"  {s['model']} · {s['dataset']} · {s['method']} · budget {s['budget']}"
             + (f" ({s['budget_tokens']} tokens)" if s.get("budget_tokens") else "")
             + f" · compress_at {s['compress_at']}",
             f"  {s['metric']}: {'-' if score is None else f'{score:.3f}'} on {s['n']} samples"
             + (f", {s['n_failed']} failed" if s.get("n_failed") else "")
             + (f", {s['task'].get('n_unparsed')} unparsed" if (s.get("task") or {}).get("n_unparsed") else ""),
             f"  KV cache kept: {'-' if kept is None else f'{kept:.1%}'} of the prompt's entries, "
             f"{human_bytes(s.get('kv_bytes_kept_mean'))} of {human_bytes(s.get('kv_bytes_full_mean'))} per sample"
             + (f" (by modality: {by_mod})" if by_mod else ""),
             f"  time: prefill {human_seconds(pre.get('mean'))} (p90 {human_seconds(pre.get('p90'))}), "
             f"decode {human_seconds(dec.get('mean'))}/token; peak memory {human_bytes(mem.get('mean'))}"
             + (f" ({s['peak_mem_kind']})" if s.get("peak_mem_kind") else ""),
             f"tables and plots: avkv report {display_path(runs_root)} --out reports/   "
             "(pandas: avkv.report.collect([...]))"]
    return "\n".join(lines)

"""Results store: one run directory per grid point, keyed by a hash of what changes a sample's result.

    <runs>/<model>__<dataset>__<method>__b<budget>__<hash10>/
        config.yaml     resolved config
        meta.json       git commit, package versions, device, seed, host (and every resume)
        samples.jsonl   one JSON line per sample, appended and fsynced as it completes
        summary.json    aggregate task metrics + efficiency figures with spread
        run.lock        held (flock) by the one process writing the directory; names it (pid, host, start)

This module is the only owner of a run's **identity** (:func:`identity_core`, :func:`run_hash`,
:func:`point_hash`, :func:`run_name`), of the directory's files and of **reading its records**
(:func:`read_records`); ``run.py``, ``avkv missing`` and ``avkv report`` all ask it. Two modules of the contract
hold its mechanisms and are re-exported here: :mod:`avkv.records` (reading records, atomic writes) and
:mod:`avkv.run_lock` (the one-writer lock).

Identity: the resolved config less what does not change a sample's result: presentation and bookkeeping keys
(:data:`NOT_IDENTITY`: logger, paths, progress, where the run is written, how the grid was assembled —
``grid``/``experiment``/``smoke``/``experiment_name`` — and resume behaviour) and the descriptive keys of the
model/dataset/method groups (:data:`DESCRIPTIVE_KEYS`). ``batch_size`` enters only when it is not 1 (a batched run
has its own directory: its timing fields are the batch's; at 1 the identity is the one from before the key). A method that keeps the whole cache (``uses_budget =
False`` on its class: the full cache) has one identity whatever ``budget``/``budget_tokens`` say. Paths inside the
project (the checkout's ``.cache`` of tiny checkpoints and fixtures, the committed proxies) enter relative to the
project root, so two worktrees of the same code map a grid point to the same directory name; any other path enters
as given. The code version is not part of the identity (``meta.json`` records the commit of every start).

Writes are append-only or atomic: samples are appended one fsynced line at a time; a line torn by a kill is cut
off with one ``truncate`` (never a rewrite of the file); ``meta.json``, ``config.yaml`` and ``summary.json`` are
written to a temporary file and ``os.replace``d. A line that is not a JSON record with a ``sample_id``, and an
unreadable ``meta.json``, are reported and skipped, never fatal.

Re-running the same config resumes: a sample id already in ``samples.jsonl`` is skipped — unless it failed and
``resume.retry_failed`` is on, then it runs again and its new line supersedes the old one (the reader keeps the
last record per id, so every count is per id).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

from avkv.records import (ReadReport, atomic_write_text, is_failed, read_json_file, read_records,  # noqa: F401
                          tail_after_last_newline)
from avkv.run_lock import LOCK, RunLock, RunLocked, describe_holder, lock_holder  # noqa: F401 - re-exported

log = logging.getLogger("avkv")

SAMPLES = "samples.jsonl"
CONFIG = "config.yaml"
META = "meta.json"
SUMMARY = "summary.json"
# LOCK = "run.lock": avkv.run_lock's, imported above

#: top-level keys that never change a sample's result: presentation, where things are written, how the grid was
#: assembled, resume behaviour (excluded from the identity)
NOT_IDENTITY = ("hydra", "logger", "wandb", "paths", "progress", "run_dir", "notes", "experiment_name", "grid",
                "experiment", "smoke", "resume")
#: keys of the model/dataset/method groups that describe the entry and do not change what is computed
DESCRIPTIVE_KEYS = ("notes", "families", "hub_id", "tiny_builder")
#: identity keys that split one grid point into run directories (``point_hash`` leaves them out)
SHARD_KEYS = ("shard", "num_shards")
BUDGET_KEYS = ("budget", "budget_tokens")
PROJECT = "<project>"            # how a path inside the project root enters the identity


# ------------------------------------------------------------------------------------------------ identity
def uses_budget(cfg: Mapping) -> bool:
    """False for a method that keeps every entry (its class says ``uses_budget = False``: the full cache)."""
    method = cfg.get("method")
    target = method.get("_target_") if isinstance(method, Mapping) else None
    if isinstance(target, str):
        try:
            from hydra.utils import get_class
            return bool(getattr(get_class(target), "uses_budget", True))
        except Exception:  # noqa: BLE001 - an old config naming a class that moved: fall back to the name
            pass
    return cfg.get("method_name") != "full"


def _roots(cfg: Mapping) -> list[str]:
    roots = []
    paths = cfg.get("paths")
    if isinstance(paths, Mapping) and isinstance(paths.get("root"), str) and os.path.isabs(paths["root"]):
        roots.append(os.path.normpath(paths["root"]))
    from avkv.config import ROOT
    roots.append(os.path.normpath(str(ROOT)))
    return list(dict.fromkeys(roots))


def _portable(value: Any, roots: list[str]) -> Any:
    """Strings that are absolute paths inside a project root → ``<project>/<relative path>``; the rest as is."""
    if isinstance(value, Mapping):
        return {k: _portable(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v, roots) for v in value]
    if isinstance(value, str) and value.startswith(os.sep):
        norm = os.path.normpath(value)
        from avkv.config import PACKAGE           # the package's own files (committed proxies), clone or installed
        if norm.startswith(str(PACKAGE) + os.sep):
            return PROJECT + "/avkv/" + os.path.relpath(norm, str(PACKAGE)).replace(os.sep, "/")
        for r in roots:
            if norm == r:
                return PROJECT
            if norm.startswith(r.rstrip(os.sep) + os.sep):
                return PROJECT + "/" + os.path.relpath(norm, r).replace(os.sep, "/")
    return value


#: digests of the ``dataset.prompts`` of the datasets whose prompt text was code until it became config data (issue
#: 17: AVQA and the proxies' sets, AVSD, MUSIC-AVQA, MVBench, MileBench, LibriSpeech), each as it was in the code.
#: Those exact prompts stay out of the hash (code is not hashed), so their runs keep their identity, as before; an
#: edited prompt is hashed like any other key (``tests/test_store.py`` checks the committed configs hit this set)
PROMPTS_FROM_CODE = frozenset({
    "0919e78b8e07b02271055abc9fb5c0f907efac4f63fb34e5234375452cb64531",   # avqa, proxy_av/audio/video
    "f5798e140589cfcab0d30954076a6e1df77b41d2c68897523d5a69c2a401e92e",   # avsd
    "e69e30d85ba2332dc196fdb6689eb4ef04e68483c34b49d6e65b7caf3f6402ea",   # music_avqa
    "6735b4af9fee4c5e62fe6f8f446e8d3801e197cdb4f1fea47ea5b61f543f7baf",   # mvbench, mvbench_acckv
    "f6776858cc991cd374d308ab1e7947ad58174cacb33b2bf1fff63033247d46f3",   # milebench, milebench_flowmm
    "537cb5c885f58257d643067035936eeb823d4afd5d65972c2b9d7e8d0695745e",   # librispeech, librispeech_long(_fixture)
    # the same texts with the Gemma-3n family's entries added (no other family's text changed; gemma3n had no runs
    # before): a new family's entries in these configs would otherwise move every earlier run of the dataset
    "c5a123203c29c03b7d8ac30baf0e5a3831b9ad4c379cb2b06e68e22aadc4a28a",   # mvbench, mvbench_acckv + gemma3n: null
    "741eea4dc13f43cccafc165c41fb75ea07493f297043637d766c048ce3fe357b",   # milebench(_flowmm) + gemma3n: null
    "ebd408f760409fbede9d2bef9c69a6ab541b676cd60dc41a7480ce717bccbe00",   # librispeech(_long, _fixture) + gemma3n
})


def identity_core(cfg: Mapping) -> dict:
    """What a run's hash covers (see the module docstring): a plain dict, JSON-serialisable."""
    core = {k: v for k, v in cfg.items() if k not in NOT_IDENTITY}
    for group in ("model", "dataset", "method"):
        if isinstance(core.get(group), Mapping):
            core[group] = {k: v for k, v in core[group].items() if k not in DESCRIPTIVE_KEYS}
    if not uses_budget(cfg):
        for k in BUDGET_KEYS:
            core[k] = None
    if core.get("batch_size", 1) == 1:            # one sample at a time: the runs from before the key, as before
        core.pop("batch_size", None)
    if isinstance(core.get("dataset"), Mapping) and core["dataset"].get("limit_per_task", 0) is None:
        core["dataset"] = {k: v for k, v in core["dataset"].items() if k != "limit_per_task"}   # unset: as before
    if isinstance(core.get("dataset"), Mapping) and "prompts" in core["dataset"] \
            and _digest(core["dataset"]["prompts"]) in PROMPTS_FROM_CODE:        # the text the code held: as before
        core["dataset"] = {k: v for k, v in core["dataset"].items() if k != "prompts"}
    return _portable(json.loads(json.dumps(core, sort_keys=True, default=str)), _roots(cfg))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_hash(cfg: Mapping) -> str:
    """The hash naming a run directory (one per shard of a grid point)."""
    return _digest(identity_core(cfg))


def point_hash(cfg: Mapping) -> str:
    """The hash of a grid point: :func:`run_hash` without the shard keys (the shards of a point share it)."""
    return _digest({k: v for k, v in identity_core(cfg).items() if k not in SHARD_KEYS})


#: the name ``config_hash`` earlier code and W&B run ids use
config_hash = run_hash


def _slug(x: Any) -> str:
    s = str(x)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)[:40]


def run_name(cfg: Mapping, h: str | None = None) -> str:
    """``<model>__<dataset>__<method>__b<budget>__<hash10>``; the full cache is ``bfull`` whatever the budget."""
    h = h or run_hash(cfg)
    if uses_budget(cfg):
        budget = cfg.get("budget_tokens") or cfg.get("budget")
    else:
        budget = "full"
    return "__".join([_slug(cfg.get("model_name", "model")), _slug(cfg.get("dataset_name", "dataset")),
                      _slug(cfg.get("method_name", "method")), f"b{_slug(budget)}", h[:10]])


def run_dir(cfg: Mapping) -> Path:
    """Where a resolved config's run is written: ``run_dir`` if set, else ``<paths.runs>/<run_name>``."""
    if cfg.get("run_dir"):
        return Path(str(cfg["run_dir"]))
    return Path(str(cfg["paths"]["runs"])) / run_name(cfg)


def stored_config(cfg: Mapping) -> dict:
    """The config as ``config.yaml`` keeps it: the resolved config, with the budget keys blank for a method that
    does not use them (so the shared directory of the full cache does not claim one run's budget)."""
    out = dict(cfg)
    if not uses_budget(cfg):
        for k in BUDGET_KEYS:
            out[k] = None
    return out


# ------------------------------------------------------------------------------------------------ metadata
def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except Exception:
        return None


def environment_meta(root: Path, device: str, seed: int) -> dict:
    import importlib.metadata as md
    pkgs = {}
    for p in ("torch", "transformers", "tokenizers", "hydra-core", "omegaconf", "numpy", "av", "wandb", "pandas"):
        try:
            pkgs[p] = md.version(p)
        except md.PackageNotFoundError:
            pkgs[p] = None
    meta = {"git_commit": git_commit(root), "packages": pkgs, "python": platform.python_version(),
            "platform": platform.platform(), "device": device, "seed": seed, "host": platform.node(),
            "cpu_count": os.cpu_count()}
    try:
        import torch
        meta["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name()
    except Exception:
        pass
    return meta


# ------------------------------------------------------------------------------------------------ the store
class RunStore:
    """Append-only per-sample store with resume; :meth:`open` takes the directory's lock."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.samples_path = self.dir / SAMPLES
        self.lock = RunLock(self.dir)

    def open(self) -> "RunStore":
        """Take the run directory's lock (raises :class:`RunLocked` naming the holder)."""
        self.lock.acquire()
        return self

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "RunStore":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def prepare(self, config_yaml: str, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / CONFIG, config_yaml)
        meta_path = self.dir / META
        if meta_path.exists():                      # keep the first start's meta, note the resumes
            old, problem = read_json_file(meta_path, "run metadata")
            if isinstance(old, dict):
                old.setdefault("resumed", []).append({k: meta[k] for k in ("git_commit", "host") if k in meta})
                meta = old
            else:
                problem = problem or f"run metadata {meta_path} is not a JSON object"
                kept = self._set_aside(meta_path)
                log.warning("%s; kept it as %s and started a new one", problem, kept.name)
                meta = dict(meta, previous_meta_unreadable={"file": kept.name, "problem": problem})
        atomic_write_text(meta_path, json.dumps(meta, indent=2, default=_json_default))
        self.repair()

    @staticmethod
    def _set_aside(path: Path) -> Path:
        k = 1
        while path.with_name(f"{path.name}.unreadable-{k}").exists():
            k += 1
        dest = path.with_name(f"{path.name}.unreadable-{k}")
        os.replace(path, dest)
        return dest

    def repair(self) -> int:
        """Make ``samples.jsonl`` end with a newline after a kill mid-write, by one ``truncate`` to the last
        newline (never a rewrite: a kill during the repair loses nothing). A complete record that only lacks its
        newline gets the newline instead. Returns the number of bytes cut."""
        if not self.samples_path.is_file():
            return 0
        offset, tail = tail_after_last_newline(self.samples_path)
        if not tail:
            return 0
        try:
            rec = json.loads(tail.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            rec = None
        if isinstance(rec, dict) and rec.get("sample_id") is not None:
            with open(self.samples_path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            return 0
        os.truncate(self.samples_path, offset)
        log.warning("%s: cut a torn last line (%d bytes, a kill mid-write); that sample runs again",
                    self.samples_path, len(tail))
        return len(tail)

    def records(self, warn: bool = False) -> list[dict]:
        return read_records(self.samples_path, warn=warn)

    def done_ids(self, retry_failed: bool = False) -> set[str]:
        """Ids not to run again: every recorded id, or with ``retry_failed`` only those whose last record
        succeeded."""
        return {str(r["sample_id"]) for r in self.records(warn=True) if not (retry_failed and is_failed(r))}

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=_json_default) + "\n"
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.dir / SUMMARY, json.dumps(summary, indent=2, default=_json_default))


def _json_default(o: Any):
    try:
        import torch
        if isinstance(o, torch.Tensor):
            return o.tolist()
    except Exception:
        pass
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def spread(values: Iterable[float | None]) -> dict | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None
    import numpy as np
    p50, p90 = np.quantile(np.asarray(v, dtype=np.float64), [0.5, 0.9], method="nearest")   # a recorded value
    return {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0,
            "p50": float(p50), "p90": float(p90), "min": min(v), "max": max(v), "n": len(v)}


def efficiency_summary(records: list[dict]) -> dict:
    ok = [r for r in records if r.get("error") is None]
    mean = lambda k: (statistics.fmean([r[k] for r in ok if r.get(k) is not None])  # noqa: E731
                      if any(r.get(k) is not None for r in ok) else None)
    mods: dict[str, list[float]] = {}
    for r in ok:
        for m, v in (r.get("kept_by_modality") or {}).items():
            mods.setdefault(m, []).append(v["ratio"])
    return {
        "kept_ratio_mean": mean("kept_ratio"),
        "kv_bytes_full_mean": mean("kv_bytes_full"),
        "kv_bytes_kept_mean": mean("kv_bytes_kept"),
        "kv_bytes_ratio_mean": mean("kv_bytes_ratio"),
        "kept_ratio_by_modality": {m: statistics.fmean(v) for m, v in sorted(mods.items())},
        "prefill_s": spread(r.get("prefill_s") for r in ok),
        "compress_s": spread(r.get("compress_s") for r in ok),
        "decode_s_per_token": spread(r.get("decode_s_per_token") for r in ok),
        "peak_mem_bytes": spread(r.get("peak_mem_bytes") for r in ok),
        "peak_mem_kind": ok[0].get("peak_mem_kind") if ok else None,
        "media_s": spread(r.get("media_s") for r in ok),
        "processor_s": spread(r.get("processor_s") for r in ok),
        "new_tokens": spread(r.get("new_tokens") for r in ok),
    }

"""Results store: one run directory per grid point, keyed by a hash of what changes a sample's result.

    <runs>/<model>__<dataset>__<method>__b<budget>__<hash10>/
        config.yaml     resolved config
        meta.json       git commit, package versions, device, seed, host (and every resume)
        samples.jsonl   one JSON line per sample, appended (written and flushed) as it completes
        summary.json    aggregate task metrics + efficiency figures with spread
        run.lock        held (flock) by the one process writing the directory; names it (pid, host, start)

This module is the only owner of the directory's files and of **reading its records** (:func:`read_records`), and
the one place ``run.py``, ``avkv missing`` and ``avkv report`` ask for a run's **identity** (:func:`identity_core`,
:func:`run_hash`, :func:`point_hash`, :func:`run_name`). Three modules of the contract hold its mechanisms and are
re-exported here: :mod:`avkv.identity` (which config keys name a run directory), :mod:`avkv.records` (reading
records, atomic writes) and :mod:`avkv.run_lock` (the one-writer lock).

Writes are append-only or atomic: samples are appended one line at a time, each written to the kernel before the
next sample starts, so a killed process (``kill -9``, out of memory, a preempted job) loses no finished sample;
``fsync`` — which only matters when the machine itself goes down — runs when :data:`FSYNC_EVERY_S` seconds have
passed since the last one, before the summary is written and when the store closes, so a machine crash loses at
most the samples of those last seconds, and they run again on resume (150 fsyncs cost ~1 s of a 70 s default
run on this project's machine: ``results/bench/harness/``). A line torn by a kill is cut
off with one ``truncate`` (never a rewrite of the file); ``meta.json``, ``config.yaml`` and ``summary.json`` are
written to a temporary file and ``os.replace``d. A line that is not a JSON record with a ``sample_id``, and an
unreadable ``meta.json``, are reported and skipped, never fatal.

Re-running the same config resumes: a sample id already in ``samples.jsonl`` is skipped — unless it failed and
``resume.retry_failed`` is on, then it runs again and its new line supersedes the old one (the reader keeps the
last record per id, so every count is per id).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

from avkv import measure
from avkv.records import (CONFIG, META, SAMPLES, SUMMARY, ReadReport, atomic_write_text,  # noqa: F401
                          is_failed, read_json_file, read_records, tail_after_last_newline)
from avkv.run_lock import LOCK, RunLock, RunLocked, describe_holder, lock_holder  # noqa: F401 - re-exported
from avkv.identity import (BUDGET_KEYS, DESCRIPTIVE_KEYS, NOT_IDENTITY, PROJECT, SHARD_KEYS,  # noqa: F401 - re-exported
                           config_hash, identity_core, point_hash, run_dir, run_hash, run_name,
                           stored_config, uses_budget)

log = logging.getLogger("avkv")

# the file names (SAMPLES, CONFIG, META, SUMMARY) are avkv.records', LOCK = "run.lock" avkv.run_lock's: imported above

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
#: seconds between fsyncs of ``samples.jsonl`` (every append is written to the kernel at once; see the module doc)
FSYNC_EVERY_S = 10.0


class RunStore:
    """Append-only per-sample store with resume; :meth:`open` takes the directory's lock. ``fsync_every_s``: at
    most this long between fsyncs of the appended records (0: after every record)."""

    def __init__(self, run_dir: str | Path, fsync_every_s: float | None = None):
        self.dir = Path(run_dir)
        self.samples_path = self.dir / SAMPLES
        self.lock = RunLock(self.dir)
        self.fsync_every_s = FSYNC_EVERY_S if fsync_every_s is None else float(fsync_every_s)
        self._unsynced, self._last_sync = False, measure.wall()

    def open(self) -> "RunStore":
        """Take the run directory's lock (raises :class:`RunLocked` naming the holder)."""
        self.lock.acquire()
        return self

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self.lock.release()

    def sync(self) -> None:
        """fsync what was appended since the last one (nothing to do when nothing was)."""
        if self._unsynced and self.samples_path.is_file():
            fd = os.open(self.samples_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced, self._last_sync = False, measure.wall()

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
            f.flush()                               # in the kernel now: a killed process loses nothing
            self._unsynced = True
            if measure.wall() - self._last_sync >= self.fsync_every_s:
                os.fsync(f.fileno())
                self._unsynced, self._last_sync = False, measure.wall()

    def write_summary(self, summary: dict) -> None:
        self.sync()                                 # the summary never counts records a crash could take back
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

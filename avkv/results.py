"""Results store: one run directory per resolved config, keyed by a hash of that config.

    <runs>/<model>__<dataset>__<method>__b<budget>__<hash10>/
        config.yaml     resolved config
        meta.json       git commit, package versions, device, seed, host
        samples.jsonl   one JSON line per sample, appended and flushed as it completes
        summary.json    aggregate task metrics + efficiency figures with spread

Re-running the same config resumes: sample ids already in ``samples.jsonl`` are skipped, none is duplicated.
A line cut short by a kill is ignored on reading and the sample runs again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable

#: keys that change how results are shown or stored, not what is computed (excluded from the hash)
PRESENTATION_KEYS = ("logger", "paths", "progress", "hydra", "run_dir", "experiment_name", "wandb", "notes")


def config_hash(cfg: dict) -> str:
    """Stable hash of the resolved config minus presentation-only keys."""
    core = {k: v for k, v in cfg.items() if k not in PRESENTATION_KEYS}
    blob = json.dumps(core, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _slug(x: Any) -> str:
    s = str(x)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)[:40]


def run_name(cfg: dict, h: str) -> str:
    budget = cfg.get("budget_tokens") or cfg.get("budget")
    return "__".join([_slug(cfg.get("model_name", "model")), _slug(cfg.get("dataset_name", "dataset")),
                      _slug(cfg.get("method_name", "method")), f"b{_slug(budget)}", h[:10]])


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


class RunStore:
    """Append-only per-sample store with resume."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.samples_path = self.dir / "samples.jsonl"

    def prepare(self, config_yaml: str, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(config_yaml)
        meta_path = self.dir / "meta.json"
        if meta_path.exists():                      # keep the first start's meta, note the resumes
            old = json.loads(meta_path.read_text())
            old.setdefault("resumed", []).append({k: meta[k] for k in ("git_commit", "host") if k in meta})
            meta = old
        meta_path.write_text(json.dumps(meta, indent=2))
        self._truncate_partial_line()

    def _truncate_partial_line(self) -> None:
        """A run killed mid-write can leave a partial last line: cut it so appends stay line-aligned."""
        if not self.samples_path.exists():
            return
        data = self.samples_path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.samples_path.write_bytes(data[: data.rfind(b"\n") + 1])

    def records(self) -> list[dict]:
        out = []
        if self.samples_path.exists():
            for line in self.samples_path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        # the last record for an id wins (a sample re-run after a failure replaces nothing: ids are unique)
        seen: dict[str, dict] = {}
        for r in out:
            seen[str(r["sample_id"])] = r
        return list(seen.values())

    def done_ids(self) -> set[str]:
        return {str(r["sample_id"]) for r in self.records()}

    def append(self, record: dict) -> None:
        with open(self.samples_path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        tmp = self.dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
        os.replace(tmp, self.dir / "summary.json")


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
    s = sorted(v)
    q = lambda p: s[min(len(s) - 1, int(round(p * (len(s) - 1))))]  # noqa: E731
    return {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0,
            "p50": q(0.5), "p90": q(0.9), "min": s[0], "max": s[-1], "n": len(v)}


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
        "new_tokens": spread(r.get("new_tokens") for r in ok),
    }

"""Run directories in the results store's format, written by hand (no model needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml


def make_run(root: Path, name: str, *, model="tiny_qwen25vl", method="snapkv", budget=0.5, dataset="milebench",
             task=None, scores=(1, 0, 1), ids=None, complete=True, shard=0, num_shards=1, experiment="exp",
             paper=None, errors=(), extra_cfg=None, kv_full=1000, decode=0.01, achieved=None) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model": {"name": model}, "method": {"name": method, "window": 4}, "budget": budget,
           "dataset": {"name": dataset, "root": "/data", **({"task": task} if task else {})}, "limit": None,
           "seed": 0, "shard": shard, "num_shards": num_shards, "grid": {"name": experiment, "paper": paper},
           "output_dir": str(root), **(extra_cfg or {})}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "meta.json").write_text(json.dumps({"git": "x"}))
    ids = ids or [f"s{i}" for i in range(len(scores))]
    ratio = 1.0 if method == "full" else budget if achieved is None else achieved
    with open(d / "samples.jsonl", "w") as f:
        for sid, s in zip(ids, scores):
            err = "boom" if sid in errors else None
            f.write(json.dumps({"sample_id": sid, "prediction": "A", "target": "A", "score": None if err else s,
                                "kv_bytes_full": kv_full, "kv_bytes_kept": kv_full * ratio, "kept_ratio": ratio,
                                "kept_by_modality": {"text": ratio, "image": ratio}, "prefill_s": 0.1,
                                "decode_s_per_token": decode * (0.5 + ratio / 2), "new_tokens": 4,
                                "peak_mem_bytes": 5000, "error": err}) + "\n")
    if complete:
        (d / "summary.json").write_text(json.dumps({"n": len(ids), "score": float(np.mean(scores))}))
    return d

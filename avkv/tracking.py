"""W&B mirror of a run: config, per-sample table and summary. The on-disk results store stays the ground truth.

``logger=wandb`` logs to W&B with run id = config hash (``resume='allow'``: a rerun or a requeued job continues
the same run instead of creating a duplicate). Without network it runs offline (``mode: auto``); upload later with
``wandb sync <runs>/wandb/offline-run-*``. No key is ever written into results: W&B reads its own login.
"""
from __future__ import annotations

import os
import socket
from typing import Any


def _online() -> bool:
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=1.5).close()
        return True
    except OSError:
        return False


class NullTracker:
    def log_sample(self, record: dict) -> None:
        pass

    def finish(self, summary: dict, records: list[dict] | None = None) -> None:
        pass


class WandbTracker:
    def __init__(self, cfg: dict, run_id: str, name: str, tags: list[str], group: str | None):
        import wandb
        mode = cfg.get("mode", "auto")
        if mode == "auto":
            mode = "online" if _online() else "offline"
        os.makedirs(cfg["dir"], exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.get("project", "avkv"), entity=cfg.get("entity"), id=run_id,
                              name=name, group=group, tags=tags, job_type="eval", resume="allow", mode=mode,
                              dir=cfg["dir"], config=cfg.get("run_config"), settings=wandb.Settings(silent=True))
        self.rows: list[list[Any]] = []
        self.columns = ["sample_id", "prediction", "target", "score", "kept_ratio", "kv_bytes_kept",
                        "prefill_s", "decode_s_per_token", "error"]

    def log_sample(self, record: dict) -> None:
        self.rows.append([str(record.get(c)) if c in ("prediction", "target", "error", "sample_id")
                          else record.get(c) for c in self.columns])

    def finish(self, summary: dict, records: list[dict] | None = None) -> None:
        """Summary scalars (also as ``<dataset>/<metric>``, lmms-eval style) and the per-sample table.

        ``records`` are all the run's samples from the store: a resumed run (requeued job) logs the complete
        table, not only the samples this process computed.
        """
        if records is not None:
            self.rows = []
            for r in records:
                self.log_sample(r)
        flat = {}
        for k, v in summary.items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    if isinstance(v2, (int, float)) or v2 is None:
                        flat[f"{k}/{k2}"] = v2
                    elif isinstance(v2, dict) and "mean" in v2:
                        flat[f"{k}/{k2}"] = v2["mean"]
            elif isinstance(v, (int, float)):
                flat[k] = v
        if summary.get("dataset") and summary.get("metric") and isinstance(summary.get("score"), (int, float)):
            flat[f"{summary['dataset']}/{summary['metric']}"] = summary["score"]
        self.run.summary.update(flat)
        self.run.log({"samples": self.wandb.Table(columns=self.columns, data=self.rows)})
        self.run.finish()


def make_tracker(logger_cfg: dict, run_id: str, name: str, tags: list[str], group: str | None):
    if logger_cfg.get("name", "none") == "wandb":
        return WandbTracker(logger_cfg, run_id, name, tags, group)
    return NullTracker()

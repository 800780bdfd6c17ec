"""W&B mirror of a run: config, per-sample table and summary. The on-disk results store stays the ground truth.

``logger=wandb`` logs to W&B with run id = config hash (``resume='allow'``: a rerun or a requeued job continues
the same run instead of creating a duplicate). Without network it runs offline (``mode: auto``); the offline folder
and the ``wandb sync`` command that uploads it are printed once per process. No key is ever written into results:
W&B reads its own login. ``wandb`` is an optional dependency (``pip install 'avkv[wandb]'``).

* **Group** = the sweep (:func:`group_name`): ``logger.group`` when set, else the preset (``grid.name``), else
  ``experiment_name`` unless it is ``default``, else the Hydra multirun's folder name (one group per ``-m`` launch).
* **Per-sample rows are streamed**: every finished sample is logged as it completes (``sample/score``,
  ``sample/kept_ratio``, ... and a row of the incremental ``samples_live`` table); the complete ``samples`` table
  (every stored sample, also those of an earlier, resumed attempt) is logged at the end.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Any

_ANNOUNCED: set[str] = set()          # offline folders already printed by this process
NUMERIC_STREAM = ("score", "kept_ratio", "kv_bytes_kept", "prefill_s", "decode_s_per_token", "new_tokens",
                  "budget_achieved")


def group_name(cfg: Any) -> str | None:
    """The W&B group of a run: one per sweep (see the module docstring)."""
    from omegaconf import OmegaConf
    explicit = OmegaConf.select(cfg, "logger.group", default=None)
    if explicit:
        return str(explicit)
    preset = OmegaConf.select(cfg, "grid.name", default=None)
    if preset:
        return str(preset)
    name = cfg.get("experiment_name")
    if name and name != "default":
        return str(name)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"sweep-{os.path.basename(os.path.normpath(hc.sweep.dir))}"
    except (ValueError, ImportError, AttributeError):
        pass
    return None


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
        try:                                            # wandb >= 0.19: a table that grows row by row
            self.live = wandb.Table(columns=self.columns, log_mode="INCREMENTAL")
        except TypeError:
            self.live = None
        self.n_streamed = 0
        if mode == "offline":
            announce_offline(cfg["dir"])

    def _row(self, record: dict) -> list[Any]:
        return [str(record.get(c)) if c in ("prediction", "target", "error", "sample_id")
                else record.get(c) for c in self.columns]

    def log_sample(self, record: dict) -> None:
        """Stream one finished sample: its numbers as ``sample/<field>`` and a row of ``samples_live``."""
        row = self._row(record)
        self.rows.append(row)
        self.n_streamed += 1
        data: dict[str, Any] = {f"sample/{k}": record[k] for k in NUMERIC_STREAM
                                if isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)}
        data["sample/failed"] = int(bool(record.get("error")))
        data["samples_done"] = self.n_streamed
        if self.live is not None:
            self.live.add_data(*row)
            data["samples_live"] = self.live
        self.run.log(data)

    def finish(self, summary: dict, records: list[dict] | None = None) -> None:
        """Summary scalars (also as ``<dataset>/<metric>``, lmms-eval style) and the per-sample table.

        ``records`` are all the run's samples from the store: a resumed run (requeued job) logs the complete
        table, not only the samples this process computed.
        """
        if records is not None:                     # the complete table, not only this process's samples
            self.rows = [self._row(r) for r in records]
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


def announce_offline(wandb_dir: str) -> None:
    """Print once per process where offline runs go and the command that uploads them."""
    folder = os.path.join(wandb_dir, "wandb")
    if folder in _ANNOUNCED:
        return
    _ANNOUNCED.add(folder)
    print(f"avkv: W&B is offline; runs are saved under {folder}/offline-run-*\n"
          f"      upload them later with: wandb sync {folder}/offline-run-*", file=sys.stderr)


def make_tracker(logger_cfg: dict, run_id: str, name: str, tags: list[str], group: str | None):
    if logger_cfg.get("name", "none") == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ImportError("logger=wandb needs the wandb package: pip install 'avkv[wandb]' "
                              "(or run with logger=none)") from None
        return WandbTracker(logger_cfg, run_id, name, tags, group)
    return NullTracker()

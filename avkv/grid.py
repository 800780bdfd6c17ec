"""Sweep grids: expand a Hydra multirun exactly as the basic sweeper does, find what is missing, resubmit only that.

``avkv missing experiment=flowmm_table1 smoke=tiny`` (the same overrides as the ``python run.py -m`` that
launched the sweep; or a sweep folder holding Hydra's ``multirun.yaml``) composes every job of the grid, computes
the run directory its config maps to (config hash, ``avkv.results``), and sorts the jobs into

* **complete**: ``summary.json`` written (``failed`` counts its samples whose last record is an error);
* **running**: a process holds the run directory's lock (``run.lock``: its pid, host and start time are shown),
  or SLURM runs the array task of that point; it is never resubmitted — a second writer would be refused anyway;
* **queued**: SLURM holds an array task for the point that has not started, or was requeued (after a preemption,
  ``scontrol requeue`` or a time limit) and waits to start again (``avkv.slurm`` maps ``squeue`` back to the grid);
  never resubmitted: the task will run, or resume, the point itself;
* **partial**: ``samples.jsonl`` has some samples but the run never finished (killed, preempted, timed out);
  rerunning it resumes at the first unfinished sample;
* **missing**: no samples yet.

It prints the grid and the shortest ``python run.py -m ...`` commands that cover exactly the partial and missing
jobs (jobs that differ in one key are merged into one comma list), so a cluster user resubmits only those. Each
command writes a new sweep folder (``hydra.sweep.dir=<original>-resubmit-<UTC time>``, when the original is known):
Hydra would otherwise overwrite the original sweep's ``multirun.yaml`` with the smaller grid. With
``--retry-failed`` complete jobs with failed samples are resubmitted too, with ``resume.retry_failed=true`` (their
failed samples run again; the new record of a sample supersedes the old one).

This module also registers the OmegaConf resolvers the experiment presets use in ``hydra.sweeper.params``:

* ``${avkv.sweep:${grid.methods}}`` joins a list into Hydra's sweep syntax (``full,snapkv,h2o``);
* ``${avkv.available:${grid.methods},method}`` keeps only names that have a config in ``configs/method/`` (the
  smoke override uses it, so a preset naming methods that are not written yet still runs the ones that are, and
  picks up the others as they land).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from avkv.resolvers import as_list, available, sweep_string  # noqa: F401 - the sweep resolvers, re-exported



def _config_dir() -> Path:
    """The clone's ``configs/`` or the installed package data (``avkv.config`` decides; imported late: it
    registers this module's resolvers when it loads)."""
    from avkv.config import CONFIG_DIR
    return CONFIG_DIR


# ------------------------------------------------------------------------------------------------ resolvers


def register_resolvers() -> None:
    """Idempotent; called by ``run.py`` at import (before Hydra composes) and by :func:`expand`."""
    from avkv.config import register_resolvers as _all
    _all()


# ------------------------------------------------------------------------------------------------ expansion
@dataclass
class Job:
    overrides: list[str]                     # ``key=value`` strings, one per swept or fixed key, in sweep order
    config: DictConfig | None = None         # the job's task config (hydra node removed)
    run_dir: Path | None = None
    status: str = "unknown"                  # complete | running | queued | partial | missing
    samples: int = 0
    failed: int = 0                          # samples whose last record is an error
    holder: dict | None = None               # the lock holder of a running job (pid, host, started, ...)
    slurm: str | None = None                 # the live SLURM task of the point ("<array>_<task> <STATE>")

    def as_dict(self) -> dict:
        return {"overrides": self.overrides, "run_dir": str(self.run_dir) if self.run_dir else None,
                "status": self.status, "samples": self.samples, "failed": self.failed, "holder": self.holder,
                "slurm": self.slurm}


def expand(overrides: Sequence[str], config_dir: str | Path | None = None, config_name: str = "config",
           compose_jobs: bool = True) -> list[Job]:
    """Every job of ``python run.py -m <overrides>``: ``hydra.sweeper.params`` from the composed config first,
    then the command line (a key given on the command line replaces the preset's values), crossed as Hydra's
    basic sweeper crosses them. With ``compose_jobs`` each job's config is composed too (as the launcher would).
    """
    return [job for batch in expand_batches(overrides, config_dir, config_name, compose_jobs) for job in batch]


def expand_batches(overrides: Sequence[str], config_dir: str | Path | None = None, config_name: str = "config",
                   compose_jobs: bool = True) -> list[list[Job]]:
    """:func:`expand`, in the basic sweeper's batches (``hydra.sweeper.max_batch_size``; one batch by default):
    the launcher submits each batch as one SLURM array, its jobs in order (``avkv.slurm`` maps tasks back)."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    from avkv.config import register_resolvers as _all_resolvers  # avkv_root and ours

    _all_resolvers()
    config_dir = str(Path(config_dir or _config_dir()).resolve())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name="avkv_missing"):
        loader = GlobalHydra.instance().config_loader()
        cfg = loader.load_configuration(config_name, list(overrides), run_mode=RunMode.MULTIRUN)
        params = cfg.hydra.sweeper.get("params") or {}
        params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params)
        args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
        parser = OverridesParser.create(config_loader=loader)
        batches = BasicSweeper.split_arguments(parser.parse_overrides(args), cfg.hydra.sweeper.get("max_batch_size"))
        job_batches = [[Job(list(o)) for o in batch] for batch in batches]
        jobs = [job for batch in job_batches for job in batch]
        if compose_jobs:
            for num, job in enumerate(jobs):
                sweep_cfg = loader.load_sweep_config(cfg, job.overrides)
                with open_dict(sweep_cfg):
                    sweep_cfg.hydra.job.num = num
                    sweep_cfg.hydra.job.id = f"missing_{num}"
                HydraConfig.instance().set_config(sweep_cfg)
                task_cfg = OmegaConf.create(OmegaConf.to_container(sweep_cfg, resolve=False))
                with open_dict(task_cfg):
                    del task_cfg["hydra"]
                # resolve now, while this job's HydraConfig is current (``${hydra:...}`` interpolations)
                job.config = OmegaConf.create(OmegaConf.to_container(task_cfg, resolve=True))
    GlobalHydra.instance().clear()
    return job_batches


def open_dict(cfg: DictConfig):
    from omegaconf import open_dict as _od

    return _od(cfg)


# ------------------------------------------------------------------------------------------------ status
def default_run_dir(cfg: DictConfig) -> Path:
    """The run directory ``avkv.experiment.run`` writes for ``cfg`` (delegates to the results store)."""
    from avkv.experiment import run_dir_of

    return Path(run_dir_of(cfg))


def job_status(run_dir: Path) -> tuple[str, int]:
    """(status, samples) of a run directory (see the module docstring)."""
    status, samples, _, _ = run_state(run_dir)
    return status, samples


def run_state(run_dir: Path) -> tuple[str, int, int, dict | None]:
    """(status, samples, failed samples, lock holder) of a run directory, read through ``avkv.results``."""
    from avkv import results

    recs = results.read_records(run_dir / results.SAMPLES, warn=False)
    failed = sum(1 for r in recs if results.is_failed(r))
    holder = results.lock_holder(run_dir)
    if holder is not None:
        return "running", len(recs), failed, holder
    if (run_dir / results.SUMMARY).is_file():
        return "complete", len(recs), failed, None
    if recs:
        return "partial", len(recs), failed, None
    return "missing", 0, 0, None


def check(jobs: list[Job], run_dir_of: Callable[[DictConfig], Path] = default_run_dir, *,
          known: dict | None = None, config_dir: str | Path | None = None) -> list[Job]:
    """Each job's run directory and state; a partial or missing point that SLURM still holds a task for is
    ``queued`` (or ``running``, while its task starts up and has not taken the lock yet). ``known``: sweep folder
    → its expanded batches, already at hand (spares expanding it again for its SLURM tasks)."""
    from avkv import slurm

    live = slurm.live_run_dirs(lambda sweep: expand_batches(overrides_from_sweep_dir(sweep), config_dir=config_dir),
                               run_dir_of, known=known)
    for job in jobs:
        job.run_dir = Path(run_dir_of(job.config))
        job.status, job.samples, job.failed, job.holder = run_state(job.run_dir)
        task = live.get(job.run_dir.resolve())
        if task is not None:
            job.slurm = f"{task.job_id} {task.state}"
            if job.status in ("partial", "missing"):
                job.status = task.status
    return jobs


# ------------------------------------------------------------------------------------------------ resubmission
def _split(o: str) -> tuple[str, str]:
    k, _, v = o.partition("=")
    return k, v


def cover(jobs: Iterable[Job]) -> list[list[str]]:
    """Few cartesian boxes covering exactly ``jobs``: override lists with comma sweeps where jobs differ in one key.

    Greedy: two boxes equal on every key but one are merged, until no pair can be. Every box is a product of
    value sets, so ``python run.py -m <box>`` runs exactly the jobs it came from.
    """
    boxes: list[dict[str, list[str]]] = []
    order: list[str] = []
    for job in jobs:
        box = {}
        for o in job.overrides:
            k, v = _split(o)
            box[k] = [v]
            if k not in order:
                order.append(k)
        boxes.append(box)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a.keys() != b.keys():
                    continue
                diff = [k for k in a if sorted(a[k]) != sorted(b[k])]
                if len(diff) == 1:
                    k = diff[0]
                    a[k] = a[k] + [v for v in b[k] if v not in a[k]]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return [[f"{k}={','.join(box[k])}" for k in order if k in box] for box in boxes]


RETRY_OVERRIDE = "resume.retry_failed=true"
SWEEP_DIR_KEY = "hydra.sweep.dir"


def fresh_sweep_dirs(base: str | Path, n: int, stamp: str | None = None) -> list[str]:
    """``n`` sweep folders next to ``base`` that do not exist yet: ``<base>-resubmit-<UTC time>[-<i>]``."""
    import time

    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out: list[str] = []
    i = 0
    while len(out) < n:
        d = f"{str(base).rstrip('/')}-resubmit-{stamp}" + (f"-{i}" if i else "")
        if not Path(d).exists():
            out.append(d)
        i += 1
    return out


def resubmit_commands(jobs: Iterable[Job], prefix: str = "python run.py -m", retry_failed: bool = False,
                      sweep_dir: str | Path | None = None) -> list[str]:
    """Commands covering the partial and missing jobs (never a running or queued one); with ``retry_failed`` also
    the complete jobs with failed samples, and every command reruns failed samples.

    A ``hydra.sweep.dir`` of the original sweep (``sweep_dir``, or the override in the jobs) is never reused: each
    command gets a new folder beside it, so the original ``multirun.yaml`` keeps the whole grid. Without one,
    Hydra's default (a new timestamped folder) applies."""
    todo = [j for j in jobs if j.status in ("partial", "missing")
            or (retry_failed and j.status == "complete" and j.failed)]
    base = str(sweep_dir) if sweep_dir is not None else None
    stripped = []
    for j in todo:
        kept = []
        for o in j.overrides:
            if _split(o)[0].lstrip("+~") == SWEEP_DIR_KEY:
                base = base or _split(o)[1]
            else:
                kept.append(o)
        stripped.append(Job(kept, status=j.status))
    extra = [RETRY_OVERRIDE] if retry_failed else []
    boxes = cover(stripped)
    dirs = fresh_sweep_dirs(base, len(boxes)) if base else [None] * len(boxes)
    return [" ".join([prefix, *(shlex.quote(o) for o in [*box, *extra, *([f"{SWEEP_DIR_KEY}={d}"] if d else [])])])
            for box, d in zip(boxes, dirs)]


def format_jobs(jobs: list[Job]) -> str:
    keys: list[str] = []
    for j in jobs:
        for o in j.overrides:
            k = _split(o)[0]
            if k not in keys:
                keys.append(k)
    varying = [k for k in keys if len({dict(map(_split, j.overrides)).get(k) for j in jobs}) > 1] or keys
    head = ["status", "samples", "failed", *varying, "run_dir"]
    rows = [[j.status, str(j.samples), str(j.failed), *(dict(map(_split, j.overrides)).get(k, "") for k in varying),
             str(j.run_dir) + (f"  [{_holder(j.holder)}]" if j.holder is not None else "")
             + (f"  [SLURM task {j.slurm}]" if j.slurm else "")] for j in jobs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _holder(holder: dict) -> str:
    from avkv.results import describe_holder

    return "held by " + describe_holder(holder)


def overrides_from_sweep_dir(path: Path) -> list[str]:
    """The command-line overrides of the multirun whose sweep folder (``multirun.yaml``) is ``path``."""
    f = path / "multirun.yaml" if path.is_dir() else path
    cfg = OmegaConf.load(f)
    hydra_overrides = [o for o in (cfg.hydra.overrides.get("hydra") or []) if not o.startswith("hydra.mode=")]
    return [*hydra_overrides, *cfg.hydra.overrides.task]  # the launcher and its settings, then the task's


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="avkv missing",
        description="List the grid points of a sweep that are missing or incomplete and print the commands that "
                    "resubmit only those. Give the overrides of the original `python run.py -m ...` "
                    "(e.g. experiment=flowmm_table1 smoke=tiny) or --sweep-dir with its multirun.yaml.")
    ap.add_argument("overrides", nargs="*", help="the multirun's overrides")
    ap.add_argument("--sweep-dir", type=Path, default=None, help="a Hydra sweep folder (holds multirun.yaml)")
    ap.add_argument("--config-dir", type=Path, default=None, help="Hydra config folder (default: configs/)")
    ap.add_argument("--json", action="store_true", help="print the jobs as JSON")
    ap.add_argument("--prefix", default="python run.py -m", help="command the resubmission lines start with")
    ap.add_argument("--retry-failed", action="store_true",
                    help="also resubmit complete jobs with failed samples, rerunning those samples "
                         f"({RETRY_OVERRIDE})")
    a = ap.parse_args(argv)
    overrides = list(a.overrides)
    if a.sweep_dir is not None:
        overrides = overrides_from_sweep_dir(a.sweep_dir) + overrides
    from avkv.config import check_overrides
    problems = check_overrides(overrides, config_dir=a.config_dir)
    if problems:
        for line in problems:
            print(f"avkv missing: {line}", file=sys.stderr)
        return 2
    try:
        batches = expand_batches(overrides, config_dir=a.config_dir)
        known = {a.sweep_dir.resolve(): batches} if a.sweep_dir is not None and not a.overrides else None
        jobs = check([job for batch in batches for job in batch], known=known, config_dir=a.config_dir)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors: their first line, not a traceback
        from hydra.errors import HydraException
        if not isinstance(e, (HydraException, ValueError)):
            raise
        print(f"avkv missing: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps([j.as_dict() for j in jobs], indent=1))
        return 0
    n = {s: sum(j.status == s for j in jobs) for s in ("complete", "running", "queued", "partial", "missing")}
    print(format_jobs(jobs))
    live = "".join(f", {n[s]} {s}" for s in ("running", "queued") if n[s])
    print(f"\n{len(jobs)} jobs: {n['complete']} complete{live}, {n['partial']} partial, {n['missing']} missing")
    n_failed = sum(j.failed for j in jobs if j.status == "complete")
    if n_failed and not a.retry_failed:
        print(f"{n_failed} samples of complete jobs failed; --retry-failed resubmits them")
    cmds = resubmit_commands(jobs, prefix=a.prefix, retry_failed=a.retry_failed, sweep_dir=a.sweep_dir)
    if n["running"] or n["queued"]:
        print(f"{n['running'] + n['queued']} jobs are running or queued (run lock, SLURM): never resubmitted")
    if cmds:
        print("\nresubmit only these (partial jobs resume at their first unfinished sample):")
        print("\n".join(cmds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

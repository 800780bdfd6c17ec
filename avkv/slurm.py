"""What SLURM still holds of avkv's sweeps: queued and running array tasks, mapped to their grid points.

A grid point whose task is queued (pending, or requeued and waiting out SLURM's requeue delay) has no live process
and so no lock on its run directory: the directory looks ``partial`` or ``missing``, and resubmitting it would
run the point twice (the second writer is refused by the run lock, but only once the first has started). ``avkv
missing`` asks :func:`live_run_dirs` for the run directories of every task SLURM still holds and reports them as
``queued``/``running``, never as something to resubmit.

How a task is mapped to its grid point, without unpickling anything (a submission pickle is code, not data):

* ``squeue -r`` lists every live task of this user, one line per array task, with its state and its stdout path;
* Hydra's submitit launcher writes that stdout under ``<sweep dir>/.submitit/<array>_<task>/``, so the path names
  the sweep folder, whose ``multirun.yaml`` holds the sweep's overrides;
* the launcher submits the sweep's jobs as one array per batch of Hydra's basic sweeper, in job order: task ``i``
  of the ``k``-th submission of a sweep folder (by job id, from the job folders under ``.submitit/``) is job
  ``i`` of the ``k``-th batch. A batch of one job is submitted by submitit as a plain job (id ``<job>``,
  folder ``.submitit/<job>/``), which is task 0. Expanding the sweep (``avkv.grid.expand``) gives that job's config and so its run
  directory.

Without SLURM (no ``squeue`` on the PATH) nothing is live and :func:`live_run_dirs` returns ``{}``; a ``squeue``
that fails is reported on stderr and treated the same way (the lock still marks running points).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: squeue states of a task that has not started (or was requeued and waits to start again)
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED",
          "STOPPED", "SPECIAL_EXIT", "RESIZING", "SIGNALING", "STAGE_OUT"}
#: states of a task whose process runs (or is being cleaned up after it)
RUNNING = {"RUNNING", "COMPLETING"}

_JOB = re.compile(r"^(\d+)(?:_(\d+))?$")


@dataclass(frozen=True)
class Task:
    job_id: str          # "<array>_<task>", or "<job>" for a plain job (submitit's batch of one)
    state: str           # squeue's state (PENDING, RUNNING, ...)
    stdout: str          # squeue's StdOut path

    @property
    def array_id(self) -> int:
        return int(self.job_id.split("_")[0])

    @property
    def index(self) -> int:
        return int(self.job_id.split("_")[1]) if "_" in self.job_id else 0

    @property
    def status(self) -> str:
        """``running`` or ``queued`` (what ``avkv missing`` shows)."""
        return "running" if self.state in RUNNING else "queued"


def squeue_tasks(timeout: float = 30.0) -> list[Task]:
    """The live array tasks of this user (one per task, pending arrays expanded). ``[]`` without SLURM."""
    if shutil.which("squeue") is None:
        return []
    cmd = ["squeue", "--me", "-h", "-r", "-O", "JobArrayID:|,State:|,StdOut:4096"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"avkv missing: squeue failed ({e}); queued SLURM tasks are not known", file=sys.stderr)
        return []
    if p.returncode != 0:
        print(f"avkv missing: squeue failed ({p.stderr.strip()[:300]}); queued SLURM tasks are not known",
              file=sys.stderr)
        return []
    return parse_squeue(p.stdout)


def parse_squeue(text: str) -> list[Task]:
    """Lines ``<array>_<task>|<state>|<stdout>`` or ``<job>|<state>|<stdout>`` (``squeue -O
    JobArrayID:|,State:|,StdOut``); others are skipped (``sweep_dir_of`` later skips jobs not of a sweep)."""
    tasks = []
    for line in text.splitlines():
        parts = [s.strip() for s in line.split("|")]
        if len(parts) < 3 or not _JOB.match(parts[0]):
            continue
        tasks.append(Task(parts[0], parts[1].split()[0] if parts[1] else "", parts[2]))
    return tasks


def sweep_dir_of(stdout: str) -> Path | None:
    """``<sweep>/.submitit/<id>/<id>_0_log.out`` → ``<sweep>`` (None for a path not written by submitit)."""
    p = Path(stdout)
    for parent in p.parents:
        if parent.name == ".submitit":
            return parent.parent
    return None


def submission_ids(sweep_dir: Path) -> list[int]:
    """The job ids submitted from a sweep folder, ascending: its job folders ``.submitit/<array>_<task>`` (an
    array) and ``.submitit/<job>`` (a plain job; submitit also makes a ``<array>`` folder for an array)."""
    ids = set()
    for d in (sweep_dir / ".submitit").glob("*"):
        m = _JOB.match(d.name)
        if m and d.is_dir():
            ids.add(int(m.group(1)))
    return sorted(ids)


def live_run_dirs(expand, run_dir_of, tasks: list[Task] | None = None,
                  known: dict | None = None) -> dict[Path, Task]:
    """Run directory → the live SLURM task that will write it, for every task of an avkv sweep that SLURM holds.

    ``expand(sweep_dir)`` gives a sweep folder's batches of jobs (``grid`` passes its ``expand_batches`` of the
    folder's overrides: this module needs no import of it) and ``run_dir_of(cfg)`` maps a job config to its run
    directory. Tasks whose sweep folder has no ``multirun.yaml`` (not a Hydra sweep) or that cannot be mapped are
    skipped. ``known``: sweep folder → its batches, where the caller has expanded it already.
    """
    tasks = squeue_tasks() if tasks is None else tasks
    by_sweep: dict[Path, list[Task]] = {}
    for t in tasks:
        sweep = sweep_dir_of(t.stdout)
        if sweep is not None and (sweep / "multirun.yaml").is_file():
            by_sweep.setdefault(sweep.resolve(), []).append(t)
    live: dict[Path, Task] = {}
    for sweep, ts in by_sweep.items():
        try:
            batches = (known or {}).get(sweep) or expand(sweep)
        except Exception as e:  # noqa: BLE001 - a sweep folder from another code version: say so, go on
            print(f"avkv missing: cannot expand the sweep {sweep} of SLURM tasks "
                  f"{', '.join(t.job_id for t in ts)}: {e}", file=sys.stderr)
            continue
        arrays = submission_ids(sweep)
        for t in ts:
            k = arrays.index(t.array_id) if t.array_id in arrays else -1
            if not 0 <= k < len(batches) or t.index >= len(batches[k]):
                print(f"avkv missing: SLURM task {t.job_id} does not match a job of the sweep {sweep}",
                      file=sys.stderr)
                continue
            job = batches[k][t.index]
            rd = Path(run_dir_of(job.config)).resolve()
            # a requeued task that already runs again is the same grid point: keep the running state
            if rd not in live or t.status == "running":
                live[rd] = t
    return live

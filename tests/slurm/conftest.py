"""The real-SLURM tier: fixtures and helpers for tests against a running SLURM (scripts/slurm/local_cluster.sh).

Run through ``make test-slurm`` (scripts/slurm/test_tier.sh starts the cluster, exports SLURM_CONF and
AVKV_SLURM_TIER=1). Outside the tier, without a reachable SLURM, every test here is skipped with the reason; inside
the tier a missing cluster or missing accounting is a failure. Every wait is bounded; every job a test submits is
cancelled when the test ends (only its own: the tasks whose output lies under the test's folder).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("AVKV_SLURM_STATE", "/var/lib/avkv-slurm"))
#: the options every sweep of the tier passes (one CPU per task: the tier must fit a 2-core machine)
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "threads=1", "progress=false"]


def _env() -> dict:
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
    if "SLURM_CONF" not in env and (STATE / "etc" / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(STATE / "etc" / "slurm.conf")
    return env


def sh(*cmd: str, timeout: float = 30, check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stdout[-2000:]} {p.stderr[-2000:]}")
    return p


@pytest.fixture(scope="session")
def cluster() -> dict:
    """The environment for SLURM clients; skips (outside the tier) or fails (inside) without SLURM + sacct."""
    in_tier = os.environ.get("AVKV_SLURM_TIER") == "1"
    why = None
    try:
        p = sh("sinfo", "-h", "-o", "%P %T", check=False, timeout=20)
        if p.returncode != 0 or "debug" not in p.stdout:
            why = f"no SLURM with a 'debug' partition answers sinfo ({(p.stdout + p.stderr).strip()[:300]})"
        else:
            a = sh("sacct", "-n", "-X", "-S", "now-1minutes", check=False, timeout=20)
            if a.returncode != 0:
                why = f"SLURM accounting (sacct) does not work: {a.stderr.strip()[:300]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        why = f"no SLURM client commands ({e})"
    if why:
        msg = f"real-SLURM tier: {why}; start one with `make test-slurm` (scripts/slurm/local_cluster.sh)"
        if in_tier:
            pytest.fail(msg)
        pytest.skip(msg)
    return _env()


def live_tasks_under(folder: Path) -> list[str]:
    """Ids of the live SLURM tasks whose stdout lies under ``folder`` (the jobs a test submitted)."""
    from avkv import slurm

    p = sh("squeue", "--me", "-h", "-r", "-O", "JobArrayID:|,State:|,StdOut:4096", check=False)
    return [t.job_id for t in slurm.parse_squeue(p.stdout) if str(folder) in t.stdout]


@pytest.fixture
def work(cluster, tmp_path):
    """The test's folder; at the end, its watchers are killed and its SLURM jobs cancelled (bounded)."""
    w = Work(tmp_path, cluster)
    yield w
    for proc in w.procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    ids = live_tasks_under(tmp_path)
    if ids:
        sh("scancel", *ids, check=False)
        wait_until(lambda: not live_tasks_under(tmp_path), 60, f"cancelled tasks {ids} to leave the queue")


class Work:
    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.procs = root, env, []
        self.runs = root / "runs"

    def submit(self, *overrides: str, sweep: str = "sweep", cwd: Path = REPO, extra: tuple = ()
               ) -> subprocess.Popen:
        """``python run.py -m <launcher> <overrides>`` in the background: the sweep's watcher."""
        out = open(self.root / f"{sweep}.watcher.log", "w")
        cmd = [sys.executable, "run.py", "-m", *LAUNCHER, f"paths.runs={self.runs}",
               f"hydra.sweep.dir={self.root / sweep}", *overrides, *extra]
        proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log = self.root / f"{sweep}.watcher.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def run_cmd(self, cmd: str, name: str, cwd: Path = REPO) -> subprocess.Popen:
        """A printed command line (``python run.py -m ...``) run in the background as a watcher."""
        argv = shlex.split(cmd)
        assert argv[:2] == ["python", "run.py"], cmd
        out = open(self.root / f"{name}.watcher.log", "w")
        proc = subprocess.Popen([sys.executable, *argv[1:]], cwd=cwd, env=self.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = self.root / f"{name}.watcher.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def run_dirs(self) -> list[Path]:
        return sorted(d for d in self.runs.glob("*__*") if d.is_dir()) if self.runs.is_dir() else []

    def run_dir(self, pattern: str, timeout: float = 300) -> Path:
        """The one run directory matching ``*pattern*`` (waits for it to appear)."""
        wait_until(lambda: len(list(self.runs.glob(f"*{pattern}*"))) == 1, timeout, f"a run dir *{pattern}*")
        return next(self.runs.glob(f"*{pattern}*"))


def wait_until(pred, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the watcher did not exit within {timeout:.0f} s:\n{watcher_log(proc)[-3000:]}")


def watcher_log(proc) -> str:
    return Path(proc.log).read_text(errors="replace")


def raw_lines(run_dir: Path) -> list[str]:
    f = run_dir / "samples.jsonl"
    return f.read_text().splitlines() if f.is_file() else []


def n_lines(run_dir: Path) -> int:
    return len(raw_lines(run_dir))


def counts(run_dir: Path) -> tuple[int, int]:
    """(lines, distinct sample ids) of a run directory's samples.jsonl, every line parsed (a torn or duplicate
    line shows up as lines != ids)."""
    ids = [json.loads(l)["sample_id"] for l in raw_lines(run_dir)]
    dup = [k for k, v in Counter(ids).items() if v > 1]
    assert not dup, f"{run_dir.name}: samples written twice: {dup}"
    return len(ids), len(set(ids))


def sacct_states(job: str, timeout: float = 60) -> list[str]:
    """Every state sacct recorded for a task (``-D``: requeued attempts too), oldest first, once the last is final
    (the watcher returns on the result file, while SLURM may still be ending the task: waits, bounded)."""
    def states():
        p = sh("sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "JobID,State")
        got = [line.split("|")[1].split()[0] for line in p.stdout.splitlines() if line.split("|")[0] == job]
        return got if got and got[-1] not in LIVE_STATES else None

    return wait_until(states, timeout, f"a final sacct state of {job}", every=1)


LIVE_STATES = {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING", "SUSPENDED", "RESIZING"}


def task_of(run_dir: Path, timeout: float = 300) -> str:
    """The SLURM task (``<array>_<task>``) holding a run directory's lock (waits until one does)."""
    from avkv.results import lock_holder

    h = wait_until(lambda: lock_holder(run_dir), timeout, f"a task to lock {run_dir.name}")
    assert h.get("slurm_job"), h
    return h["slurm_job"]


def missing(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """``avkv missing ARGS`` (the avkv of the checkout ``cwd``)."""
    return sh(sys.executable, "-m", "avkv.cli", "missing", *args, cwd=cwd, timeout=timeout)


def resubmit_lines(out: str) -> list[str]:
    return [l for l in out.splitlines() if l.startswith("python run.py -m")]

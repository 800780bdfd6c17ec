"""Preemption on a real SLURM: ``scontrol requeue`` (what a preemption does) and ``scancel --signal=USR2`` (what
submitit's time-limit warning looks like) mid-run; each requeued task resumes its run directory: every sample
exactly once, the watcher exits 0."""
from __future__ import annotations

import json

from .conftest import (counts, n_lines, sacct_states, sh, task_of, wait_exit, wait_until, watcher_log)

#: the whole AV proxy held-out set: long enough that a run cannot finish inside the kill's latency (with 30
#: samples, about 0.1 s each, the requeued attempt finished all 30 during KillWait's 3 s)
LIMIT = 150


def _task_log(work, task: str) -> str:
    d = work.root / "sweep" / ".submitit" / task
    return "".join(f.read_text(errors="replace") for f in sorted(d.glob("*_log.*")))


def test_requeue_and_usr2_mid_run(work):
    w = work.submit("method=snapkv", "budget=0.2,0.5", f"dataset.limit={LIMIT}")
    req, usr = work.run_dir("__b0.2__"), work.run_dir("__b0.5__")
    t_req, t_usr = task_of(req), task_of(usr)
    wait_until(lambda: n_lines(req) >= 2 and n_lines(usr) >= 2, 300, "two samples in each run dir")
    sh("scontrol", "requeue", t_req)
    # scancel may answer "Job can not be altered now" for a while (array bookkeeping): it retries; bounded
    sh("timeout", "120", "scancel", "--signal=USR2", t_usr, timeout=130)
    # the killed attempts: lines written before the kill, still short of the limit (the kill landed mid-run)
    from avkv.results import lock_holder

    wait_until(lambda: lock_holder(req) is None and lock_holder(usr) is None, 120, "both attempts to end")
    cut = {"requeue": n_lines(req), "usr2": n_lines(usr)}
    print("lines when the first attempts ended:", cut)
    assert all(0 < k < LIMIT for k in cut.values()), cut
    rc = wait_exit(w, 600)
    assert rc == 0, watcher_log(w)[-3000:]
    for d in (req, usr):
        assert counts(d) == (LIMIT, LIMIT), d.name
        assert (d / "summary.json").is_file()
        meta = json.loads((d / "meta.json").read_text())
        assert len(meta.get("resumed", [])) == 1, meta.get("resumed")  # one rerun, which found the directory
    for task in (t_req, t_usr):
        states = sacct_states(task)
        assert states[-1] == "COMPLETED" and "REQUEUED" in states[:-1], (task, states)
    # what docs/sweeps.md says: SLURM's SIGTERM is ignored by submitit (the kill comes after KillWait); USR2 makes
    # submitit checkpoint and requeue the task itself
    assert "Bypassing signal SIGTERM" in _task_log(work, t_req)
    log = _task_log(work, t_usr)
    assert "Caught signal SIGUSR2" in log and "preempted" in log, log[-2000:]

"""The watcher killed mid-sweep, ``avkv missing`` while the array runs (one task running, one queued: no resubmit
command), a resubmission of the running point (its task is refused the run directory and skips it), and a task
killed without a result file (the watcher exits, with accounting, in bounded time; the printed resubmission writes
a new sweep folder and completes the point)."""
from __future__ import annotations

import os
import signal
import time

from avkv.results import lock_holder

from .conftest import (counts, live_tasks_under, missing, n_lines, resubmit_lines, sacct_states, task_of,
                       wait_exit, wait_until, watcher_log)

LIMIT = 24


def test_watcher_killed_missing_and_resubmitted_running_point(work):
    w = work.submit("method=snapkv", "budget=0.2,0.5", f"dataset.limit={LIMIT}",
                    "hydra.launcher.array_parallelism=1")
    first = work.run_dir("__b0.2__")
    t_first = task_of(first)
    wait_until(lambda: n_lines(first) >= 1, 300, "a first sample")
    os.killpg(w.pid, signal.SIGKILL)
    assert wait_exit(w, 30) == -signal.SIGKILL
    # the task keeps running without its watcher; stop it (SIGSTOP: it keeps its lock) while we look and resubmit
    pid = lock_holder(first)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        out = missing("--sweep-dir", str(work.root / "sweep")).stdout
        print(out)
        assert "2 jobs: 0 complete, 1 running, 1 queued, 0 partial, 0 missing" in out, out
        assert not resubmit_lines(out), out
        assert "PENDING" in out and t_first in out
        # a resubmission of the running point, as a user would type it: a new sweep, the same grid point
        dup = work.submit("method=snapkv", "budget=0.2", f"dataset.limit={LIMIT}", sweep="dup")
        assert wait_exit(dup, 300) == 0, watcher_log(dup)[-3000:]
        # a sweep of one point is one plain job for submitit (no array): its folder is .submitit/<job id>
        [dup_task] = [p.name for p in (work.root / "dup" / ".submitit").iterdir() if p.name.isdigit()]
        dup_log = "".join(f.read_text() for f in (work.root / "dup" / ".submitit" / dup_task).glob("*_log.*"))
        assert "is in use by pid" in dup_log, dup_log[-2000:]   # refused: it never wrote a line
        assert sacct_states(dup_task) == ["COMPLETED"]
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: not live_tasks_under(work.root / "sweep"), 600, "the array to finish without its watcher")
    dirs = work.run_dirs()
    assert len(dirs) == 2
    for d in dirs:
        assert counts(d) == (LIMIT, LIMIT), d.name
        assert (d / "summary.json").is_file()
    out = missing("--sweep-dir", str(work.root / "sweep")).stdout
    assert "2 jobs: 2 complete, 0 partial, 0 missing" in out and not resubmit_lines(out), out


def test_task_killed_without_result(work):
    w = work.submit("method=random", "budget=0.2", f"dataset.limit={LIMIT}")
    d = work.run_dir("__b0.2__")
    task = task_of(d)
    wait_until(lambda: n_lines(d) >= 2, 300, "two samples")
    os.kill(lock_holder(d)["pid"], signal.SIGKILL)   # an OOM kill or a dead node: no result file
    t0 = time.monotonic()
    rc = wait_exit(w, 180)   # with accounting: UncompletedJobError; without sacct it would wait forever
    waited = time.monotonic() - t0
    print(f"watcher exited {rc} {waited:.1f} s after the kill")
    assert rc != 0 and "UncompletedJobError" in watcher_log(w), watcher_log(w)[-3000:]
    assert sacct_states(task) == ["FAILED"], sacct_states(task)
    k, ids = counts(d)
    print(f"killed task left {k} lines / {ids} ids")
    assert 0 < k == ids < LIMIT and not (d / "summary.json").exists()
    wait_until(lambda: not live_tasks_under(work.root), 60, "the failed task to leave the queue")
    sweep = work.root / "sweep"
    mr = (sweep / "multirun.yaml").read_bytes()
    out = missing("--sweep-dir", str(sweep)).stdout
    assert "1 jobs: 0 complete, 1 partial, 0 missing" in out, out
    cmds = resubmit_lines(out)
    assert len(cmds) == 1 and f"hydra.sweep.dir={sweep}-resubmit-" in cmds[0], cmds
    r = work.run_cmd(cmds[0], "resubmit")
    assert wait_exit(r, 600) == 0, watcher_log(r)[-3000:]
    assert counts(d) == (LIMIT, LIMIT) and (d / "summary.json").is_file()
    assert (sweep / "multirun.yaml").read_bytes() == mr          # the original sweep's record is untouched
    new = [p for p in work.root.glob("sweep-resubmit-*") if (p / "multirun.yaml").is_file()]
    assert len(new) == 1, new
    out = missing("--sweep-dir", str(sweep)).stdout
    assert "1 jobs: 1 complete, 0 partial, 0 missing" in out, out

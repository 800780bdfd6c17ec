"""A 2×2 sweep on a real SLURM: one array, four run directories, every sample once, the watcher exits 0."""
from __future__ import annotations

import json
import re

from .conftest import (counts, live_tasks_under, missing, resubmit_lines, sacct_states, wait_exit, wait_until,
                       watcher_log)

LIMIT = 8


def test_sweep_2x2(work):
    w = work.submit("method=snapkv,random", "budget=0.2,0.5", f"dataset.limit={LIMIT}")
    rc = wait_exit(w, 600)
    assert rc == 0, watcher_log(w)[-3000:]
    dirs = work.run_dirs()
    assert sorted(d.name.split("__")[2] + "@" + d.name.split("__")[3] for d in dirs) == \
        ["random@b0.2", "random@b0.5", "snapkv@b0.2", "snapkv@b0.5"]
    ids = None
    for d in dirs:
        assert counts(d) == (LIMIT, LIMIT), d.name
        assert (d / "summary.json").is_file()
        got = {json.loads(l)["sample_id"] for l in (d / "samples.jsonl").read_text().splitlines()}
        ids = ids or got
        assert got == ids  # the same 8 samples in every point
    # one array of four tasks, each completed once (the watcher returns on the result files: a task may still be
    # ending in SLURM)
    wait_until(lambda: not live_tasks_under(work.root), 60, "the array's tasks to end")
    tasks = sorted(p.name for p in (work.root / "sweep" / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 4 and len({t.split("_")[0] for t in tasks}) == 1, tasks
    for task in tasks:
        assert sacct_states(task) == ["COMPLETED"], (task, sacct_states(task))
    out = missing("--sweep-dir", str(work.root / "sweep")).stdout
    assert "4 jobs: 4 complete, 0 partial, 0 missing" in out and not resubmit_lines(out), out

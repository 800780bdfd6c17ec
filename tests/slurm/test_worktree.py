"""The same grid point submitted from two checkouts in different folders is one run directory: ``avkv missing``
from the second checkout sees the point the first finished as complete, and its SLURM task resumes (skips) the
same directory instead of starting a new one."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from .conftest import REPO, counts, missing, resubmit_lines, sh, wait_exit, watcher_log

LIMIT = 8
POINT = ("method=snapkv", "budget=0.2", f"dataset.limit={LIMIT}")


def _second_checkout(dest):
    """The working tree's files (tracked and untracked, not ignored) copied to ``dest``; its ``.cache`` (tiny
    checkpoints, fixtures) is a link to this checkout's: the configs still name ``<dest>/.cache/...``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    (dest / ".cache").symlink_to(REPO / ".cache")
    return dest


def test_two_checkouts_one_run_dir(work):
    other = _second_checkout(work.root / "elsewhere" / "avkv")
    assert sh(sys.executable, "-c", "import avkv.results as r; print(r.__file__)", cwd=other).stdout.strip() \
        == str(other / "avkv" / "results.py")   # the second checkout runs its own code
    w = work.submit(*POINT)
    assert wait_exit(w, 600) == 0, watcher_log(w)[-3000:]
    [d] = work.run_dirs()
    assert counts(d) == (LIMIT, LIMIT)
    before = (d / "samples.jsonl").read_bytes()
    args = ["hydra/launcher=slurm", f"paths.runs={work.runs}", *POINT]
    out = missing(*args, cwd=other).stdout
    assert "1 jobs: 1 complete, 0 partial, 0 missing" in out and str(d) in out and not resubmit_lines(out), out
    w2 = work.submit(*POINT, sweep="sweep_elsewhere", cwd=other)
    assert wait_exit(w2, 600) == 0, watcher_log(w2)[-3000:]
    assert work.run_dirs() == [d]                       # no second directory
    assert (d / "samples.jsonl").read_bytes() == before   # nothing recomputed, nothing appended
    meta = json.loads((d / "meta.json").read_text())
    assert len(meta.get("resumed", [])) == 1   # the second checkout's task opened this directory

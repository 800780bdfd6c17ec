"""End to end on the tiny models and fixtures: multiruns through run.py, interruption and resume, the report."""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from avkv import grid, report
from tests.sweeps.conftest import kill_group, popen_run_py, run_py, run_py_here

pytestmark = pytest.mark.slow
COMMON = ["model=tiny_qwen2_5_omni", "dataset=avqa", "max_new_tokens=2", "experiment_name=sweeptest", "threads=1"]


def lines(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []


def test_local_launcher_multirun_then_report(assets, tmp_path):
    runs, sweep = tmp_path / "runs", tmp_path / "sweep"
    run_py("-m", "hydra/launcher=local", "method=full,snapkv", "budget=0.2,0.5", "dataset.limit=2", *COMMON,
           f"paths.runs={runs}", f"hydra.sweep.dir={sweep}")
    dirs = sorted(d for d in runs.iterdir() if d.name != "wandb")
    assert len(dirs) == 3                     # the full cache is one run directory at both budgets
    assert sum("__full__bfull__" in d.name for d in dirs) == 1
    for d in dirs:
        assert (d / "summary.json").is_file()
        assert [r["sample_id"] for r in lines(d / "samples.jsonl")] == ["1000", "1001"]   # written once
    # submitit ran each grid point as its own job (own folder, own log)
    jobs = [p for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(jobs) == 4
    res = report.build([runs], out=tmp_path / "rep", n_boot=200, quiet=True)
    pts = res["points"]
    assert set(pts["method"]) == {"full", "snapkv"} and set(pts[pts.method == "snapkv"]["budget"]) == {0.2, 0.5}
    assert len(pts[pts.method == "full"]) == 1
    assert (pts["score_n"] == 2).all() and pts["complete"].all()
    snap = pts[pts.method == "snapkv"]
    assert (snap["diff_n"] == 2).all()  # paired with the full cache on the same two samples
    assert (snap["kv_bytes_kept"] < pts[pts.method == "full"]["kv_bytes_kept"].min()).all()
    md = (tmp_path / "rep" / "table.md").read_text()
    assert "| tiny_qwen2_5_omni | snapkv | 0.5 |" in md and "| tiny_qwen2_5_omni | full | – |" in md
    assert (tmp_path / "rep" / "samples.parquet").is_file()
    assert list((tmp_path / "rep" / "plots").glob("*.png"))


def test_interrupted_multirun_resumes_without_duplicates(assets, tmp_path):
    """Kill a preset's multirun mid-way (as a preemption would), list what is left, rerun: complete points are
    skipped, the partial one resumes after its last whole line, nothing is computed twice or written twice."""
    runs, sweep = tmp_path / "runs", tmp_path / "sweep"
    args = ["experiment=budget_curves", "smoke=tiny", "method=full,streamingllm,snapkv", "budget=0.2",
            "dataset.limit=4", "max_new_tokens=6", f"paths.runs={runs}"]
    p = popen_run_py("-m", *args, f"hydra.sweep.dir={sweep}")
    deadline = time.time() + 150
    try:
        while time.time() < deadline:
            dirs = [d for d in runs.glob("*__*")] if runs.is_dir() else []
            done = [d for d in dirs if (d / "summary.json").is_file()]
            partial = [d for d in dirs if not (d / "summary.json").is_file() and lines(d / "samples.jsonl")]
            if done and partial:
                break
            if p.poll() is not None:
                pytest.fail("the multirun finished before it could be interrupted")
            time.sleep(0.01)
        else:
            pytest.fail("no partial run appeared in time")
    finally:
        kill_group(p)
    # a kill can also tear the last line: simulate that on the partial run
    part = next(d for d in runs.glob("*__*") if not (d / "summary.json").is_file() and lines(d / "samples.jsonl"))
    with open(part / "samples.jsonl", "a") as f:
        f.write('{"sample_id": "10')
    before = {d.name: (d / "samples.jsonl").read_bytes() for d in runs.glob("*__*")}
    complete_before = {d.name for d in runs.glob("*__*") if (d / "summary.json").is_file()}
    partial_ids = [json.loads(l)["sample_id"] for l in before[part.name].decode().splitlines()[:-1]]

    jobs = grid.check(grid.expand(args))
    status = Counter(j.status for j in jobs)
    assert len(jobs) == 3 and status["complete"] >= 1 and status["partial"] >= 1
    cmds = grid.resubmit_commands(jobs)
    assert cmds and all("experiment=budget_curves" in c and "smoke=tiny" in c for c in cmds)
    resubmitted = {m for c in cmds for o in c.split() if o.startswith("method=") for m in o[7:].split(",")}
    method_of = lambda j: dict(o.split("=", 1) for o in j.overrides)["method"]  # noqa: E731
    assert resubmitted == {method_of(j) for j in jobs if j.status != "complete"}  # only what is left

    run_py_here("-m", *args, f"hydra.sweep.dir={sweep}-2")
    dirs = list(runs.glob("*__*"))
    assert len(dirs) == 3
    for d in dirs:
        recs = lines(d / "samples.jsonl")
        ids = [r["sample_id"] for r in recs]
        assert len(ids) == len(set(ids)) == 4, (d.name, ids)  # every sample once, none twice
        assert (d / "summary.json").is_file()
        if d.name in complete_before:  # skipped: not one byte rewritten
            assert (d / "samples.jsonl").read_bytes() == before[d.name]
    assert [r["sample_id"] for r in lines(part / "samples.jsonl")][:len(partial_ids)] == partial_ids
    assert Counter(j.status for j in grid.check(grid.expand(args)))["complete"] == 3


def test_slurm_launcher_array_requeue_resume(assets, tmp_path):
    """``hydra/launcher=slurm`` against a stand-in SLURM (tests/sweeps/fake_slurm): one array task per grid point
    with the cluster settings in the script; task 0 gets SLURM's warning signal after its first sample, submitit
    checkpoints and asks ``scontrol requeue`` (a time-limit requeue, allowed by max_num_timeout), and the requeued
    task resumes its run directory: every sample once."""
    import os
    import sys

    fake = Path(__file__).parent / "fake_slurm"
    state, runs, sweep = tmp_path / "slurm", tmp_path / "runs", tmp_path / "sweep"

    env = {"PATH": f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_STATE": str(state),
           "FAKE_SLURM_PREEMPT": str(runs / "*__b0.2__*"), "FAKE_SLURM_PYTHON": sys.executable}
    try:
        run_py("-m", "hydra/launcher=slurm", "hydra.launcher.partition=testpart", "hydra.launcher.account=proj",
               "hydra.launcher.timeout_min=1", "method=snapkv", "budget=0.2,0.5", "model=tiny_qwen2_5_vl",
               "dataset.limit=3", "max_new_tokens=4", "threads=1", f"paths.runs={runs}", f"hydra.sweep.dir={sweep}",
               env=env, timeout=300)
    finally:  # the stand-in's runner outlives a failed sweep: end it (and the tasks it started) by its id
        import signal

        for pid_file in state.glob("runner_*.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    events = (state / "events.log").read_text()
    assert "--array=0-1%" in events and "--partition=testpart" in events and "--account=proj" in events
    assert "signal 1000_0 USR2" in events and "scontrol requeue 1000_0" in events
    assert "start 1000_0 attempt 1" in events and "start 1000_1 attempt 0" in events
    assert "start 1000_1 attempt 1" not in events
    dirs = [d for d in runs.glob("*__*")]
    assert len(dirs) == 2
    for d in dirs:
        ids = [r["sample_id"] for r in lines(d / "samples.jsonl")]
        assert len(ids) == len(set(ids)) == 3 and (d / "summary.json").is_file(), (d.name, ids)
    meta = json.loads(next(d for d in dirs if "__b0.2__" in d.name).joinpath("meta.json").read_text())
    assert meta.get("resumed")  # the requeued task found its run directory and went on from there

"""Grid expansion (as Hydra's basic sweeper does it), resolvers, missing/partial listing, resubmission cover."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from avkv import grid


@pytest.fixture
def conf(tmp_path):
    d = tmp_path / "conf"
    (d / "method").mkdir(parents=True)
    (d / "experiment").mkdir()
    for m in ("full", "snapkv", "streamingllm"):
        (d / "method" / f"{m}.yaml").write_text(f"name: {m}\n")
    (d / "config.yaml").write_text(yaml.safe_dump({
        "defaults": ["_self_", {"method": "full"}, {"experiment": None}],
        "budget": 1.0, "out": str(tmp_path / "runs"), "shard": 0, "num_shards": 1}))
    (d / "experiment" / "paper.yaml").write_text("# @package _global_\n" + yaml.safe_dump({
        "grid": {"name": "paper", "methods": ["full", "snapkv", "h2o_not_written"], "budgets": [0.2, 0.5]},
        "hydra": {"sweeper": {"params": {"method": "${avkv.available:${grid.methods},method}",
                                         "budget": "${avkv.sweep:${grid.budgets}}"}}}}))
    return d


def run_dir_of(cfg):
    return Path(cfg.out) / f"{cfg.method.name}-{cfg.budget}-{cfg.shard}"


def test_resolvers(conf):
    assert grid.sweep_string([0.2, 0.5]) == "0.2,0.5"
    assert grid.available(["full", "nope", "snapkv"], "method", conf) == "full,snapkv"
    with pytest.raises(ValueError):
        grid.available(["nope"], "method", conf)


def test_expand_preset_params_and_cli(conf):
    jobs = grid.expand(["experiment=paper"], config_dir=conf)
    got = sorted((j.config.method.name, j.config.budget) for j in jobs)
    assert got == sorted(itertools.product(["full", "snapkv"], [0.2, 0.5]))  # h2o has no config: skipped
    # a key on the command line replaces the preset's values for that key; new keys add a dimension
    jobs = grid.expand(["experiment=paper", "budget=0.1", "shard=0,1", "num_shards=2"], config_dir=conf)
    assert len(jobs) == 4 and {j.config.budget for j in jobs} == {0.1}
    assert {j.config.shard for j in jobs} == {0, 1}


def test_status_and_resubmission(conf, tmp_path):
    jobs = grid.expand(["experiment=paper"], config_dir=conf)
    runs = tmp_path / "runs"
    (runs / "full-0.2-0").mkdir(parents=True)
    (runs / "full-0.2-0" / "summary.json").write_text("{}")
    (runs / "full-0.5-0").mkdir()
    (runs / "full-0.5-0" / "summary.json").write_text("{}")
    (runs / "snapkv-0.2-0").mkdir()
    (runs / "snapkv-0.2-0" / "samples.jsonl").write_text(json.dumps({"sample_id": "a"}) + "\n")
    grid.check(jobs, run_dir_of)
    status = {(j.config.method.name, j.config.budget): (j.status, j.samples) for j in jobs}
    assert status[("full", 0.2)][0] == "complete"
    assert status[("snapkv", 0.2)] == ("partial", 1)
    assert status[("snapkv", 0.5)] == ("missing", 0)
    cmds = grid.resubmit_commands(jobs)
    assert len(cmds) == 1
    assert sorted(cmds[0].split()[3:]) == ["budget=0.2,0.5", "experiment=paper", "method=snapkv"]
    table = grid.format_jobs(jobs)
    assert "partial" in table and "missing" in table


def test_cover_is_exact():
    def job(**kv):
        return grid.Job([f"{k}={v}" for k, v in kv.items()], status="missing")

    jobs = [job(m=m, b=b) for m in "xyz" for b in (1, 2)] + [job(m="w", b=1)]
    boxes = grid.cover(jobs)
    expanded = set()
    for box in boxes:
        vals = [o.split("=", 1)[1].split(",") for o in box]
        keys = [o.split("=", 1)[0] for o in box]
        for combo in itertools.product(*vals):
            t = tuple(zip(keys, combo))
            assert t not in expanded
            expanded.add(t)
    assert expanded == {tuple((k, v) for k, v in (o.split("=", 1) for o in j.overrides)) for j in jobs}
    assert len(boxes) <= 3


def test_cli_sweep_dir(conf, tmp_path, capsys, monkeypatch):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["experiment=paper"]}}}))
    assert grid.overrides_from_sweep_dir(sweep) == ["experiment=paper"]
    monkeypatch.setattr(grid, "default_run_dir", run_dir_of)
    monkeypatch.setattr(grid.check, "__defaults__", (run_dir_of,))
    assert grid.main(["--sweep-dir", str(sweep), "--config-dir", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "4 jobs: 0 complete, 0 partial, 4 missing" in out
    cmd = [l for l in out.splitlines() if l.startswith("python run.py -m")]
    assert len(cmd) == 1
    args = cmd[0].split()[3:]
    new_dir = [a for a in args if a.startswith("hydra.sweep.dir=")]
    assert sorted(set(args) - set(new_dir)) == ["budget=0.2,0.5", "experiment=paper", "method=full,snapkv"]
    # the resubmission writes a new sweep folder beside the original (never the original's multirun.yaml)
    assert len(new_dir) == 1 and new_dir[0].startswith(f"hydra.sweep.dir={sweep}-resubmit-")


def test_resubmission_never_reuses_the_sweep_dir(tmp_path):
    jobs = [grid.Job(["hydra.sweep.dir=/x/sweep", f"method={m}", "budget=0.2"], status=st)
            for m, st in (("a", "missing"), ("b", "partial"), ("c", "queued"), ("d", "running"), ("e", "complete"))]
    [cmd] = grid.resubmit_commands(jobs)
    args = cmd.split()[3:]
    assert "hydra.sweep.dir=/x/sweep" not in args
    assert [a for a in args if a.startswith("method=")] == ["method=a,b"]      # never queued/running/complete
    assert sum(a.startswith("hydra.sweep.dir=/x/sweep-resubmit-") for a in args) == 1
    # two boxes: two distinct new folders; one that exists already is skipped
    (tmp_path / "s-resubmit-T").mkdir()
    assert grid.fresh_sweep_dirs(tmp_path / "s", 2, stamp="T") == [f"{tmp_path}/s-resubmit-T-1",
                                                                   f"{tmp_path}/s-resubmit-T-2"]


def test_cli_queued_and_running_slurm_tasks(conf, tmp_path, capsys, monkeypatch):
    """squeue's live tasks of a sweep map back to its grid points by array index (task i = job i of the basic
    sweeper's order): a pending task's point is queued, a running task's point running; neither is resubmitted."""
    from avkv import slurm

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["experiment=paper"]}}}))
    for i in range(4):
        (sweep / ".submitit" / f"7_{i}").mkdir(parents=True)
    out_path = f"{sweep}/.submitit/%A_%a/%A_%a_0_log.out"
    squeue_out = f"7_1|PENDING|{out_path}   \n7_2|RUNNING|{out_path}\n99|RUNNING|/elsewhere/slurm-99.out\n"
    (sweep / ".submitit" / "7").mkdir()   # submitit's folder of the array itself: not another submission
    monkeypatch.setattr(slurm, "squeue_tasks", lambda timeout=30.0: slurm.parse_squeue(squeue_out))
    monkeypatch.setattr(grid, "default_run_dir", run_dir_of)
    monkeypatch.setattr(grid.check, "__defaults__", (run_dir_of,))
    assert grid.main(["--sweep-dir", str(sweep), "--config-dir", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "4 jobs: 0 complete, 1 running, 1 queued, 0 partial, 2 missing" in out, out
    rows = {tuple(l.split()[3:5]): l.split()[0] for l in out.splitlines() if l.split()[:1] in (
        ["missing"], ["queued"], ["running"])}
    # the preset's sweeper params are budget, then method (yaml.safe_dump sorts keys); Hydra's basic sweeper
    # crosses them in that order: (0.2,full) (0.2,snapkv) (0.5,full) (0.5,snapkv) are jobs 0..3
    assert rows == {("0.2", "full"): "missing", ("0.2", "snapkv"): "queued", ("0.5", "full"): "running",
                    ("0.5", "snapkv"): "missing"}, out
    assert "[SLURM task 7_1 PENDING]" in out and "[SLURM task 7_2 RUNNING]" in out
    cmds = [l for l in out.splitlines() if l.startswith("python run.py -m")]
    assert len(cmds) == 2 and _covers(cmds, {("full", "0.2"), ("snapkv", "0.5")}), cmds
    assert len({a for c in cmds for a in c.split() if a.startswith("hydra.sweep.dir=")}) == 2   # one folder each


def _covers(cmds, points):
    got = set()
    for c in cmds:
        kv = dict(a.split("=", 1) for a in c.split()[3:])
        got |= set(itertools.product(kv["method"].split(","), kv["budget"].split(",")))
    return got == points


def test_plain_job_of_a_one_point_sweep(tmp_path):
    """submitit submits a batch of one job as a plain job (``.submitit/<id>/``): it is task 0 of that batch, and the
    sweep's later submission (an array) is the next batch."""
    from avkv import slurm

    sweep = tmp_path / "s"
    for d in ("40", "41", "41_0", "41_1", "notes"):
        (sweep / ".submitit" / d).mkdir(parents=True)
    assert slurm.submission_ids(sweep) == [40, 41]
    [t] = slurm.parse_squeue(f"40|RUNNING|{sweep}/.submitit/%j/%j_0_log.out\n")
    assert (t.array_id, t.index, t.status) == (40, 0, "running")
    assert slurm.sweep_dir_of(t.stdout) == sweep

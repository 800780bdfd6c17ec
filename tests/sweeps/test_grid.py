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
    assert sorted(cmd[0].split()[3:]) == ["budget=0.2,0.5", "experiment=paper", "method=full,snapkv"]

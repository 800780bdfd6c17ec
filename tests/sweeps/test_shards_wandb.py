"""Sharding (separate run dirs, merged by the report) and the W&B mirror (group, tags, id = config hash)."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from avkv import grid, report
from avkv.experiment import run, run_dir_of, shard_docs


def test_shard_docs_partition():
    docs = list(range(7))
    parts = [shard_docs(docs, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == docs and all(parts)
    assert shard_docs(docs, 0, 1) == docs
    with pytest.raises(ValueError):
        shard_docs(docs, 3, 3)


@pytest.mark.slow
def test_shards_run_apart_and_merge_in_the_report(assets, tmp_path):
    jobs = grid.expand(["model=tiny_qwen2_5_vl", "method=snapkv", "dataset.limit=3", "max_new_tokens=2",
                        "shard=0,1", "num_shards=2", f"paths.runs={tmp_path}", "progress=false", "threads=1"])
    dirs = {run_dir_of(j.config) for j in jobs}
    assert len(dirs) == 2  # the shard keys are in the config hash
    summaries = [run(j.config) for j in jobs]
    assert {Path(s["run_dir"]) for s in summaries} == dirs
    ids = [json.loads(l)["sample_id"] for d in dirs for l in (d / "samples.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 3
    pts = report.aggregate(report.collect([tmp_path]), n_boot=50)
    assert len(pts) == 1
    p = pts.iloc[0]
    assert p.score_n == 3 and p.runs == 2 and p.num_shards == 2 and p.complete


class FakeRun:
    def __init__(self, **kw):
        self.kw, self.summary, self.logged, self.finished = kw, {}, [], False

    def log(self, d):
        self.logged.append(d)

    def finish(self):
        self.finished = True


class FakeTable(dict):
    def __init__(self, columns, data=None, log_mode=None):
        super().__init__(columns=columns, data=list(data or []), log_mode=log_mode)

    def add_data(self, *row):
        self["data"].append(list(row))


def test_wandb_conventions(monkeypatch, tmp_path):
    """group = experiment, tags model/method/dataset/budget, id = config hash, resume='allow', the full table."""
    runs = []
    fake = types.SimpleNamespace(
        init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1],
        Table=FakeTable,
        Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from avkv.tracking import make_tracker

    t = make_tracker({"name": "wandb", "mode": "offline", "project": "avkv", "dir": str(tmp_path)},
                     run_id="abc123", name="run", tags=["tiny", "snapkv", "avqa", "budget=0.2"], group="flowmm")
    t.log_sample({"sample_id": "3", "score": 1.0})
    t.finish({"dataset": "avqa", "metric": "accuracy", "score": 0.5, "prefill_s": {"mean": 0.1}},
             records=[{"sample_id": "1", "score": 0.0}, {"sample_id": "2", "score": 1.0}])
    r = runs[0]
    assert r.kw["id"] == "abc123" and r.kw["resume"] == "allow" and r.kw["group"] == "flowmm"
    assert r.kw["tags"] == ["tiny", "snapkv", "avqa", "budget=0.2"] and r.kw["mode"] == "offline"
    assert r.summary["avqa/accuracy"] == 0.5 and r.summary["prefill_s/mean"] == 0.1
    table = r.logged[-1]["samples"]
    assert [row[0] for row in table["data"]] == ["1", "2"]  # every stored sample, as after a requeue
    assert r.finished
    # the sample logged while running was streamed at once: its numbers and a row of the incremental table
    streamed = r.logged[0]
    assert streamed["sample/score"] == 1.0 and streamed["samples_done"] == 1
    assert streamed["samples_live"]["log_mode"] == "INCREMENTAL" and streamed["samples_live"]["data"][0][0] == "3"


def test_wandb_group_is_the_sweep(monkeypatch):
    """logger.group, else the preset's grid.name, else experiment_name (not 'default'), else none outside a sweep."""
    from omegaconf import OmegaConf

    from avkv.tracking import group_name
    cfg = lambda **kw: OmegaConf.create({"experiment_name": "default", "logger": {"group": None}, **kw})
    assert group_name(cfg()) is None
    assert group_name(cfg(experiment_name="ablation")) == "ablation"
    assert group_name(cfg(experiment_name="ablation", grid={"name": "flowmm_table1"})) == "flowmm_table1"
    assert group_name(cfg(logger={"group": "mine"}, grid={"name": "flowmm_table1"})) == "mine"


def test_wandb_offline_folder_and_sync_command_printed_once(monkeypatch, tmp_path, capsys):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1], Table=FakeTable,
                                 Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from avkv import tracking
    monkeypatch.setattr(tracking, "_ANNOUNCED", set())
    for i in range(3):                                    # three runs of one sweep in one process
        tracking.make_tracker({"name": "wandb", "mode": "offline", "dir": str(tmp_path)}, run_id=f"r{i}",
                              name="run", tags=[], group="g")
    err = capsys.readouterr().err
    assert err.count(f"wandb sync {tmp_path}/wandb/offline-run-*") == 1, err


@pytest.mark.slow
def test_wandb_offline_run_resumes_same_id(assets, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (job,) = grid.expand(["model=tiny_qwen2_5_vl", "method=snapkv", "dataset.limit=1", "max_new_tokens=2",
                          "logger=wandb", "logger.mode=offline", "experiment_name=wbtest", f"paths.runs={tmp_path}",
                          "progress=false", "threads=1"])
    s1 = run(job.config)
    s2 = run(job.config)  # a requeued job: same config, nothing left to compute, same W&B run
    offline = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) >= 1
    # offline-run-<YYYYMMDD_HHMMSS>-<run id>[-<n>]: wandb appends -<n> when both runs start in the same second
    assert {p.name.split("-")[3] for p in offline} == {s1["config_hash"][:32]} == {s2["config_hash"][:32]}
    text = "".join(p.read_text(errors="ignore") for p in (tmp_path).rglob("*") if p.is_file()
                   and p.suffix in (".json", ".yaml", ".jsonl", ".log"))
    assert "WANDB_API_KEY" not in text

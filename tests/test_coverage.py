"""The coverage count (avkv/coverage.py): the real paper CSVs, and a small synthetic paper whose answer is known."""
from __future__ import annotations

import csv

import pytest

from avkv import coverage

HEAD = ["paper", "table", "model", "model_key", "method_key", "budget", "task", "task_key", "metric_kind", "value"]


def write_paper(d, rows):
    with open(d / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEAD)
        w.writerows(rows)


def test_real_papers_count_every_published_number():
    res = coverage.compute()
    assert res["published"] == 359                 # metric_kind=score with a value, as the issue counts
    assert {k[0] for k in res["tables"]} == {"audiokv_table1", "audiokv_table2", "flowmm_table1", "madakv_table1"}
    assert res["runnable"] <= res["runnable_lenient"] <= res["published"]
    # every key the CSVs use has a row in the mapping table (a new key must be mapped, never guessed)
    assert not [b for b in res["blocks"] if "no row in" in b], res["blocks"]
    assert "coverage of the published score numbers" in coverage.format_report(res)


def test_synthetic_paper(tmp_path):
    cfg = tmp_path / "configs"
    for g, names in {"model": ["m1"], "method": ["full", "x"], "dataset": ["d1"]}.items():
        (cfg / g).mkdir(parents=True)
        for n in names:
            (cfg / g / f"{n}.yaml").write_text("{}\n")
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys" / "config_keys.csv").write_text(
        "kind,key,config,note\nmodel,k1,m1,\nmodel,k2,m2,\nmethod,full,full,\nmethod,x,x,\nmethod,y,y,\n"
        "task,t1,d1,\ntask,t2,d2,\ntask,Avg,,aggregate\n")
    write_paper(tmp_path, [
        ["P", "T", "M1", "k1", "full", "1", "a", "t1", "score", "1"],      # runnable
        ["P", "T", "M1", "k1", "full", "1", "b", "t2", "score", "2"],      # dataset d2 missing
        ["P", "T", "M1", "k1", "full", "1", "avg", "Avg", "score", "3"],   # needs t1 and t2 -> lenient only
        ["P", "T", "M1", "k1", "y", "1", "a", "t1", "score", "4"],         # method y missing
        ["P", "T", "M2", "k2", "full", "1", "a", "t1", "score", "5"],      # model m2 missing
        ["P", "T", "M3", "", "x", "1", "a", "t1", "score", "6"],           # no model key
        ["P", "T", "M1", "k1", "full", "1", "a", "t1", "score", ""],       # no value: not published
        ["P", "T", "M1", "k1", "full", "1", "a", "t1", "delta", "7"],      # not a score
    ])
    res = coverage.compute(tmp_path, cfg)
    assert res["published"] == 6 and res["runnable"] == 1 and res["runnable_lenient"] == 2
    assert res["blocks"] == {"dataset t2 (configs/dataset/d2.yaml)": 2, "method y (configs/method/y.yaml)": 1,
                             "model k2 (configs/model/m2.yaml)": 1, "model M3 (no model_key)": 1}
    assert res["alone"]["dataset t2 (configs/dataset/d2.yaml)"] == 2
    (cfg / "dataset" / "d2.yaml").write_text("{}\n")                   # add the dataset: both rows run
    assert coverage.compute(tmp_path, cfg)["runnable"] == 3


def test_mapping_table_errors(tmp_path):
    write_paper(tmp_path, [])
    with pytest.raises(FileNotFoundError, match="config_keys.csv"):
        coverage.compute(tmp_path)
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys" / "config_keys.csv").write_text("kind,key,config,note\nmodel,a,b,\nmodel,a,c,\n")
    with pytest.raises(ValueError, match="line 3 repeats model key 'a'"):
        coverage.compute(tmp_path)

"""The report on hand-written run directories: CI, paired differences, shard merging, tables, plots, papers."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from avkv import report, stats
from tests.sweeps.fake_runs import make_run


# ---------------------------------------------------------------------------------------------- statistics
def test_bootstrap_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    x = rng.random(200)
    a = stats.bootstrap_mean(x, n_boot=500, seed=3)
    b = stats.bootstrap_mean(x, n_boot=500, seed=3)
    assert a == b
    assert a.lo < a.mean < a.hi and a.n == 200
    assert a.mean == pytest.approx(x.mean())
    # roughly the normal-theory interval
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert a.half_width == pytest.approx(1.96 * se, rel=0.2)


def test_bootstrap_edge_cases():
    assert math.isnan(stats.bootstrap_mean([]).mean)
    one = stats.bootstrap_mean([0.5])
    assert (one.mean, one.lo, one.hi) == (0.5, 0.5, 0.5)
    assert stats.bootstrap_mean([1.0, float("nan"), 0.0]).n == 2


def test_stratified_mean_is_mean_of_task_means():
    v = [1, 1, 1, 1, 0, 0]
    s = ["a", "a", "a", "a", "b", "b"]
    e = stats.bootstrap_mean(v, strata=s, n_boot=200)
    assert e.mean == pytest.approx(0.5)  # (1 + 0) / 2, not 4/6


def test_paired_difference_uses_common_keys_only():
    a = {"x": 1.0, "y": 0.0, "z": 1.0}
    b = {"x": 1.0, "y": 1.0, "w": 0.0}
    d = stats.paired_difference(a, b, n_boot=200)
    assert d.n == 2 and d.mean == pytest.approx(-0.5)
    same = stats.paired_difference(a, a)
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------- collecting
@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "runs"
    ids = [f"s{i}" for i in range(8)]
    for task, base in [("ALFRED", 1), ("IEdit", 0)]:
        make_run(root, f"full-{task}", method="full", budget=0.2, task=task, ids=ids, scores=[1] * 8,
                 paper="flowmm_table1")
        for m in ("snapkv", "streamingllm"):
            for b in (0.2, 0.5):
                sc = [1 if (i + (m == "snapkv") + int(b * 10)) % 2 == 0 else 0 for i in range(8)]
                make_run(root, f"{m}-{b}-{task}", method=m, budget=b, task=task, ids=ids, scores=sc,
                         paper="flowmm_table1")
    return root


def test_collect_one_row_per_sample(grid):
    df = report.collect([grid])
    assert len(df) == 2 * 5 * 8
    assert {"kept_by_modality.text", "model", "method", "budget", "task", "point_id"} <= set(df.columns)
    assert set(df["task"]) == {"ALFRED", "IEdit"}


def test_points_have_ci_and_paired_diff(grid):
    df = report.collect([grid])
    pts = report.aggregate(df, n_boot=200)
    snap = pts[(pts.method == "snapkv") & (pts.budget == 0.2) & (pts.task == "ALFRED")].iloc[0]
    sc = df[(df.method == "snapkv") & (df.budget == 0.2) & (df.task == "ALFRED")]["score"].mean() * 100
    assert snap.score_mean == pytest.approx(sc)
    assert snap.score_lo <= snap.score_mean <= snap.score_hi
    assert snap.diff_mean == pytest.approx(sc - 100.0)  # full scored 1 everywhere
    assert snap.diff_n == 8 and bool(snap.complete)
    full = pts[pts.method == "full"].iloc[0]
    assert full.diff_mean == 0.0


def test_tables_markdown_latex(grid, tmp_path):
    res = report.build([grid], out=tmp_path / "rep", n_boot=200, quiet=True)
    md = res["markdown"]
    assert "| model | method | budget | n | ALFRED | IEdit | Avg | Δ Full |" in md
    assert md.count("| tiny_qwen25vl | full |") == 1  # full shown once though it ran with budget 0.2
    assert "±" in md
    tex = (tmp_path / "rep" / "table.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex
    for f in ["samples.parquet", "samples.csv", "points.csv", "table.md", "plots/exp__tiny_qwen25vl__milebench.png"]:
        assert (tmp_path / "rep" / f).is_file(), f
    back = report.read_table(tmp_path / "rep")
    assert len(back) == len(res["samples"])
    # the preset named its paper: the paper's numbers are printed beside ours
    assert "beside the paper" in md and "36.92" in md


def test_shards_merge_and_incomplete_flagged(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a0", shard=0, num_shards=2, ids=["s0", "s2"], scores=[1, 1])
    make_run(root, "a1", shard=1, num_shards=2, ids=["s1", "s3"], scores=[0, 1], complete=False)
    make_run(root, "b0", method="full", ids=["s0", "s1", "s2", "s3"], scores=[1, 1, 1, 1])
    df = report.collect([root])
    pts = report.aggregate(df, n_boot=100)
    snap = pts[pts.method == "snapkv"].iloc[0]
    assert snap.score_n == 4 and snap.runs == 2 and snap.num_shards == 2
    assert snap.score_mean == pytest.approx(75.0)
    assert not snap.complete  # shard 1 has no summary.json yet
    assert snap.diff_mean == pytest.approx(-25.0) and snap.diff_n == 4
    res = report.build([root], n_boot=100, quiet=True)
    assert "Incomplete points" in res["markdown"]


def test_missing_shard_means_incomplete(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a0", shard=0, num_shards=3, ids=["s0"], scores=[1])
    pts = report.aggregate(report.collect([root]), n_boot=50)
    assert pts.iloc[0].shards_seen == 1 and not pts.iloc[0].complete


def test_duplicates_and_torn_lines_and_errors(tmp_path):
    root = tmp_path / "runs"
    d = make_run(root, "a", ids=["s0", "s1", "s2"], scores=[1, 0, 1], errors=("s2",))
    with open(d / "samples.jsonl", "a") as f:
        f.write('{"sample_id": "s1", "score": 1, "error": null}\n{"sample_id": "s9", "sco')  # rewrite + torn tail
    df = report.collect([root])
    assert sorted(df["sample_id"]) == ["s0", "s1", "s2"]
    pts = report.aggregate(df, n_boot=50)
    assert pts.iloc[0].n_err == 1 and pts.iloc[0].score_n == 2 and pts.iloc[0].score_mean == 100.0


def test_distinct_hyperparameters_are_separate_rows(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "w4", scores=[1, 1])
    make_run(root, "w8", scores=[0, 0], extra_cfg={"method": {"name": "snapkv", "window": 8}})
    pts = report.aggregate(report.collect([root]), n_boot=50)
    assert len(pts) == 2
    t = report.wide_table(pts)
    assert len(t) == 2 and t["method"].str.contains(r"snapkv \[").all()


def test_out_of_budget_points_are_listed_apart_at_what_they_held(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "snap", method="snapkv", budget=0.2, scores=[1, 0])
    make_run(root, "fastv", method="fastv", budget=0.2, scores=[1, 1], achieved=0.56)      # FastV's 2-layer floor
    make_run(root, "acc", method="acckv", budget=0.2, scores=[0, 1], achieved=0.199)       # rounding: held
    pts = report.aggregate(report.collect([root]), n_boot=50)
    by = {r.method: r for r in pts.itertuples()}
    assert by["fastv"].budget_achieved == pytest.approx(0.56) and not by["fastv"].budget_held
    assert by["snapkv"].budget_held and by["acckv"].budget_held
    t = report.wide_table(pts)
    assert list(t["method"]) == ["snapkv", "acckv", "fastv"]                 # the out-of-budget row comes last
    assert list(t["budget"]) == ["0.2", "0.2", "0.2 → held 0.56"]
    assert list(t["KV held"]) == ["0.20", "0.20", "0.56"]


def test_empty(tmp_path):
    res = report.build([tmp_path], quiet=True)
    assert "no results" in res["markdown"]


def test_cli(grid, tmp_path, capsys):
    from avkv import cli

    assert cli.main(["report", str(grid), "--out", str(tmp_path / "r"), "--n-boot", "100", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "snapkv" in out and (tmp_path / "r" / "samples.parquet").is_file()


# ---------------------------------------------------------------------------------------------- paper numbers
def test_paper_csvs_are_well_formed():
    df = report.paper_numbers()
    assert {"paper", "table", "ref", "source", "method_key", "task_key", "value"} <= set(df.columns)
    assert set(df["source"]) <= {"paper", "2nd"}
    assert set(df["paper"]) == {"FlowMM", "MadaKV", "AudioKV", "AccKV", "PureKV"}
    assert df["ref"].str.len().min() > 10


def test_flowmm_table1_transcription_is_consistent():
    """Avg is the mean of the task columns and Δ = Avg − Full Avg, as printed in the paper (rounding aside)."""
    df = report.paper_numbers("flowmm_table1")
    for (model, method), g in df.groupby(["model", "method"]):
        tasks = g[~g.task_key.isin(["Avg", "Δ Full"])]["value"]
        avg = g[g.task_key == "Avg"]["value"].iloc[0]
        assert tasks.mean() == pytest.approx(avg, abs=0.03), (model, method)
        if method != "Full":
            full = df[(df.model == model) & (df.method == "Full") & (df.task_key == "Avg")]["value"].iloc[0]
            delta = g[g.task_key == "Δ Full"]["value"].iloc[0]
            assert avg - full == pytest.approx(delta, abs=0.02), (model, method)


def test_audiokv_table1_full_avg_consistent():
    df = report.paper_numbers("audiokv_table1")
    full = df[df.method_key == "full"]
    for model, g in full.groupby("model"):
        tasks = g[g.task_key != "Avg"]["value"]
        assert tasks.mean() == pytest.approx(g[g.task_key == "Avg"]["value"].iloc[0], abs=0.06), model


def test_asr_samples_scored_at_corpus_level(tmp_path):
    """errors/ref_words samples: 100 − corpus WER (not the mean of per-sample WERs), paired against full."""
    import json

    root = tmp_path / "runs"
    for method, errs in [("full", [0, 1, 0]), ("snapkv", [5, 1, 0])]:
        d = make_run(root, method, method=method, dataset="librispeech", scores=[0, 0, 0])
        recs = [json.loads(l) for l in (d / "samples.jsonl").read_text().splitlines()]
        with open(d / "samples.jsonl", "w") as f:
            for r, e, n in zip(recs, errs, [10, 10, 80]):
                r.update(errors=e, ref_words=n, score=100.0 * e / n)
                f.write(json.dumps(r) + "\n")
    pts = report.aggregate(report.collect([root]), n_boot=300)
    full = pts[pts.method == "full"].iloc[0]
    snap = pts[pts.method == "snapkv"].iloc[0]
    assert full.score_mean == pytest.approx(100 - 100 * 1 / 100)
    assert snap.wer == pytest.approx(6.0) and snap.score_mean == pytest.approx(94.0)
    assert snap.diff_mean == pytest.approx(-5.0)
    assert snap.diff_lo <= -5.0 <= snap.diff_hi
    e = stats.bootstrap_corpus([200, 0], [100, 100])
    assert e.mean == 0.0  # clipped at 0 like the paper


def test_each_paper_model_gets_its_own_table(tmp_path):
    """A preset sweeping several of the paper's models (``grid.paper_models``): each run is compared with its own
    model's row of the paper (MobileVLM's Full ALFRED is 25.18, Qwen2.5-VL's 36.92)."""
    root = tmp_path / "runs"
    g = {"name": "flowmm_table1", "paper": "flowmm_table1", "paper_model": "Qwen2.5-VL-7B",
         "paper_models": {"tiny_mobilevlm": "MobileVLM-V2-3B"}}
    for model in ("tiny_qwen2_5_vl", "tiny_mobilevlm"):
        make_run(root, f"{model}-full", model=model, method="full", budget=0.2, task="ALFRED", scores=[1, 0],
                 experiment="flowmm_table1", extra_cfg={"grid": g})
    df = report.collect([root])
    assert dict(zip(df["model"], df["paper_model"])) == {"tiny_qwen2_5_vl": "Qwen2.5-VL-7B",
                                                         "tiny_mobilevlm": "MobileVLM-V2-3B"}
    res = report.build([root], n_boot=50, quiet=True, plots=False)
    sides = res["beside_paper"]
    assert set(sides) == {"flowmm_table1 · Qwen2.5-VL-7B", "flowmm_table1 · MobileVLM-V2-3B"}
    mob = sides["flowmm_table1 · MobileVLM-V2-3B"].to_string()
    assert "(25.18)" in mob and "(36.92)" not in mob
    assert "(36.92)" in sides["flowmm_table1 · Qwen2.5-VL-7B"].to_string()


# ---------------------------------------------------------------------------------------------- unlike points
@pytest.fixture
def mixed(tmp_path):
    """One experiment run at two dataset limits (8 and 16 samples) and a second experiment with compress_at=context:
    the same (model, method, budget) appears in three contexts."""
    root = tmp_path / "mixed"
    for name, n, extra, exp in [("a8", 8, {"dataset": {"name": "avqa", "root": "/d", "limit": 8}}, "budget_demo"),
                                ("a16", 16, {"dataset": {"name": "avqa", "root": "/d", "limit": 16}}, "budget_demo"),
                                ("c8", 8, {"dataset": {"name": "avqa", "root": "/d", "limit": 8},
                                           "compress_at": "context"}, "context_demo")]:
        ids = [f"s{i}" for i in range(n)]
        make_run(root, f"full-{name}", method="full", budget=0.2, dataset="avqa", ids=ids, scores=[1] * n,
                 experiment=exp, extra_cfg=extra)
        make_run(root, f"snap-{name}", method="snapkv", budget=0.2, dataset="avqa", ids=ids,
                 scores=[1] * (n // 2) + [0] * (n - n // 2) if n == 8 else [1] * n, experiment=exp, extra_cfg=extra)
    return root


def test_points_of_different_limits_and_experiments_are_never_pooled(mixed, tmp_path):
    res = report.build([mixed], out=tmp_path / "rep", n_boot=100, quiet=True)
    pts = res["points"]
    snap = pts[pts["method"] == "snapkv"].sort_values(["experiment", "score_n"])
    assert list(snap["score_n"]) == [8, 16, 8]                  # three points, n kept apart
    assert sorted(snap["score_mean"]) == [50.0, 50.0, 100.0]
    assert set(snap["limit"]) == {"8", "16"} and set(snap["compress_at"].astype(str)) >= {"context"}
    md = res["markdown"]
    assert md.count("### budget_demo · avqa") == 2 and md.count("### context_demo · avqa") == 1
    assert "n=8" in md and "n=16" in md and "never pooled" in md
    plots = sorted(p.name for p in res["plots"])
    assert len(plots) == 3 and any(p.startswith("context_demo__") for p in plots)


def test_wide_table_refuses_points_that_would_share_a_cell(mixed):
    res = report.build([mixed], n_boot=50, quiet=True, plots=False)
    with pytest.raises(report.MixedPoints, match="differ in .*limit"):
        report.wide_table(res["points"][res["points"]["experiment"] == "budget_demo"])


def test_experiment_and_filter_select_a_sweep(mixed, tmp_path, capsys):
    res = report.build([mixed], n_boot=50, quiet=True, plots=False, experiments=["context_demo"])
    assert set(res["points"]["experiment"]) == {"context_demo"}
    res = report.build([mixed], n_boot=50, quiet=True, plots=False, filters=["limit=16"])
    assert set(res["points"]["score_n"]) == {16}
    with pytest.raises(report.ReportError, match=r"experiment=contxt_demo: no run has it.*did you mean context_demo"):
        report.build([mixed], n_boot=50, quiet=True, plots=False, experiments=["contxt_demo"])
    with pytest.raises(report.ReportError, match="key one of"):
        report.build([mixed], n_boot=50, quiet=True, plots=False, filters=["mehtod=snapkv"])
    assert report.main([str(mixed), "--experiment", "budget_demo", "--filter", "method=snapkv,full",
                        "--no-plots", "--n-boot", "50"]) == 0
    assert "context_demo" not in capsys.readouterr().out


def test_report_exit_codes(tmp_path, capsys):
    assert report.main([str(tmp_path / "absent")]) == 2
    assert "no such path" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "no runs found" in capsys.readouterr().err


def test_plot_title_names_model_dataset_metric_and_n(mixed, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.figure
    titles, ylabels = [], []
    orig_suptitle, orig_save = matplotlib.figure.Figure.suptitle, matplotlib.figure.Figure.savefig

    def save(fig, *a, **k):
        ylabels.append([ax.get_ylabel() for ax in fig.axes])
        return orig_save(fig, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle",
                        lambda fig, t, **k: titles.append(t) or orig_suptitle(fig, t, **k))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    res = report.build([mixed], n_boot=50, quiet=True, plots=False, experiments=["context_demo"])
    pts = res["points"].assign(metric="accuracy")
    report.plot_budget_curves(pts, tmp_path / "p", res["avg"])
    assert titles == ["tiny_qwen25vl · avqa · accuracy · n=8  —  experiment context_demo (limit 8, compress_at "
                      "context)"]
    assert ylabels[0][0].startswith("accuracy") and "ms/token, mean ± 95% CI" in ylabels[0][2]


# ---------------------------------------------------------------------------------------------- naming
@pytest.mark.parametrize("group", ["model", "dataset", "method"])
def test_report_labels_a_config_without_its_name_keys_as_the_run_named_it(group):
    """One naming rule (``avkv.identity.entry_name``): for every ``configs/<group>/*.yaml``, the report's label of a
    stored config that lacks ``<group>_name`` (an older store) is the name the run gave it (``experiment.resolved``)."""
    from omegaconf import OmegaConf

    from avkv.config import CONFIG_DIR, compose
    from avkv.experiment import _group_name
    from avkv.report.collect import _label

    paths = sorted((CONFIG_DIR / group).glob("*.yaml"))
    assert paths
    for p in paths:
        node = OmegaConf.load(p)
        if "defaults" in node:                                   # composed from other groups: compose it
            node = compose([f"{group}={p.stem}"])[group]
        cfg = OmegaConf.create({group: node})
        ran = _group_name(cfg, group)
        assert ran == _label({group: OmegaConf.to_container(cfg[group], resolve=False)}, group), p.stem
        assert ran != group, f"{p.stem}: neither a name nor a _target_"

"""Every experiment preset composes (its paper grid at full scale, its smoke grid) and runs at smoke scale."""
from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from avkv import grid, report
from avkv.config import CONFIG_DIR

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def options(group: str) -> set[str]:
    return {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}


def preset_yaml(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml"), resolve=False)


def needs(name: str) -> list[str]:
    """Configs the preset's defaults name that this checkout does not have yet (datasets, models)."""
    out = []
    for d in preset_yaml(name).get("defaults", []):
        if isinstance(d, dict):
            for k, v in d.items():
                group = k.replace("override", "").strip().strip("/")
                if v not in options(group):
                    out.append(f"{group}/{v}")
    return out


def test_presets_exist():
    assert {"flowmm_table1", "madakv_table1", "audiokv_table1", "acckv_table4", "acckv_table5", "purekv",
            "budget_curves"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_metadata(name):
    y = preset_yaml(name)
    g = y["grid"]
    assert y["experiment_name"] == g["name"] == name
    assert g["methods"][0] == "full" and g["budgets"] and all(0 < b <= 1 for b in g["budgets"])
    assert {"full", "smoke"} <= set(g["at"]) and g["at"]["smoke"]["model"].startswith("tiny_")
    assert g["at"]["smoke"]["model"] in options("model")
    if g.get("paper"):
        paper = report.paper_numbers(g["paper"])  # the CSV exists and has the paper's model
        assert g["paper_model"] in set(paper["model"])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes(name, tmp_path):
    missing = needs(name)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)} (not on this branch yet)")
    g = preset_yaml(name)["grid"]
    have = [m for m in g["methods"] if m in options("method")]
    b0 = g["budgets"][0]
    # the whole paper grid expands (job override lists; composing each takes ~0.4 s here, so only one budget is)
    models = g["at"]["full"]["model"].split(",")
    nd = len(g.get("datasets") or [None])              # a preset may sweep its table's datasets
    plan = grid.expand([f"experiment={name}", f"method={','.join(have)}"], compose_jobs=False)
    assert len(plan) == len(have) * len(g["budgets"]) * len(models) * nd
    # full scale: every point whose method exists composes, on the paper's model and the real data root
    jobs = grid.expand([f"experiment={name}", f"method={','.join(have)}", f"budget={b0}", f"model={models[0]}",
                        f"paths.runs={tmp_path}"])
    assert len(jobs) == len(have) * nd
    for j in jobs:
        c = j.config
        assert c.experiment_name == name and c.grid.scale == "full"
        assert c.model.name == models[0]
        assert "fixtures" not in str(c.dataset.root)
        assert c.budget == b0
    # methods of the paper that are not written yet fail loudly at full scale, never silently
    for m in [m for m in g["methods"] if m not in have][:1]:
        with pytest.raises(MissingConfigException, match=m):
            grid.expand([f"experiment={name}", f"method={m}", f"budget={b0}"])
    # smoke: the tiny model, the fixture, two samples, the methods that exist
    plan = grid.expand([f"experiment={name}", "smoke=tiny"], compose_jobs=False)
    methods = {dict(o.split("=", 1) for o in j.overrides)["method"] for j in plan}
    assert methods == set(have) and len(plan) == len(have) * len(g["budgets"]) * nd
    smoke_ds = g["at"]["smoke"].get("datasets")
    smoke_ds = smoke_ds if isinstance(smoke_ds, list) else g.get("datasets")
    one = [f"dataset={smoke_ds[0]}"] if smoke_ds else []
    (job,) = grid.expand([f"experiment={name}", "smoke=tiny", "method=full", f"budget={b0}",
                          f"paths.runs={tmp_path}", *one])
    c = job.config
    assert c.model.name == g["at"]["smoke"]["model"] and c.dataset.limit_per_task == 2 and c.max_new_tokens == 4
    assert c.dataset.limit == 2                         # one-task datasets; multi-task ones: 2 per sub-task
    assert str(c.dataset.root).startswith(str(c.paths.fixtures))


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_at_smoke_scale(name, smoke_runs):
    if name not in smoke_runs:
        pytest.skip(f"{name} needs {', '.join(needs(name))} (not on this branch yet)")
    runs = smoke_runs[name]
    df = report.collect([runs])
    df = df[df["experiment"] == name]
    g = preset_yaml(name)["grid"]
    have = [m for m in g["methods"] if m in options("method")]
    assert set(df["method"]) == set(have if len(have) <= 4 else have[:1] + have[-3:])
    res = report.build([runs], n_boot=100, quiet=True, plots=False)
    pts = res["points"]
    pts = pts[pts["experiment"] == name]
    assert pts["complete"].all() and (pts["n_err"] == 0).all(), pts[["method", "n_err"]]
    if g.get("paper"):
        assert "beside the paper" in res["markdown"]

"""The Python API runs the command line's code path: avkv.run writes the same run directory as `avkv run`, Harness
loads a model once and returns the records run_sample makes, as a DataFrame."""
from __future__ import annotations

import pytest

import avkv
from avkv.config import ConfigError, OverrideError


def test_run_writes_the_results_store_like_the_cli(tmp_path):
    s = avkv.run({"method": "snapkv", "budget": 0.5, "dataset.limit": 2, "paths.runs": str(tmp_path),
                  "max_new_tokens": 2, "progress": False})
    assert s["n"] == 2 and s["method"] == "snapkv" and s["budget"] == 0.5
    from avkv.experiment import run_dir_of
    assert s["run_dir"] == str(run_dir_of(avkv.compose([f"paths.runs={tmp_path}", "method=snapkv", "budget=0.5",
                                                        "dataset.limit=2", "max_new_tokens=2"])))
    df = avkv.collect([tmp_path])
    assert len(df) == 2 and set(df["method"]) == {"snapkv"}


def test_run_refuses_bad_keys_and_values_before_loading(tmp_path):
    with pytest.raises(OverrideError, match="did you mean budget"):
        avkv.run(["budgt=0.2", f"paths.runs={tmp_path}"])
    with pytest.raises(ConfigError, match="budget=2"):
        avkv.run({"budget": 2, "paths.runs": str(tmp_path)})
    assert not any(tmp_path.iterdir())


def test_harness_runs_methods_on_shared_docs(monkeypatch):
    import avkv.experiment as ex
    loads = []
    real = ex.load_adapter
    monkeypatch.setattr(ex, "load_adapter", lambda cfg: loads.append(1) or real(cfg))
    h = avkv.Harness(model="proxy_av", max_new_tokens=2)
    docs = h.docs(dataset="proxy_av", limit=3)
    assert len(docs) == 3
    a = h.run(method="snapkv", budget=0.2, docs=docs)
    b = h.run(method="full", budget=1.0, docs=docs)
    assert len(loads) == 1                                  # the model loaded once for both methods
    assert list(a["sample_id"]) == list(b["sample_id"]) == [str(d.id) for d in docs]
    assert set(a["method"]) == {"snapkv"} and set(b["method"]) == {"full"}
    assert a["error"].isna().all() and b["error"].isna().all()
    assert (a["kept_ratio"] < b["kept_ratio"]).all()       # the budget reached the engine
    c = h.run(method="snapkv", budget=0.2, docs=docs, overrides=["batch_size=2"])     # batched, as `avkv run`
    assert list(c["batch_size"]) == [2, 2, 1]
    assert list(c["prediction"]) == list(a["prediction"]) and list(c["kv_bytes_kept"]) == list(a["kv_bytes_kept"])
    # the same records `avkv run` appends: run_sample on the same engine gives the same prediction
    cfg = h.config(["method=snapkv", "budget=0.2", "dataset=proxy_av"])
    task = avkv.config.instantiate(cfg.dataset)
    rec = ex.run_sample(cfg, task, h.adapter, ex.make_engine(cfg, h.adapter, avkv.config.instantiate(cfg.method)),
                        docs[0])
    assert rec["prediction"] == a["prediction"].iloc[0]
    with pytest.raises(ValueError, match="loaded once per Harness"):
        h.run(method="snapkv", overrides=["model.num_frames=4"])

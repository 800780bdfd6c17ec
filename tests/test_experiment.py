"""run.py / experiment: records, summary, resume, errors, every config composing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from avkv.config import CONFIG_DIR, ROOT, compose
from avkv.experiment import run
from tests.conftest import fixtures_dir, tiny_model_dir

SAMPLE_FIELDS = ("sample_id", "prediction", "target", "score", "kv_bytes_full", "kv_bytes_kept", "kept_ratio",
                 "kept_by_modality", "kept_per_layer", "prefill_s", "compress_s", "decode_s_per_token",
                 "new_tokens", "peak_mem_bytes", "media_s", "error")


def _cfg(tmp_path, *overrides):
    fixtures_dir()
    return compose([f"paths.runs={tmp_path}", "progress=false", "max_new_tokens=4", *overrides])


def _records(summary):
    lines = (Path(summary["run_dir"]) / "samples.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_every_config_composes():
    # scorer/ holds building blocks that method configs compose (not a group of the top-level config);
    # tests/methods/test_config_defaults.py checks them inside every method that uses them
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in CONFIG_DIR.iterdir()
              if p.is_dir() and p.name not in ("hydra", "local", "experiment", "smoke", "judge", "scorer")}
    assert {"model", "method", "dataset", "logger"} <= set(groups)
    for group, names in groups.items():
        for name in names:
            cfg = compose([f"{group}={name}"])
            OmegaConf.to_container(cfg, resolve=True)       # every interpolation resolves
            assert cfg[group] is not None


def test_snapkv_run_records_every_field_and_keeps_the_budget(tmp_path):
    tiny_model_dir("tiny_qwen2_5_vl")
    s = run(_cfg(tmp_path, "model=tiny_qwen2_5_vl", "method=snapkv", "budget=0.2", "dataset.limit=3"))
    recs = _records(s)
    assert len(recs) == 3 and all(r["error"] is None for r in recs)
    for r in recs:
        for f in SAMPLE_FIELDS:
            assert f in r, f
        assert abs(r["kept_ratio"] - 0.2) <= 0.02
        assert abs(r["kv_bytes_kept"] / r["kv_bytes_full"] - 0.2) <= 0.02
        assert r["prefill_s"] > 0 and r["peak_mem_bytes"] > 0
        assert r["processor_s"] > 0 and r["media_s"] > 0           # the encode's two parts, both timed
        assert r["wall_s"] >= r["processor_s"] + r["media_s"] + r["prefill_s"]   # the sample, encode included
    d = Path(s["run_dir"])
    assert {"config.yaml", "meta.json", "samples.jsonl", "summary.json"} <= {p.name for p in d.iterdir()}
    meta = json.loads((d / "meta.json").read_text())
    assert meta["packages"]["transformers"] and meta["config_hash"]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["n"] == 3 and abs(summary["kept_ratio_mean"] - 0.2) <= 0.02
    assert summary["prefill_s"]["mean"] > 0 and "p90" in summary["decode_s_per_token"]
    assert summary["processor_s"]["mean"] > 0


def test_budget_one_gives_the_predictions_of_full(tmp_path):
    tiny_model_dir("tiny_qwen2_5_omni")
    a = _records(run(_cfg(tmp_path, "method=snapkv", "budget=1.0", "dataset.limit=3")))
    b = _records(run(_cfg(tmp_path, "method=full", "dataset.limit=3")))
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]


def test_resume_after_interrupt_runs_every_sample_once(tmp_path, monkeypatch):
    import avkv.experiment as ex
    tiny_model_dir("tiny_qwen2_audio")
    cfg = _cfg(tmp_path, "model=tiny_qwen2_audio", "method=streamingllm", "dataset.limit=5")
    real, calls = ex.run_sample, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt          # the job is killed after 2 samples
        return real(*a, **k)

    monkeypatch.setattr(ex, "run_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(ex, "run_sample", real)
    runs = list(tmp_path.glob("tiny_qwen2_audio__*"))
    assert len(runs) == 1
    with open(runs[0] / "samples.jsonl", "a") as f:     # a kill in the middle of a write
        f.write('{"sample_id": "trunc')
    s = run(cfg)
    ids = [r["sample_id"] for r in _records(s)]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert s["n"] == 5


def test_broken_sample_is_recorded_and_the_run_goes_on(tmp_path):
    import shutil
    tiny_model_dir("tiny_qwen2_5_vl")
    root = tmp_path / "avqa"
    shutil.copytree(fixtures_dir() / "avqa", root)
    videos = sorted((root / "videos").glob("*.mp4"))
    videos[0].unlink()                                   # missing media
    videos[-1].write_bytes(b"not a video")               # corrupt media
    s = run(_cfg(tmp_path, "model=tiny_qwen2_5_vl", "method=snapkv", f"dataset.root={root}"))
    recs = _records(s)
    n_docs = len(json.loads((root / "val_qa.json").read_text()))
    assert len(recs) == n_docs
    errors = [r["error"] for r in recs if r["error"]]
    assert errors and s["n_failed"] == len(errors)
    assert all(videos[0].name in e or videos[-1].name in e for e in errors)
    assert any(videos[0].name in e for e in errors) and any(videos[-1].name in e for e in errors)
    assert any(r["error"] is None for r in recs)


def _run_py(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=120)


def test_unknown_names_list_the_available_ones():
    for group, bad in (("method", "nosuchmethod"), ("model", "nosuchmodel"), ("dataset", "nosuchdata")):
        p = _run_py(f"{group}={bad}")
        assert p.returncode != 0
        err = p.stderr + p.stdout
        assert f"{group}={bad}: no config {group}/{bad}.yaml; one of " in err and "Traceback" not in err
        if group == "method":
            assert "snapkv" in p.stderr                          # the options are listed
    assert "(did you mean method=snapkv?)" in _run_py("method=snapk").stderr      # the closest option


def test_missing_checkpoint_names_path_and_script(tmp_path):
    p = _run_py("model=tiny_qwen2_5_omni", f"model.path={tmp_path}/absent", "dataset.limit=1", f"paths.runs={tmp_path}",
                "progress=false")
    assert p.returncode != 0
    assert f"{tmp_path}/absent" in p.stderr and "make_tiny_models.py" in p.stderr


def test_wandb_offline_mirror_writes_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "local-secret-0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("WANDB_MODE", "offline")
    tiny_model_dir("tiny_qwen2_5_vl")
    s = run(_cfg(tmp_path, "model=tiny_qwen2_5_vl", "logger=wandb", "logger.mode=offline", "dataset.limit=2"))
    assert list((tmp_path / "wandb").rglob("*.wandb")), "no offline W&B run written"
    for p in Path(s["run_dir"]).rglob("*"):
        if p.is_file():
            assert "local-secret" not in p.read_text(errors="ignore")


def test_fidelity_compares_with_the_full_cache(tmp_path):
    tiny_model_dir("tiny_qwen2_5_vl")
    full = _records(run(_cfg(tmp_path, "model=tiny_qwen2_5_vl", "method=full", "fidelity=true", "dataset.limit=2")))
    assert all(r["fidelity_token_agreement"] == 1.0 and r["fidelity_first_kl"] < 1e-6 for r in full)
    comp = _records(run(_cfg(tmp_path, "model=tiny_qwen2_5_vl", "method=streamingllm", "budget=0.1",
                             "fidelity=true", "dataset.limit=2")))
    assert all(0.0 <= r["fidelity_token_agreement"] <= 1.0 and r["fidelity_first_kl"] >= 0 for r in comp)
    assert any(r["fidelity_first_kl"] > 1e-6 for r in comp)


BATCH_FIELDS = ("prediction", "score", "error", "n_prompt", "kept_ratio", "kept_per_layer", "kept_by_modality",
                "kv_bytes_full", "kv_bytes_kept", "kv_storage", "new_tokens")


@pytest.mark.parametrize("method", ["snapkv", "adakv"])
def test_batch_size_gives_the_records_of_batch_one(tmp_path, method):
    """batch_size=2 over 3 samples (a batch of 2, then one of 1): every sample's record is its batch-1 record —
    prediction, score, what it kept (counts, bytes, per layer and modality) — in the same order; the run has its
    own directory (batch_size is in its identity), batch 1 keeps the identity it had before the key existed."""
    tiny_model_dir("tiny_qwen2_5_vl")
    base = ("model=tiny_qwen2_5_vl", f"method={method}", "budget=0.3", "dataset.limit=3")
    one = run(_cfg(tmp_path, *base))
    two = run(_cfg(tmp_path, *base, "batch_size=2"))
    assert one["run_dir"] != two["run_dir"]
    from avkv.experiment import resolved
    from avkv.results import run_hash
    before = {k: v for k, v in resolved(_cfg(tmp_path, *base)).items() if k != "batch_size"}   # a run from before
    assert one["config_hash"] == run_hash(before)
    a, b = _records(one), _records(two)
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b] and len(b) == 3
    assert all(r["error"] is None for r in b)
    for x, y in zip(a, b):
        for f in BATCH_FIELDS:
            assert x.get(f) == y.get(f), (x["sample_id"], f, x.get(f), y.get(f))
    assert [r["batch_size"] for r in b] == [2, 2, 1]
    assert b[0]["decode_s"] == b[1]["decode_s"] and b[0]["batch_decode_tokens_per_s"] > 0
    assert len({r["prediction"] for r in b}) > 1 or len({r["n_prompt"] for r in b}) > 1   # not one answer copied


def test_batched_run_resumes_and_records_a_broken_prompt(tmp_path, monkeypatch):
    """batch_size=3 over 6 samples whose last two have no video: those two are recorded with their error while the
    first sample of their batch is generated; the run killed in its second batch resumes without running a sample
    twice."""
    import shutil
    import avkv.samples as sm
    tiny_model_dir("tiny_qwen2_5_vl")
    root = tmp_path / "avqa"
    shutil.copytree(fixtures_dir() / "avqa", root)
    docs = json.loads((root / "val_qa.json").read_text())[:6]
    assert [d["video_id"] for d in docs] == [0, 0, 0, 0, 1, 1]
    (root / "videos" / "fx000000001_000000.mp4").unlink()         # the video of samples 5 and 6
    cfg = _cfg(tmp_path, "model=tiny_qwen2_5_vl", "method=snapkv", f"dataset.root={root}", "dataset.limit=6",
               "batch_size=3")
    real, calls = sm.generate_batch, []

    def killed(engine, encs, **k):
        calls.append(len(encs))
        if len(calls) == 2:
            raise KeyboardInterrupt              # killed in the second batch
        return real(engine, encs, **k)

    monkeypatch.setattr(sm, "generate_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    runs = list(tmp_path.glob("tiny_qwen2_5_vl__*"))
    assert len(runs) == 1
    first = [json.loads(x) for x in (runs[0] / "samples.jsonl").read_text().splitlines()]
    assert len(first) == 3 and all(r["error"] is None for r in first)      # the first batch, nothing of the second
    monkeypatch.setattr(sm, "generate_batch", real)
    recs = _records(run(cfg))
    ids = [r["sample_id"] for r in recs]
    assert ids == [str(d["id"]) for d in docs] and recs[:3] == first
    assert calls == [3, 1]                       # the second batch went on with its one good sample
    assert recs[3]["error"] is None and recs[3]["batch_size"] == 1 and recs[3]["prediction"] is not None
    assert all(r["error"] and "fx000000001_000000" in r["error"] for r in recs[4:])


def test_batch_size_refuses_what_cannot_batch(tmp_path):
    from avkv.config import ConfigError
    with pytest.raises(ConfigError, match=r"batch_size=2: method 'h2o' evicts during decoding.*batch_size=1"):
        run(_cfg(tmp_path, "model=tiny_qwen2_5_vl", "method=h2o", "batch_size=2", "dataset.limit=2"))
    assert not list(tmp_path.glob("tiny_qwen2_5_vl__*"))          # refused before anything was written
    with pytest.raises(ConfigError, match=r"batch_size=0: an integer >= 1"):
        _cfg(tmp_path, "batch_size=0")

def test_overrides_of_config_yaml_keys_are_checked_without_composing(monkeypatch):
    """``run_dir=``, ``budget=``, ``resume.retry_failed=`` are keys config.yaml sets itself: the pre-check accepts
    them without a Hydra composition (~0.3 s of every such run); a key only a group sets still composes, and a
    typo is still named."""
    import avkv.config as config
    real, calls = config.compose, []
    monkeypatch.setattr(config, "compose", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert config.check_overrides(["run_dir=/x", "budget=0.5", "resume.retry_failed=true", "method=snapkv"]) == []
    assert calls == []
    assert config.check_overrides(["dataset.limit=3"]) == [] and len(calls) == 1
    assert "did you mean budget" in config.check_overrides(["budgt=0.5"])[0]

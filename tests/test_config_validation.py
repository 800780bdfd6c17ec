"""Config values are checked when the config is composed, before any dataset or model loads; every error names
its key, the value given and what is allowed; zero samples is an error."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from avkv.config import ROOT, ConfigError, check_config, compose, validate
from avkv.tasks.base import DatasetError
from tests.conftest import fixtures_dir

BAD = [
    ("budget=abc", "budget", "(0, 1]"),
    ("budget=0", "budget", "(0, 1]"),
    ("budget=1.5", "budget", "(0, 1]"),
    ("budget_tokens=0", "budget_tokens", "integer >= 1 or null"),
    ("budget_tokens=-5", "budget_tokens", "integer >= 1 or null"),
    ("budget_tokens=2.5", "budget_tokens", "integer >= 1 or null"),
    ("max_new_tokens=-3", "max_new_tokens", "integer >= 1 or null"),
    ("max_new_tokens=0", "max_new_tokens", "integer >= 1 or null"),
    ("batch_size=0", "batch_size", "an integer >= 1"),
    ("batch_size=null", "batch_size", "an integer >= 1"),
    ("batch_size=2.5", "batch_size", "an integer >= 1"),
    ("method.window=-4", "method.window", "integer >= 0"),
    ("method.kernel=0", "method.kernel", "integer >= 1"),
    ("method.window=abc", "method.window", "an integer"),
    ("method=madakv method.mode=weird", "method", "mode must be"),
    ("compress_at=middle", "compress_at", "'question', 'context', 'prompt'"),
    ("dataset.limit=0", "dataset.limit", "integer >= 1 or null"),
    ("dataset.limit=-1", "dataset.limit", "integer >= 1 or null"),
    ("device=gpu", "device", "cpu, cuda"),
    ("seed=abc", "seed", "an integer"),
    ("threads=0", "threads", "integer >= 1 or null"),
    ("fidelity=maybe", "fidelity", "true or false"),
    ("model.dtype=fp8", "model.dtype", "'float32', 'bfloat16', 'float16'"),
    ("model.attn_implementation=flash", "model.attn_implementation", "'sdpa', 'eager'"),
    ("model.num_frames=0", "model.num_frames", "integer >= 1"),
    ("resume.retry_failed=sometimes", "resume.retry_failed", "true or false"),
]


@pytest.mark.parametrize("override,key,allowed", BAD, ids=[b[0] for b in BAD])
def test_each_bad_value_is_named_with_what_is_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        compose(override.split())
    msg = str(e.value)
    assert f"{key}=" in msg and allowed in msg, msg
    assert [p.key for p in e.value.problems] == [key]


def test_shard_out_of_range_and_several_problems_at_once():
    with pytest.raises(ConfigError, match=r"shard=2: an integer in 0\.\.1 \(num_shards=2\)"):
        compose(["shard=2", "num_shards=2"])
    problems = check_config(compose(["budget=abc", "max_new_tokens=-3", "method.window=-4"], validate_values=False))
    assert [p.key for p in problems] == ["budget", "max_new_tokens", "method.window"]
    assert check_config(compose(["model.dtype=fp8"], validate_values=False))[0].choices == (
        "float32", "bfloat16", "float16")                      # closed sets keep their choices (for suggestions)


def test_every_shipped_config_and_preset_validates():
    from avkv.config import CONFIG_DIR
    for group in ("model", "method", "dataset"):
        for f in sorted((CONFIG_DIR / group).glob("*.yaml")):
            validate(compose([f"{group}={f.stem}"], validate_values=False))
    for f in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        for smoke in ([], ["smoke=tiny"]):
            validate(compose([f"experiment={f.stem}", *smoke], validate_values=False))


def test_bad_values_stop_the_run_before_anything_loads(tmp_path, monkeypatch):
    import avkv.experiment as ex
    monkeypatch.setattr(ex, "load_adapter", lambda cfg: pytest.fail("the model loaded"))
    cfg = compose([f"paths.runs={tmp_path}", "method.window=-4"], validate_values=False)
    with pytest.raises(ConfigError, match="method.window=-4"):
        ex.run(cfg)
    assert not any(tmp_path.iterdir())                         # no run directory either


def test_run_py_names_the_key_and_exits_nonzero(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), "budget=abc", f"model.path={tmp_path}/absent",
                        f"paths.runs={tmp_path}"], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert p.returncode == 2
    assert "budget='abc'" in p.stderr and "(0, 1]" in p.stderr
    assert "absent" not in p.stderr and "Traceback" not in p.stderr   # refused before the checkpoint is looked at


def test_zero_samples_is_an_error(tmp_path, monkeypatch):
    import avkv.experiment as ex
    monkeypatch.setattr(ex, "load_adapter", lambda cfg: pytest.fail("the model loaded"))
    root = tmp_path / "avqa"
    shutil.copytree(fixtures_dir() / "avqa", root)
    (root / "val_qa.json").write_text("[]")
    with pytest.raises(DatasetError, match=f"dataset avqa at {root} gives no samples"):
        ex.run(compose([f"paths.runs={tmp_path / 'runs'}", "dataset=avqa", f"dataset.root={root}"]))
    assert not list((tmp_path / "runs").rglob("summary.json"))  # nothing `avkv missing` could call complete
    items = json.loads((fixtures_dir() / "avqa" / "val_qa.json").read_text())[:1]
    (root / "val_qa.json").write_text(json.dumps(items))
    with pytest.raises(DatasetError, match=r"no samples \(shard=1 of num_shards=2\)"):
        ex.run(compose([f"paths.runs={tmp_path / 'runs'}", "dataset=avqa", f"dataset.root={root}", "shard=1",
                        "num_shards=2"]))

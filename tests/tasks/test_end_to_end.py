"""One end-to-end run per dataset family on the matching tiny model (method=full): one sample line per item with
the dataset's metric fields, and summary.json carrying the official aggregate with its breakdowns."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from avkv.config import ROOT, compose
from avkv.experiment import run
from avkv.tasks.fixtures import unavailable
from tests import discover
from tests.conftest import VLM_FAMILIES, fixtures_dir, tiny_model_dir

pytestmark = pytest.mark.slow


def _run(tmp_path, model, dataset, *overrides):
    fixtures_dir()
    tiny_model_dir(model)
    cfg = compose([f"paths.runs={tmp_path}", "progress=false", "max_new_tokens=3", f"model={model}",
                   "method=full", f"dataset={dataset}", *overrides])
    s = run(cfg)
    d = Path(s["run_dir"])
    recs = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((d / "summary.json").read_text())
    return recs, summary


CASES = [
    # dataset, tiny model, overrides, per-sample fields, summary keys
    ("avqa", "tiny_qwen2_5_omni", ["dataset.limit=4"], ["parsed_ok", "question_relation"],
     ["accuracy", "accuracy_by_question_relation", "accuracy_by_question_type", "n_unparsed"]),
    ("music_avqa", "tiny_qwen2_5_omni", ["dataset.limit=4"], ["score_videollama2", "type"],
     ["accuracy", "accuracy_videollama2", "accuracy_by_type", "accuracy_by_modality"]),
    ("avsd", "tiny_qwen2_5_omni", ["dataset.limit=2"], ["turn"], ["rouge_l", "rouge_l_by_turn"]),
    ("videomme", "tiny_qwen2_5_vl", ["dataset.limit=3"], ["duration", "task_type"],
     ["accuracy", "accuracy_by_duration", "accuracy_by_domain", "accuracy_by_task_type"]),
    ("mvbench", "tiny_qwen2_5_vl", ["dataset.tasks=[action_sequence,moving_direction]"],
     ["score_videollama2", "task"], ["accuracy", "accuracy_by_task", "accuracy_videollama2", "accuracy_task_mean"]),
    ("milebench", "tiny_qwen2_5_vl", ["dataset.tasks=[ObjectExistence,Spot-the-Diff,MMCoQA,GPR1200]",
                                      "dataset.n_tokens_per_image=64"],
     ["dataset", "image_quantity_level", "truncation"],
     ["score", "score_by_dataset", "score_by_group", "score_by_image_quantity_level"]),
    # the transformers vision-language families (issue 19) on two MileBench tasks each
    *[("milebench", f"tiny_{f}", ["dataset.tasks=[Spot-the-Diff,MMCoQA]", "dataset.limit=2",
                                  "dataset.n_tokens_per_image=64"],
       ["dataset", "image_quantity_level"], ["score", "score_by_dataset"]) for f in VLM_FAMILIES
      if f != "qwen2_5_vl"],                                              # (its own MileBench case above)
    ("librispeech", "tiny_qwen2_audio", ["dataset.split=[test-clean,test-other]", "dataset.limit=4"],
     ["errors", "ref_words", "source"], ["wer", "wer_by_source", "acc_100_minus_wer"]),
    # the MoE thinker on AudioKV Table 1's ASR column (its audio path: standalone audio, no video)
    ("librispeech", "tiny_qwen3_omni", ["dataset.split=[test-clean]", "dataset.limit=2", "method=snapkv",
                                        "budget=0.4"],
     ["errors", "ref_words", "source"], ["wer", "acc_100_minus_wer"]),
]


def test_every_task_of_a_dataset_config_has_an_end_to_end_case():
    """Every task class a ``configs/dataset/*.yaml`` names runs end to end here or in the speech datasets' cases: a
    new dataset config fails this until it has its case."""
    from tests.tasks.test_speech_datasets import E2E
    task = {d: compose([f"dataset={d}"]).dataset._target_ for d in discover.datasets()}
    covered = {task[c[0]] for c in (*CASES, *E2E)}
    assert set(task.values()) <= covered, sorted(set(task.values()) - covered)


@pytest.mark.parametrize("dataset,model,overrides,fields,keys", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_family_end_to_end(tmp_path, dataset, model, overrides, fields, keys):
    if dataset.startswith("librispeech") and unavailable("librispeech"):
        pytest.skip(f"speech fixture unavailable: {unavailable('librispeech')}")
    recs, summary = _run(tmp_path, model, dataset, *overrides)
    assert recs and all(r["error"] is None for r in recs), [r["error"] for r in recs]
    assert len({r["sample_id"] for r in recs}) == len(recs) == summary["n"]
    for r in recs:
        assert r["score"] is not None and "prediction" in r
        for f in fields:
            assert f in r, f
    for k in keys:
        assert k in summary["task"], k
    assert summary["score"] == summary["task"][summary["metric"]]


def test_librispeech_long_end_to_end(tmp_path):
    if unavailable("librispeech"):
        pytest.skip(f"speech fixture unavailable: {unavailable('librispeech')}")
    recs, summary = _run(tmp_path, "tiny_qwen2_audio", "librispeech_long", "dataset.min_s=6", "dataset.max_s=12",
                         f"dataset.long_dir={tmp_path / 'long'}", "dataset.chunk_s=4")
    assert len(recs) == 3 and all(r["error"] is None and r["ref_words"] > 10 for r in recs)
    assert summary["dataset"] == "librispeech_long" and summary["task"]["wer"] is not None


def test_broken_media_costs_that_sample_only(tmp_path, broken_copy):
    root = broken_copy("avqa")
    (root / "videos" / "fx000000000_000000.mp4").write_bytes(b"not a video")
    recs, summary = _run(tmp_path, "tiny_qwen2_5_omni", "avqa", f"dataset.root={root}", "dataset.limit=5")
    bad = [r for r in recs if r["error"]]
    assert len(recs) == 5 and len(bad) == 4                   # the first clip carries four questions
    assert all("fx000000000_000000.mp4" in r["error"] for r in bad)
    assert summary["n_failed"] == 4 and summary["task"]["n_failed"] == 4
    assert summary["task"]["n_by_question_relation"]["Visual"] >= 2     # failed samples still in their group


def test_mvbench_frame_folder_task(tmp_path):
    """Episodic Reasoning ships 3 fps JPEG folders; the run records what the adapter makes of them."""
    recs, summary = _run(tmp_path, "tiny_qwen2_5_vl", "mvbench", "dataset.tasks=[episodic_reasoning]")
    assert len(recs) == 2
    for r in recs:
        assert r["error"] is None or "fx_tvqa_clip" in r["error"]


def test_run_py_command_line(tmp_path):
    """The documented command: python run.py dataset=<name> dataset.root=<layout> model=<tiny> method=full."""
    fixtures_dir()
    tiny_model_dir("tiny_qwen2_5_omni")
    root = fixtures_dir() / "avqa"
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "dataset=avqa", f"dataset.root={root}",
                          "model=tiny_qwen2_5_omni", "method=full", "dataset.limit=2", "max_new_tokens=2",
                          f"paths.runs={tmp_path}", "progress=false", "hydra.run.dir=" + str(tmp_path / "h")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = [p for p in tmp_path.iterdir() if (p / "summary.json").exists()]
    assert len(runs) == 1
    lines = (runs[0] / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert "accuracy_by_question_type" in summary["task"]

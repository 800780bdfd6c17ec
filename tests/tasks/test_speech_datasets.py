"""The AudioKV speech datasets (MLS, KeSpeech, CoVoST 2, the UltraEval-Audio spoken-QA sets): their official
layouts, the errors broken layouts give, the per-family prompts, and one end-to-end run each on a tiny audio model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from avkv.config import compose, instantiate
from avkv.tasks.base import DatasetError
from avkv.tasks.fixtures import unavailable
from avkv.tasks.prompts import PromptSet

SPEECH = ("mls", "kespeech", "covost2", "speech_qa")
DATASETS = ["mls_fr", "mls_de", "mls_es", "kespeech", "covost2_en_zh", "covost2_zh_en",
            "speech_chatbot_alpaca_eval", "llama_questions", "speech_triviaqa", "speech_web_questions"]


@pytest.fixture(autouse=True)
def _needs_espeak():
    for fam in SPEECH:
        if unavailable(fam):
            pytest.skip(f"speech fixture unavailable: {unavailable(fam)}")


def task(name: str, fixture_root: Path, *overrides: str):
    cfg = compose([f"dataset={name}", f"paths.fixtures={fixture_root}", *overrides])
    return instantiate(cfg.dataset)


@pytest.mark.parametrize("name", DATASETS)
def test_docs_from_the_fixture(name, fixture_root, facts):
    t = task(name, fixture_root)
    docs = list(t.docs())
    assert docs and len({d.id for d in docs}) == len(docs)
    for d in docs:
        assert len(d.media) == 1 and d.media[0].kind == "audio" and Path(d.media[0].path).is_file()
    if name.startswith("mls_"):
        utts = facts["mls"]["utterances"]
        assert {d.id: d.target for d in docs} == {u: v["text"] for u, v in utts.items()
                                                   if v["folder"] == Path(t.root).name}
    if name == "kespeech":
        assert [d.meta["subdialect"] for d in docs] == ["Mandarin", "Beijing", "Southwestern"]
        assert all("SPOKEN_NOISE" not in d.target for d in docs)
    if name.startswith("covost2_"):
        clips = facts["covost2"]["clips"]
        assert all(clips[d.id + ".mp3"]["split"] == "test" for d in docs)
        assert {d.target for d in docs} == {clips[d.id + ".mp3"]["translation"] for d in docs}
        assert len(docs) == 3                                 # the dev / train rows are left out
    if name == "speech_web_questions":
        assert docs[0].target == ["Portuguese"] and docs[0].question.startswith("What language")


def test_prompts_per_family_are_config_data(fixture_root):
    t = task("mls_de", fixture_root)
    d = next(iter(t.docs()))
    assert t.prompt(d, "qwen2_audio").question == "Detect the language and recognize the speech: <|de|>"
    assert "German" in t.prompt(d, "qwen2_5_omni").question
    assert t.prompt(d, "qwen2_5_vl").question.startswith("Please recognize the speech")   # the default
    t = task("covost2_zh_en", fixture_root)
    assert "Chinese speech" in t.prompt(next(iter(t.docs())), "qwen2_5_omni").question     # {fields} filled
    t = task("llama_questions", fixture_root)
    assert t.prompt(next(iter(t.docs())), "qwen2_5_omni").question == ""                   # the audio alone
    assert t.prompt(next(iter(t.docs())), "qwen2_5_omni").max_new_tokens == 64


def test_prompt_set_errors():
    with pytest.raises(ValueError, match=r"dataset.prompts.qwen 9: keys are 'default' or a model family"):
        PromptSet({"default": "x", "qwen 9": "y"})
    with pytest.raises(ValueError, match=r"placeholder \{a\.b\} is not a plain field name"):
        PromptSet({"default": "say {a.b}"})
    only = PromptSet({"qwen2_audio": "x", "mobilevlm": None})
    assert only.refusal("qwen2_audio") is None and only.text("qwen2_audio") == "x"
    assert "no entry for the gpt model family and no default (it runs on: qwen2_audio)" in only.refusal("gpt")
    assert "prompts.mobilevlm is null" in only.refusal("mobilevlm")
    with pytest.raises(ValueError, match="no default"):
        only.text("gpt")
    with pytest.raises(ValueError, match=r"placeholder 'nope' is not a field"):
        PromptSet({"default": "say {nope}"}).text("qwen2_audio")
    with pytest.raises(ValueError, match="no prompts given"):
        PromptSet(None).text("qwen2_audio")
    assert PromptSet(None).refusal("qwen2_audio") is None          # a task without prompt text refuses nothing
    assert PromptSet("x").text("gpt") == "x"                      # a string is the default of every family
    assert PromptSet({"default": "a", "qwen2_audio": "b"}).text("qwen2_audio") == "b"


def test_mls_layout_errors(fixture_root, broken_copy):
    root = broken_copy("mls") / "mls_french"
    trans = root / "test" / "transcripts.txt"
    good = trans.read_text(encoding="utf-8")
    trans.write_text("not-an-id\tbonjour\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"transcripts.txt: line 1 field 'id' 'not-an-id'"):
        list(task("mls_fr", fixture_root, f"dataset.root={root}").docs())
    trans.write_text(good.splitlines()[0] + "\n" + good.splitlines()[0] + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2 field 'id' repeats"):
        list(task("mls_fr", fixture_root, f"dataset.root={root}").docs())
    trans.unlink()
    with pytest.raises(DatasetError, match="MLS transcripts not found"):
        list(task("mls_fr", fixture_root, f"dataset.root={root}").docs())


def test_kespeech_paths_stay_inside_the_root(fixture_root, broken_copy):
    root = broken_copy("kespeech") / "KeSpeech"
    scp = root / "Tasks" / "ASR" / "test" / "wav.scp"
    lines = scp.read_text(encoding="utf-8").splitlines()
    uid = lines[0].split()[0]
    scp.write_text(f"{uid} ../../outside.wav\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=rf"wav.scp: item {uid} field 'path' = '../../outside.wav' is not a path"):
        list(task("kespeech", fixture_root, f"dataset.root={root}").docs())
    scp.write_text("\n".join(lines) + "\nextra_utt Audio/x.wav\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="item extra_utt .listed in wav.scp. has no line"):
        list(task("kespeech", fixture_root, f"dataset.root={root}").docs())


def test_covost_clip_names_are_plain_file_names(fixture_root, broken_copy):
    root = broken_copy("covost2") / "en"
    tsv = root / "covost_v2.en_zh-CN.tsv"
    rows = tsv.read_text(encoding="utf-8").splitlines()
    tsv.write_text(rows[0] + "\n../secret.mp3\tx\ty\tz\ttest\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"line 2 field 'path' = '../secret.mp3' is not a clip file name"):
        list(task("covost2_en_zh", fixture_root, f"dataset.root={root}").docs())
    tsv.write_text(rows[0] + "\nclip.mp3\tx\t\tz\ttest\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2 has no field 'translation'"):
        list(task("covost2_en_zh", fixture_root, f"dataset.root={root}").docs())


def test_speech_qa_column_errors(fixture_root, tmp_path):
    with pytest.raises(DatasetError, match=r"no column 'Question' .columns: Answer, Questions, audio"):
        list(task("llama_questions", fixture_root, "dataset.question_field=Question",
                  f"dataset.extract_dir={tmp_path}").docs())
    with pytest.raises(DatasetError, match="no parquet file data/dev-"):
        list(task("llama_questions", fixture_root, "dataset.split=dev").docs())


def test_speech_qa_extracts_audio_once(fixture_root, tmp_path):
    t = task("llama_questions", fixture_root, f"dataset.extract_dir={tmp_path}")
    docs = list(t.docs())
    files = sorted(tmp_path.glob("*.wav"))
    assert [f.name for f in files] == [f"test_{i:05d}.wav" for i in range(len(docs))]
    stamp = files[0].stat().st_mtime_ns
    list(t.docs())
    assert files[0].stat().st_mtime_ns == stamp              # not rewritten


# ------------------------------------------------------------------------------------------- end to end
def _run(tmp_path, model, dataset, *overrides):
    from avkv.experiment import run
    from tests.conftest import fixtures_dir, tiny_model_dir

    fixtures_dir()
    tiny_model_dir(model)
    cfg = compose([f"paths.runs={tmp_path}", "progress=false", "max_new_tokens=3", f"model={model}",
                   "method=snapkv", "budget=0.5", f"dataset={dataset}", f"paths.cache={tmp_path / 'cache'}",
                   f"paths.models={fixtures_dir().parent / 'models'}", f"paths.fixtures={fixtures_dir()}",
                   *overrides])
    s = run(cfg)
    d = Path(s["run_dir"])
    return [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()], s


E2E = [
    ("mls_fr", "tiny_qwen2_audio", ["errors", "ref_words", "speaker"], ["wer", "acc_100_minus_wer", "wer_by_speaker"]),
    ("mls_de", "tiny_qwen2_5_omni", ["errors", "ref_words"], ["wer"]),
    ("mls_es", "tiny_qwen2_audio", ["errors", "ref_words"], ["wer"]),
    ("kespeech", "tiny_qwen2_5_omni", ["errors", "ref_words", "subdialect"],
     ["cer", "acc_100_minus_cer", "cer_by_subdialect"]),
    ("covost2_en_zh", "tiny_qwen2_5_omni", ["sentence_bleu", "sentence_chrf"], ["chrf", "bleu", "bleu_tokenizer"]),
    ("covost2_zh_en", "tiny_qwen2_audio", ["sentence_bleu", "sentence_chrf"], ["bleu", "chrf"]),
    ("speech_chatbot_alpaca_eval", "tiny_qwen2_5_omni", ["judge", "question_text"], ["judge_accuracy", "n_pending"]),
    ("llama_questions", "tiny_qwen2_audio", ["judge", "exist_match"], ["exist_match", "n_pending"]),
    ("speech_triviaqa", "tiny_qwen2_5_omni", ["judge", "exist_match"], ["exist_match"]),
    ("speech_web_questions", "tiny_qwen2_audio", ["judge", "exist_match"], ["exist_match"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("dataset,model,fields,keys", E2E, ids=[c[0] for c in E2E])
def test_speech_dataset_end_to_end(tmp_path, monkeypatch, dataset, model, fields, keys):
    for var in ("AVKV_JUDGE_BASE_URL", "AVKV_JUDGE_MODEL", "AVKV_JUDGE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    recs, s = _run(tmp_path, model, dataset)
    assert recs and all(r["error"] is None for r in recs), [r["error"] for r in recs]
    assert len({r["sample_id"] for r in recs}) == len(recs) == s["n"]
    for r in recs:
        assert r["prediction"] is not None and r["kept_ratio"] < 1.0
        for f in fields:
            assert f in r, f
    for k in keys:
        assert k in s["task"], k
    if s["metric"] == "judge_accuracy":           # no endpoint: predictions kept, scores pending
        assert all(r["judge"] == "pending" and r["score"] is None for r in recs)
        assert s["score"] is None and s["task"]["n_pending"] == len(recs)
    else:
        assert s["score"] == s["task"][s["metric"]] is not None


@pytest.mark.slow
def test_broken_clip_costs_that_sample_only(tmp_path, broken_copy):
    root = broken_copy("covost2") / "en"
    (root / "clips" / "common_voice_en_100001.mp3").write_bytes(b"not audio")
    recs, s = _run(tmp_path, "tiny_qwen2_5_omni", "covost2_en_zh", f"dataset.root={root}")
    bad = [r for r in recs if r["error"]]
    assert len(recs) == 3 and len(bad) == 1 and "common_voice_en_100001" in bad[0]["sample_id"]
    assert s["task"]["n_failed"] == 1 and s["task"]["n_scored"] == 2 and s["task"]["chrf"] is not None


def test_covost_aggregate_is_corpus_level(fixture_root):
    from avkv.metrics.translation import corpus_bleu, corpus_chrf

    t = task("covost2_zh_en", fixture_root)
    docs = list(t.docs())
    hyps = ["The weather is good today.", "I like green tea very much.", ""]
    recs = [{"sample_id": d.id, "target": d.target, "prediction": h, "error": None, **t.score(d, h)}
            for d, h in zip(docs, hyps)]
    agg = t.aggregate(recs + [{"sample_id": "x", "target": "a", "prediction": "a", "error": "boom"}])
    refs = [d.target for d in docs]
    assert agg["bleu"] == pytest.approx(corpus_bleu(hyps, refs, "en")) and agg["n_failed"] == 1
    assert agg["chrf"] == pytest.approx(corpus_chrf(hyps, refs)) and agg["bleu_tokenizer"] == "13a"
    mean_sentence = sum(r["sentence_bleu"] for r in recs) / 3
    assert agg["bleu"] != pytest.approx(mean_sentence)            # corpus BLEU, not a mean of sentences
    assert all(0.0 <= r["score"] <= 1.0 for r in recs)


def test_mls_opus_release(fixture_root, tmp_path):
    """The *_opus release: same layout, .opus files (the loader picks the extension from the folder name)."""
    import shutil

    import soundfile as sf

    from avkv.models.media_io import load_audio

    src = fixture_root / "mls" / "mls_french"
    root = tmp_path / "mls_french_opus"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("*.flac"))
    for f in src.rglob("*.flac"):
        a, sr = sf.read(str(f), dtype="float32")
        out = root / f.relative_to(src).with_suffix(".opus")
        out.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(out), a, sr, format="OGG", subtype="OPUS")
    docs = list(task("mls_fr", fixture_root, f"dataset.root={root}").docs())
    assert len(docs) == 3 and all(d.media[0].path.endswith(".opus") for d in docs)
    assert load_audio(docs[0].media[0].path).size > 16000 * 0.5

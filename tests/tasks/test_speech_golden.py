"""avkv's speech scorers against the official code's own outputs (tests/tasks/golden/speech_official.json, which
records each source repository and commit): Qwen2-Audio's evaluate_asr.py for KeSpeech CER and MLS WER, the
sacrebleu command line for CoVoST 2 BLEU / chrF, UltraEval-Audio's qa-exist-match and reference-answer judge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from avkv.judge import JudgeError, JudgePrompt, parse_verdict
from avkv.metrics.qa import exist_match
from avkv.metrics.text import corpus_wer, edit_counts, remove_special_tokens
from avkv.metrics.translation import corpus_bleu, corpus_chrf
from avkv.metrics.zh import normalize_zh

GOLDEN = json.loads((Path(__file__).parent / "golden" / "speech_official.json").read_text(encoding="utf-8"))


def test_golden_records_its_sources():
    for key in ("asr", "ultraeval"):
        src = GOLDEN["sources"][key]
        assert src["repo"] and len(src["commit"]) == 40
    assert GOLDEN["sources"]["sacrebleu"]["version"].endswith("2.6.0")


@pytest.mark.parametrize("case", GOLDEN["asr"], ids=lambda c: f"{c['language']}{c['id']}")
def test_asr_error_rate_per_case(case):
    lan = case["language"]
    if lan == "zh":
        assert normalize_zh(remove_special_tokens(case["reference"], "zh")) == case["ref_normalized"]
        assert normalize_zh(remove_special_tokens(case["hypothesis"], "zh")) == case["hyp_normalized"]
    errors, n = edit_counts(case["reference"], case["hypothesis"], lan)
    if case["error_rate"] is None:             # the official code crashes on an empty normalised reference
        assert n == 0
    else:
        assert errors / n == pytest.approx(case["error_rate"], abs=1e-12)


@pytest.mark.parametrize("lan", sorted(GOLDEN["aggregate"]["asr_error_rate"]))
def test_asr_corpus_error_rate(lan):
    cases = [c for c in GOLDEN["asr"] if c["language"] == lan and c["error_rate"] is not None]
    got = corpus_wer([c["reference"] for c in cases], [c["hypothesis"] for c in cases], lan)
    assert got == pytest.approx(GOLDEN["aggregate"]["asr_error_rate"][lan], abs=1e-12)


@pytest.mark.parametrize("corpus", GOLDEN["st"], ids=lambda c: c["name"])
def test_translation_matches_sacrebleu_cli(corpus):
    hyps, refs, tgt = corpus["hypotheses"], corpus["references"], corpus["target_language"]
    assert corpus_bleu(hyps, refs, tgt) == pytest.approx(corpus["bleu"], abs=1e-6)
    assert corpus_chrf(hyps, refs) == pytest.approx(corpus["chrf"], abs=1e-6)


@pytest.mark.parametrize("case", GOLDEN["qa_exist_match"], ids=lambda c: str(c["id"]))
def test_qa_exist_match(case):
    assert exist_match(case["prediction"], case["answers"]) == bool(case["match"])


@pytest.mark.parametrize("case", GOLDEN["judge"], ids=lambda c: str(c["id"]))
def test_judge_prompt_and_verdict(case):
    prompt = JudgePrompt.load("ultraeval_ref_qa")
    assert prompt.render(question=case["question"], prediction=case["prediction"], answer=case["answer"]) \
        == case["rendered"]
    if case["verdict"] is None:
        with pytest.raises(JudgeError):
            parse_verdict(case["reply"], prompt.parse)
    else:
        assert parse_verdict(case["reply"], prompt.parse) == case["verdict"]

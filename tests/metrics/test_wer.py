"""Corpus WER as Qwen2-Audio / lmms-eval compute it: Whisper English normalisation, then sum(edits)/sum(ref)."""
from __future__ import annotations

import pytest

from avkv.metrics.text import asr_tokens, corpus_wer, edit_counts, normalize_asr, remove_special_tokens

REF = "MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES AND WE ARE GLAD TO WELCOME HIS GOSPEL"
HYP = "Mr. Quilter is the apostle of the middle classes, and we're glad to welcome his gospel."


def test_mister_and_contractions_normalise_away():
    assert normalize_asr(REF) == normalize_asr(HYP)
    assert corpus_wer([REF], [HYP]) == 0.0


def test_spoken_numbers():
    assert corpus_wer(["THERE WERE TWENTY FIVE RED BOXES"], ["There were 25 red boxes."]) == 0.0
    assert asr_tokens("SHE COUNTED THREE HUNDRED AND TWELVE STONES") == ["she", "counted", "312", "stones"]


def test_spelling_map_and_special_tokens():
    assert normalize_asr("<|en|>The colour grey") == normalize_asr("THE COLOR GRAY")
    assert remove_special_tokens("<|en|> hello , world") == "hello, world"


def test_corpus_level_not_mean_of_utterances():
    refs = ["A B C D", "E F"]             # 6 reference words
    hyps = ["A B C D", "X"]               # 0 errors + (1 sub + 1 del) = 2 errors
    assert corpus_wer(refs, hyps) == pytest.approx(2 / 6)       # the mean of utterance WERs would be 0.5
    assert edit_counts("E F", "X") == (2, 2)


def test_insertions_can_exceed_100_percent():
    assert corpus_wer(["yes"], ["no no no"]) == pytest.approx(3.0)
    assert edit_counts("A B C", "") == (3, 3)

"""Corpus WER / CER as Qwen2-Audio's ``evaluate_asr.py`` and lmms-eval compute them (re-exported by
:mod:`avkv.metrics.text`).
"""
from __future__ import annotations

import re
from typing import Sequence


# ---------------------------------------------------------------------------------------------------- WER / CER
# Qwen2-Audio ``eval_audio/evaluate_asr.py`` == lmms-eval ``asr_wer_utils``: remove special tokens, normalise
# (English: Whisper EnglishTextNormalizer, then — an if/elif quirk — BasicTextNormalizer too), tokenise with
# fairseq's EvaluationTokenizer (sacrebleu "none", lower-case, drop all-punctuation tokens), corpus-level
# WER = sum of edit distances / sum of reference tokens. The normalisers are transformers' Whisper ones; the
# British→American spelling map they need is openai/whisper's ``normalizers/english.json`` (MIT), vendored as
# ``whisper_english_spelling.json`` because transformers ships it only inside Whisper checkpoints.

_PUNCS = "!,.?;:"
_NORMALIZERS: dict[str, object] = {}


def remove_special_tokens(text: str, language: str = "en") -> str:
    """Qwen2-Audio ``remove_sp``: ``<|...|>`` tokens → space, squash spaces, no space before ``!,.?;:``."""
    s = re.sub(r"<\|.*?\|>", " ", str(text))
    s = re.sub(r"\s+", " ", s)
    s = re.sub(f" ?([{_PUNCS}])", r"\1", s)
    s = s.lstrip(" ")
    if language == "zh":
        s = re.sub(r"\s+", "", s)
    return s


def _normalizer(kind: str):
    if kind not in _NORMALIZERS:
        from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer
        if kind == "en":
            import json
            from pathlib import Path
            mapping = json.loads((Path(__file__).with_name("whisper_english_spelling.json")).read_text())
            _NORMALIZERS[kind] = EnglishTextNormalizer(mapping)
        else:
            _NORMALIZERS[kind] = BasicTextNormalizer()
    return _NORMALIZERS[kind]


def normalize_asr(text: str, language: str = "en") -> str:
    """The Qwen2-Audio / lmms-eval normalisation of one transcript (before tokenisation).

    ``en``: EnglishTextNormalizer then BasicTextNormalizer; ``zh``: speechio's TextNorm rules only
    (:mod:`avkv.metrics.zh`, as Qwen2-Audio's script: no Basic normaliser after it); other languages:
    BasicTextNormalizer.
    """
    s = remove_special_tokens(text, language)
    if language == "zh":
        from avkv.metrics.zh import normalize_zh
        return normalize_zh(s)
    if language == "en":
        s = _normalizer("en")(s)
    return _normalizer("basic")(s)


def asr_tokens(text: str, language: str = "en", normalized: bool = False) -> list[str]:
    """fairseq EvaluationTokenizer(tokenizer_type='none', lowercase, punctuation_removal); characters for yue."""
    import unicodedata
    s = text if normalized else normalize_asr(text, language)
    s = " ".join(t for t in s.split(" ") if not all(unicodedata.category(c)[0] == "P" for c in t))
    toks = s.lower().split()
    if language in ("zh", "yue"):
        toks = list("".join(toks))
    return toks


def edit_counts(ref: str, hyp: str, language: str = "en") -> tuple[int, int]:
    """(word edit distance, reference length) after normalisation; the edit distance comes from jiwer."""
    import jiwer
    r, h = asr_tokens(ref, language), asr_tokens(hyp, language)
    if not r:
        return len(h), 0
    out = jiwer.process_words(" ".join(r), " ".join(h))
    return out.substitutions + out.deletions + out.insertions, len(r)


def corpus_wer(refs: Sequence[str], hyps: Sequence[str], language: str = "en") -> float:
    """Corpus WER (a fraction): sum of edit distances over the sum of reference tokens."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    e = n = 0
    for r, h in zip(refs, hyps):
        de, dn = edit_counts(r, h, language)
        e, n = e + de, n + dn
    return e / n if n else 0.0

"""Speech-translation metrics through sacrebleu (the reference implementation; CoVoST 2 and Qwen2-Audio's
``evaluate_st.py`` call it the same way): corpus BLEU with tokenizer ``zh`` for Chinese targets (``13a``
otherwise) and corpus chrF (character 6-grams, beta 2, sacrebleu's defaults). AudioKV reports chrF for en→zh
and BLEU for zh→en."""
from __future__ import annotations

from typing import Sequence

#: sacrebleu tokenizer per target language (Qwen2-Audio evaluate_st.py: zh, ja-mecab, else 13a)
BLEU_TOKENIZER = {"zh": "zh", "zh-CN": "zh", "ja": "ja-mecab"}


def bleu_tokenizer(target_language: str) -> str:
    return BLEU_TOKENIZER.get(target_language, "13a")


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str], target_language: str = "en") -> float:
    import sacrebleu
    _check(hyps, refs)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)], tokenize=bleu_tokenizer(target_language)).score)


def corpus_chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu
    _check(hyps, refs)
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def sentence_scores(hyp: str, ref: str, target_language: str = "en") -> dict:
    """Per-sample BLEU and chrF (sacrebleu's sentence-level forms, BLEU with exponential smoothing)."""
    import sacrebleu
    return {"bleu": float(sacrebleu.sentence_bleu(hyp, [ref], tokenize=bleu_tokenizer(target_language)).score),
            "chrf": float(sacrebleu.sentence_chrf(hyp, [ref]).score)}


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")

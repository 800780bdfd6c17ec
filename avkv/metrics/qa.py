"""UltraEval-Audio's offline answer matcher for spoken QA (``qa-exist-match``, the official metric of its
``*-s2t`` llama-questions / speech-web-questions / speech-triviaqa tasks): the sample is correct when the tokens of
any reference answer occur contiguously among the tokens of the model's answer. Both sides are NFD-normalised,
lower-cased and split into runs of letters/digits/marks, each other non-space, non-control character being a
token of its own (the DPR ``SimpleTokenizer``). An empty reference matches every answer, as in the reference."""
from __future__ import annotations

import unicodedata
from typing import Sequence

import regex

_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)


def qa_tokens(text: str) -> list[str]:
    return [m.group().lower() for m in _TOKEN.finditer(unicodedata.normalize("NFD", str(text)))]


def exist_match(prediction: str, answers: str | Sequence[str]) -> bool:
    if isinstance(answers, str):
        answers = [answers]
    text = qa_tokens(prediction)
    for a in answers:
        toks = qa_tokens(a)
        if any(toks == text[i:i + len(toks)] for i in range(len(text) - len(toks) + 1)):
            return True
    return False

"""ROUGE-L as the benchmarks' own scorers compute it: the COCO caption evaluation (AVSD: ``dstc7`` / ``dstc10`` /
``coco`` versions) and the ``rouge`` package (pltrdy) MileBench uses (re-exported by :mod:`avkv.metrics.text`).
"""
from __future__ import annotations

import re
from typing import Sequence


# ------------------------------------------------------------------------------------------------------ ROUGE-L
# Two ROUGE-L variants are kept because two official scorers compute different numbers and avkv reproduces both
# (goldens in tests/tasks/golden): coco-caption's (PTB tokens, max P / max R over references, beta 1.2), used by the
# DSTC7/DSTC10 AVSD evaluation, and pltrdy ``rouge`` 1.0.1's (summary-level, set counts), used by MileBench's
# evaluate.py. Neither is available as a maintained Python package for the coco one (it shells out to Java's
# PTBTokenizer), and ``rouge`` 1.0.1 is reimplemented rather than depended on to stay pure and pinned by goldens.


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def ptb_tokenize(text: str) -> list[str]:
    """coco-caption's ``PTBTokenizer`` (Stanford PTB tokenizer, lower-cased, its punctuation list dropped) without
    Java: :func:`avkv.metrics.ptb.ptb_tokens`."""
    from avkv.metrics.ptb import ptb_tokens
    return ptb_tokens(text)


def _coco_tokens(text: str) -> list[str]:
    # coco-caption's Rouge splits the tokenised line on " ": an empty line is one empty token ([''])
    from avkv.metrics.ptb import ptb_line
    return ptb_line(text).split(" ")


#: the AVSD scorer versions: DSTC7's package (stopword-filtered hypotheses), DSTC10's package (both sides filtered
#: of "," and "." tokens), or plain coco-caption
AVSD_SCORER_VERSIONS = ("dstc7", "dstc10", "coco")


def rouge_l_coco(candidate: str, references: Sequence[str], beta: float = 1.2, version: str = "coco") -> float:
    """coco-caption ``Rouge.calc_score`` on PTB tokens: LCS precision and recall against each reference, the
    *maximum* precision and the maximum recall taken separately, ``F = (1 + b²) P R / (R + b² P)``, ``b = 1.2``.

    ``version="dstc7"`` first passes the candidate through the DSTC7 package's hypothesis filter
    (:func:`avkv.metrics.ptb.dstc7_stopword_filter`: every one-character token dropped); references are not
    filtered. ``version="dstc10"`` passes the candidate *and* each reference through the DSTC10 package's filter
    (:func:`avkv.metrics.ptb.dstc10_stopword_filter`: the tokens "," and "." dropped, Unicode whitespace
    squashed). As upstream, an empty tokenised text is one empty token, so an empty candidate scores 0 against
    non-empty references (and 1 against a reference that tokenises to nothing). An empty reference list raises
    (upstream asserts).
    """
    if version not in AVSD_SCORER_VERSIONS:
        raise ValueError(f"unknown AVSD scorer version {version!r}; known: {', '.join(AVSD_SCORER_VERSIONS)}")
    if not references:
        raise ValueError("rouge_l_coco needs at least one reference")
    if version == "dstc7":
        from avkv.metrics.ptb import dstc7_stopword_filter
        candidate = dstc7_stopword_filter(candidate)
    elif version == "dstc10":
        from avkv.metrics.ptb import dstc10_stopword_filter
        candidate = dstc10_stopword_filter(candidate)
        references = [dstc10_stopword_filter(r) for r in references]
    c = _coco_tokens(candidate)
    precs, recs = [], []
    for ref in references:
        r = _coco_tokens(ref)
        lcs = _lcs(r, c)
        precs.append(lcs / len(c))
        recs.append(lcs / len(r))
    p, rec = max(precs), max(recs)
    if p == 0 or rec == 0:
        return 0.0
    return ((1 + beta ** 2) * p * rec) / (rec + beta ** 2 * p)


def _recon_lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one LCS of x and y, reconstructed exactly as pltrdy ``rouge`` 1.0.1 ``_recon_lcs`` does."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    out: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def _rouge_sentences(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split(".") if len(p) > 0]


def rouge_l_pltrdy(hyp: str, ref: str) -> float:
    """ROUGE-L F exactly as ``Rouge().get_scores(hyp, ref)[0]['rouge-l']['f']`` of the ``rouge==1.0.1`` package
    (pltrdy), which MileBench's ``evaluate.py`` uses.

    Its quirks: the texts are split into sentences at every ``.``; it is *summary-level* (union of per-sentence
    LCS); word counts and the LCS union are **sets** (``exclusive=True``: repeated words count once); and
    ``F = 2PR / (P + R + 1e-8)``. It raises on an empty text (MileBench scores an empty prediction 0 before
    calling it; here an empty hypothesis returns 0.0).
    """
    hs, rs = _rouge_sentences(str(hyp)), _rouge_sentences(str(ref))
    if not hs or not rs:
        return 0.0
    h_words = [w for s in hs for w in s.split(" ")]
    r_words = [w for s in rs for w in s.split(" ")]
    m, n = len(set(r_words)), len(set(h_words))
    union: set[str] = set()
    llcs = 0
    for r in rs:
        prev = len(union)
        rw = r.split(" ")
        for h in hs:
            union |= _recon_lcs_words(rw, h.split(" "))
        llcs += len(union) - prev
    r_lcs, p_lcs = llcs / m, llcs / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))

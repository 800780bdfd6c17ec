"""MileBench's scoring (``evaluate.py``), its quirks kept (re-exported by :mod:`avkv.metrics.text`)."""
from __future__ import annotations

import re
from typing import Sequence

from avkv.metrics.rouge import rouge_l_pltrdy


# ----------------------------------------------------------------------------------------------- MileBench
# Re-implementation of MileBench ``evaluate.py`` (class ``Eval``) with its quirks kept on purpose; each quirk is
# named where it happens. Differences from it would change the numbers the KV papers report.

_MB_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
             "!"]
_MB_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# quirk: the official pattern is "(?!<=\d)(\.)(?!\d)" — a look-*ahead* for "<=\d", not a look-behind — so every
# period not followed by a digit is removed, even after a digit
_MB_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")


def milebench_process(text: str) -> str:
    """MileBench ``Eval.process``: newlines/tabs → spaces, VQA-style punctuation handling, quotes stripped,
    lower-cased.

    Quirks kept: a punctuation mark is *deleted* (not replaced by a space) when it is anywhere followed or
    preceded by a space, or when the text has a digit-comma-digit; the period removal passes ``re.UNICODE`` (32)
    as the ``count`` argument of ``sub``, so at most 32 periods go.
    """
    s = str(text).replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in _MB_PUNCT:
        if (p + " " in s or " " + p in s) or _MB_COMMA_STRIP.search(s) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _MB_PERIOD_STRIP.sub("", out, 32)
    return out.strip("'").strip('"').strip().lower()


_MB_REGEX_SPECIAL = ["\\", ".", "^", "$", "*", "+", "?", "{", "}", "[", "]", "|", "(", ")"]


def _mb_option_pattern(option: str) -> str:
    s = milebench_process(option)
    for ch in _MB_REGEX_SPECIAL:                 # escaped one character class after the other, as upstream
        if ch in s:
            s = s.replace(ch, "\\" + ch)
    return s


#: MileBench ``evaluate.py`` versions: the initial commit 730e930 and the current one b2979ac (LOOK-M's copy)
MILEBENCH_VERSIONS = ("current", "initial")


def milebench_key(i: int, version: str = "current") -> str:
    """Option key ``i``: ``chr(65 + i)`` in the initial version (past Z: ``[``, ``\\``, ``]``, ...), ``Eval.char``
    in the current one (A..Z, AA..AZ, then ``'B' + chr(i + 13)``: BA..)."""
    if version == "initial":
        return chr(65 + i)
    if version != "current":
        raise ValueError(f"unknown MileBench scorer version {version!r}; known: {', '.join(MILEBENCH_VERSIONS)}")
    if i < 26:
        return chr(i + 65)
    if i < 52:
        return "A" + chr(i + 65 - 26)
    return "B" + chr(i + 65 - 26 - 26)


def milebench_match_choice(text: str, options: dict[str, str], version: str = "current") -> str:
    """MileBench ``Eval.match_choice`` on an already-processed prediction; returns the picked key(s).

    Order: (1) the first ``"<key> <option text>"`` found anywhere (so "a red" inside "this is a red square"
    reads as A), returning only the *first character* of what matched (a current-version "ab picture 28"
    returns "A"); (2) the first option text found with all spaces removed (regex alternation in option order, so
    "picture2" wins inside "picture28"); (3) the whole answer is a key: one character (initial) or one or two
    (current: "AB"); (4) otherwise every character of the text that is a key, upper-cased and concatenated.
    **Empty text returns 'C'.** A regex error returns the text itself.
    """
    if text == "":
        return "C"
    try:
        pat = "|".join(_mb_option_pattern(f"{k} {v}") for k, v in options.items())
        m = re.search(rf"({pat})", text, re.S)
        if m:
            return m.group(0)[0].upper()
        pats = {k: _mb_option_pattern(v).replace(" ", "") for k, v in options.items()}
        m = re.search(rf"({'|'.join(pats.values())})", text.replace(" ", ""), re.S)
        if m:
            for k, p in pats.items():
                if m[0].strip() == p:
                    return k.upper()
        if len(text) in ((1,) if version == "initial" else (1, 2)) and text.upper() in options:
            return text.upper()
    except Exception:                                              # noqa: BLE001 - upstream returns the text
        return text
    return "".join(ch.upper() for ch in text if ch.upper() in options)


def milebench_score_mc(pred: str, gold: str, choices: Sequence[str], version: str = "current"
                       ) -> tuple[float, str, bool]:
    """``judge_multi_choice`` after ``process_sample``: (score, picked key(s), parsed_ok).

    Keys follow :func:`milebench_key` for ``version``. ``parsed_ok`` is False for the empty-answer 'C' and for a
    pick that is not exactly one key.
    """
    p = milebench_process(pred)
    g = milebench_process(gold)
    ch = [milebench_process(c) for c in choices]
    if g not in ch:
        raise ValueError(f"gold answer {gold!r} is not among the choices")
    options = {milebench_key(i, version): c for i, c in enumerate(ch)}
    picked = milebench_match_choice(p, options, version)
    return float(picked == milebench_key(ch.index(g), version)), picked, p != "" and picked in options


def milebench_image_level(n_images: int) -> str:
    """The current ``evaluate.py``'s ``get_image_quantity_level``: from the number of images, not the stored
    field (< 6 Few, > 31 Many, else Medium)."""
    return "Few" if n_images < 6 else ("Many" if n_images > 31 else "Medium")


def milebench_score_open(pred: str, gold: str) -> float:
    """Open-ended MileBench datasets: ROUGE-L F (``rouge==1.0.1``) of the processed texts; empty prediction → 0."""
    p, g = milebench_process(pred), milebench_process(gold)
    return 0.0 if p == "" else rouge_l_pltrdy(p, g)


def milebench_score_needle(pred: str, gold: str, whole_token: bool = True) -> float:
    """Needle datasets: processed gold is one of the whitespace tokens of the processed prediction
    (``whole_token``), or — MMCoQA — a substring of it."""
    p, g = milebench_process(pred), milebench_process(gold)
    return float(g in p.split()) if whole_token else float(g in p)

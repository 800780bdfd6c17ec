"""The DSTC7/DSTC10 AVSD text pipeline without Java: their stopword filters and an emulation of coco-caption's
``PTBTokenizer`` wrapper (Stanford CoreNLP 3.4.1 ``edu.stanford.nlp.process.PTBTokenizer -preserveLines
-lowerCase``, then coco-caption's punctuation list removed).

Written from the behaviour of the Java tokenizer observed on the golden cases (tests/tasks/golden/avsd_*.json),
not from its source. What it covers, and the constructs it knowingly does not, are listed in docs/datasets.md.
"""
from __future__ import annotations

import re

#: tokens coco-caption's wrapper drops after tokenisation (compared *after* -lowerCase, so the bracket escapes
#: -LRB- ... never match: "-lrb-" tokens stay, a quirk kept here)
COCO_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                               "-", "--", "...", ";"])
TOKENIZER_NAME = "ptb-emulation-2 (avkv.metrics.ptb; Stanford PTBTokenizer 3.4.1 as coco-caption calls it)"

_ASCII_WS = " \t\n\r\x0b\x0c"


def dstc7_stopword_filter(text: str) -> str:
    """The DSTC7 package's ``get_hypotheses.py -s data/stopwords.txt`` (Python 2, on the UTF-8 bytes).

    ``stopwords.txt`` holds the lines ``,`` and ``.``; ``StopwordFilter`` compiles each as the regex ``^<line>$``,
    so ``.`` matches *any* one-byte token: every one-character ASCII token of the hypothesis ("a", "i", "2", ",")
    is dropped. Tokens are the byte string's ``split()`` (ASCII whitespace only); a one-character non-ASCII token
    is several bytes and stays. References are not filtered.
    """
    words = re.split(f"[{_ASCII_WS}]+", str(text))
    return " ".join(w for w in words if w and len(w.encode("utf-8")) != 1)


def dstc10_stopword_filter(text: str) -> str:
    """The DSTC10 AVSD package's ``StopwordFilter`` with its ``data/stopwords.txt`` (Python 3), which runs on the
    hypothesis *and* on every reference.

    ``stopwords.txt`` holds the lines ``,`` and ``\\.``: the regexes ``^,$`` and ``^\\.$`` drop only the tokens
    that are exactly "," or "." (one-character words stay, unlike DSTC7). Tokens are ``str.split()`` (any Unicode
    whitespace: NBSP, U+2028, U+3000, ...), re-joined with single spaces.
    """
    return " ".join(w for w in str(text).split() if w not in (",", "."))


_ABBREV = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "inc", "corp", "ltd", "co", "vs", "mt", "ave", "prof",
           "gen", "rep", "sen", "gov", "lt", "col", "capt", "sgt", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
           "sep", "sept", "oct", "nov", "dec", "mon", "tue", "tues", "wed", "thu", "thur", "thurs", "fri",
           "al", "ft", "etc", "esp", "fig", "dept", "est"}
_SPECIAL = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
            "lemme": ["lem", "me"], "gimme": ["gim", "me"]}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CHAR_MAP = str.maketrans({"\u2018": "`", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u201c": '"',
                           "\u201d": '"', "\u201e": '"', "\u00a3": "#", "\u20ac": "$", "\u00bd": "1/2",
                           # U+2018 is an opening quote, never an apostrophe ("lady\u2018s" -> lady ` s);
                           # the Java lexer deletes a soft hyphen (joining the word) and splits at these
                           # invisible format characters as at a space (seen on the DSTC10 golden probes)
                           "\u00ad": None, **{c: " " for c in "\u180e\u200b\u200c\u200d\u200e\u200f\u2060\ufeff"}})
_JAVA_LINE_BREAK = re.compile("[\r\x0b\x0c\u2028\u2029]")
_A = r"[^\W_]"                                              # a letter or digit (any script)
_SCAN = re.compile("|".join([
    r"(?P<url>(?:https?://|www\.)[^\s\"<>()\[\]{}]*[^\s\"<>()\[\]{}.,;:!?'])",
    r"(?P<email>[\w.+-]+@[\w-]+(?:\.[\w-]+)+)",
    r"(?P<emo>[:;]-?[()DPp](?![\w]))",
    r"(?P<ell>\.\.+|\u2026)",
    r"(?P<dash>--+|\u2014|\u2013)",
    r"(?P<excl>[!?]+)",
    r"(?P<dq>'')",                                          # a doubled quote, even before s ("who''s")
    r"(?P<apo>'(?i:tis|twas|n'|cause|s|m|d|re|ve|ll|em)(?![\w']))",
    r"(?P<hash>[#@](?=[^\W\d_])[\w]+)",
    # a word or number: letters/digits joined by - . ' / & (and , : between digits), a leading sign on a number
    r"(?P<word>(?:(?<![\w.])[+-](?=\d))?" + _A + r"+(?:(?:[-./&]|(?<=[^\W\d_])'(?=" + _A + r")|[,:](?=\d)(?<=\d[,:]))"
    + _A + r"+)*(?:\.(?!\.)|(?<=(?<![\w.])[^\W\d_])\.)?)",
    r"(?P<other>\S)",
]))


def _split_word(tok: str, rest: str) -> list[str]:
    out_tail: list[str] = []
    if tok.endswith(".") and len(tok) > 1:
        core = tok[:-1]
        low = core.lower()
        segs = low.split(".")
        if len(core) == 1 and core.isalpha() or low in _ABBREV or (len(segs) > 1 and all(
                len(s) == 1 and s.isalpha() for s in segs)) or (low == "no" and re.match(r"\s*\d", rest)) or (
                rest[:1] in (",", ";", ":")):
            return [tok]                                    # abbreviation: the period stays (an extra '.' is dropped)
        tok, out_tail = core, ["."]
    low = tok.lower()
    if low in _SPECIAL:
        return _SPECIAL[low] + out_tail
    if "'" not in tok:
        return [tok] + out_tail
    head: list[str] = []
    if low.startswith("y'") and len(tok) > 2:
        head, tok = [tok[:2]], tok[2:]
    parts: list[str] = []
    while True:                                             # clitics off the right end: I'd've → I 'd 've
        m = re.search(r"(n't|'s|'m|'d|'re|'ve|'ll)$", tok, flags=re.IGNORECASE)
        if not m or m.start() == 0:
            break
        parts.insert(0, tok[m.start():])
        tok = tok[:m.start()]
    if not parts and len(tok) > 2 and tok[-2:].lower() == "'t" and tok[:-2].lower() != "n":   # "does't"
        return head + [tok[:-2], "'", tok[-1]] + out_tail
    if re.search(r"'n'", tok, flags=re.IGNORECASE):          # rock'n'roll
        a, _, b = re.split(r"('n')", tok, maxsplit=1, flags=re.IGNORECASE)[0:3]
        mid = re.search(r"'n'", tok, flags=re.IGNORECASE).group(0)
        return head + [x for x in (a, mid, b) if x] + parts + out_tail
    return head + [tok] + parts + out_tail


def ptb_tokens(text: str) -> list[str]:
    """Tokens of one caption as coco-caption's ``PTBTokenizer`` leaves them: lower-cased, punctuation dropped."""
    # coco-caption replaces "\n" by a space; the Java lexer still breaks the line at CR, VT, FF, U+2028 and U+2029,
    # and the wrapper gives the caption its first output line (upstream, the rest shifts onto the next captions)
    s = _JAVA_LINE_BREAK.split(str(text).replace("\n", " "), 1)[0].translate(_CHAR_MAP)
    raw: list[str] = []
    for m in _SCAN.finditer(s):
        kind, tok = m.lastgroup, m.group(0)
        if kind == "word":
            raw.extend(_split_word(tok, s[m.end():]))
        elif kind == "emo":
            raw.append(tok[:-1] + _BRACKETS.get(tok[-1], tok[-1]))
        elif kind == "ell":
            raw.append("...")
        elif kind == "dash":
            raw.append("--")
        elif kind == "other":
            if tok in _BRACKETS:
                raw.append(_BRACKETS[tok])
            elif tok in "\"'`":
                raw.append("''")                           # a quote: dropped below
            else:
                raw.append(tok)
        else:
            raw.append(tok)
    out = []
    for t in raw:
        if t.startswith("'") and t.lower() in ("'tis", "'twas"):
            out.extend(["'t", t[2:]])
            continue
        out.append(t.lower())
    return [t for t in out if t not in COCO_PUNCTUATIONS]


def ptb_line(text: str) -> str:
    """The tokenised caption as the wrapper stores it (tokens joined by one space; '' when none)."""
    return " ".join(ptb_tokens(text))

"""Chinese text normalisation for CER, as Qwen2-Audio's ``evaluate_asr.py`` applies speechio's ``cn_tn.TextNorm``
(every option off): numbers written with digits are read out in Chinese characters, then punctuation becomes
spaces. The CER tokeniser (:func:`avkv.metrics.text.asr_tokens`) then lower-cases, drops the spaces and compares
characters.

The rules, in their order (each finds all its matches first, then replaces the *first occurrence* of each matched
string, as the reference does):

1. dates ``[YYYY年][M月[D日|号]]``: the year digit by digit, month and day as numbers;
2. money ``N[.N][多余几]<unit>[N[<unit>]]`` (units: 元 块 角 毛 分, 万/千/百/亿 prefixes): every number inside;
3. mobile numbers (``[+86 ]1xx xxxx xxxx``) and landlines (``[0xx[x]-]xxxxxxx[x]``): digit by digit;
4. fractions ``a/b`` → ``b分之a``; 5. percentages ``N%`` (also ``％``) → ``百分之N``;
6. a number before a measure word (个 本 年 米 ...); 7. runs of 4 to 32 digits: digit by digit;
8. every other number; 9. ``二`` between Latin letters goes back to ``2`` (P2P, B2B).

Numbers are read with the units 十 百 千 万 亿 兆 … (亿 = 10^8, 兆 = 10^12: the ``mid`` system), a zero where a
place is skipped (一千零五), ``两`` for a 2 before 百/千/万/… not after 十 (两百, 两千, 二十), a leading
``一十`` shortened to ``十`` and a decimal part digit by digit after ``点``.

The word lists (punctuation, currency units, measure words) are data from the reference
(``zh_tn_data.json`` records the source); the code is avkv's. ``tests/tasks/test_speech_golden.py`` checks it
against the reference's own output on a case list.
"""
from __future__ import annotations

import json
import re
import string
from functools import lru_cache
from pathlib import Path

DIGITS = "零一二三四五六七八九"
# (power of ten, character): 十 百 千 万, then 亿 兆 京 垓 秭 穰 沟 涧 正 载 every 4 powers from 10^8
UNITS = [(1, "十"), (2, "百"), (3, "千"), (4, "万")] + [((i + 2) * 4, c) for i, c in enumerate("亿兆京垓秭穰沟涧正载")]
POINT = "点"
TWO_ALT = "两"


@lru_cache(maxsize=1)
def _data() -> dict:
    d = json.loads(Path(__file__).with_name("zh_tn_data.json").read_text(encoding="utf-8"))
    d["translate"] = str.maketrans({c: " " for c in d["punctuation"] + string.punctuation})
    return d


def _place_symbols(s: str) -> list[tuple[str, int | str]]:
    """The digit string ``s`` (leading zeros kept) as symbols: ('d', digit) and ('u', power)."""
    t = s.lstrip("0")
    if not t:
        return []
    if len(t) == 1:
        return ([("d", 0)] if len(s) != len(t) else []) + [("d", int(t))]
    power = next(p for p, _ in reversed(UNITS) if p < len(t))
    return _place_symbols(s[:-power]) + [("u", power)] + _place_symbols(t[-power:])


def read_number(number: str, two_alt: bool = True, use_units: bool = True) -> str:
    """A digit string (optionally with one decimal point) read out in Chinese characters."""
    parts = number.split(".")
    if len(parts) > 2:
        raise ValueError(f"a number with more than one point: {number!r}")
    whole, frac = parts[0], (parts[1] if len(parts) == 2 else "")
    syms = _place_symbols(whole) if use_units and len(whole) > 1 else [("d", int(c)) for c in whole]
    unit_char = dict(UNITS)
    out = []
    for i, (kind, v) in enumerate(syms):
        if kind == "u":
            out.append(unit_char[v])
            continue
        ch = DIGITS[v]
        if two_alt and v == 2:
            nxt = syms[i + 1] if i + 1 < len(syms) else None
            prev = syms[i - 1] if i > 0 else None
            if nxt is not None and nxt[0] == "u" and (prev is None or prev[0] == "u"):
                if nxt[1] != 1 and (prev is None or prev[1] != 1):
                    ch = TWO_ALT
        out.append(ch)
    if frac:
        out.append(POINT)
        out.extend(DIGITS[int(c)] for c in frac)
    res = "".join(out)
    if res.startswith(POINT):
        return DIGITS[0] + res
    if len(res) >= 2 and res[0] == "一" and res[1] == "十":
        res = res[1:]
    return res


def _digits(s: str) -> str:
    return read_number(s, two_alt=False, use_units=False)


def _date(date: str) -> str:
    year, sep, rest = date.strip().partition("年")
    if not sep:
        year, rest = "", date
    else:
        year = _digits(year) + "年"
    month = day = ""
    if rest:
        m, sep, d = rest.strip().partition("月")
        if sep:
            month = read_number(m) + "月"
        else:
            d = date
        if d:
            day = read_number(d[:-1]) + d[-1]
    return year + month + day


def _money(money: str) -> str:
    for num, _ in re.findall(r"(\d+(\.\d+)?)", money):
        money = money.replace(num, read_number(num))
    return money


def _phone(number: str, fixed: bool) -> str:
    parts = number.split("-") if fixed else number.strip("+").split()
    return "".join(_digits(p) for p in parts)


def _sub_first(text: str, matches: list[str], fn) -> str:
    for m in matches:
        text = text.replace(m, fn(m), 1)
    return text


def normalize_numbers(raw: str) -> str:
    """Rules 1-9 above (the reference's ``normalize_nsw``)."""
    d = _data()
    units, quant = d["currency_units"], d["quantifiers"]
    text = "^" + raw + "$"
    text = _sub_first(text, [m[0] for m in re.findall(
        r"\D+((([089]\d|(19|20)\d{2})年)?(\d{1,2}月(\d{1,2}[日号])?)?)", text)], _date)
    text = _sub_first(text, [m[0] for m in re.findall(
        r"\D+((\d+(\.\d+)?)[多余几]?" + units + r"(\d" + units + r"?)?)", text)], _money)
    text = _sub_first(text, [m[0] for m in re.findall(
        r"\D((\+?86 ?)?1([38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D", text)], lambda m: _phone(m, fixed=False))
    text = _sub_first(text, [m[0] for m in re.findall(
        r"\D((0(10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D", text)], lambda m: _phone(m, fixed=True))
    text = _sub_first(text, re.findall(r"(\d+/\d+)", text),
                      lambda m: read_number(m.split("/")[1]) + "分之" + read_number(m.split("/")[0]))
    text = text.replace("％", "%")
    text = _sub_first(text, [m[0] for m in re.findall(r"(\d+(\.\d+)?%)", text)],
                      lambda m: "百分之" + read_number(m.strip().strip("%")))
    text = _sub_first(text, [m[0] for m in re.findall(r"(\d+(\.\d+)?)[多余几]?" + quant, text)], read_number)
    text = _sub_first(text, re.findall(r"(\d{4,32})", text), _digits)
    text = _sub_first(text, [m[0] for m in re.findall(r"(\d+(\.\d+)?)", text)], read_number)
    text = _sub_first(text, [m[0] for m in re.findall(r"(([a-zA-Z]+)二([a-zA-Z]+))", text)],
                      _restore_two)
    return text.lstrip("^").rstrip("$")


def _restore_two(m: str) -> str:
    a, b = re.fullmatch(r"([a-zA-Z]+)二([a-zA-Z]+)", m).groups()
    return a + "2" + b


def normalize_zh(text: str) -> str:
    """The reference ``TextNorm()`` with every option off: numbers read out, punctuation → spaces."""
    return normalize_numbers(text).translate(_data()["translate"])

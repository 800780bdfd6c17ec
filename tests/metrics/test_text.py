"""Text metrics against hand-computed examples, including the official scripts' quirks."""
from __future__ import annotations

import pytest

from avkv.metrics.text import (exact_match, extract_choice, option_letters, render_options, rouge_l_coco,
                               rouge_l_pltrdy, videollama2_exact_match)

CH = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize("text,idx", [
    ("B", 1), ("(B)", 1), ("B.", 1), (" c ", 2), ("[D]", 3),
    ("B. green", 1), ("(C) blue", 2), ("D) yellow", 3), ("A: red", 0),
    ("The answer is B.", 1), ("Answer: (C)", 2), ("answer: d", 3), ("Best option: (A)", 0),
    ("I think it is (C) because", 2), ("the colour is blue", 2), ("It's yellow.", 3),
    ("A red square is shown", 0),             # option text, the article "A" is not a key
    ("The square is B", 1),
])
def test_extract_choice(text, idx):
    assert extract_choice(text, CH) == idx


@pytest.mark.parametrize("text", ["", "   ", None, "I don't know", "red or blue", "A or B", "E"])
def test_extract_choice_unparsed(text):
    assert extract_choice(text, CH) is None


def test_extract_choice_longest_option_text():
    ch = ["a high-pitched beep", "a low-pitched beep", "a human voice", "a dog barking"]
    assert extract_choice("I hear a low-pitched beep.", ch) == 1
    ch2 = ["beeps", "high-pitched beeps", "silence", "voice"]
    assert extract_choice("high-pitched beeps", ch2) == 1


def test_option_letters_and_render():
    keys = option_letters(30)
    assert keys[:3] == ["A", "B", "C"] and keys[25] == "Z" and keys[26:29] == ["AA", "AB", "AC"]
    assert render_options(["x", "y"]) == "(A) x\n(B) y"
    assert render_options(["x", "y"], "dot") == "A. x\nB. y"


def test_videollama2_exact_match_quirks():
    assert videollama2_exact_match("Yes.", "yes")
    assert videollama2_exact_match("two .", "Two")
    assert not videollama2_exact_match("Yes, there are two.", "yes")     # strict: a sentence scores 0
    assert not videollama2_exact_match(" yes", "yes")                   # only trailing ' .' is stripped
    assert not videollama2_exact_match("yes!", "yes")


def test_clean_exact_match():
    assert exact_match(" Yes! ", "yes") and exact_match("The piano.", "piano")
    assert not exact_match("two pianos", "piano")


def test_rouge_l_known_pairs():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 → P = R = F = 5/6
    assert rouge_l_coco("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # LCS = 2, P = 2/4, R = 2/2 → F1 = 2/3; COCO beta = 1.2: (1 + 1.44) * 0.5 * 1 / (1 + 1.44 * 0.5)
    assert rouge_l_coco("a b c d", ["a c"], beta=1.0) == pytest.approx(2 / 3)
    assert rouge_l_coco("a b c d", ["a c"]) == pytest.approx(2.44 * 0.5 / 1.72)
    assert rouge_l_coco("", ["a"]) == 0.0 and rouge_l_coco("x y", ["a b"]) == 0.0
    assert rouge_l_coco("same words here", ["same words here"]) == pytest.approx(1.0)


def test_rouge_l_pltrdy_quirks():
    """rouge==1.0.1 (MileBench): word *sets*, summary-level over '.'-split sentences, F = 2PR/(P+R+1e-8)."""
    # unique words: hyp {the,cat,sat,on,mat} = 5, ref {the,cat,is,on,mat} = 5, LCS set {the,cat,on,mat} = 4 → 0.8
    assert rouge_l_pltrdy("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)
    assert rouge_l_pltrdy("a b c d", "a c") == pytest.approx(2 / 3, abs=1e-7)
    assert rouge_l_pltrdy("the the the cat", "the cat") == pytest.approx(1.0, abs=1e-7)   # repeats count once
    # "3.5" splits into two sentences "x 3" / "5 y": words {x,3,5,y}, LCS union {x,3,y} → P = 3/4, R = 1
    assert rouge_l_pltrdy("x 3.5 y", "x 3 y") == pytest.approx(2 * 0.75 / 1.75, abs=1e-7)
    assert rouge_l_pltrdy("", "a") == 0.0


def test_rouge_l_pltrdy_matches_package_when_installed():
    rouge = pytest.importorskip("rouge", reason="the reference package rouge==1.0.1 is not installed")
    import random
    r, rng = rouge.Rouge(), random.Random(0)
    vocab = "a b c the cat . on mat 3.5 x".split()
    for _ in range(500):
        h = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 10)))
        g = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 10)))
        try:
            want = r.get_scores(h, g)[0]["rouge-l"]["f"]
        except (ValueError, ZeroDivisionError):
            continue
        assert rouge_l_pltrdy(h, g) == pytest.approx(want, abs=1e-12)

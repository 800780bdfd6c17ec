"""AVSD: DSTC7 dialogs layout, undisclosed last answers + multiref file, history prompt, coco ROUGE-L."""
from __future__ import annotations

import json

import pytest

from avkv.metrics.text import ptb_tokenize, rouge_l_coco
from avkv.tasks.avsd import AVSD
from avkv.tasks.base import DatasetError
from tests.tasks.helpers import prompt, prompts


@pytest.fixture
def av_root(fixture_root):
    return fixture_root / "avsd"


def test_layout(av_root):
    idx = json.loads((av_root / "test_set4DSTC7-AVSD.json").read_text())
    for d in idx["dialogs"]:
        assert {"image_id", "summary", "caption", "dialog"} <= set(d)
        assert d["dialog"][-1]["answer"] == "__UNDISCLOSED__"
        assert (av_root / "Charades_v1_480" / f"{d['image_id']}.mp4").is_file()
    multi = json.loads((av_root / "test_set4DSTC7-AVSD_multiref.json").read_text())
    assert all(isinstance(d["dialog"][-1]["answer"], list) for d in multi["dialogs"])


def test_loader_uses_references(av_root):
    docs = list(AVSD(av_root).docs())
    assert len(docs) == 4 and all(isinstance(d.target, list) and len(d.target) >= 3 for d in docs)
    assert "__UNDISCLOSED__" not in json.dumps([d.target for d in docs])
    assert docs[1].meta["turn"] == 4 and len(docs[1].meta["history"]) == 3


def test_undisclosed_without_references_fails_at_load(av_root):
    with pytest.raises(DatasetError, match="__UNDISCLOSED__ and no references"):
        list(AVSD(av_root, references=None).docs())


SNAP_CONTEXT = ("Dialog history:\nQ: is there anything moving in the video ?\nA: yes , a square moves across the "
                "screen .\nQ: what colour is the square ?\nA: the square is red .")
SNAP_QUESTION = "Q: which way does it move ?\nAnswer the question about the video in one short sentence."


@pytest.mark.parametrize("family,kind", [("qwen2_5_omni", "video"), ("videollama2", "video"),
                                         ("qwen2_5_vl", "video"), ("qwen2_audio", "audio")])
def test_prompt_snapshot(av_root, family, kind):
    t = AVSD(av_root, prompts=prompts("avsd"))
    d = next(iter(t.docs()))
    p = prompt(t, d, family)
    assert p.context[0].kind == kind and p.context[1] == SNAP_CONTEXT and p.question == SNAP_QUESTION


def test_prompt_options(av_root):
    d = next(iter(AVSD(av_root).docs()))
    p = AVSD(av_root, include_caption=True, max_history=1, prompts=prompts("avsd")).prompt(d, "qwen2_5_omni")
    assert p.context[1].startswith("Video caption: a coloured square") and p.context[1].count("Q: ") == 1
    assert len(AVSD(av_root, max_history=0, prompts=prompts("avsd")).prompt(d, "qwen2_5_omni").context) == 1


def test_rouge_l_coco_known_pairs():
    assert ptb_tokenize("Yes, he's holding a T-shirt.") == ["yes", "he", "'s", "holding", "a", "t-shirt"]
    # cand "a red square" vs refs: max P = 3/3 (ref 2), max R = 3/5 (ref 2) → 2.44 * 0.6 / (0.6 + 1.44 * 1)
    assert rouge_l_coco("a red square", ["the square is red", "it is a red square"]) == \
        pytest.approx(2.44 * 0.6 / 2.04)
    # the max P and max R may come from different references
    # ref1 "red": P = 1/2, R = 1; ref2 "the square is red": LCS("square red") P = 1, R = 1/2
    assert rouge_l_coco("square red", ["red", "the square is red"]) == pytest.approx(2.44 * 1.0 / (1 + 1.44))
    assert rouge_l_coco("", ["x"]) == 0.0


def test_score_and_aggregate(av_root):
    t = AVSD(av_root)
    docs = list(t.docs())
    assert t.score(docs[0], "It moves from left to right.")["score"] == pytest.approx(1.0)
    recs = [dict(t.score(d, "no idea"), error=None) for d in docs] + [{"error": "cannot decode x.mp4", "turn": 3}]
    agg = t.aggregate(recs)
    assert agg["rouge_l"] == 0.0 and agg["n_failed"] == 1 and set(agg["rouge_l_by_turn"]) == {"3", "4"}


def test_broken_copies(broken_copy):
    root = broken_copy("avsd")
    p = root / "test_set4DSTC7-AVSD.json"
    data = json.loads(p.read_text())
    del data["dialogs"][2]["dialog"][1]["question"]
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"test_set4DSTC7-AVSD.json: item #2 \(image_id FX0C3\) turn 1 has no "
                                           r"field 'question'"):
        list(AVSD(root).docs())
    p.write_text(json.dumps({"dialog": []}))
    with pytest.raises(DatasetError, match="'dialogs' list"):
        list(AVSD(root).docs())

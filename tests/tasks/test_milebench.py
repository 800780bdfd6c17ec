"""MileBench: all 29 datasets in the official layout, prompt + left truncation, official scoring quirks, roll-up."""
from __future__ import annotations

import json

import pytest

from avkv.metrics.text import (milebench_match_choice, milebench_process, milebench_score_mc,
                               milebench_score_needle, milebench_score_open)
from avkv.tasks.base import DatasetError, Media
from avkv.tasks.milebench import DATASETS, GROUPS, PRESETS, MileBench, _Tokens, truncate
from tests.tasks.helpers import prompt, prompts


@pytest.fixture
def mb_root(fixture_root):
    return fixture_root / "milebench"


def test_29_datasets_in_three_groups():
    assert len(DATASETS) == 29 and len(set(DATASETS)) == 29
    assert [len(v) for v in GROUPS.values()] == [13, 13, 3]
    assert set(PRESETS["flowmm"]) <= set(DATASETS) and len(PRESETS["flowmm"]) == 7


def test_layout(mb_root):
    for ds in DATASETS:
        data = json.loads((mb_root / ds / f"{ds}.json").read_text())
        assert {"dataset", "split", "num_sample", "task_instruction", "question_type"} <= set(data["meta_data"])
        for it in data["data"]:
            assert {"sample_id", "task_instruction_id", "task_instance", "response", "image_quantity_level"} <= set(it)
            for p in it["task_instance"]["images_path"]:
                assert (mb_root / ds / "images" / p).is_file()
    assert (mb_root / "ObjectExistence" / "ObjectExistence-adv.json").is_file()
    levels = {it["image_quantity_level"] for ds in DATASETS
              for it in json.loads((mb_root / ds / f"{ds}.json").read_text())["data"]}
    assert levels == {"Few", "Medium", "Many"}


def test_needle_image_really_holds_the_code(mb_root, facts):
    import numpy as np
    from PIL import Image
    f = facts["milebench"]["ImageNeedleInAHaystack"]
    dark = [(np.asarray(Image.open(mb_root / "ImageNeedleInAHaystack" / "images" / f"0/{k}.jpg")).mean(-1) < 60).sum()
            for k in range(34)]
    assert int(np.argmax(dark)) == f["image_index"] and sorted(dark)[-2] == 0


def test_truncate_by_hand():
    """Whitespace tokens: instruction 2 tokens, max 12 → budget 10, images cost 3."""
    tok = _Tokens(None)
    ctx = "a b <ImageHere>c d e <ImageHere>f g"
    segs, info = truncate("Do it.", ctx, ["i1", "i2"], 12, 3, tok)
    # backwards: "f g" (2) → image i2 (+3 = 5) → "c d e " (3 → 8) → image i1 would make 11 > 10: stop
    assert [s.path if isinstance(s, Media) else s for s in segs] == ["Do it.\n", "c d e ", "i2", "f g"]
    assert info["images_kept"] == 1 and info["context_tokens"] == 8 and info["truncated"]
    segs, info = truncate("Do it.", ctx, ["i1", "i2"], 100, 3, tok)
    assert [s.path if isinstance(s, Media) else s for s in segs] == ["Do it.\n", "a b ", "i1", "c d e ", "i2", "f g"]
    assert not info["truncated"]
    # a leading image: the empty fragment before it is kept as a chunk, so the image follows it
    segs, _ = truncate("I", "<ImageHere>x y", ["i1"], 100, 3, tok)
    assert [s.path if isinstance(s, Media) else s for s in segs] == ["I\n", "", "i1", "x y"]
    # when the budget ends right after an image, that image leads the context
    segs, _ = truncate("I", "a <ImageHere>x y", ["i1"], 6, 3, tok)
    assert [s.path if isinstance(s, Media) else s for s in segs] == ["I\n", "i1", "x y"]
    # a single fragment longer than the budget keeps its tail
    segs, info = truncate("I", "one two three four five", [], 4, 3, tok)
    assert segs == ["I\n", "three four five"] and info["truncated"]


def test_loader_and_truncation_recorded(mb_root):
    t = MileBench(mb_root)
    docs = list(t.docs())
    assert len(docs) == 30 and {d.meta["dataset"] for d in docs} == set(DATASETS)
    needle = next(d for d in docs if d.meta["dataset"] == "ImageNeedleInAHaystack")
    tr = needle.meta["truncation"]
    assert tr["images_total"] == 34 and tr["images_kept"] == len(needle.media) < 34
    assert tr["max_context_len"] == 4096 and tr["n_tokens_per_image"] == 576 and tr["tokenizer"] == "whitespace"
    big = MileBench(mb_root, tasks=["ImageNeedleInAHaystack"], max_context_len=100000)
    assert len(next(iter(big.docs())).media) == 34
    assert len(list(MileBench(mb_root, tasks="flowmm").docs())) == 7
    adv = next(iter(MileBench(mb_root, tasks=["ObjectExistence"], adv=True).docs()))
    assert adv.choices == ["no", "yes"]


SNAP_Q = "Question: Does a blue square appear in the frames?\nChoice list: \nA. yes\nB. no\nYour answer is: "


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_5_omni", "videollama2", "mobilevlm"])
def test_prompt_snapshot(mb_root, family):
    t = MileBench(mb_root, tasks=["ObjectExistence"], prompts=prompts("milebench"))
    d = next(iter(t.docs()))
    p = prompt(t, d, family)
    assert p.context[0] == "Look at the frames and answer the question.\n"
    assert [c.kind for c in p.context[1:]] == ["image"] * 3 and p.question == SNAP_Q
    assert p.context[1].path.endswith("ObjectExistence/images/0/0.jpg") and p.max_new_tokens == 512


def test_prompt_gpr1200_has_bare_options(mb_root):
    t = MileBench(mb_root, tasks=["GPR1200"], prompts=prompts("milebench"))
    p = prompt(t, next(iter(t.docs())), "qwen2_5_vl")
    assert "\npicture 1\npicture 2\n" in p.question and "A. " not in p.question
    with pytest.raises(ValueError, match="qwen2_audio is null"):
        prompt(t, next(iter(t.docs())), "qwen2_audio")


def test_process_quirks():
    assert milebench_process("Hello, World.\nIt costs 3.5!") == "hello world it costs 3.5"
    assert milebench_process("x (y)") == "x y"
    assert milebench_process("a-b") == "a b"                       # no space next to '-': replaced by a space
    assert milebench_process("a - b") == "a  b"                    # a space next to '-': deleted
    assert milebench_process("'Quoted'") == "quoted"


def test_mc_quirks():
    ch = ["red", "green", "blue", "yellow"]
    assert milebench_score_mc("", "blue", ch) == (1.0, "C", False)          # empty answer picks C
    assert milebench_score_mc("", "red", ch)[0] == 0.0
    assert milebench_score_mc("B", "green", ch) == (1.0, "B", True)
    assert milebench_score_mc("b. green", "green", ch)[1] == "B"
    assert milebench_score_mc("This is a red square", "green", ch)[1] == "A"  # "a red" = key A + option text
    assert milebench_score_mc("the answer is b", "green", ch)[1] == "AB"      # every key letter, concatenated
    assert milebench_score_mc("GREEN", "green", ch)[0] == 1.0
    assert milebench_match_choice("d", {"A": "x", "D": "y"}) == "D"


def test_gpr1200_keys_past_z():
    """initial: keys are chr(65 + i), options 27-29 get '[', '\\\\', ']', which process() deletes, so their patterns
    are the bare option text and a correct answer reads as 'P'. current: AA, AB, ... and "AB" is a key."""
    opts = [f"picture {k + 1}" for k in range(30)]
    assert milebench_score_mc("picture 3", "picture 3", opts, "initial")[:2] == (1.0, "C")
    assert milebench_score_mc("picture 28", "picture 28", opts, "initial")[:2] == (0.0, "P")
    assert milebench_score_mc("AB", "picture 28", opts, "initial")[:2] == (0.0, "AB")
    assert milebench_score_mc("picture 28", "picture 28", opts)[:2] == (0.0, "B")     # "picture2" matches first
    assert milebench_score_mc("AB", "picture 28", opts)[:2] == (1.0, "AB")


def test_needle_substring_and_rouge():
    assert milebench_score_needle("The code is K7Q.", "k7q") == 1.0
    assert milebench_score_needle("code:K7Q", "k7q") == 0.0                          # not a whole token
    assert milebench_score_needle("code:K7Q", "k7q", whole_token=False) == 1.0       # MMCoQA: substring
    assert milebench_score_open("", "anything") == 0.0
    # processed: "the red circle moved left" vs "the red circle moved to the left": word sets 5 and 6 (unique),
    # LCS union {the, red, circle, moved, left} = 5 → P = 1, R = 5/6 → F = 2PR/(P+R) = 10/11
    assert milebench_score_open("The red circle moved left.", "the red circle moved to the left") == \
        pytest.approx(10 / 11, abs=1e-6)


def test_score_and_rollup(mb_root):
    t = MileBench(mb_root)
    docs = list(t.docs())
    recs = []
    for d in docs:
        pred = d.target if d.meta["dataset"] not in ("ALFRED", "GPR1200") else ""
        recs.append(dict(t.score(d, pred), sample_id=d.id, error=None))
    recs.append({"sample_id": "x", "error": "cannot open image", "dataset": "ALFRED"})
    agg = t.aggregate(recs)
    assert agg["score_by_dataset"]["ALFRED"] == 0.0 and agg["score_by_dataset"]["ObjectExistence"] == 100.0
    assert agg["score_by_dataset"]["GPR1200"] == 0.0                      # empty → 'C', gold is picture 28
    rt = GROUPS["Realistic Temporal"]
    assert agg["score_by_group"]["Realistic Temporal"] == pytest.approx(
        sum(agg["score_by_dataset"][d] for d in rt) / len(rt))
    assert agg["score"] == pytest.approx(sum(agg["score_by_dataset"].values()) / 29)
    assert set(agg["score_by_image_quantity_level"]) == {"Few", "Medium", "Many"}
    assert agg["n_failed"] == 1 and agg["n_unparsed"] == 2 and agg["n"] == 31


def test_broken_copies(broken_copy):
    root = broken_copy("milebench")
    p = root / "IEdit" / "IEdit.json"
    data = json.loads(p.read_text())
    del data["data"][0]["response"]
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"IEdit.json: item #0 \(sample_id 0\) has no field 'response'"):
        list(MileBench(root, tasks=["IEdit"]).docs())
    p = root / "TQA" / "TQA.json"
    data = json.loads(p.read_text())
    data["data"][0]["response"] = "purple"
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="TQA.json: item #0 .*'response' 'purple' is not in choice_list"):
        list(MileBench(root, tasks=["TQA"]).docs())
    p = root / "WebQA" / "WebQA.json"
    data = json.loads(p.read_text())
    del data["meta_data"]["question_type"]
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="WebQA.json: item meta_data has no field 'question_type'"):
        list(MileBench(root, tasks=["WebQA"]).docs())
    (root / "nuscenes" / "nuscenes.json").unlink()
    with pytest.raises(DatasetError, match="nuscenes.json"):
        list(MileBench(root, tasks=["nuscenes"]).docs())
    assert list(MileBench(root, tasks=["nuscenes"], skip_missing_tasks=True).docs()) == []
    with pytest.raises(DatasetError, match="unknown MileBench dataset"):
        MileBench(root, tasks=["Nope"])

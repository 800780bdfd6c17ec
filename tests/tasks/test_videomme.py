"""Video-MME: the official parquet layout, the w/o-subs prompt from the config, lmms-eval's letter extraction."""
from __future__ import annotations

import pytest

from avkv.tasks.base import DatasetError
from avkv.tasks.videomme import VideoMME, extract_letter
from tests.tasks.helpers import prompt, prompts

SNAP = ("Select the best answer to the following multiple-choice question based on the video. Respond with only "
        "the letter (A, B, C, or D) of the correct option.\nWhat colour is the moving square?\nA. blue\nB. yellow\n"
        "C. red\nD. green\nThe best answer is:")


@pytest.fixture(scope="module")
def root(fixture_root):
    return fixture_root / "videomme"


def test_docs_from_the_fixture(root, facts):
    docs = list(VideoMME(root).docs())
    assert len(docs) == 9 and [d.id for d in docs[:2]] == ["001-1", "001-2"]
    for d in docs:
        f = facts["videomme"]["items"][d.id]
        assert d.choices["ABCD".index(d.target)][3:] == f["answer_text"]          # "C. red" -> "red"
        assert d.media[0].path.endswith(f"data/{f['videoID']}.mp4") and not d.media[0].with_audio
        assert d.meta["duration"] == f["duration"]
    assert [d.meta["duration"] for d in VideoMME(root, duration="long").docs()] == ["long"] * 3
    with pytest.raises(ValueError, match="not a Video-MME duration"):
        VideoMME(root, duration="tiny")


def test_prompt_snapshot(root):
    t = VideoMME(root, prompts=prompts("videomme"))
    d = next(iter(t.docs()))
    p = prompt(t, d, "qwen2_5_vl")
    assert p.question == SNAP and p.context == d.media and p.max_new_tokens == 16
    with pytest.raises(ValueError, match="qwen2_audio is null"):
        prompt(t, d, "qwen2_audio")


@pytest.mark.parametrize("reply,letter", [
    ("C", "C"), (" (B) yellow", "B"), ("The best answer is: D", "D"), ("The answer is A.", "A"),
    ("Best answer:Best option: C", "C"), ("", ""), ("none", ""),
    # more than ten words without a capital A-D: unparsed, even though a letter-like word appears later in lower case
    ("i think that the square in this video is moving from left to right", ""),
    ("Based on the video, C", "B"),                   # the first capital A-D wins (the B of "Based")
])
def test_letter_extraction(reply, letter):
    assert extract_letter(reply) == letter


def test_score_and_aggregate(root):
    t = VideoMME(root)
    docs = list(t.docs())
    recs = [dict(t.score(d, d.target), sample_id=d.id) for d in docs[:3]]
    recs += [dict(t.score(d, "no idea"), sample_id=d.id) for d in docs[3:6]]
    recs += [{"sample_id": d.id, "error": "MediaError: x", "score": None} for d in docs[6:]]
    agg = t.aggregate(recs)
    assert agg["accuracy"] == pytest.approx(0.5) and agg["n_failed"] == 3 and agg["n_unparsed"] == 3
    assert agg["accuracy_by_duration"] == {"long": None, "medium": 0.0, "short": 1.0}
    assert agg["n_by_duration"] == {"long": 3, "medium": 3, "short": 3}


def test_layout_errors(broken_copy):
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = broken_copy("videomme")
    path = root / "videomme" / "test-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[1]["answer"] = "E"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DatasetError, match=r"row 1 \(question_id 001-2\) field 'answer' 'E' is not an option"):
        list(VideoMME(root).docs())
    path.unlink()
    with pytest.raises(DatasetError, match="Video-MME index not found"):
        list(VideoMME(root).docs())

"""AVQA: fixture content, loader on the fixture and on broken copies, prompt snapshots, scoring, aggregation."""
from __future__ import annotations

import json
import time

import pytest

from avkv.tasks import fixtures
from avkv.tasks.avqa import AVQA
from avkv.tasks.base import DatasetError, Media
from tests.tasks.helpers import prompt, prompts
from tests.tasks.media_probe import beep_events, decode_video, square_track

FIELDS = ["id", "video_name", "video_id", "question_text", "multi_choice", "answer", "question_relation",
          "question_type"]


def test_layout_is_official(fixture_root):
    root = fixture_root / "avqa"
    items = json.loads((root / "val_qa.json").read_text())
    assert isinstance(items, list) and 16 <= len(items) <= 24
    for it in items:
        assert set(FIELDS) <= set(it)
        assert len(it["multi_choice"]) == 4 and isinstance(it["answer"], int)
        assert it["question_relation"] in {"Audio", "Visual", "Both"}
        assert it["question_type"] in {"Which", "Come From", "Happening", "Where", "Why", "Before Next", "When",
                                       "Used For"}
        assert len(it["video_name"].split("_")[0]) == 11 and len(it["video_name"].split("_")[1]) == 6
        assert (root / "videos" / f"{it['video_name']}.mp4").is_file()
    assert {it["question_relation"] for it in items} == {"Audio", "Visual", "Both"}
    assert not (root / "_fixture").exists() and not (root / "facts.json").exists()


def test_fixture_is_idempotent_and_fast(tmp_path):
    t0 = time.perf_counter()
    assert fixtures.build(tmp_path, only=["avqa"]) == {"avqa": True}
    assert time.perf_counter() - t0 < 5
    assert fixtures.build(tmp_path, only=["avqa"]) == {"avqa": False}
    (tmp_path / "avqa" / "videos" / "fx000000000_000000.mp4").unlink()      # incomplete → rebuilt
    assert fixtures.build(tmp_path, only=["avqa"]) == {"avqa": True}


def test_media_carry_the_answers(fixture_root, facts):
    """Decode every clip: colour/direction of the square and beep count/pitch match the facts sidecar."""
    for name, f in facts["avqa"]["videos"].items():
        frames, audio, sr = decode_video(fixture_root / "avqa" / "videos" / f"{name}.mp4")
        assert frames.shape[1:] == (f["size"], f["size"], 3) and len(frames) == f["seconds"] * f["fps"]
        assert sr == 16000 and abs(len(audio) / sr - f["seconds"]) < 0.2
        track = square_track(frames)
        segs = f["segments"]
        per = len(frames) // len(segs)
        events = beep_events(audio, sr)
        assert len(events) == sum(s["beeps"] for s in segs)
        for k, s in enumerate(segs):
            part = track[k * per:(k + 1) * per]
            assert {c for c, _, _ in part} == {s["colour"]}
            dx, dy = part[-1][1] - part[0][1], part[-1][2] - part[0][2]
            want = {"left_to_right": dx > 20, "right_to_left": dx < -20, "top_to_bottom": dy > 20,
                    "bottom_to_top": dy < -20}[s["direction"]]
            assert want, (name, s, dx, dy)
            lo, hi = k * f["seconds"] / len(segs), (k + 1) * f["seconds"] / len(segs)
            seg_events = [e for e in events if lo <= e[0] < hi]
            assert len(seg_events) == s["beeps"]
            assert all(abs(hz - s["freq_hz"]) < 30 for _, hz in seg_events)


def test_answers_match_facts(fixture_root, facts):
    items = json.loads((fixture_root / "avqa" / "val_qa.json").read_text())
    for it in items:
        assert it["multi_choice"][it["answer"]] == facts["avqa"]["items"][str(it["id"])]["answer_text"]


def test_loader(fixture_root):
    t = AVQA(fixture_root / "avqa")
    docs = list(t.docs())
    assert len(docs) == 23 and len({d.id for d in docs}) == 23
    d = docs[0]
    assert d.media == [Media("video", str(fixture_root / "avqa" / "videos" / "fx000000000_000000.mp4"),
                             with_audio=True)]
    assert d.id == "1000" and isinstance(d.target, int) and len(d.choices) == 4
    assert set(d.meta) >= {"question_relation", "question_type"}
    assert len(list(AVQA(fixture_root / "avqa", limit=5).docs())) == 5
    assert len(list(AVQA(fixture_root / "avqa", split="train").docs())) == 2


SNAP_DEFAULT = ("What colour is the moving square?\n(A) blue\n(B) yellow\n(C) green\n(D) red\n"
                "Answer with the option's letter from the given choices directly.")
SNAP_VL2 = ("Question: What colour is the moving square?\nOptions:\n(A) blue\n(B) yellow\n(C) green\n(D) red\n"
            "Answer with the option's letter from the given choices directly and only give the best option.")


@pytest.mark.parametrize("family,kind,text", [("qwen2_5_vl", "video", SNAP_DEFAULT),
                                              ("qwen2_5_omni", "video", SNAP_DEFAULT),
                                              ("qwen2_audio", "audio", SNAP_DEFAULT),
                                              ("videollama2", "video", SNAP_VL2)])
def test_prompt_snapshot(fixture_root, family, kind, text):
    t = AVQA(fixture_root / "avqa", prompts=prompts("avqa"))
    d = next(iter(t.docs()))
    p = prompt(t, d, family)
    assert p.question == text
    assert [m.kind for m in p.context] == [kind] and p.context[0].path == d.media[0].path
    assert p.context[0].with_audio == (kind == "video")


def test_prompt_needs_prompt_text(fixture_root):
    t = AVQA(fixture_root / "avqa")                       # no prompts: the config's data is missing
    with pytest.raises(ValueError, match="no prompts given"):
        t.prompt(next(iter(t.docs())), "qwen2_5_vl")
    t = AVQA(fixture_root / "avqa", prompts={"default": "{question} {nope}"})
    with pytest.raises(ValueError, match="placeholder 'nope' is not a field"):
        t.prompt(next(iter(t.docs())), "qwen2_5_vl")


def test_score_and_aggregate(fixture_root):
    t = AVQA(fixture_root / "avqa")
    all_docs = list(t.docs())
    docs = all_docs[:4]          # targets D, C, ... (see snapshot)
    preds = ["(D)", "The answer is C.", "", "I cannot tell"]
    recs = [dict(t.score(d, p), sample_id=d.id, error=None) for d, p in zip(docs, preds)]
    assert recs[0]["score"] == 1.0 and recs[0]["parsed"] == "D"
    assert recs[1]["parsed"] == "C" and recs[1]["score"] == (1.0 if docs[1].target == 2 else 0.0)
    assert recs[2]["parsed_ok"] is False and recs[2]["score"] == 0.0 and recs[2]["parsed"] is None
    both = next(d for d in all_docs if d.meta["question_relation"] == "Both")
    # a failed record carries no score fields: the task places it by its id
    recs.append({"sample_id": both.id, "error": "MediaError: media file not found: /x.mp4", "score": None})
    agg = t.aggregate(recs)
    assert agg["n"] == 5 and agg["n_failed"] == 1 and agg["n_unparsed"] == 2 and agg["n_scored"] == 4
    exp = sum(r["score"] for r in recs[:4]) / 4
    assert agg["accuracy"] == pytest.approx(exp)
    assert set(agg["accuracy_by_question_relation"]) == {"Visual", "Audio", "Both"}
    assert agg["accuracy_by_question_relation"]["Both"] is None     # its only record failed
    assert agg["n_by_question_relation"]["Both"] == 1
    assert "accuracy_by_question_type" in agg


# ------------------------------------------------------------------------------------------ broken copies


def _write(root, items):
    (root / "val_qa.json").write_text(json.dumps(items))


def test_missing_index(tmp_path):
    with pytest.raises(DatasetError, match="val_qa.json"):
        list(AVQA(tmp_path).docs())


def test_malformed_json(broken_copy):
    root = broken_copy("avqa")
    (root / "val_qa.json").write_text("[{\"id\": 1,")
    with pytest.raises(DatasetError, match="not valid JSON"):
        list(AVQA(root).docs())


@pytest.mark.parametrize("field", FIELDS[:2] + FIELDS[3:])
def test_missing_field_names_file_item_field(broken_copy, field):
    root = broken_copy("avqa")
    items = json.loads((root / "val_qa.json").read_text())
    del items[3][field]
    _write(root, items)
    with pytest.raises(DatasetError) as e:
        list(AVQA(root).docs())
    msg = str(e.value)
    assert "val_qa.json" in msg and "#3" in msg and f"'{field}'" in msg


def test_bad_answer_index(broken_copy):
    root = broken_copy("avqa")
    items = json.loads((root / "val_qa.json").read_text())
    items[2]["answer"] = 7
    _write(root, items)
    with pytest.raises(DatasetError, match=r"#2.*'answer'"):
        list(AVQA(root).docs())


def test_wrong_type(broken_copy):
    root = broken_copy("avqa")
    items = json.loads((root / "val_qa.json").read_text())
    items[1]["answer"] = "2"
    _write(root, items)
    with pytest.raises(DatasetError, match=r"#1.*'answer'.*expected int"):
        list(AVQA(root).docs())


def test_missing_or_corrupt_media_is_per_sample(broken_copy):
    """Loading never decodes: a missing/corrupt clip still yields its doc (the adapter's decode error names the
    path and costs that sample only)."""
    root = broken_copy("avqa")
    (root / "videos" / "fx000000001_000000.mp4").unlink()
    (root / "videos" / "fx000000002_000000.mp4").write_bytes(b"not an mp4")
    docs = list(AVQA(root).docs())
    assert len(docs) == 23
    missing = [d for d in docs if d.meta["video_name"] == "fx000000001_000000"]
    assert missing and not (root / "videos" / "fx000000001_000000.mp4").exists()
    assert missing[0].media[0].path.endswith("fx000000001_000000.mp4")

"""MUSIC-AVQA: official layout and template filling, prompts, clean vs VideoLLaMA2 exact match, breakdowns."""
from __future__ import annotations

import json

import numpy as np
import pytest

from avkv.tasks.base import DatasetError
from avkv.tasks.fixtures.media import COLOURS
from avkv.tasks.fixtures.music_avqa import COLOUR
from avkv.tasks.music_avqa import MusicAVQA, fill_question
from tests.tasks.helpers import prompt, prompts
from tests.tasks.media_probe import decode_video

OFFICIAL_TYPES = {"Audio/Counting", "Audio/Comparative", "Visual/Counting", "Visual/Location",
                  "Audio-Visual/Existential", "Audio-Visual/Counting", "Audio-Visual/Location",
                  "Audio-Visual/Comparative", "Audio-Visual/Temporal"}


@pytest.fixture
def mu_root(fixture_root):
    return fixture_root / "music_avqa"


def test_layout(mu_root):
    items = json.loads((mu_root / "json_update" / "avqa-test.json").read_text())
    assert len(items) >= 16
    for it in items:
        assert set(it) == {"video_id", "question_id", "type", "question_content", "templ_values",
                           "question_deleted", "anser"}
        assert isinstance(it["type"], str) and isinstance(it["templ_values"], str)       # JSON-encoded strings
        assert len(it["video_id"]) == 8 and (mu_root / "videos" / f"{it['video_id']}.mp4").is_file()
    assert (mu_root / "json_update" / "avqa-val.json").is_file()


def test_media_match_facts(mu_root, facts):
    for vid, insts in facts["music_avqa"]["videos"].items():
        frames, audio, sr = decode_video(mu_root / "videos" / f"{vid}.mp4")
        f = frames[0].astype(int)
        for inst in insts:
            half = f[:, : f.shape[1] // 2] if inst["side"] == "left" else f[:, f.shape[1] // 2:]
            want = np.array(COLOURS[COLOUR[inst["instrument"]]])
            assert (np.abs(half - want).sum(-1) < 60).sum() > 100
        rms = [np.sqrt(np.mean(audio[int(t * sr):int((t + 0.25) * sr)] ** 2)) for t in np.arange(0, 3.75, 0.25)]
        playing = [any(s <= t + 0.125 < e for i in insts for s, e in i["spans"]) for t in np.arange(0, 3.75, 0.25)]
        assert all((r > 0.02) == p for r, p in zip(rms, playing))


def test_fill_question_like_the_official_loader():
    assert fill_question("Is the <Object> louder than the <Object>?", ["violin", "flute"]) == \
        "Is the violin louder than the flute?"
    assert fill_question("What is the <FL> instrument that comes in?", ["first"]) == \
        "What is the first instrument that comes in?"
    assert fill_question("Is there a <Object>?", ["cello"]) == "Is there a cello?"       # placeholder at the end
    with pytest.raises(IndexError):
        fill_question("Is the <Object> on the <LR>?", ["piano"])


def test_loader(mu_root):
    docs = list(MusicAVQA(mu_root).docs())
    assert len(docs) == 22 and {d.meta["type"] for d in docs} <= OFFICIAL_TYPES
    d = next(d for d in docs if d.meta["type"] == "Audio/Comparative")
    assert d.question == "Is the violin louder than the flute?" and d.target == "no"
    assert d.media[0].with_audio and d.media[0].path.endswith("videos/00000001.mp4")
    assert len(list(MusicAVQA(mu_root, split="val").docs())) == 3


@pytest.mark.parametrize("family,kind,text", [
    ("videollama2", "video", "Where is the first sounding instrument?"),
    ("qwen2_5_omni", "video", "Where is the first sounding instrument?\n"
                              "Answer the question using a single word or phrase."),
    ("qwen2_5_vl", "video", "Where is the first sounding instrument?\n"
                            "Answer the question using a single word or phrase."),
    ("qwen2_audio", "audio", "Where is the first sounding instrument?\n"
                             "Answer the question using a single word or phrase."),
])
def test_prompt_snapshot(mu_root, family, kind, text):
    t = MusicAVQA(mu_root, prompts=prompts("music_avqa"))
    d = list(t.docs())[1]
    p = prompt(t, d, family)
    assert p.question == text and p.context[0].kind == kind


def test_scoring_quirks(mu_root):
    t = MusicAVQA(mu_root)
    docs = {d.id: d for d in t.docs()}
    two, left, violin = docs["1"], docs["2"], docs["3"]
    s = t.score(two, "Two.")
    assert s["score"] == 1.0 and s["score_videollama2"] == 1.0
    s = t.score(two, "2")
    assert s["score"] == 1.0 and s["score_videollama2"] == 0.0          # VideoLLaMA2: strict string match
    s = t.score(violin, "The violin.")
    assert s["score"] == 1.0 and s["score_videollama2"] == 0.0
    s = t.score(left, "It is on the left side of the stage.")
    assert s["score"] == 0.0 and s["score_videollama2"] == 0.0           # a sentence scores 0 in both
    assert t.score(left, "")["parsed_ok"] is False


def test_aggregate(mu_root):
    t = MusicAVQA(mu_root)
    docs = list(t.docs())
    recs = [dict(t.score(d, d.target.upper() + "."), error=None) for d in docs]
    recs[0] = dict(t.score(docs[0], "three"), error=None)
    agg = t.aggregate(recs)
    assert agg["accuracy"] == pytest.approx(21 / 22) and agg["accuracy_videollama2"] == pytest.approx(21 / 22)
    assert agg["accuracy_by_type"]["Audio/Counting"] == pytest.approx(3 / 4)
    assert set(agg["accuracy_by_modality"]) == {"Audio", "Visual", "Audio-Visual"}


def test_broken_copies(broken_copy):
    root = broken_copy("music_avqa")
    path = root / "json_update" / "avqa-test.json"
    items = json.loads(path.read_text())

    def write(bad):
        path.write_text(json.dumps(bad))

    bad = json.loads(json.dumps(items))
    del bad[4]["anser"]
    write(bad)
    with pytest.raises(DatasetError, match=r"avqa-test.json: item #4 \(question_id 5\) has no field 'anser'"):
        list(MusicAVQA(root).docs())
    bad = json.loads(json.dumps(items))
    bad[2]["templ_values"] = "[oops"
    write(bad)
    with pytest.raises(DatasetError, match=r"#2 .*'templ_values'"):
        list(MusicAVQA(root).docs())
    bad = json.loads(json.dumps(items))
    bad[3]["templ_values"] = '["violin"]'                                # the template needs two
    write(bad)
    with pytest.raises(DatasetError, match=r"#3 .*'templ_values'.*more placeholders"):
        list(MusicAVQA(root).docs())
    with pytest.raises(DatasetError, match="avqa-train.json"):
        list(MusicAVQA(root, split="train").docs())

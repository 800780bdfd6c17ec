"""MVBench: official layout (json/ + per-source video folders), bounds, presets, prompts, both scorers."""
from __future__ import annotations

import json

import pytest

from avkv.metrics.text import videollama2_mc_choice
from avkv.tasks.base import DatasetError
from avkv.tasks.mvbench import ACCKV_TASKS, TASKS, MVBench
from tests.tasks.helpers import prompt, prompts
from tests.tasks.media_probe import decode_video, square_track


@pytest.fixture
def mv_root(fixture_root):
    return fixture_root / "mvbench"


def test_layout_and_every_task(mv_root):
    for name, (stem, folder, dtype, bound) in TASKS.items():
        items = json.loads((mv_root / "json" / f"{stem}.json").read_text())
        for it in items:
            assert {"video", "question", "candidates", "answer"} <= set(it) and it["answer"] in it["candidates"]
            assert ("start" in it) == bound
            p = mv_root / "video" / folder / it["video"]
            assert (p.is_dir() and any(p.glob("00001.jpg"))) if dtype == "frame" else p.is_file()


def test_bound_clip_decides_the_answer(mv_root):
    docs = [d for d in MVBench(mv_root, tasks=["action_sequence"]).docs()]
    frames, _, _ = decode_video(docs[0].media[0].path)
    track = square_track(frames)
    for d in docs:
        m = d.media[0]
        inside = {c for i, (c, _, _) in enumerate(track) if m.start <= (i + 0.5) / 8 < m.end}
        assert inside == {d.choices[d.target]}
        assert {c for c, _, _ in track} > inside                     # the whole clip would be ambiguous


def test_presets_and_selection(mv_root):
    allq = list(MVBench(mv_root).docs())
    assert {d.meta["task"] for d in allq} == {v[0] for v in TASKS.values()}
    acc = list(MVBench(mv_root, tasks="acckv").docs())
    assert {d.meta["task"] for d in acc} == set(ACCKV_TASKS) and len(ACCKV_TASKS) == 10
    assert all(d.media[0].with_audio for d in acc)
    assert not any(d.media[0].with_audio for d in MVBench(mv_root, tasks=["Moving Direction"]).docs())
    assert len(list(MVBench(mv_root, limit=4).docs())) == 4
    with pytest.raises(DatasetError, match="unknown MVBench task"):
        MVBench(mv_root, tasks=["nope"])


def test_frame_task(mv_root):
    d = next(iter(MVBench(mv_root, tasks=["episodic_reasoning"]).docs()))
    assert d.meta["data_type"] == "frame" and d.meta["frame_fps"] == 3.0
    assert d.media[0].path.endswith("tvqa/frames_fps3_hq/fx_tvqa_clip") and d.media[0].end == 4.0


SNAP_LMMS = "Question:What colour is the square in the clip?\nOption:\n(A) green\n(B) red\n(C) blue\n(D) yellow\n" \
            "Only give the best option.\n"
SNAP_VL2 = "Question: What colour is the square in the clip?\nOptions:\n(A) green\n(B) red\n(C) blue\n(D) yellow\n" \
           "Answer with the option's letter from the given choices directly and only give the best option."


@pytest.mark.parametrize("family,text", [("qwen2_5_vl", SNAP_LMMS), ("qwen2_5_omni", SNAP_LMMS),
                                         ("videollama2", SNAP_VL2)])
def test_prompt_snapshot(mv_root, family, text):
    t = MVBench(mv_root, tasks=["action_sequence"], prompts=prompts("mvbench"))
    d = next(iter(t.docs()))
    p = prompt(t, d, family)
    assert p.question == text and p.context == d.media


def test_videollama2_regex_quirks():
    assert videollama2_mc_choice("(B) red", 4) == (1, True)
    assert videollama2_mc_choice("Based on the video, (A)", 4) == (1, True)     # the B of "Based"
    assert videollama2_mc_choice("none of these", 4) == (2, False)             # fallback 'C'
    assert videollama2_mc_choice("", 3) == (2, False)


def test_score_and_aggregate(mv_root):
    t = MVBench(mv_root, tasks=["action_sequence", "object_existence"])
    docs = list(t.docs())
    letters = "ABCD"
    preds = [f"({letters[docs[0].target]})", "Based on the clip it is " + docs[1].choices[docs[1].target],
             "I cannot tell", "..."]
    recs = [dict(t.score(d, p), error=None) for d, p in zip(docs, preds)]
    assert recs[0]["score"] == 1.0 and recs[1]["score"] == 1.0
    assert recs[1]["score_videollama2"] == float(docs[1].target == 1)
    assert recs[2]["parsed_ok"] is False
    # VideoLLaMA2's option-text fallback: "no" occurs in "i cannot tell"
    assert recs[2]["parsed_ok_videollama2"] and recs[2]["score_videollama2"] == float(docs[2].target == 1)
    assert recs[3]["parsed_ok_videollama2"] is False and recs[3]["score_videollama2"] == 0.0   # index 2 of 2
    agg = t.aggregate(recs)
    assert agg["n_unparsed"] == 2 and agg["n_fallback_videollama2"] == 1
    assert set(agg["accuracy_by_task"]) == {"action_sequence", "object_existence"}
    assert agg["accuracy_task_mean"] == pytest.approx(sum(agg["accuracy_by_task"].values()) / 2)


def test_broken_copies(broken_copy):
    root = broken_copy("mvbench")
    (root / "json" / "moving_count.json").unlink()
    with pytest.raises(DatasetError, match="moving_count.json"):
        list(MVBench(root).docs())
    assert len(list(MVBench(root, skip_missing_tasks=True).docs())) == 26
    items = json.loads((root / "json" / "action_sequence.json").read_text())
    del items[1]["end"]
    (root / "json" / "action_sequence.json").write_text(json.dumps(items))
    with pytest.raises(DatasetError, match=r"action_sequence.json: item #1 has no field 'end'"):
        list(MVBench(root, tasks=["action_sequence"]).docs())
    items = json.loads((root / "json" / "moving_direction.json").read_text())
    items[0]["answer"] = "sideways"
    (root / "json" / "moving_direction.json").write_text(json.dumps(items))
    with pytest.raises(DatasetError, match=r"#0 field 'answer'"):
        list(MVBench(root, tasks=["moving_direction"]).docs())
    (root / "video" / "scene_qa" / "video" / "fx_scene_0.mp4").unlink()        # costs that sample at decode only
    assert len(list(MVBench(root, tasks=["scene_transition"]).docs())) == 2


def test_prompt_refuses_audio_only_family(mv_root):
    t = MVBench(mv_root, tasks=["action_count"], prompts=prompts("mvbench"))
    with pytest.raises(ValueError, match="prompts.qwen2_audio is null: this dataset is not run"):
        prompt(t, next(iter(t.docs())), "qwen2_audio")


def test_frame_folder_task_decodes_through_the_adapter(mv_root):
    """A video stored as a folder of JPEGs (3 fps) is read by the shared media reader, clipped to start/end."""
    from avkv.models import media_io
    d = next(iter(MVBench(mv_root, tasks=["episodic_reasoning"]).docs()))
    m = d.media[0]
    out = media_io.load(m, num_frames=4)
    assert out["frames"].ndim == 4 and out["frames"].shape[0] == 4 and out["frames"].dtype.name == "uint8"
    n_files = len(list(__import__("pathlib").Path(m.path).glob("*.jpg")))
    clipped = media_io.load_video_frames(m.path, num_frames=None, start=m.start, end=m.end, frame_rate=m.frame_rate)[0]
    expected = sum(1 for i in range(n_files) if (m.start or 0) <= i / m.frame_rate <= m.end)
    assert 0 < len(clipped) == expected

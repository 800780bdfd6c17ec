"""Dataset files are untrusted: duplicate ids are an error naming both items; media paths stay inside the dataset
root (else that sample fails, the file is never opened); a truncated FLAC costs its long-form segment with the file
named; a non-UTF-8 transcript names its file and line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from avkv.tasks.avqa import AVQA
from avkv.tasks.avsd import AVSD
from avkv.tasks.base import DatasetError, Doc, inside
from avkv.tasks.librispeech import LibriSpeech
from avkv.tasks.milebench import MileBench
from avkv.tasks.music_avqa import MusicAVQA
from avkv.tasks.mvbench import MVBench


def _load(p: Path):
    return json.loads(p.read_text())


def _save(p: Path, data) -> None:
    p.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------------ duplicate ids
def test_duplicate_ids_name_the_file_and_both_items(broken_copy):
    cases = []
    root = broken_copy("avqa")
    idx = root / "val_qa.json"
    d = _load(idx)
    d[5]["id"] = d[2]["id"]
    _save(idx, d)
    cases.append((AVQA(root), idx, "#2", "#5"))

    root = broken_copy("music_avqa")
    idx = root / "json_update" / "avqa-test.json"
    d = _load(idx)
    d[7]["question_id"] = d[3]["question_id"]
    _save(idx, d)
    cases.append((MusicAVQA(root), idx, "#3", "#7"))

    root = broken_copy("avsd")
    idx = root / "test_set4DSTC7-AVSD.json"
    d = _load(idx)
    d["dialogs"].append(d["dialogs"][1])
    _save(idx, d)
    cases.append((AVSD(root), idx, "#1", f"#{len(d['dialogs']) - 1}"))

    root = broken_copy("milebench")
    idx = root / "IEdit" / "IEdit.json"
    d = _load(idx)
    d["data"].append(dict(d["data"][0]))
    _save(idx, d)
    cases.append((MileBench(root, tasks=["IEdit"]), idx, "#0", "#1"))

    root = broken_copy("librispeech") / "LibriSpeech"
    trans = root / "test-clean/1001/2002/1001-2002.trans.txt"
    lines = trans.read_text().splitlines()
    trans.write_text("\n".join([*lines, lines[1]]) + "\n")
    cases.append((LibriSpeech(root), trans, "line 2", f"line {len(lines) + 1}"))

    cases.append((MVBench(broken_copy("mvbench"), tasks=["action_count", "action_count"]), "action_count.json",
                   "#0", "#0"))
    for task, file, first, second in cases:
        with pytest.raises(DatasetError) as e:
            list(task.docs())
        msg = str(e.value)
        assert "duplicate sample id" in msg and str(file) in msg, msg
        a, b = msg.split(" and ", 1)
        assert first in a and second in b, msg


def test_fixtures_have_unique_ids(fixture_root):
    for task in (AVQA(fixture_root / "avqa"), MusicAVQA(fixture_root / "music_avqa"), AVSD(fixture_root / "avsd"),
                 MileBench(fixture_root / "milebench", skip_missing_tasks=True),
                 LibriSpeech(fixture_root / "librispeech" / "LibriSpeech", split=["test-clean", "test-other"]),
                 MVBench(fixture_root / "mvbench", skip_missing_tasks=True)):
        ids = [d.id for d in task.docs()]
        assert ids and len(ids) == len(set(ids))


# ------------------------------------------------------------------------------------------------ traversal
def test_inside_is_lexical_and_strict(tmp_path):
    assert inside(tmp_path, "a/b.mp4") == tmp_path / "a" / "b.mp4"
    assert inside(tmp_path, "a/../b.mp4") == tmp_path / "b.mp4"
    for bad in ("/etc/passwd", "../x.mp4", "a/../../x", "~/x", "../../../../etc/passwd", "a\x00b"):
        with pytest.raises(DatasetError):
            inside(tmp_path, bad)


def _traversal_docs(broken_copy, tmp_path):
    """Each loader with one item whose media path leaves the dataset; returns (docs, bad id, file)."""
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"outside")
    out = []
    root = broken_copy("avqa")
    d = _load(root / "val_qa.json")
    d[0]["video_name"] = str(secret.with_suffix(""))                    # absolute
    _save(root / "val_qa.json", d)
    out.append((AVQA(root), str(d[0]["id"]), root / "val_qa.json"))

    root = broken_copy("milebench")
    idx = root / "IEdit" / "IEdit.json"
    d = _load(idx)
    d["data"][0]["task_instance"]["images_path"][1] = "../../../../etc/passwd"
    _save(idx, d)
    out.append((MileBench(root, tasks=["IEdit", "MultiModalQA"]), "IEdit/0", idx))

    root = broken_copy("music_avqa")
    idx = root / "json_update" / "avqa-test.json"
    d = _load(idx)
    d[0]["video_id"] = "../../secret"
    _save(idx, d)
    out.append((MusicAVQA(root), str(d[0]["question_id"]), idx))

    root = broken_copy("avsd")
    idx = root / "test_set4DSTC7-AVSD.json"
    d = _load(idx)
    d["dialogs"][0]["image_id"] = "../../secret"
    _save(idx, d)
    ref = root / "test_set4DSTC7-AVSD_multiref.json"
    r = _load(ref)
    r["dialogs"][0]["image_id"] = "../../secret"
    _save(ref, r)
    out.append((AVSD(root), "../../secret", idx))

    root = broken_copy("mvbench")
    idx = root / "json" / "action_count.json"
    d = _load(idx)
    d[0]["video"] = "../../../../secret.mp4"
    _save(idx, d)
    out.append((MVBench(root, tasks=["action_count"]), "action_count/0", idx))
    return out


def test_media_paths_outside_the_root_fail_that_sample_only(broken_copy, tmp_path):
    for task, bad_id, file in _traversal_docs(broken_copy, tmp_path):
        docs = list(task.docs())                                   # loading goes on
        bad = [d for d in docs if d.error]
        assert [d.id for d in bad] == [bad_id], task.name
        assert str(file) in bad[0].error and ("leaves" in bad[0].error or "absolute" in bad[0].error)
        assert len(docs) > 1 and all(not d.error for d in docs if d.id != bad_id)
        root = Path(task.root).resolve()
        for d in docs:
            if not d.error:
                assert all(Path(m.path).resolve().is_relative_to(root) for m in d.media), d.media


def test_a_refused_doc_is_recorded_without_touching_the_model():
    from avkv.experiment import run_sample
    doc = Doc(id="x", media=[], question="q", target=0, error="idx.json: item #0: field 'video_name' '/etc/x' is absolute")
    rec = run_sample(None, None, None, None, doc)                  # no task, adapter or engine is called
    assert rec["sample_id"] == "x" and rec["prediction"] is None
    assert rec["error"].startswith("DatasetError: idx.json: item #0") and "/etc/x" in rec["error"]


# ------------------------------------------------------------------------------------------------ LibriSpeech
def test_a_truncated_flac_costs_its_long_form_segment(broken_copy, fixture_root, tmp_path):
    root = broken_copy("librispeech") / "LibriSpeech"
    flac = root / "test-clean/1001/2002/1001-2002-0002.flac"
    data = flac.read_bytes()
    flac.write_bytes(data[: len(data) // 2])                        # header intact, audio cut: "lost sync"
    docs = list(LibriSpeech(root, long_form=True, min_s=6, max_s=12, long_dir=tmp_path / "long").docs())
    good = list(LibriSpeech(fixture_root / "librispeech" / "LibriSpeech", long_form=True, min_s=6, max_s=12,
                            long_dir=tmp_path / "long_ok").docs())
    assert [d.id for d in docs] == [d.id for d in good]
    bad = [d for d in docs if d.error]
    assert len(bad) == 1 and "1001-2002-0002" in bad[0].meta["utterances"]
    assert str(flac) in bad[0].error and bad[0].id in bad[0].error
    assert len(docs) >= 3 and all(d.meta["seconds"] for d in docs if not d.error)
    assert not list((tmp_path / "long").rglob(f"{bad[0].id}.flac"))    # no half-written segment left behind


def test_a_non_utf8_transcript_names_file_and_line(broken_copy):
    root = broken_copy("librispeech") / "LibriSpeech"
    trans = root / "test-clean/1002/2003/1002-2003.trans.txt"
    lines = trans.read_bytes().split(b"\n")
    lines[2] = lines[2] + b" CAF\xe9"                                 # Latin-1, not UTF-8
    trans.write_bytes(b"\n".join(lines))
    with pytest.raises(DatasetError, match=rf"{trans}: line 3 is not valid UTF-8"):
        list(LibriSpeech(root).docs())

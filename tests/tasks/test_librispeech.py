"""LibriSpeech: official layout, short and long-form loading, prompts, WER scoring, broken copies."""
from __future__ import annotations

import pytest

from avkv.tasks.base import DatasetError
from avkv.tasks.fixtures import unavailable
from avkv.tasks.librispeech import LibriSpeech
from tests.tasks.helpers import prompt, prompts

pytestmark = pytest.mark.skipif(unavailable("librispeech") is not None,
                                reason=f"speech fixture unavailable: {unavailable('librispeech')}")


@pytest.fixture
def ls_root(fixture_root):
    return fixture_root / "librispeech" / "LibriSpeech"


def test_layout(ls_root):
    for f in ["SPEAKERS.TXT", "CHAPTERS.TXT", "test-clean/1001/2002/1001-2002.trans.txt",
              "test-clean/1001/2002/1001-2002-0000.flac", "test-other/1003/2004/1003-2004-0003.flac"]:
        assert (ls_root / f).is_file(), f


def test_audio_is_16k_speech(ls_root, facts):
    import numpy as np
    import soundfile as sf
    a, sr = sf.read(ls_root / "test-clean/1001/2002/1001-2002-0000.flac")
    assert sr == 16000 and a.ndim == 1
    assert abs(len(a) / sr - facts["librispeech"]["utterances"]["1001-2002-0000"]["seconds"]) < 0.01
    assert np.sqrt(np.mean(a ** 2)) > 0.01


def test_loader(ls_root):
    t = LibriSpeech(ls_root)
    docs = list(t.docs())
    assert [d.id for d in docs][:2] == ["1001-2002-0000", "1001-2002-0001"] and len(docs) == 9
    assert docs[0].target == "MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES"
    assert docs[0].media[0].kind == "audio" and docs[0].media[0].path.endswith("1001-2002-0000.flac")
    both = LibriSpeech(ls_root, split=["test-clean", "test-other"])
    assert len(list(both.docs())) == 13 and len(list(LibriSpeech(ls_root, limit=3).docs())) == 3


def test_long_form(ls_root, tmp_path, facts):
    t = LibriSpeech(ls_root, long_form=True, min_s=6, max_s=12, long_dir=tmp_path)
    docs = list(t.docs())
    assert docs and all(6 <= d.meta["seconds"] <= 12 for d in docs)
    import soundfile as sf
    utt = facts["librispeech"]["utterances"]
    for d in docs:
        info = sf.info(d.media[0].path)
        assert info.samplerate == 16000
        assert abs(info.duration - sum(utt[u]["seconds"] for u in d.meta["utterances"])) < 0.01
        assert d.target == " ".join(utt[u]["text"] for u in d.meta["utterances"])
    mtime = [(tmp_path / "test-clean-6-12s" / f"{d.id}.flac").stat().st_mtime_ns for d in docs]
    assert [(tmp_path / "test-clean-6-12s" / f"{d.id}.flac").stat().st_mtime_ns
            for d in LibriSpeech(ls_root, long_form=True, min_s=6, max_s=12, long_dir=tmp_path).docs()] == mtime


def test_long_form_default_is_paper_regime(ls_root):
    t = LibriSpeech(ls_root, long_form=True)
    assert (t.min_s, t.max_s) == (60.0, 120.0) and t.max_new_tokens == 1024
    with pytest.raises(DatasetError, match="no chapter reaches min_s=60"):   # the fixture's chapters are ~15 s
        list(t.docs())


@pytest.mark.parametrize("family,text", [
    ("qwen2_audio", "Detect the language and recognize the speech: <|en|>"),
    ("qwen2_5_omni", "Transcribe the English audio into text without any punctuation marks."),
    ("videollama2", "Please recognize the speech and only output the recognized content:"),
])
def test_prompt_snapshot(ls_root, family, text):
    t = LibriSpeech(ls_root, prompts=prompts("librispeech"))
    d = next(iter(t.docs()))
    p = prompt(t, d, family)
    assert p.question == text and p.context == d.media and p.max_new_tokens == 256


def test_prompt_refuses_deaf_family(ls_root):
    t = LibriSpeech(ls_root, prompts=prompts("librispeech"))
    with pytest.raises(ValueError, match="no entry for the qwen2_5_vl model family and no default"):
        prompt(t, next(iter(t.docs())), "qwen2_5_vl")


def test_score_and_aggregate(ls_root):
    t = LibriSpeech(ls_root, split=["test-clean", "test-other"])
    docs = list(t.docs())
    recs = []
    for d in docs:
        pred = d.target
        if d.id == "1001-2002-0000":
            pred = "Mr. Quilter is the apostle of the middle classes."
        if d.id == "1001-2002-0001":
            pred = "There were 25 red boxes on a table."                     # 1 substitution of 9 words
        recs.append(dict(t.score(d, pred), sample_id=d.id, error=None))
    assert recs[0]["score"] == 0.0 and recs[1]["errors"] == 1 and recs[1]["ref_words"] == 8
    recs.append({"sample_id": "bad", "error": "cannot decode /x.flac", "source": "test-other"})
    agg = t.aggregate(recs)
    n_clean = sum(r["ref_words"] for r in recs[:-1] if r["source"] == "test-clean")
    assert agg["wer_by_source"]["test-clean"] == pytest.approx(100 / n_clean)
    assert agg["wer_by_source"]["test-other"] == 0.0
    assert agg["n_failed"] == 1 and agg["n"] == 14 and agg["acc_100_minus_wer"] == pytest.approx(100 - agg["wer"])


def test_broken_copies(broken_copy):
    root = broken_copy("librispeech") / "LibriSpeech"
    with pytest.raises(DatasetError, match="split folder not found"):
        list(LibriSpeech(root, split="dev-clean").docs())
    trans = root / "test-clean/1001/2002/1001-2002.trans.txt"
    lines = trans.read_text().splitlines()
    trans.write_text("\n".join(lines[:2] + ["1001-2002-0002"] + lines[3:]) + "\n")
    with pytest.raises(DatasetError, match=r"1001-2002.trans.txt: line 3 .*'transcript'"):
        list(LibriSpeech(root).docs())
    trans.unlink()
    with pytest.raises(DatasetError, match="no transcript file"):
        list(LibriSpeech(root).docs())


def test_missing_or_corrupt_audio_is_per_sample(broken_copy, tmp_path):
    root = broken_copy("librispeech") / "LibriSpeech"
    (root / "test-clean/1001/2002/1001-2002-0001.flac").unlink()
    (root / "test-clean/1002/2003/1002-2003-0001.flac").write_bytes(b"garbage")
    assert len(list(LibriSpeech(root).docs())) == 9          # loading never decodes
    docs = list(LibriSpeech(root, long_form=True, min_s=6, max_s=12, long_dir=tmp_path).docs())
    bad = {d.id: d.media[0].path for d in docs if d.meta["seconds"] is None}
    # a segment with an unreadable part points at that part, so the decode error names the real file
    assert any(p.endswith("1001-2002-0001.flac") for p in bad.values())
    assert any(p.endswith("1002-2003-0001.flac") for p in bad.values())


def test_long_form_chunks_for_30s_encoders(ls_root, tmp_path):
    t = LibriSpeech(ls_root, long_form=True, min_s=6, max_s=12, long_dir=tmp_path, chunk_s=4,
                    prompts=prompts("librispeech"))
    d = next(iter(t.docs()))
    p = t.prompt(d, "qwen2_audio")
    secs = d.meta["seconds"]
    assert len(p.context) == -(-secs // 4) and all(m.path == d.media[0].path for m in p.context)
    assert [m.start for m in p.context] == [4.0 * k for k in range(len(p.context))]
    assert p.context[-1].end is None and p.context[0].end == 4.0
    assert LibriSpeech(ls_root, long_form=True, min_s=6, max_s=12, long_dir=tmp_path,
                       prompts=prompts("librispeech")).prompt(d, "qwen2_audio").context == d.media

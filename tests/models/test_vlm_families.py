"""The transformers vision-language families (issue 19: LLaVA-1.5, Qwen2-VL, LLaVA-OneVision, InternVL) on their tiny
checkpoints: media stay where the prompt puts them, video positions and their layout are the processor's frames, and
media a family cannot take are left out with a note. (The engine equivalences run in tests/test_engine.py.)"""
from __future__ import annotations

import pytest
import torch

from avkv.methods.base import IMAGE, TEXT, VIDEO
from tests.conftest import VLM_FAMILIES, adapter, av_prompt, image_prompt


def _runs(mod: torch.Tensor, code: int) -> list[tuple[int, int]]:
    """(start, end) of every maximal run of positions with modality ``code``."""
    out, start = [], None
    for i, m in enumerate(mod.tolist() + [TEXT]):
        if m == code and start is None:
            start = i
        elif m != code and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_images_stay_between_the_texts_that_surround_them(family):
    ad = adapter(family)
    enc = ad.encode(image_prompt())
    ids, mod = enc.input_ids[0], enc.modality
    assert (mod == IMAGE).sum() > 0
    first, last = int((mod == IMAGE).nonzero().min()), int((mod == IMAGE).nonzero().max())
    before = ad.tokenizer.decode(ids[:first])
    between = ad.tokenizer.decode(ids[first:last + 1][mod[first:last + 1] == TEXT])
    assert "First image:" in before and "second image:" not in before
    assert "second image:" in between                     # the second text piece sits between the two images
    assert "What colour" in ad.tokenizer.decode(ids[last + 1:])


@pytest.mark.parametrize("family", [f for f in VLM_FAMILIES if "video" in adapter(f).modalities])
def test_video_positions_and_layout_are_the_frames(family):
    ad = adapter(family)
    enc = ad.encode(av_prompt())
    mod, lay = enc.modality, enc.layout
    n_video = int((mod == VIDEO).sum())
    assert n_video > 0 and (mod == IMAGE).sum() == 0 and enc.modalities_used == ["video"]
    frame, spatial = lay["video_frame"], lay["video_spatial"]
    assert ((frame >= 0) <= (mod == VIDEO)).all()         # frame cells are video positions
    cells = frame[frame >= 0]
    t = int(cells.max()) + 1
    counts = torch.bincount(cells)
    assert len(counts) == t and (counts == counts[0]).all()                    # every frame as many cells
    assert t * int(counts[0]) >= n_video - t                                  # at most one extra token per frame
    for f in range(t):                                                         # spatial = place in the frame
        assert spatial[frame == f].tolist() == list(range(int(counts[0])))


def test_internvl_marks_each_frame_run_as_video():
    ad = adapter("internvl")
    enc = ad.encode(av_prompt())
    seq = ad.processor.image_seq_length
    frames = enc.inputs["pixel_values"].shape[0]
    assert int((enc.modality == VIDEO).sum()) == frames * seq
    assert len(_runs(enc.modality, VIDEO)) == frames            # one <img>…</img> run per frame


def test_llava_leaves_a_video_out_and_says_so():
    ad = adapter("llava")
    enc = ad.encode(av_prompt())
    assert (enc.modality != TEXT).sum() == 0
    assert any("video item left out" in n for n in enc.notes)

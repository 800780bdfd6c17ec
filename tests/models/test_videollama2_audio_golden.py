"""VideoLLaMA2 audio input against goldens generated once by the official code (DAMO-NLP-SG/VideoLLaMA2, branch
audio_visual at 8cedfbd: ``mm_utils.process_audio_file`` / ``process_audio_from_video``, run outside this
repository with Debian's ffmpeg 5.1; the file's ``source`` entry records the commit, versions, seeds and the
sha256 of each fixture medium from ``tests/models/parity_media.py``).

The goldens are summaries of the official bfloat16 fbank (2998 × 128): its sha256, the mean of every frame, the
mean of every mel bin, and every 50th frame in full. bfloat16 keeps 8 bits, so two float computations of the
same fbank may round a few values one bf16 step apart: the tests allow one step on at most 0.1 % of the stored
values and the frame means within two steps / 128.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avkv.config import ROOT
from avkv.models.videollama2 import processing as P
from tests.models import parity_media

GOLDEN = Path(__file__).parent / "goldens" / "videollama2_audio_8cedfbd.npz"
BF16_STEP = 2.0 ** -7            # relative spacing of bfloat16 values


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN)
    data = {k: z[k] for k in z.files}
    src = json.loads(str(data["source"]))
    paths = parity_media.build(ROOT / ".cache" / "parity" / "media")
    for name, sha in src["media_sha256"].items():
        got = hashlib.sha256(paths[name].read_bytes()).hexdigest()
        if got != sha:
            pytest.fail(f"fixture {paths[name]} differs from the one the goldens were made from "
                        f"(sha256 {got[:12]} != {sha[:12]}); regenerate the goldens (see {GOLDEN.name}'s source)")
    return data, src, paths


def _bf16(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16).float().numpy()


def port_fbank(case: dict, path: Path) -> np.ndarray:
    if case["kind"] == "audio_file":
        return P.fbank_features(P.audio_file_waveform(str(path), window_seed=case["seed"])).numpy()
    return P.audio_features(P.read_video_audio(str(path)), from_video=True).numpy()


def assert_matches(case_id: str, fb: np.ndarray, data: dict) -> None:
    assert fb.shape == tuple(data[f"{case_id}/shape"])
    ref_rows = _bf16(data[f"{case_id}/rows_every_50"])
    d = np.abs(fb[::50] - ref_rows)
    assert (d <= BF16_STEP * np.abs(ref_rows) + 1e-12).all(), f"{case_id}: rows differ by up to {d.max():.4f}"
    assert (d > 0).mean() <= 1e-3, f"{case_id}: {(d > 0).mean():.2%} of the stored values differ"
    fm = np.abs(fb.mean(1) - data[f"{case_id}/frame_mean"]).max()
    assert fm <= 2 * 0.125 / 128, f"{case_id}: frame means differ by up to {fm:.4f}"
    assert np.abs(fb.mean(0) - data[f"{case_id}/bin_mean"]).max() <= 1e-3


CASES = ["file_mono16k", "file_stereo44k", "file_stereo16k_flac", "file_mono44k_40s_seed3",
         "file_stereo16k_35s_seed7", "video_stereo44k", "video_mono16k_70s", "video_mono44k", "video_track_1_5s",
         "video_no_audio"]


@pytest.mark.parametrize("case_id", CASES)
def test_fbank_equals_official(golden, case_id):
    data, src, paths = golden
    case = next(c for c in src["cases"] if c["id"] == case_id)
    assert_matches(case_id, port_fbank(case, paths[case["media"]]), data)


def test_golden_source_is_recorded(golden):
    _, src, _ = golden
    assert src["repo"] == "DAMO-NLP-SG/VideoLLaMA2" and src["commit"].startswith("8cedfbd")
    assert {c["id"] for c in src["cases"]} == set(CASES)
    assert GOLDEN.stat().st_size < 200_000


def test_video_audio_ignores_the_clip_by_default(golden):
    """Official ``process_video(..., va=True)`` reads the whole track whatever ``s``/``e`` say."""
    _, _, paths = golden
    p = str(paths["long_mono16k"])
    whole = P.read_video_audio(p)
    assert np.array_equal(P.read_video_audio(p, 3.3, 41.7), whole)
    clipped = P.read_video_audio(p, 3.3, 41.7, clip=True)
    assert len(clipped) == int(41.7 * 16000) - int(3.3 * 16000)


def test_clip_starts_follow_the_float_duration():
    """pytorchvideo's sampler starts from the float ``n / sr``; the exact fraction n/sr gives other samples."""
    from fractions import Fraction
    n = 40028                                             # 2.50175 s
    ours = [a for a, _ in P.official_clip_bounds(n)]
    exact = [int(Fraction(max(Fraction(n, 16000) - 2, 0)) / 8 * i * 16000) for i in range(8)]
    assert ours == [0, 1003, 2006, 3010, 4013, 5017, 6020, 7024]       # float(n / sr) is just below 2.50175
    assert ours != exact                                  # the case the issue found: one sample apart
    assert max(abs(a - b) for a, b in zip(ours, exact)) == 1


def test_long_audio_window_is_seeded_and_recorded(golden, tmp_path):
    _, _, paths = golden
    notes: list[str] = []
    a = P.audio_file_waveform(str(paths["wav_mono44k_long"]), window_seed=3, notes=notes)
    b = P.audio_file_waveform(str(paths["wav_mono44k_long"]), window_seed=3)
    c = P.audio_file_waveform(str(paths["wav_mono44k_long"]), window_seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 480000 and any("window from" in n and "seed 3" in n for n in notes)

"""Input parity for Qwen2.5-VL, Qwen2.5-Omni and Qwen2-Audio: avkv's ``preprocessing: official`` readers against
the official packages (qwen-vl-utils 0.0.14, qwen-omni-utils 0.0.9, librosa 0.11 with decord 0.6) run in the side
venv ``.cache/venv-qwenutils`` (``make qwenutils-venv``) on generated fixture media.

The official outputs are cached under ``.cache/parity/qwen/<sha256>.npz``, keyed by the script, the case, the
media bytes and the side venv's installed distributions. Frames must be equal pixel for pixel after the same
resize, frame indices equal, waveforms within 1e-6.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avkv.config import ROOT
from avkv.models import media_io
from avkv.tasks.base import Media
from tests.models import parity_media

SIDE = ROOT / ".cache" / "venv-qwenutils"
SCRIPT = ROOT / "scripts" / "parity" / "qwen_official.py"
OUT = ROOT / ".cache" / "parity" / "qwen"
MEDIA = ROOT / ".cache" / "parity" / "media"
WAVE_TOL = 1e-6

D = media_io.OFFICIAL_DEFAULTS
VIDEO_KEYS = ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels")

# (case id, media name, avkv official params overriding the defaults, start, end)
VIDEO_CASES = [
    ("short_default", "short_stereo44k", {}, None, None),
    ("long_default", "long_mono16k", {}, None, None),
    ("long_clip", "long_mono16k", {}, 3.3, 41.7),
    ("long_start_only", "long_mono16k", {}, 12.5, None),
    ("long_budget", "long_mono16k", {"max_frames": 16, "min_pixels": 3136, "max_pixels": 50000,
                                     "total_pixels": 200000}, None, None),
    ("long_min_cap", "long_mono16k", {"total_pixels": 1_000_000}, None, None),
    ("short_fps1", "short_stereo44k", {"fps": 1.0, "min_frames": 2}, None, None),
    ("odd444", "odd444", {}, None, None),
    ("odd444_big", "odd444", {"min_pixels": 300_000, "max_pixels": 400_000}, 0.4, 2.6),
    ("tall", "tall", {}, None, None),
]
IMAGE_CASES = [
    ("img_odd", "img_odd", {}),
    ("img_rgba", "img_rgba", {}),
    ("img_tiny", "img_tiny", {}),
    ("img_large_capped", "img_large", {"image_max_pixels": 500_000}),
    ("img_large_default", "img_large", {}),
]
# (case id, media name, kind, start, end): kind audio = an audio item, video = a video's track (Omni
# use_audio_in_video)
AUDIO_CASES = [
    ("wav_mono16k", "wav_mono16k", "audio", None, None),
    ("wav_stereo44k", "wav_stereo44k", "audio", None, None),
    ("wav_stereo44k_clip", "wav_stereo44k", "audio", 0.7, 2.6),
    ("flac_stereo16k", "flac_stereo16k", "audio", None, None),
    ("m4a_stereo44k", "m4a_stereo44k", "audio", None, None),
    ("m4a_stereo44k_clip", "m4a_stereo44k", "audio", 0.5, 2.05),
    ("m4a_mono16k", "m4a_mono16k", "audio", None, None),
    ("video_stereo44k", "short_stereo44k", "video", None, None),
    ("video_mono16k_clip", "long_mono16k", "video", 3.3, 41.7),
    ("video_mono44k_tall", "tall", "video", None, None),
]
# Qwen2-Audio model card: librosa.load(path, sr=16000) on the whole file
LIBROSA_CASES = ["wav_stereo44k", "m4a_stereo44k", "flac_stereo16k", "short_stereo44k", "wav_mono16k"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _side_fingerprint() -> str:
    site = sorted(p.name for p in SIDE.glob("lib/python*/site-packages/*.dist-info"))
    return hashlib.sha256("\n".join(site).encode()).hexdigest()


def _specs(paths: dict[str, Path]) -> dict[str, dict]:
    specs = {}
    for cid, name, over, s, e in VIDEO_CASES:
        p = {**D, **over}
        ele = {"type": "video", "video": str(paths[name]), **{k: p[k] for k in VIDEO_KEYS}}
        if s is not None:
            ele["video_start"] = s
        if e is not None:
            ele["video_end"] = e
        specs[f"video/{cid}"] = {"kind": "video", "ele": ele, "media": name}
    for cid, name, over in IMAGE_CASES:
        p = {**D, **over}
        specs[f"image/{cid}"] = {"kind": "image", "media": name,
                                 "ele": {"type": "image", "image": str(paths[name]),
                                         "min_pixels": p["image_min_pixels"], "max_pixels": p["image_max_pixels"]}}
    for cid, name, kind, s, e in AUDIO_CASES:
        key = "audio" if kind == "audio" else "video"
        ele = {"type": kind, key: str(paths[name])}
        if s is not None:
            ele[f"{key}_start"] = s
        if e is not None:
            ele[f"{key}_end"] = e
        specs[f"omni_audio/{cid}"] = {"kind": "omni_audio", "media": name, "ele": ele,
                                      "use_audio_in_video": kind == "video"}
    for name in LIBROSA_CASES:
        specs[f"librosa/{name}"] = {"kind": "librosa", "media": name, "path": str(paths[name])}
    return specs


@pytest.fixture(scope="module")
def official():
    """case id → the official outputs (npz), computing the missing ones in the side venv."""
    paths = parity_media.build(MEDIA)
    if not (SIDE / ".installed").exists():
        why = (SIDE / ".failed").read_text().strip() if (SIDE / ".failed").exists() else "it was never built"
        pytest.fail(f"side venv {SIDE} is missing ({why}); build it with `make qwenutils-venv` "
                    f"(requirements/qwenutils.txt) — the Qwen input-parity tests cannot run without it")
    fp = _side_fingerprint() + _sha(SCRIPT)
    files, todo = {}, []
    for cid, spec in _specs(paths).items():
        key = hashlib.sha256(json.dumps({k: v for k, v in spec.items() if k != "media"}, sort_keys=True).encode()
                             + _sha(paths[spec["media"]]).encode() + fp.encode()).hexdigest()[:32]
        files[cid] = OUT / f"{key}.npz"
        if not files[cid].exists():
            todo.append({**spec, "out": str(files[cid])})
    if todo:
        OUT.mkdir(parents=True, exist_ok=True)
        job = OUT / f"spec-{os.getpid()}.json"
        job.write_text(json.dumps({"cases": todo}))
        env = {**os.environ, "PATH": f"{SIDE / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        r = subprocess.run([str(SIDE / "bin" / "python"), str(SCRIPT), str(job)], capture_output=True, text=True,
                           env=env, timeout=600)
        job.unlink(missing_ok=True)
        if r.returncode != 0:
            pytest.fail(f"the official preprocessing failed in {SIDE}:\n{r.stderr[-3000:]}")
    out = {}
    for cid, f in files.items():
        with np.load(f) as z:
            out[cid] = {k: z[k] for k in z.files}
        if str(out[cid]["error"]):
            pytest.fail(f"official code refused case {cid}: {out[cid]['error']}")
    return {"arrays": out, "paths": paths}


def _params(over: dict) -> dict:
    return {**D, **over}


@pytest.mark.parametrize("cid,name,over,start,end", VIDEO_CASES, ids=[c[0] for c in VIDEO_CASES])
def test_video_frames_equal_qwen_vl_utils(official, cid, name, over, start, end):
    ref = official["arrays"][f"video/{cid}"]
    media = Media("video", str(official["paths"][name]), start=start, end=end)
    dec = media_io.load_official(media, _params(over), want_audio=False)
    ours = dec["frames"]                                                   # uint8 T,H,W,3
    theirs = ref["video"].transpose(0, 2, 3, 1)                            # T,C,H,W → T,H,W,C
    assert dec["info"]["frame_indices"] == ref["frame_indices"].tolist()
    assert dec["info"]["clip_frames"] == int(ref["total_num_frames"])
    assert abs(dec["info"]["video_fps"] - float(ref["video_fps"])) < 1e-9
    assert abs(dec["info"]["sample_fps"] - float(ref["sample_fps"])) < 1e-9
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert np.array_equal(ours, theirs), f"max |diff| {np.abs(ours.astype(int) - theirs).max()}"


@pytest.mark.parametrize("cid,name,over", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_image_pixels_equal_qwen_vl_utils(official, cid, name, over):
    ref = official["arrays"][f"image/{cid}"]["image"]
    dec = media_io.load_official(Media("image", str(official["paths"][name])), _params(over))
    ours = np.asarray(dec["image"])
    assert ours.shape == ref.shape and np.array_equal(ours, ref)
    assert dec["info"]["resized"] == list(ref.shape[:2])


@pytest.mark.parametrize("cid,name,kind,start,end", AUDIO_CASES, ids=[c[0] for c in AUDIO_CASES])
def test_waveform_equals_qwen_omni_utils(official, cid, name, kind, start, end):
    ref = official["arrays"][f"omni_audio/{cid}"]["waveform"]
    media = Media(kind, str(official["paths"][name]), start=start, end=end, with_audio=kind == "video")
    wav = media_io.load_official(media, _params({}), want_video=False)["audio"]
    assert wav.dtype == np.float32 and wav.shape == ref.shape, (wav.shape, ref.shape)
    assert np.abs(wav - ref).max() <= WAVE_TOL


@pytest.mark.parametrize("name", LIBROSA_CASES)
def test_qwen2_audio_waveform_equals_librosa_load(official, name):
    ref = official["arrays"][f"librosa/{name}"]["waveform"]
    path = official["paths"][name]
    wav = media_io.load_audio_librosa(str(path), 16000, via_ffmpeg=path.suffix == ".mp4")
    assert wav.shape == ref.shape and np.abs(wav - ref).max() <= WAVE_TOL


def test_official_sources_are_the_pinned_packages(official):
    """The cached outputs name the package versions requirements/qwenutils.txt pins (and the configs cite)."""
    pins = dict(line.split("==") for line in (ROOT / "requirements" / "qwenutils.txt").read_text().split()
                if "==" in line)
    vers = json.loads(str(next(iter(official["arrays"].values()))["versions"]))
    for pkg in ("qwen-vl-utils", "qwen-omni-utils", "decord", "librosa"):
        assert vers[pkg] == pins[pkg]

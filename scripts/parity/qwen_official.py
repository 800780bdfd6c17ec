"""Run the official Qwen preprocessing on avkv's parity fixtures and save what it produces (side venv only).

Usage (done by tests/models/test_qwen_input_parity.py, with .cache/venv-qwenutils/bin/python):
    python scripts/parity/qwen_official.py SPEC.json

SPEC.json: {"cases": [{"out": "<file.npz>", "kind": ..., ...}, ...]}. Kinds:
  video       qwen_vl_utils.fetch_video(ele, return_video_sample_fps=True, return_video_metadata=True)
  image       qwen_vl_utils.fetch_image(ele)
  omni_audio  qwen_omni_utils.v2_5.process_audio_info([{"role": "user", "content": [ele]}], use_audio_in_video)
  librosa     librosa.load(path, sr=16000)   (the Qwen2-Audio model card's loader)

Nothing here reimplements the official code: it imports the packages and calls them. One shim is needed:
torchvision's wheels are CUDA builds whose C ops cannot load beside the CPU torch, and torchvision 0.28 then
fails at import when it registers fake kernels for two of those ops; defining the two op schemas first lets
it import. qwen-vl-utils only uses torchvision's pure-Python tensor resize (and torchvision.io, which 0.28 no
longer has; decord is the video backend), so the shim changes none of the computed values.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from importlib.metadata import version

os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

_lib = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import librosa  # noqa: E402
from qwen_omni_utils.v2_5 import process_audio_info  # noqa: E402
from qwen_vl_utils import vision_process  # noqa: E402

PACKAGES = ("qwen-vl-utils", "qwen-omni-utils", "decord", "librosa", "soxr", "soundfile", "audioread",
            "torchvision", "torch", "pillow", "numpy", "imageio-ffmpeg")


def versions() -> dict:
    return {p: version(p) for p in PACKAGES}


def run_case(case: dict) -> dict:
    kind = case["kind"]
    if kind == "video":
        (video, meta), sample_fps = vision_process.fetch_video(dict(case["ele"]), image_patch_size=14,
                                                               return_video_sample_fps=True,
                                                               return_video_metadata=True)
        v = video.numpy()
        if not np.array_equal(v, np.round(v)):
            raise AssertionError("official video pixels are not whole numbers")
        return {"video": v.astype(np.uint8), "frame_indices": np.asarray(meta["frames_indices"]),
                "video_fps": np.float64(meta["fps"]), "total_num_frames": np.int64(meta["total_num_frames"]),
                "sample_fps": np.float64(sample_fps)}
    if kind == "image":
        return {"image": np.asarray(vision_process.fetch_image(dict(case["ele"]), image_patch_size=14))}
    if kind == "omni_audio":
        conv = [{"role": "user", "content": [dict(case["ele"])]}]
        audios = process_audio_info(conv, use_audio_in_video=case.get("use_audio_in_video", False))
        return {"waveform": np.asarray(audios[0], dtype=np.float32)}
    if kind == "librosa":
        y, sr = librosa.load(case["path"], sr=16000)
        return {"waveform": np.asarray(y, dtype=np.float32), "sr": np.int64(sr)}
    raise ValueError(f"unknown case kind {kind!r}")


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    vers = json.dumps(versions(), sort_keys=True)
    for case in spec["cases"]:
        try:
            arrays = run_case(case)
            arrays["error"] = np.array("")
        except Exception as e:          # the official code refusing an input is a result too
            arrays = {"error": np.array(f"{type(e).__name__}: {e}")}
        arrays["versions"] = np.array(vers)
        tmp = case["out"] + ".tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, case["out"])
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--versions"]:
        print(json.dumps(versions(), sort_keys=True))
        sys.exit(0)
    sys.exit(main(sys.argv[1]))

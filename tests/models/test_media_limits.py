"""Media reading stays bounded (issue 16 item 9): video decoding keeps only the frames it samples, so memory does
not grow with clip length, and images over ``model.max_image_pixels`` are refused before decoding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avkv.config import ROOT, compose
from avkv.models import media_io

LONG = ROOT / ".cache" / "parity" / "media" / "long_10min_160x120.mp4"


def _ten_minute_clip() -> Path:
    """600 s of 160x120 H.264 at 10 fps (6000 frames): all of them as RGB would take 345 MB."""
    if LONG.exists():
        return LONG
    import av
    LONG.parent.mkdir(parents=True, exist_ok=True)
    tmp = LONG.with_suffix(".tmp.mp4")
    rng = np.random.default_rng(0)
    looks = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(4)]
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 160, 120, "yuv420p"
        s.options = {"preset": "ultrafast", "threads": "1", "g": "250"}
        for i in range(6000):
            for p in s.encode(av.VideoFrame.from_ndarray(looks[(i // 50) % 4], format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    tmp.replace(LONG)
    return LONG


_CHILD = """
import resource, sys, json
import numpy, av, torch                      # imported before the baseline is taken
from avkv.models import media_io
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = eval(sys.argv[1], {"media_io": media_io, "path": sys.argv[2]})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
frames = out[0]
print(json.dumps({"grow_mb": (peak - base) / 1024, "shape": list(frames.shape)}))
"""


def _growth(expr: str, path: str) -> dict:
    """Peak resident memory a fresh process gains while running ``expr`` (ru_maxrss: PyAV's frame buffers
    are not seen by tracemalloc)."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _CHILD, expr, path], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_ten_minute_clip_peak_memory_is_bounded():
    """All 6000 frames as RGB are 345 MB (the old reader peaked at 713 MB RSS); 8 sampled frames are 0.5 MB."""
    path = str(_ten_minute_clip())
    r = _growth("media_io.load_video_frames(path, num_frames=8)", path)
    assert r["shape"] == [8, 120, 160, 3]
    assert r["grow_mb"] < 60, f"fixed_frames: the process grew {r['grow_mb']:.0f} MB for 8 frames of 10 minutes"
    r = _growth("media_io.official_video_frames(path, max_frames=16)", path)
    assert r["shape"][0] == 16
    assert r["grow_mb"] < 80, f"official: the process grew {r['grow_mb']:.0f} MB for 16 frames of 10 minutes"


def test_clip_of_a_long_video_keeps_only_its_frames():
    path = str(_ten_minute_clip())
    r = _growth("media_io.load_video_frames(path, num_frames=None, start=10.0, end=14.9)", path)
    assert r["shape"][0] == 50 and r["grow_mb"] < 60


def test_image_over_the_pixel_limit_is_refused_naming_file_and_key(tmp_path):
    from PIL import Image
    p = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500), (1, 2, 3)).save(p)
    with pytest.raises(media_io.MediaError) as e:
        media_io.load_image(str(p), max_pixels=1_000_000)
    msg = str(e.value)
    assert "big.png" in msg and "2000x1500" in msg and "model.max_image_pixels=1000000" in msg
    with pytest.raises(media_io.MediaError, match="model.max_image_pixels"):
        media_io.official_image(str(p), max_image_pixels=1_000_000)
    assert media_io.load_image(str(p), max_pixels=3_000_000).size == (2000, 1500)
    assert media_io.load_image(str(p)).size == (2000, 1500)          # the default limit: 100 M pixels


def test_max_image_pixels_reaches_the_adapter():
    cfg = compose(["model=tiny_qwen2_5_vl", "+model.max_image_pixels=12345"])
    assert cfg.model.max_image_pixels == 12345

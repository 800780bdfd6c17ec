"""Media decoding shared by all adapters: video frames and audio tracks with PyAV, images with Pillow.

Every error names the file, so a broken sample is recorded with a useful message and the run goes on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


class MediaError(RuntimeError):
    pass


def _open(path: str):
    import av
    p = Path(path)
    if not p.exists():
        raise MediaError(f"media file not found: {p}")
    try:
        return av.open(str(p))
    except Exception as e:  # av raises many error types
        raise MediaError(f"cannot open media file {p}: {e}") from e


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _frames_from_folder(path: Path, frame_rate: float | None, start: float | None, end: float | None):
    """A video stored as a folder of frame images (MVBench's frame tasks): sorted names, ``frame_rate`` fps."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MediaError(f"no frame images in video folder {path}")
    rate = float(frame_rate or 1.0)
    frames, times = [], []
    for i, f in enumerate(files):
        t = i / rate
        if start is not None and t < start:
            continue
        if end is not None and t > end:
            break
        frames.append(np.asarray(load_image(str(f))))
        times.append(t)
    return frames, times


def _frames_from_file(path: str, start: float | None, end: float | None):
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(f"no video stream in {path}")
        try:
            frames, times = [], []
            for fr in c.decode(video=0):
                t = float(fr.time) if fr.time is not None else len(times) / float(c.streams.video[0].average_rate or 1)
                if start is not None and t < start:
                    continue
                if end is not None and t > end:
                    break
                frames.append(fr.to_ndarray(format="rgb24"))
                times.append(t)
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(f"corrupt video {path}: {e}") from e
    return frames, times


def load_video_frames(path: str, num_frames: int | None = 8, fps: float | None = None,
                      start: float | None = None, end: float | None = None,
                      frame_rate: float | None = None) -> tuple[np.ndarray, float]:
    """Decode frames uniformly spread over [start, end] (or sampled at ``fps``): uint8 [T,H,W,3] and sampled fps.

    ``path`` is a video file, or a folder of frame images played at ``frame_rate``.
    """
    p = Path(path)
    if p.is_dir():
        frames, times = _frames_from_folder(p, frame_rate, start, end)
    else:
        frames, times = _frames_from_file(path, start, end)
    if not frames:
        raise MediaError(f"no decodable frames in {path} (clip {start}-{end})")
    times_a = np.asarray(times)
    duration = max(times_a[-1] - times_a[0], 1e-6)
    if fps is not None:
        n = max(1, int(round(duration * fps)) + 1)
        if num_frames:
            n = min(n, num_frames)
    else:
        n = num_frames or len(frames)
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    sampled_fps = (n - 1) / duration if n > 1 else 1.0
    return np.stack([frames[i] for i in idx]), float(sampled_fps)


def load_audio(path: str, sr: int = SAMPLE_RATE, start: float | None = None, end: float | None = None,
               max_s: float | None = None, required: bool = True) -> np.ndarray | None:
    """Decode the first audio stream as mono float32 at ``sr`` Hz. Returns None if absent and not required."""
    import av
    with _open(path) as c:
        if not c.streams.audio:
            if required:
                raise MediaError(f"no audio stream in {path}")
            return None
        res = av.AudioResampler(format="flt", layout="mono", rate=sr)
        chunks = []
        try:
            for fr in c.decode(audio=0):
                for o in res.resample(fr):
                    chunks.append(o.to_ndarray().reshape(-1))
            for o in res.resample(None):
                chunks.append(o.to_ndarray().reshape(-1))
        except Exception as e:
            raise MediaError(f"corrupt audio in {path}: {e}") from e
    if not chunks:
        raise MediaError(f"no decodable audio in {path}")
    wav = np.concatenate(chunks).astype(np.float32)
    a = int((start or 0.0) * sr)
    b = int(end * sr) if end is not None else len(wav)
    wav = wav[a:b]
    if max_s is not None:
        wav = wav[: int(max_s * sr)]
    return wav


def load_image(path: str):
    from PIL import Image
    p = Path(path)
    if not p.exists():
        raise MediaError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except Exception as e:
        raise MediaError(f"corrupt image {p}: {e}") from e


def load(media, num_frames: int | None = 8, fps: float | None = None, sr: int = SAMPLE_RATE,
         max_audio_s: float | None = None, want_audio: bool = True) -> dict:
    """Decode one :class:`~avkv.tasks.base.Media` into ``frames``/``fps``, ``audio`` and/or ``image``."""
    out: dict = {}
    if media.kind == "video":
        out["frames"], out["fps"] = load_video_frames(media.path, num_frames, fps, media.start, media.end,
                                                      getattr(media, "frame_rate", None))
        if media.with_audio and want_audio and not Path(media.path).is_dir():
            out["audio"] = load_audio(media.path, sr, media.start, media.end, max_audio_s, required=False)
    elif media.kind == "audio":
        out["audio"] = load_audio(media.path, sr, media.start, media.end, max_audio_s)
    elif media.kind == "image":
        out["image"] = load_image(media.path)
    else:
        raise MediaError(f"unknown media kind {media.kind!r} for {media.path}")
    return out

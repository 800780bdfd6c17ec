"""The **official** media readers: what ``qwen-vl-utils`` / ``qwen-omni-utils`` feed Qwen2.5-VL / Qwen2.5-Omni
(:func:`official_video_frames`, :func:`official_image`, their ``smart_resize`` arithmetic) and what the Qwen2-Audio
model card feeds its processor (``librosa.load``: :func:`load_audio_librosa`), with :func:`load_official` decoding
one media item in that mode. ``tests/models/test_qwen_input_parity.py`` compares them with the packages themselves.

The PyAV/Pillow primitives they share with the fixed_frames readers (and the error type) are in
:mod:`avkv.models.media_io`, which also exposes every name here (``media_io.load_official`` …).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from avkv.models.media_io import (DEFAULT_MAX_IMAGE_PIXELS, SAMPLE_RATE, MediaError, decode_audio_s16, decode_selected,
                                  decoded_times, frame_files, load_image, open_image_checked, packet_times)

#: qwen-vl-utils' constants (0.0.14, image_patch_size 14 → factor 28) that the config does not override
SPATIAL_MERGE_SIZE, FRAME_FACTOR, MAX_RATIO = 2, 2, 200
VIDEO_MAX_TOKEN_NUM = 768

#: the package defaults, which the real-model configs spell out (``official:`` block of configs/model/*.yaml)
OFFICIAL_DEFAULTS = dict(patch_size=14, fps=2.0, min_frames=4, max_frames=768,
                         min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28,
                         total_pixels=int(128000 * 28 * 28 * 0.9),
                         image_min_pixels=4 * 28 * 28, image_max_pixels=16384 * 28 * 28, sample_rate=SAMPLE_RATE)


def _round_by(x, f):
    return round(x / f) * f


def _ceil_by(x, f):
    return math.ceil(x / f) * f


def _floor_by(x, f):
    return math.floor(x / f) * f


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """qwen-vl-utils ``smart_resize``: both sides multiples of ``factor``, area within [min, max], aspect kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise MediaError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_RATIO}")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = _floor_by(height / beta, factor)
        w_bar = _floor_by(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


def official_nframes(total_frames: int, video_fps: float, fps: float, min_frames: int,
                     max_frames: int | None) -> int:
    """qwen-vl-utils ``smart_nframes`` (fps mode): ``duration * fps`` bounded by min/max frames and the clip,
    rounded down to the temporal patch (2)."""
    lo = _ceil_by(min_frames, FRAME_FACTOR)
    hi = _floor_by(max_frames if max_frames is not None else min(768, total_frames), FRAME_FACTOR)
    n = total_frames / video_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    n = _floor_by(n, FRAME_FACTOR)
    if not (FRAME_FACTOR <= n <= total_frames):
        raise MediaError(f"video too short for the official sampling: {n} frames from {total_frames} "
                         f"(need at least {FRAME_FACTOR})")
    return n


def official_frame_range(total_frames: int, video_fps: float, start: float | None,
                         end: float | None) -> tuple[int, int, int]:
    """qwen-vl-utils ``calculate_video_frame_range``: first and last frame index of [start, end] and the count."""
    if video_fps <= 0 or total_frames <= 0:
        raise MediaError(f"video has no frames or no frame rate ({total_frames} frames at {video_fps} fps)")
    if start is None and end is None:
        return 0, total_frames - 1, total_frames
    max_duration = total_frames / video_fps
    s = math.ceil(max(0.0, min(start, max_duration)) * video_fps) if start is not None else 0
    if end is not None:
        e = min(math.floor(max(0.0, min(end, max_duration)) * video_fps), total_frames - 1)
    else:
        e = total_frames - 1
    if s >= e:
        raise MediaError(f"clip {start}-{end} s holds no frame range ({s} >= {e}) in a {max_duration:.2f} s video")
    return s, e, e - s + 1


def official_video_max_pixels(nframes: int, factor: int, min_pixels: float, max_pixels: float | None,
                              total_pixels: float) -> float:
    """qwen-vl-utils ``fetch_video``'s per-frame pixel cap: the total-pixel budget shared by the frames, at
    most the package's 768-token frame, at least 1.05 × min_pixels, and at most the configured max_pixels."""
    cap = max(min(VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / nframes * FRAME_FACTOR),
              int(min_pixels * 1.05))
    return cap if max_pixels is None else min(max_pixels, cap)


def torch_bicubic_resize_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T,H,W,3] → uint8 [T,height,width,3] the way torchvision's tensor ``resize`` (BICUBIC, antialias)
    does it: float32 interpolate, clamp to [0, 255], round, cast. Identity when the size is unchanged."""
    import torch
    import torch.nn.functional as F
    if frames.shape[1:3] == (height, width):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(torch.float32)
    x = F.interpolate(x, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    x = torch.round(x.clamp(min=0, max=255)).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _video_stream_info(path: str) -> tuple[int, float]:
    """Frame count (video packets, as decord indexes them) and average frame rate."""
    pts, tb, rate = packet_times(path)
    total = len(pts) if pts is not None else len(decoded_times(path))
    fps = float(rate) if rate else 0.0
    return total, fps


def official_video_frames(path: str, start: float | None = None, end: float | None = None,
                          frame_rate: float | None = None, **params) -> tuple[np.ndarray, dict]:
    """Frames as ``qwen_vl_utils.fetch_video`` gives them (decord backend): fps-based count rounded to the
    temporal patch, indices ``linspace(start_frame, end_frame, n).round()``, each frame ``smart_resize``d
    within the per-frame cap of the total-pixel budget (torchvision bicubic). uint8 [T,H,W,3] and a record
    (frames used, their indices, source and resized size, the sampled fps).

    A folder of frame images (no official rule) is treated as a video at ``frame_rate`` fps."""
    import torch
    p = {**OFFICIAL_DEFAULTS, **{k: v for k, v in params.items() if v is not None or k == "max_frames"}}
    factor = p["patch_size"] * SPATIAL_MERGE_SIZE
    folder = Path(path).is_dir()
    if folder:
        files = frame_files(Path(path))
        total, video_fps = len(files), float(frame_rate or 1.0)
    else:
        total, video_fps = _video_stream_info(path)
    s, e, count = official_frame_range(total, video_fps, start, end)
    n = official_nframes(count, video_fps, p["fps"], p["min_frames"], p["max_frames"])
    idx = torch.linspace(s, e, n).round().long().tolist()
    wanted: dict[int, list[int]] = {}
    for slot, i in enumerate(idx):
        wanted.setdefault(i, []).append(slot)
    if folder:
        frames = [np.asarray(load_image(str(files[i]), p.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)))
                  for i in idx]
    else:
        frames = decode_selected(path, wanted, n)
        if any(f is None for f in frames):
            raise MediaError(f"{path}: {sum(f is None for f in frames)} of the {n} sampled frames are not "
                             f"decodable (the container announces {total})")
    video = np.stack(frames)
    h, w = video.shape[1:3]
    max_px = official_video_max_pixels(n, factor, p["min_pixels"], p["max_pixels"], p["total_pixels"])
    rh, rw = smart_resize(h, w, factor, p["min_pixels"], max_px)
    video = torch_bicubic_resize_uint8(video, rh, rw)
    sample_fps = n / max(count, 1e-6) * video_fps
    info = {"frames": n, "frame_indices": idx, "clip_frames": count, "video_fps": video_fps,
            "sample_fps": sample_fps, "source_size": [int(h), int(w)], "resized": [int(rh), int(rw)]}
    return video, info


def official_image(path: str, min_pixels: float | None = None, max_pixels: float | None = None,
                   patch_size: int = 14, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """An image as ``qwen_vl_utils.fetch_image`` gives it: RGBA composited on white, ``smart_resize``d between
    the image pixel bounds with PIL's default (bicubic) resize. Returns (PIL image, record)."""
    from PIL import Image
    min_pixels = OFFICIAL_DEFAULTS["image_min_pixels"] if min_pixels is None else min_pixels
    max_pixels = OFFICIAL_DEFAULTS["image_max_pixels"] if max_pixels is None else max_pixels
    im = open_image_checked(path, max_image_pixels)
    try:
        with im:
            if im.mode == "RGBA":
                rgb = Image.new("RGB", im.size, (255, 255, 255))
                rgb.paste(im, mask=im.split()[3])
            else:
                rgb = im.convert("RGB")
    except Exception as e:
        raise MediaError(f"corrupt image {path}: {e}") from e
    w, h = rgb.size
    factor = patch_size * SPATIAL_MERGE_SIZE
    rh, rw = smart_resize(h, w, factor, min_pixels, max_pixels)
    return rgb.resize((rw, rh)), {"source_size": [h, w], "resized": [rh, rw]}


def _resample_soxr_hq(y: np.ndarray, sr_native: int, sr: int) -> np.ndarray:
    """``librosa.resample(res_type="soxr_hq")``: soxr HQ, then fixed to ``ceil(n * sr / sr_native)`` samples."""
    if sr_native == sr:
        return y
    import soxr
    n_out = int(np.ceil(y.shape[-1] * (float(sr) / sr_native)))
    y_hat = soxr.resample(y, sr_native, sr, quality="soxr_hq")
    if len(y_hat) > n_out:
        y_hat = y_hat[:n_out]
    elif len(y_hat) < n_out:
        y_hat = np.pad(y_hat, (0, n_out - len(y_hat)))
    return np.asarray(y_hat, dtype=y.dtype)


def load_audio_librosa(path: str, sr: int = SAMPLE_RATE, offset: float = 0.0, duration: float | None = None,
                       via_ffmpeg: bool = False, required: bool = True) -> np.ndarray | None:
    """``librosa.load(path, sr=sr, offset=offset, duration=duration)`` (librosa 0.11, mono): soundfile reads
    what it can at the native rate; other files (and video tracks, which ``qwen-omni-utils`` opens with
    audioread's ffmpeg reader) are decoded to native-rate s16 PCM as ``ffmpeg -f s16le`` gives it; channels
    are averaged, then soxr HQ resamples to ``sr``. float32 [N]."""
    p = Path(path)
    if not p.exists():
        raise MediaError(f"media file not found: {p}")
    y = None
    if not via_ffmpeg:
        import soundfile as sf
        try:
            with sf.SoundFile(str(p)) as f:
                sr_native = f.samplerate
                if offset:
                    f.seek(int(offset * sr_native))
                frames = int(duration * sr_native) if duration is not None else -1
                y = f.read(frames=frames, dtype="float32", always_2d=False).T
        except sf.SoundFileRuntimeError:
            y = None
        except Exception as e:
            raise MediaError(f"corrupt audio in {p}: {e}") from e
    if y is None:
        dec = decode_audio_s16(str(p), trim_to_duration=True, required=required)
        if dec is None:
            return None
        pcm, ch, sr_native = dec
        flat = (1.0 / 32768.0) * pcm.astype(np.float32)
        s_start = int(sr_native * offset) * ch
        s_end = len(flat) if duration is None else s_start + int(sr_native * duration) * ch
        flat = flat[s_start:s_end]
        y = flat.reshape((-1, ch)).T if ch > 1 else flat
    if y.ndim > 1:
        y = np.mean(y, axis=tuple(range(y.ndim - 1)))
    if y.size == 0:
        raise MediaError(f"no audio samples in {p} (offset {offset}, duration {duration})")
    return _resample_soxr_hq(y, sr_native, sr)


def load_official(media, params: dict, want_audio: bool = True, want_video: bool = True,
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """official: decode one :class:`~avkv.tasks.base.Media` as the Qwen utilities do. Adds ``info`` (what was
    fed: frames, indices, sizes, audio seconds) to the usual ``frames``/``audio``/``image`` keys."""
    sr = int(params.get("sample_rate", SAMPLE_RATE))
    out: dict = {}
    if media.kind == "video":
        info = {}
        if want_video:                                       # an audio-only model hears the track only
            vp = {k: params[k] for k in ("patch_size", "fps", "min_frames", "max_frames", "min_pixels",
                                         "max_pixels", "total_pixels") if k in params}
            out["frames"], info = official_video_frames(media.path, media.start, media.end,
                                                        getattr(media, "frame_rate", None),
                                                        max_image_pixels=max_image_pixels, **vp)
            out["fps"] = info["sample_fps"]
        if media.with_audio and want_audio and not Path(media.path).is_dir():
            start = media.start or 0.0
            dur = None if media.end is None else media.end - start
            out["audio"] = load_audio_librosa(media.path, sr, start, dur, via_ffmpeg=True, required=False)
            if out["audio"] is not None:
                info["audio_s"] = len(out["audio"]) / sr
    elif media.kind == "audio":
        start = media.start or 0.0
        dur = None if media.end is None else media.end - start
        out["audio"] = load_audio_librosa(media.path, sr, start, dur)
        info = {"audio_s": len(out["audio"]) / sr}
    elif media.kind == "image":
        out["image"], info = official_image(media.path, params.get("image_min_pixels"),
                                            params.get("image_max_pixels"), params.get("patch_size", 14),
                                            max_image_pixels)
    else:
        raise MediaError(f"unknown media kind {media.kind!r} for {media.path}")
    out["info"] = {"kind": media.kind, **info}
    return out

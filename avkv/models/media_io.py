"""Media decoding shared by all adapters: video frames and audio tracks with PyAV, images with Pillow.

Every error names the file, so a broken sample is recorded with a useful message and the run goes on.

Two families of readers live here:

* the **fixed_frames** readers (:func:`load`, :func:`load_video_frames`, :func:`load_audio`): ``num_frames``
  frames spread evenly over the clip, audio downmixed by PyAV; what the tiny and trained proxy checkpoints
  were built on, and the mode for controlled experiments (the same frame count for every model);
* the **official** readers (:func:`load_official`, :func:`official_video_frames`, :func:`load_audio_librosa`,
  :func:`official_image`): what ``qwen-vl-utils`` / ``qwen-omni-utils`` feed Qwen2.5-VL / Qwen2.5-Omni and what
  the Qwen2-Audio model card feeds its processor (``librosa.load``). ``tests/models/test_qwen_input_parity.py``
  compares them with the packages themselves.

Video decoding keeps only the frames it samples (decode-and-drop), so memory does not grow with clip length,
and images larger than a configurable pixel limit are refused before they are decoded.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
#: images with more pixels are refused before decoding (``model.max_image_pixels``); ~300 MB as RGB
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


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


def _frame_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MediaError(f"no frame images in video folder {path}")
    return files


def _frames_from_folder(path: Path, frame_rate: float | None, start: float | None, end: float | None,
                        num_frames: int | None, fps: float | None, max_image_pixels: int | None):
    """A video stored as a folder of frame images (MVBench's frame tasks): sorted names, ``frame_rate`` fps.
    Only the sampled files are opened."""
    files = _frame_files(path)
    rate = float(frame_rate or 1.0)
    times = []
    for i in range(len(files)):
        t = i / rate
        if start is not None and t < start:
            continue
        if end is not None and t > end:
            break
        times.append((i, t))
    if not times:
        raise MediaError(f"no decodable frames in {path} (clip {start}-{end})")
    pick = _even_picks(len(times), num_frames, [t for _, t in times], fps)
    frames = [np.asarray(load_image(str(files[times[j][0]]), max_image_pixels)) for j in pick]
    return frames, [times[j][1] for j in pick], [t for _, t in times]


def _even_picks(n_avail: int, n: int | None, times: list[float], fps: float | None = None) -> list[int]:
    """The fixed_frames rule: ``n`` (or ``duration * fps + 1`` capped by ``n``) indices spread evenly over the
    ``n_avail`` frames of the clip, rounded."""
    duration = max(times[-1] - times[0], 1e-6)
    if fps is not None:
        k = max(1, int(round(duration * fps)) + 1)
        if n:
            k = min(k, n)
    else:
        k = n or n_avail
    return np.linspace(0, n_avail - 1, k).round().astype(int).tolist()


def _packet_times(path: str) -> tuple[list[int] | None, object, object]:
    """Presentation timestamps of every video packet (demux only, nothing decoded), sorted; None when a packet
    has no timestamp (the caller then counts by decoding)."""
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(f"no video stream in {path}")
        st = c.streams.video[0]
        pts = []
        try:
            for pk in c.demux(st):
                if pk.size == 0:                # the flush packet
                    continue
                if pk.pts is None:
                    return None, st.time_base, st.average_rate
                pts.append(int(pk.pts))
        except Exception as e:
            raise MediaError(f"corrupt video {path}: {e}") from e
        return sorted(pts), st.time_base, st.average_rate


def _decoded_times(path: str) -> list[float]:
    """Frame times by decoding (no colour conversion, frames dropped at once): the fallback of
    :func:`_packet_times`, with the same time rule as the decode pass."""
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(f"no video stream in {path}")
        rate = float(c.streams.video[0].average_rate or 1)
        times = []
        try:
            for fr in c.decode(video=0):
                times.append(float(fr.time) if fr.time is not None else len(times) / rate)
        except Exception as e:
            raise MediaError(f"corrupt video {path}: {e}") from e
    return times


def _decode_selected(path: str, wanted: dict[int, list[int]], n_slots: int,
                     resize=None) -> list[np.ndarray | None]:
    """Decode frames in presentation order and keep (as RGB) only the ones whose index is in ``wanted``
    (index → output slots); decoding stops after the last wanted frame. Memory: the kept frames only."""
    out: list[np.ndarray | None] = [None] * n_slots
    last = max(wanted, default=-1)
    with _open(path) as c:
        try:
            for i, fr in enumerate(c.decode(video=0)):
                if i in wanted:
                    arr = fr.to_ndarray(format="rgb24")
                    if resize is not None:
                        arr = resize(arr)
                    for s in wanted[i]:
                        out[s] = arr
                if i >= last:
                    break
        except Exception as e:
            raise MediaError(f"corrupt video {path}: {e}") from e
    return out


def _frames_from_file(path: str, start: float | None, end: float | None, num_frames: int | None,
                      fps: float | None):
    """fixed_frames sampling on a file: the frames whose time lies in [start, end], ``num_frames`` of them
    spread evenly. Pass 1 reads the timestamps (packets, or decoding when they lack them), pass 2 decodes
    and keeps only the chosen frames."""
    pts, tb, rate = _packet_times(path)
    if pts is not None:
        all_times = [float(p * tb) for p in pts]
    else:
        all_times = _decoded_times(path)
    in_clip = [(i, t) for i, t in enumerate(all_times)
               if (start is None or t >= start) and (end is None or t <= end)]
    if not in_clip:
        raise MediaError(f"no decodable frames in {path} (clip {start}-{end})")
    clip_times = [t for _, t in in_clip]
    pick = _even_picks(len(in_clip), num_frames, clip_times, fps)
    wanted: dict[int, list[int]] = {}
    for slot, j in enumerate(pick):
        wanted.setdefault(in_clip[j][0], []).append(slot)
    frames = _decode_selected(path, wanted, len(pick))
    if any(f is None for f in frames) and pts is not None:
        # the decoder gave fewer frames than the container has packets: count by decoding instead
        all_times = _decoded_times(path)
        in_clip = [(i, t) for i, t in enumerate(all_times)
                   if (start is None or t >= start) and (end is None or t <= end)]
        if not in_clip:
            raise MediaError(f"no decodable frames in {path} (clip {start}-{end})")
        clip_times = [t for _, t in in_clip]
        pick = _even_picks(len(in_clip), num_frames, clip_times, fps)
        wanted = {}
        for slot, j in enumerate(pick):
            wanted.setdefault(in_clip[j][0], []).append(slot)
        frames = _decode_selected(path, wanted, len(pick))
    if any(f is None for f in frames):
        raise MediaError(f"no decodable frames in {path} (clip {start}-{end})")
    return frames, [clip_times[j] for j in pick], clip_times


def load_video_frames(path: str, num_frames: int | None = 8, fps: float | None = None,
                      start: float | None = None, end: float | None = None,
                      frame_rate: float | None = None,
                      max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, float]:
    """fixed_frames: decode frames uniformly spread over [start, end] (or sampled at ``fps``): uint8 [T,H,W,3]
    and the sampled fps. Only the chosen frames are kept in memory.

    ``path`` is a video file, or a folder of frame images played at ``frame_rate``.
    """
    p = Path(path)
    if p.is_dir():
        frames, _, clip_times = _frames_from_folder(p, frame_rate, start, end, num_frames, fps, max_image_pixels)
    else:
        frames, _, clip_times = _frames_from_file(path, start, end, num_frames, fps)
    n = len(frames)
    duration = max(clip_times[-1] - clip_times[0], 1e-6)
    sampled_fps = (n - 1) / duration if n > 1 else 1.0
    return np.stack(frames), float(sampled_fps)


def load_audio(path: str, sr: int = SAMPLE_RATE, start: float | None = None, end: float | None = None,
               max_s: float | None = None, required: bool = True) -> np.ndarray | None:
    """fixed_frames: the first audio stream as mono float32 at ``sr`` Hz, downmixed and resampled by PyAV
    (its float mono layout: (L+R)/sqrt(2) for stereo). Returns None if absent and not required."""
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


def decode_audio_s16(path: str, layout: str | None = None, rate: int | None = None,
                     trim_to_duration: bool = False, required: bool = True):
    """The first audio stream as interleaved int16 PCM, converted by libswresample as the ffmpeg command line
    does for ``-f s16le`` (``layout``/``rate`` None: the stream's own; ``layout="mono"`` downmixes to
    (L+R)/2, the s16 normalisation of ``ffmpeg -ac 1``). ``trim_to_duration`` drops the encoder padding past
    the stream's declared duration, as ffmpeg >= 7 does. Returns (int16 [N*channels], channels, rate) or
    None when the file has no audio stream and ``required`` is false."""
    import av
    with _open(path) as c:
        if not c.streams.audio:
            if required:
                raise MediaError(f"no audio stream in {path}")
            return None
        st = c.streams.audio[0]
        layout = layout or st.layout.name
        rate = rate or st.rate
        res = av.AudioResampler(format="s16", layout=layout, rate=rate)
        chunks = []
        try:
            for fr in c.decode(audio=0):
                for o in res.resample(fr):
                    chunks.append(o.to_ndarray().reshape(-1))
            for o in res.resample(None):
                chunks.append(o.to_ndarray().reshape(-1))
        except Exception as e:
            raise MediaError(f"corrupt audio in {path}: {e}") from e
        channels = len(av.AudioLayout(layout).channels)
        keep = None
        if trim_to_duration and st.duration is not None and st.time_base is not None:
            keep = int(round(float(st.duration * st.time_base) * rate)) * channels
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    if keep is not None:
        pcm = pcm[:keep]
    return pcm.astype(np.int16, copy=False), channels, rate


# ------------------------------------------------------------------------------------------- images
def _open_image_checked(path: str, max_pixels: int | None):
    from PIL import Image
    p = Path(path)
    if not p.exists():
        raise MediaError(f"image file not found: {p}")
    try:
        im = Image.open(p)
    except Image.DecompressionBombError as e:
        raise MediaError(f"image {p} is too large to decode ({e}); the limit is model.max_image_pixels="
                         f"{max_pixels}") from e
    except Exception as e:
        raise MediaError(f"corrupt image {p}: {e}") from e
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        im.close()
        raise MediaError(f"image {p} is {w}x{h} = {w * h} pixels, over the limit model.max_image_pixels="
                         f"{max_pixels} (raise it in the model config to accept such images)")
    return im


def load_image(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """An RGB PIL image; refused (before decoding) when it has more than ``max_pixels`` pixels."""
    im = _open_image_checked(path, max_pixels)
    try:
        with im:
            return im.convert("RGB")
    except Exception as e:
        raise MediaError(f"corrupt image {path}: {e}") from e


def load(media, num_frames: int | None = 8, fps: float | None = None, sr: int = SAMPLE_RATE,
         max_audio_s: float | None = None, want_audio: bool = True,
         max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """fixed_frames: decode one :class:`~avkv.tasks.base.Media` into ``frames``/``fps``, ``audio`` and/or
    ``image``."""
    out: dict = {}
    if media.kind == "video":
        out["frames"], out["fps"] = load_video_frames(media.path, num_frames, fps, media.start, media.end,
                                                      getattr(media, "frame_rate", None), max_image_pixels)
        if media.with_audio and want_audio and not Path(media.path).is_dir():
            out["audio"] = load_audio(media.path, sr, media.start, media.end, max_audio_s, required=False)
    elif media.kind == "audio":
        out["audio"] = load_audio(media.path, sr, media.start, media.end, max_audio_s)
    elif media.kind == "image":
        out["image"] = load_image(media.path, max_image_pixels)
    else:
        raise MediaError(f"unknown media kind {media.kind!r} for {media.path}")
    return out


# =========================================================================== official (qwen-vl-utils & co.)
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
    pts, tb, rate = _packet_times(path)
    total = len(pts) if pts is not None else len(_decoded_times(path))
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
        files = _frame_files(Path(path))
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
        frames = _decode_selected(path, wanted, n)
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
    im = _open_image_checked(path, max_image_pixels)
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
    if media.kind == "video" and not want_video:            # an audio-only model hears the track only
        info = {}
        if media.with_audio and want_audio and not Path(media.path).is_dir():
            start = media.start or 0.0
            dur = None if media.end is None else media.end - start
            out["audio"] = load_audio_librosa(media.path, sr, start, dur, via_ffmpeg=True, required=False)
            if out["audio"] is not None:
                info["audio_s"] = len(out["audio"]) / sr
    elif media.kind == "video":
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

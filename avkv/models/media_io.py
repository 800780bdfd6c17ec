"""Media decoding shared by all adapters: video frames and audio tracks with PyAV, images with Pillow.

Every error names the file, so a broken sample is recorded with a useful message and the run goes on.

Two families of readers live here:

* the **fixed_frames** readers (:func:`load`, :func:`load_video_frames`, :func:`load_audio`): ``num_frames``
  frames spread evenly over the clip, audio downmixed by PyAV; what the tiny and trained proxy checkpoints
  were built on, and the mode for controlled experiments (the same frame count for every model);
* the **official** readers, in :mod:`avkv.models.media_official` and reachable here by name
  (:func:`load_official`, :func:`official_video_frames`, :func:`load_audio_librosa`, :func:`official_image`): what ``qwen-vl-utils`` / ``qwen-omni-utils`` feed Qwen2.5-VL / Qwen2.5-Omni and what
  the Qwen2-Audio model card feeds its processor (``librosa.load``). ``tests/models/test_qwen_input_parity.py``
  compares them with the packages themselves.

Video decoding keeps only the frames it samples (decode-and-drop), so memory does not grow with clip length,
and images larger than a configurable pixel limit are refused before they are decoded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
#: images with more pixels are refused before decoding (``model.max_image_pixels``); ~300 MB as RGB
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


class MediaError(RuntimeError):
    pass


def open_container(path: str):
    import av
    p = Path(path)
    if not p.exists():
        raise MediaError(f"media file not found: {p}")
    try:
        return av.open(str(p))
    except Exception as e:  # av raises many error types
        raise MediaError(f"cannot open media file {p}: {e}") from e


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def frame_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MediaError(f"no frame images in video folder {path}")
    return files


def _frames_from_folder(path: Path, frame_rate: float | None, start: float | None, end: float | None,
                        num_frames: int | None, fps: float | None, max_image_pixels: int | None):
    """A video stored as a folder of frame images (MVBench's frame tasks): sorted names, ``frame_rate`` fps.
    Only the sampled files are opened."""
    files = frame_files(path)
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


def packet_times(path: str) -> tuple[list[int] | None, object, object]:
    """Presentation timestamps of every video packet (demux only, nothing decoded), sorted; None when a packet
    has no timestamp (the caller then counts by decoding)."""
    with open_container(path) as c:
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


def decoded_times(path: str) -> list[float]:
    """Frame times by decoding (no colour conversion, frames dropped at once): the fallback of
    :func:`packet_times`, with the same time rule as the decode pass."""
    with open_container(path) as c:
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


def decode_selected(path: str, wanted: dict[int, list[int]], n_slots: int,
                     resize=None) -> list[np.ndarray | None]:
    """Decode frames in presentation order and keep (as RGB) only the ones whose index is in ``wanted``
    (index → output slots); decoding stops after the last wanted frame. Memory: the kept frames only."""
    out: list[np.ndarray | None] = [None] * n_slots
    last = max(wanted, default=-1)
    with open_container(path) as c:
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
    pts, tb, rate = packet_times(path)
    if pts is not None:
        all_times = [float(p * tb) for p in pts]
    else:
        all_times = decoded_times(path)
    in_clip = [(i, t) for i, t in enumerate(all_times)
               if (start is None or t >= start) and (end is None or t <= end)]
    if not in_clip:
        raise MediaError(f"no decodable frames in {path} (clip {start}-{end})")
    clip_times = [t for _, t in in_clip]
    pick = _even_picks(len(in_clip), num_frames, clip_times, fps)
    wanted: dict[int, list[int]] = {}
    for slot, j in enumerate(pick):
        wanted.setdefault(in_clip[j][0], []).append(slot)
    frames = decode_selected(path, wanted, len(pick))
    if any(f is None for f in frames) and pts is not None:
        # the decoder gave fewer frames than the container has packets: count by decoding instead
        all_times = decoded_times(path)
        in_clip = [(i, t) for i, t in enumerate(all_times)
                   if (start is None or t >= start) and (end is None or t <= end)]
        if not in_clip:
            raise MediaError(f"no decodable frames in {path} (clip {start}-{end})")
        clip_times = [t for _, t in in_clip]
        pick = _even_picks(len(in_clip), num_frames, clip_times, fps)
        wanted = {}
        for slot, j in enumerate(pick):
            wanted.setdefault(in_clip[j][0], []).append(slot)
        frames = decode_selected(path, wanted, len(pick))
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


def _resampled(container, resampler, path: str) -> list:
    """Every frame of ``container``'s first audio stream through ``resampler`` (flushed at the end), as flat
    arrays; a decoding error is a :class:`MediaError` naming ``path``."""
    chunks = []
    try:
        for fr in container.decode(audio=0):
            for o in resampler.resample(fr):
                chunks.append(o.to_ndarray().reshape(-1))
        for o in resampler.resample(None):
            chunks.append(o.to_ndarray().reshape(-1))
    except Exception as e:
        raise MediaError(f"corrupt audio in {path}: {e}") from e
    return chunks


def load_audio(path: str, sr: int = SAMPLE_RATE, start: float | None = None, end: float | None = None,
               max_s: float | None = None, required: bool = True) -> np.ndarray | None:
    """fixed_frames: the first audio stream as mono float32 at ``sr`` Hz, downmixed and resampled by PyAV
    (its float mono layout: (L+R)/sqrt(2) for stereo). Returns None if absent and not required."""
    import av
    with open_container(path) as c:
        if not c.streams.audio:
            if required:
                raise MediaError(f"no audio stream in {path}")
            return None
        res = av.AudioResampler(format="flt", layout="mono", rate=sr)
        chunks = _resampled(c, res, path)
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
    with open_container(path) as c:
        if not c.streams.audio:
            if required:
                raise MediaError(f"no audio stream in {path}")
            return None
        st = c.streams.audio[0]
        layout = layout or st.layout.name
        rate = rate or st.rate
        res = av.AudioResampler(format="s16", layout=layout, rate=rate)
        chunks = _resampled(c, res, path)
        channels = len(av.AudioLayout(layout).channels)
        keep = None
        if trim_to_duration and st.duration is not None and st.time_base is not None:
            keep = int(round(float(st.duration * st.time_base) * rate)) * channels
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    if keep is not None:
        pcm = pcm[:keep]
    return pcm.astype(np.int16, copy=False), channels, rate


# ------------------------------------------------------------------------------------------- images
def open_image_checked(path: str, max_pixels: int | None):
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
    im = open_image_checked(path, max_pixels)
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


#: the official readers live in :mod:`avkv.models.media_official`; ``media_io.<name>`` still reaches them (imported
#: on first use, so the fixed_frames path does not load them)
_OFFICIAL = frozenset((
    "SPATIAL_MERGE_SIZE", "FRAME_FACTOR", "MAX_RATIO", "VIDEO_MAX_TOKEN_NUM", "OFFICIAL_DEFAULTS", "_round_by",
    "_ceil_by", "_floor_by", "smart_resize", "official_nframes", "official_frame_range", "official_video_max_pixels",
    "torch_bicubic_resize_uint8", "_video_stream_info", "official_video_frames", "official_image",
    "_resample_soxr_hq", "load_audio_librosa", "load_official"))


def __getattr__(name: str):
    if name in _OFFICIAL:
        from avkv.models import media_official
        return getattr(media_official, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""VideoLLaMA2 input processing without torchvision, torchaudio or decord.

* frame sampling exactly as the official ``mm_utils.frame_sample`` / ``process_video`` (uniform "v1" segment
  midpoints, black frames appended up to ``num_frames``, at most ``MAX_FRAMES``);
* SigLIP / CLIP image preprocessing as the hub processors of ``google/siglip-so400m-patch14-384`` (resize to a
  square, bicubic, no crop) and ``openai/clip-vit-large-patch14-336`` (shortest edge, bicubic, centre crop),
  done with PIL;
* the Kaldi-compatible 128-bin log-mel fbank BEATs consumes (``torchaudio.compliance.kaldi.fbank`` with the
  official arguments: 25 ms frames, 10 ms shift, povey window, pre-emphasis 0.97, DC removal, power spectrum,
  no dither, input scaled by 2**15), in torch;
* the audio path of the official code (``process_audio_file`` / ``process_audio_from_video``), in its order:
  an audio file is read by soundfile (float64, *first* channel), a 30 s window taken when longer (random in
  the official code; here seeded, ``audio_window_seed``), zero-padded to 30 s at its native rate and only then
  resampled to 16 kHz (librosa ``res_type="fft"``, i.e. scipy's Fourier resampling); a video's *whole* audio
  track (``ffmpeg -ac 1 -ar 16000``: channel mean, s16) is read as 8 evenly spaced 2 s clips (pytorchvideo
  ``ConstantClipsPerVideoSampler`` on the float duration), concatenated and zero-padded to 30 s;
* the chat templates (Qwen2 for VideoLLaMA2.1, Mistral for VideoLLaMA2) and the multimodal tokenisation
  (``<video>`` / ``<audio>`` / ``<image>`` text tags split out and replaced by the negative ids -201 / -202 / -200).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

# ------------------------------------------------------------------------------------ official constants
IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX, AUDIO_TOKEN_INDEX = -200, -201, -202
MODAL_INDEX_MAP = {"<image>": IMAGE_TOKEN_INDEX, "<video>": VIDEO_TOKEN_INDEX, "<audio>": AUDIO_TOKEN_INDEX}
NUM_FRAMES, MAX_FRAMES, NUM_FRAMES_PER_SECOND = 8, 32, 1
AUDIO_SR = 16000
AUDIO_PAD_S = 30                       # every BEATs input is cut / zero-padded to 30 s
VIDEO_AUDIO_CLIPS, VIDEO_AUDIO_CLIP_S = 8, 2

#: the system message ``mm_infer`` prepends for Mistral/Mixtral models (Qwen2 models get none: the Qwen2 template
#: then inserts its own default system turn)
MISTRAL_SYSTEM_MESSAGE = (
    "<<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
    "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
    "\n<</SYS>>")

#: chat templates (``avkv/models/templates``): ``videollama2_qwen2.jinja`` is Qwen2-7B-Instruct's (VideoLLaMA2.1 ships
#: the Qwen2 tokenizer); ``videollama2_mistral.jinja`` is the Mistral-Instruct [INST] format with the optional system
#: turn put in front of the first user message, which reproduces the ``[INST] <<SYS>>…<</SYS>>\n\n<video>\n…
#: [/INST]`` prompt of the official llama2-style conversation. A checkpoint's own template is used when it ships one.
TEMPLATE_NAMES = {"qwen2": "videollama2_qwen2", "mistral": "videollama2_mistral"}


def chat_template(llm: str) -> str:
    from avkv.models.tiny import chat_template as _read
    return _read(TEMPLATE_NAMES[llm])


# ------------------------------------------------------------------------------------------- frames
def frame_sample(duration: int, mode: str = "uniform", num_frames: int | None = None,
                 fps: float | None = None) -> np.ndarray:
    """Official ``frame_sample``: indices into ``duration`` frames.

    ``uniform`` takes the midpoint of each of ``num_frames`` equal segments of ``[0, duration - 1]`` (rounded,
    +1e-6); ``fps`` takes one frame per second (segment length ``fps // 1``), starting half a segment in.
    """
    if mode == "uniform":
        if num_frames is None:
            raise ValueError("uniform sampling needs num_frames")
        seg = float(duration - 1) / num_frames
        mids = [(seg * i + seg * (i + 1)) / 2 for i in range(num_frames)]
        return np.round(np.array(mids) + 1e-6).astype(int)
    if mode == "fps":
        if fps is None:
            raise ValueError("fps sampling needs fps")
        segment_len = min(int(fps // NUM_FRAMES_PER_SECOND), duration)
        return np.arange(segment_len // 2, duration, segment_len, dtype=int)
    raise ValueError(f"unsupported frame sampling mode {mode!r}")


def video_frame_indices(num_video_frames: int, video_fps: float, num_frames: int | None,
                        start: float | None = None, end: float | None = None) -> list[int]:
    """Frame indices ``process_video`` reads: the clip range from ``start``/``end`` seconds, then sampling."""
    s, e = start, end
    if s is not None and e is not None:
        s, e = max(s, 0.0), max(e, 0.0)
        if s > e:
            s, e = e, s
        elif s == e:
            e = s + 1
    f_start = 0 if s is None else max(int(s * video_fps) - 1, 0)
    f_end = num_video_frames - 1 if e is None else min(int(e * video_fps) - 1, num_video_frames - 1)
    idx = list(range(f_start, f_end + 1))
    if num_frames is None:
        picks = frame_sample(len(idx), mode="fps", fps=video_fps)
    else:
        picks = frame_sample(len(idx), mode="uniform", num_frames=num_frames)
    return [idx[i] for i in picks]


def finalize_frames(frames: np.ndarray, num_frames: int | None) -> np.ndarray:
    """Append black frames up to ``num_frames`` and keep at most ``MAX_FRAMES`` (official order of the two)."""
    frames = np.asarray(frames)
    if num_frames is not None and len(frames) < num_frames:
        pad = np.zeros((num_frames - len(frames), *frames.shape[1:]), dtype=np.uint8)
        frames = np.concatenate([frames, pad]) if len(frames) else pad
    return frames[:MAX_FRAMES]


# --------------------------------------------------------------------------------------- image processor
@dataclass
class ImageProcessor:
    """SigLIP (``resize`` to size×size) or CLIP (``shortest_edge`` resize + centre crop) preprocessing."""

    kind: str                      # "siglip" | "clip"
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def for_tower(cls, kind: str, image_size: int) -> "ImageProcessor":
        if kind == "siglip":
            return cls("siglip", image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        if kind == "clip":
            return cls("clip", image_size, (0.48145466, 0.4578275, 0.40821073),
                       (0.26862954, 0.26130258, 0.27577711))
        raise ValueError(f"unknown vision tower kind {kind!r}")

    def _resize_crop(self, img):
        from PIL import Image
        if self.kind == "siglip":
            return img.resize((self.size, self.size), Image.BICUBIC)
        w, h = img.size                                   # CLIP: shortest edge → size, keep aspect, centre crop
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        nw, nh = (self.size, new_long) if w <= h else (new_long, self.size)
        img = img.resize((nw, nh), Image.BICUBIC)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] → float32 pixel values [T, 3, size, size]."""
        from PIL import Image
        out = []
        for f in np.asarray(frames):
            img = self._resize_crop(Image.fromarray(f).convert("RGB"))
            out.append(np.asarray(img, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


# ------------------------------------------------------------------------------------------ audio
def _mel(f: torch.Tensor | float):
    return 1127.0 * (torch.log1p(f / 700.0) if isinstance(f, torch.Tensor) else math.log1p(f / 700.0))


def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi triangular mel filters on the mel scale, ``[num_bins, padded_window // 2 + 1]`` (Nyquist column 0)."""
    n_fft_bins = padded_window // 2
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    fft_bin_width = sample_rate / padded_window
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(fft_bin_width * torch.arange(n_fft_bins, dtype=torch.float64))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1))


def num_kaldi_frames(num_samples: int, sample_rate: int = AUDIO_SR, frame_length_ms: float = 25.0,
                     frame_shift_ms: float = 10.0) -> int:
    """Kaldi frame count with ``snip_edges=True``: ``1 + (N - window) // shift`` (0 when N < window)."""
    win = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    return 0 if num_samples < win else 1 + (num_samples - win) // shift


def kaldi_fbank(waveform: torch.Tensor | np.ndarray, sample_rate: int = AUDIO_SR, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                low_freq: float = 20.0, high_freq: float = 0.0, out_dtype=torch.float32) -> torch.Tensor:
    """``torchaudio.compliance.kaldi.fbank`` with its defaults (povey window, DC removal, power spectrum, log,
    ``snip_edges``, no dither, no energy, no mean subtraction) → float32 ``[frames, num_mel_bins]``.

    ``waveform`` is 1-D and already on the scale the caller wants (VideoLLaMA2 passes samples × 2**15)."""
    x = torch.as_tensor(np.asarray(waveform), dtype=torch.float64).reshape(-1)
    win = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    padded = 1 << (win - 1).bit_length()                  # round_to_power_of_two
    m = num_kaldi_frames(x.numel(), sample_rate, frame_length_ms, frame_shift_ms)
    if m == 0:
        return torch.zeros(0, num_mel_bins, dtype=out_dtype)
    frames = x.as_strided((m, win), (shift, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)                   # remove_dc_offset
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)              # replicate-pad by one sample
    frames = frames - preemphasis * prev
    window = torch.hann_window(win, periodic=False, dtype=torch.float64).pow(0.85)   # povey
    frames = torch.nn.functional.pad(frames * window, (0, padded - win))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    mel = power @ kaldi_mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq).T
    eps = torch.finfo(torch.float32).eps
    return torch.clamp(mel, min=eps).log().to(out_dtype)


def audio_window_start(n: int, seconds: int, sr: int, seed: int | None) -> int:
    """Start of the ``seconds`` window the official code cuts from ``n`` samples: ``random.randint(0, n -
    seconds * sr)`` (Python's ``random``; seeded here so runs repeat; ``seed=None``: the first window)."""
    import random
    max_start = n - seconds * sr
    if max_start <= 0:
        return 0
    return 0 if seed is None else random.Random(seed).randint(0, max_start)


def pad_or_cut(wav: np.ndarray, seconds: int = AUDIO_PAD_S, sr: int = AUDIO_SR, start: int = 0) -> np.ndarray:
    """Official length policy: a window of ``seconds`` from sample ``start`` when longer, zero-padding when
    shorter (the dtype is kept: float64 for audio files as soundfile reads them)."""
    n = seconds * sr
    wav = np.asarray(wav).reshape(-1)
    if len(wav) > n:
        return wav[start:start + n]
    return np.pad(wav, (0, n - len(wav))) if len(wav) < n else wav


def fourier_resample(x: np.ndarray, num: int) -> np.ndarray:
    """``scipy.signal.resample(x, num)`` for a real 1-D signal (what librosa's ``res_type="fft"`` calls): keep
    the first ``min(n, num) // 2 + 1`` rFFT bins, double / halve the unpaired Nyquist bin, inverse rFFT at
    ``num`` points scaled by ``num / n``."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    m = min(num, n)
    X = np.fft.rfft(x)[: m // 2 + 1]
    if m % 2 == 0 and num != n:
        X[m // 2] *= 2 if num < n else 0.5
    return np.fft.irfft(X / (n / num), n=num)


def resample_fft(wav: np.ndarray, sr: int, target: int = AUDIO_SR) -> np.ndarray:
    """``librosa.resample(wav, orig_sr=sr, target_sr=target, res_type="fft")``: ``ceil(n * target / sr)``
    samples by Fourier resampling, same dtype."""
    if sr == target:
        return wav
    num = int(np.ceil(wav.shape[-1] * float(target) / sr))
    return np.asarray(fourier_resample(wav, num), dtype=wav.dtype)


def official_clip_bounds(n: int, sr: int = AUDIO_SR, clips: int = VIDEO_AUDIO_CLIPS,
                         clip_s: int = VIDEO_AUDIO_CLIP_S) -> list[tuple[int, int]]:
    """Sample ranges of the clips ``process_audio_from_video`` takes: pytorchvideo's
    ``ConstantClipsPerVideoSampler`` on the *float* duration ``n / sr`` (its start step is the exact binary
    value of ``max(n / sr - clip_s, 0)`` divided by ``clips``), each bound ``int(t * sr)``."""
    max_start = Fraction(max(n / sr - Fraction(clip_s), 0))
    step = Fraction(max_start, clips)
    out = []
    for i in range(clips):
        t0 = step * i
        out.append((int(t0 * sr), int((t0 + clip_s) * sr)))
        if i + 1 < clips and step * (i + 1) > max_start:
            break
    return out


def video_audio_clips(wav: np.ndarray, sr: int = AUDIO_SR, clips: int = VIDEO_AUDIO_CLIPS,
                      clip_s: int = VIDEO_AUDIO_CLIP_S) -> np.ndarray:
    """The official clip concatenation (:func:`official_clip_bounds`). A track shorter than ``clip_s`` is taken
    whole, ``clips`` times."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    out = [wav[a:b] for a, b in official_clip_bounds(len(wav), sr, clips, clip_s)]
    return np.concatenate(out) if out else wav[:0]


def fbank_features(wav: np.ndarray) -> torch.Tensor:
    """The 30 s BEATs input (16 kHz) → fbank ``[2998, 128]``, rounded through bfloat16 as the official
    processors do (computed in float64, the precision of the official audio-file path)."""
    return kaldi_fbank(np.asarray(wav, dtype=np.float64) * 2 ** 15, out_dtype=torch.float64).to(
        torch.bfloat16).to(torch.float32)


def audio_features(wav: np.ndarray | None, from_video: bool, window_seed: int | None = 0) -> torch.Tensor:
    """16 kHz mono waveform → the fbank VideoLLaMA2 feeds BEATs, ``[2998, 128]``.

    ``from_video``: the official video-track policy (8 clips of 2 s, padded to 30 s); a video without an audio
    track gets 30 s of silence, as the official loader does when ffmpeg fails. Otherwise the waveform is
    windowed / padded to 30 s (for audio files at another rate use :func:`audio_file_waveform`, which pads
    before resampling as the official code does)."""
    if wav is None:
        wav = np.zeros(AUDIO_PAD_S * AUDIO_SR, dtype=np.float32)
    if from_video:
        wav = video_audio_clips(wav)
    wav = pad_or_cut(wav, start=audio_window_start(len(wav), AUDIO_PAD_S, AUDIO_SR, window_seed))
    return fbank_features(wav)


# ------------------------------------------------------------------------------------ tokenisation
_TAG_RE = re.compile("|".join(map(re.escape, MODAL_INDEX_MAP)))


def tokenize_multimodal(prompt: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Official ``tokenizer_multimodal_token`` generalised to every tag: split ``prompt`` on the ``<image>`` /
    ``<video>`` / ``<audio>`` tags, tokenise the text chunks without special tokens and put the tag's negative
    id between them. Returns the ids and the character span ``(start, end)`` in ``prompt`` of each id."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in [*_TAG_RE.finditer(prompt), None]:
        end = m.start() if m is not None else len(prompt)
        if end > pos:
            enc = tokenizer(prompt[pos:end], add_special_tokens=False, return_offsets_mapping=True)
            ids.extend(enc["input_ids"])
            spans.extend((pos + a, pos + b) for a, b in enc["offset_mapping"])
        if m is not None:
            ids.append(MODAL_INDEX_MAP[m.group(0)])
            spans.append((m.start(), m.end()))
            pos = m.end()
    return ids, spans


def first_token_at(spans: list[tuple[int, int]], char_pos: int) -> int:
    """Index of the first token whose text ends after ``char_pos`` (len(spans) when none does)."""
    for i, (_, e) in enumerate(spans):
        if e > char_pos:
            return i
    return len(spans)


# ---------------------------------------------------------------------------------------- file readers
def read_video_frames(path: str, num_frames: int | None, start: float | None = None,
                      end: float | None = None, notes: list[str] | None = None) -> np.ndarray:
    """The frames ``process_video`` reads from a video file (decord in the official code, PyAV here): the clip
    range and sampling of :func:`video_frame_indices`, then :func:`finalize_frames`. uint8 [T, H, W, 3].

    Only the sampled frames are kept in memory (``media_io.load_video_frames`` samples differently: evenly spread
    decoded frames, which is not the official index rule)."""
    from avkv.models.media_io import MediaError, _open
    try:
        with _open(path) as c:
            if not c.streams.video:
                raise MediaError(f"no video stream in {path}")
            st = c.streams.video[0]
            fps = float(st.average_rate or st.guessed_rate or 0) or 25.0
            total = st.frames or sum(1 for _ in c.decode(video=0))
        idx = video_frame_indices(total, fps, num_frames, start, end)
        slots: dict[int, list[int]] = {}
        for slot, i in enumerate(idx):
            slots.setdefault(i, []).append(slot)
        out: list[np.ndarray | None] = [None] * len(idx)
        with _open(path) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i in slots:
                    arr = frame.to_ndarray(format="rgb24")
                    for slot in slots[i]:
                        out[slot] = arr
                if i >= max(slots, default=-1):
                    break
    except MediaError:
        raise
    except Exception as e:                  # av raises many error types
        raise MediaError(f"corrupt video {path}: {e}") from e
    frames = [f for f in out if f is not None]      # a container may announce more frames than it decodes
    if not frames:
        raise MediaError(f"no decodable frames in {path} (clip {start}-{end})")
    if notes is not None and len(frames) < len(idx):
        notes.append(f"{Path(path).name}: {len(idx) - len(frames)} of {len(idx)} sampled frames not decodable; "
                     f"black frames appended as the official loader does")
    if notes is not None and len(frames) > MAX_FRAMES:
        notes.append(f"{Path(path).name}: {len(frames)} frames cut to MAX_FRAMES={MAX_FRAMES}")
    return finalize_frames(np.stack(frames), num_frames)


def read_video_audio(path: str, start: float | None = None, end: float | None = None,
                     clip: bool = False) -> np.ndarray | None:
    """A video's audio track as ``load_audio_from_video`` reads it (``ffmpeg -ac 1 -ar 16000 -f s16le``): the
    channel mean (libswresample's s16 downmix), 16 kHz, int16 / 32768 as float32; None when there is none.
    The official code always takes the *whole* track; ``clip=True`` (config ``video_audio: clip``) cuts it to
    [start, end] instead."""
    from avkv.models.media_io import decode_audio_s16
    dec = decode_audio_s16(path, layout="mono", rate=AUDIO_SR, required=False)
    if dec is None:
        return None
    wav = dec[0].astype(np.float32) / 32768.0
    if clip:
        wav = wav[int((start or 0.0) * AUDIO_SR): None if end is None else int(end * AUDIO_SR)]
    return wav


def audio_file_waveform(path: str, start: float | None = None, end: float | None = None,
                        window_seed: int | None = 0, notes: list[str] | None = None) -> np.ndarray:
    """An audio file as ``process_audio_file`` prepares it, in its order: soundfile (float64), first channel,
    a 30 s window when longer (:func:`audio_window_start`), zero-padded to 30 s at the native rate, then
    resampled to 16 kHz by Fourier resampling. 480000 float64 samples. ``start``/``end`` (seconds, an avkv
    extension: the official function takes whole files) cut the file first. Files soundfile cannot open
    (m4a, mp3 …, which the official code cannot read) are decoded by ``media_io`` (channel mean, 16 kHz)."""
    from avkv.models.media_io import MediaError, load_audio_librosa
    import soundfile as sf
    try:
        wav, native = sf.read(str(path), always_2d=True)           # float64, as the official sf.read
    except sf.SoundFileRuntimeError:
        if not Path(path).exists():
            raise MediaError(f"media file not found: {path}")
        wav, native = load_audio_librosa(path, AUDIO_SR)[:, None].astype(np.float64), AUDIO_SR
    except Exception as e:
        raise MediaError(f"corrupt audio in {path}: {e}") from e
    wav = wav[int((start or 0.0) * native): None if end is None else int(end * native), 0]
    if len(wav) == 0:
        raise MediaError(f"no audio samples in {path} (clip {start}-{end})")
    first = audio_window_start(len(wav), AUDIO_PAD_S, native, window_seed)
    if notes is not None and len(wav) > AUDIO_PAD_S * native:
        notes.append(f"{Path(path).name}: {len(wav) / native:.1f}s of audio, the {AUDIO_PAD_S}s window from "
                     f"{first / native:.3f}s is used (seed {window_seed}; the official code draws it at random)")
    wav = pad_or_cut(wav, AUDIO_PAD_S, native, start=first)
    return resample_fft(wav, native, AUDIO_SR)


def read_image(path: str, max_pixels: int | None = None) -> np.ndarray:
    """uint8 [1, H, W, 3] (refused above ``max_pixels`` pixels, media_io's default when None)."""
    from avkv.models.media_io import DEFAULT_MAX_IMAGE_PIXELS, load_image
    return np.asarray(load_image(path, DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels))[None]

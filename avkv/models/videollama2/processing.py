"""VideoLLaMA2 input processing without torchvision, torchaudio or decord.

* frame sampling exactly as the official ``mm_utils.frame_sample`` / ``process_video`` (uniform "v1" segment
  midpoints, black frames appended up to ``num_frames``, at most ``MAX_FRAMES``);
* SigLIP / CLIP image preprocessing as the hub processors of ``google/siglip-so400m-patch14-384`` (resize to a
  square, bicubic, no crop) and ``openai/clip-vit-large-patch14-336`` (shortest edge, bicubic, centre crop),
  done with PIL;
* (:mod:`.audio`, re-exported here) the Kaldi-compatible 128-bin log-mel fbank BEATs consumes (``torchaudio.compliance.kaldi.fbank`` with the
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

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avkv.models.videollama2.audio import (AUDIO_PAD_S, AUDIO_SR, VIDEO_AUDIO_CLIP_S,  # noqa: F401 - re-exported
                                           VIDEO_AUDIO_CLIPS, audio_features, audio_window_start, fbank_features,
                                           fourier_resample, kaldi_fbank, kaldi_mel_banks, num_kaldi_frames,
                                           official_clip_bounds, pad_or_cut, resample_fft, video_audio_clips)

# ------------------------------------------------------------------------------------ official constants
IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX, AUDIO_TOKEN_INDEX = -200, -201, -202
MODAL_INDEX_MAP = {"<image>": IMAGE_TOKEN_INDEX, "<video>": VIDEO_TOKEN_INDEX, "<audio>": AUDIO_TOKEN_INDEX}
NUM_FRAMES, MAX_FRAMES, NUM_FRAMES_PER_SECOND = 8, 32, 1
# AUDIO_SR, AUDIO_PAD_S, VIDEO_AUDIO_CLIPS, VIDEO_AUDIO_CLIP_S: the audio path's, from .audio (imported above)

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
    from avkv.models.media_io import MediaError, open_container
    try:
        with open_container(path) as c:
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
        with open_container(path) as c:
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

"""VideoLLaMA2's audio inputs without torchaudio: the Kaldi-compatible 128-bin log-mel fbank BEATs consumes
(``torchaudio.compliance.kaldi.fbank`` with the official arguments), the 30 s window / padding, librosa's
Fourier resampling, and a video track's 8 evenly spaced 2 s clips (see :mod:`.processing`, which re-exports every
name here).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

AUDIO_SR = 16000
AUDIO_PAD_S = 30                       # every BEATs input is cut / zero-padded to 30 s
VIDEO_AUDIO_CLIPS, VIDEO_AUDIO_CLIP_S = 8, 2


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

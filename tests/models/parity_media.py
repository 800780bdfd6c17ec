"""Fixture media for the input-parity tests, generated (deterministically) with PyAV, soundfile and Pillow.

Mono and stereo tracks at 16 kHz and 44.1 kHz, WAV / FLAC / AAC-in-m4a audio, short and long H.264 videos with
audio, an odd-sized 4:4:4 video, a tall one, and odd-sized RGB / RGBA / tiny / large images.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

VERSION = 2          # bump to regenerate


def _tone(n: int, sr: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    chans = [0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t + c) + 0.05 * rng.standard_normal(n)
             for c in range(channels)]
    if channels == 2:
        chans[1] = chans[1] * 0.5          # unequal channels: a downmix rule shows
    return np.stack(chans, 1).astype(np.float32)          # [n, ch]


def _write_video(path: Path, w: int, h: int, n: int, fps: int, audio_sr: int | None = None, channels: int = 1,
                 pix_fmt: str = "yuv420p", seed: int = 0) -> None:
    import av
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, pix_fmt
        vs.options = {"preset": "ultrafast", "threads": "1", "bf": "2"}
        a = None
        if audio_sr:
            a = c.add_stream("aac", rate=audio_sr)
            a.layout = "stereo" if channels == 2 else "mono"
        base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n):
            img = base.copy()
            img[..., 0] = ((xx * 3 + yy + i * 9) % 256).astype(np.uint8)
            img[(yy // 8 + i) % 5 == 0, 1] = 255
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if a is not None:
            sig = _tone(int(n / fps * audio_sr), audio_sr, channels, seed).T.copy()
            for i in range(0, sig.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(sig[:, i:i + 1024]), format="fltp",
                                                layout=a.layout.name)
                fr.sample_rate, fr.pts, fr.time_base = audio_sr, i, Fraction(1, audio_sr)
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)


def _write_m4a(path: Path, seconds: float, sr: int, channels: int, seed: int) -> None:
    import av
    sig = _tone(int(seconds * sr), sr, channels, seed).T.copy()
    with av.open(str(path), "w", format="mp4") as c:
        a = c.add_stream("aac", rate=sr)
        a.layout = "stereo" if channels == 2 else "mono"
        for i in range(0, sig.shape[1], 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(sig[:, i:i + 1024]), format="fltp",
                                            layout=a.layout.name)
            fr.sample_rate, fr.pts, fr.time_base = sr, i, Fraction(1, sr)
            for p in a.encode(fr):
                c.mux(p)
        for p in a.encode():
            c.mux(p)


def build(root: Path) -> dict[str, Path]:
    """Write the fixtures under ``root`` once (a stamp file marks completion); returns name → path."""
    import soundfile as sf
    from PIL import Image
    root = Path(root)
    names = {
        "short_stereo44k": "short_stereo44k.mp4", "long_mono16k": "long_mono16k.mp4",
        "odd444": "odd444.mp4", "tall": "tall.mp4",
        "wav_mono16k": "mono16k.wav", "wav_stereo44k": "stereo44k.wav", "flac_stereo16k": "stereo16k.flac",
        "m4a_stereo44k": "stereo44k.m4a", "m4a_mono16k": "mono16k.m4a",
        "wav_mono44k_long": "mono44k_long.wav", "wav_stereo16k_long": "stereo16k_long.wav",
        "av_short_track": "short_track.mp4",
        "img_odd": "odd.png", "img_rgba": "rgba.png", "img_tiny": "tiny.jpg", "img_large": "large.jpg",
    }
    paths = {k: root / v for k, v in names.items()}
    stamp = root / f".built-v{VERSION}"
    if stamp.exists():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    _write_video(paths["short_stereo44k"], 170, 98, 60, 25, 44100, 2, seed=1)          # 2.4 s
    _write_video(paths["long_mono16k"], 96, 64, 350, 5, 16000, 1, seed=2)              # 70 s
    _write_video(paths["odd444"], 171, 97, 36, 12, None, pix_fmt="yuv444p", seed=3)    # 3 s, odd size
    _write_video(paths["tall"], 40, 360, 30, 10, 44100, 1, seed=4)                     # 3 s, 1:9
    _write_video(paths["av_short_track"], 64, 48, 15, 10, 16000, 2, seed=11)           # 1.5 s < one 2 s clip
    sf.write(str(paths["wav_mono44k_long"]), _tone(40 * 44100, 44100, 1, 12)[:, 0], 44100, subtype="PCM_16")
    sf.write(str(paths["wav_stereo16k_long"]), _tone(35 * 16000, 16000, 2, 13), 16000, subtype="PCM_16")
    sf.write(str(paths["wav_mono16k"]), _tone(48000, 16000, 1, 5)[:, 0], 16000, subtype="PCM_16")
    sf.write(str(paths["wav_stereo44k"]), _tone(198450, 44100, 2, 6), 44100, subtype="PCM_16")     # 4.5 s
    sf.write(str(paths["flac_stereo16k"]), _tone(40000, 16000, 2, 7), 16000, subtype="PCM_16")
    _write_m4a(paths["m4a_stereo44k"], 3.3, 44100, 2, 8)
    _write_m4a(paths["m4a_mono16k"], 2.2, 16000, 1, 9)
    rng = np.random.default_rng(10)
    Image.fromarray(rng.integers(0, 256, (97, 171, 3), dtype=np.uint8)).save(paths["img_odd"])
    rgba = rng.integers(0, 256, (517, 33, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(33)[None] % 3 == 0, 0, rgba[..., 3])
    Image.fromarray(rgba, "RGBA").save(paths["img_rgba"])
    Image.fromarray(rng.integers(0, 256, (20, 23, 3), dtype=np.uint8)).save(paths["img_tiny"], quality=90)
    yy, xx = np.mgrid[0:1333, 0:1999]
    big = np.stack([(xx % 256), (yy % 256), ((xx + yy) % 256)], -1).astype(np.uint8)
    Image.fromarray(big).save(paths["img_large"], quality=90)
    stamp.write_text("ok\n")
    return paths

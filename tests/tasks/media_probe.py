"""Decode fixture media and read their content back from the signals (a 'probe oracle' for tests)."""
from __future__ import annotations

import numpy as np

from avkv.tasks.fixtures.media import COLOURS


def decode_video(path) -> tuple[np.ndarray, np.ndarray, int]:
    import av
    frames, chunks, sr = [], [], 16000
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
    with av.open(str(path)) as c:
        if c.streams.audio:
            sr = c.streams.audio[0].rate
            for f in c.decode(audio=0):
                chunks.append(f.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return np.stack(frames), audio, sr


def square_track(frames: np.ndarray) -> list[tuple[str, float, float]]:
    """Per frame: (nearest colour name, centroid x, centroid y) of the non-grey pixels."""
    out = []
    for f in frames.astype(np.int16):
        mask = np.abs(f - 128).sum(-1) > 90
        ys, xs = np.nonzero(mask)
        mean = f[mask].mean(0)
        name = min(COLOURS, key=lambda k: np.sum((np.array(COLOURS[k]) - mean) ** 2))
        out.append((name, xs.mean(), ys.mean()))
    return out


def beep_events(audio: np.ndarray, sr: int) -> list[tuple[float, float]]:
    """(onset seconds, peak frequency Hz) for each beep, from a 10 ms energy envelope."""
    hop = sr // 100
    n = len(audio) // hop
    env = np.array([np.sqrt(np.mean(audio[i * hop:(i + 1) * hop] ** 2)) for i in range(n)])
    on = env > 0.1
    events, i = [], 0
    while i < n:
        if on[i]:
            j = i
            while j < n and on[j]:
                j += 1
            seg = audio[i * hop:j * hop]
            spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
            events.append((i * hop / sr, float(np.fft.rfftfreq(len(seg), 1 / sr)[spec.argmax()])))
            i = j
        else:
            i += 1
    return events

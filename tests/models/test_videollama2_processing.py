"""VideoLLaMA2 processing and connector checks against the official formulas (no checkpoint needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avkv.models.videollama2 import processing as P
from avkv.models.videollama2.projector import STCConnector


# ------------------------------------------------------------------------------------------- STC shapes
def conv3d_out(n: int, pad: int, k: int = 2, s: int = 2) -> int:
    """torch.nn.Conv3d output size (the formula the official STC connector's sampler obeys)."""
    return math.floor((n + 2 * pad - k) / s) + 1


@pytest.mark.parametrize("frames", [8, 16])
@pytest.mark.parametrize("variant,pad", [("stc_connector", 1), ("stc_connector_v35", 0)])
@pytest.mark.parametrize("side", [24, 27])          # CLIP-L/14-336 → 24×24 patches, SigLIP-so400m/14-384 → 27×27
def test_stc_token_count_matches_official_formula(frames, variant, pad, side):
    torch.manual_seed(0)
    conn = STCConnector(encoder_hidden_size=6, hidden_size=8, padding=pad).eval()
    x = torch.randn(1, frames, side * side, 6)                  # [b, t, h*w, d] as the vision tower gives it
    with torch.no_grad():
        y = conn(x)
    t, h = conv3d_out(frames, pad), conv3d_out(side, pad)
    assert y.shape == (1, t * h * h, 8)
    assert conn.output_grid(frames, side, side) == (t, h, h)
    per_frame_group = h * h
    assert y.shape[1] // t == per_frame_group


def test_stc_known_token_counts():
    """The numbers the released models see: VideoLLaMA2-7B (CLIP 24², v1, 8 frames) and 2.1 (SigLIP 27², v35, 16)."""
    assert STCConnector(4, 4, padding=1).output_grid(8, 24, 24) == (5, 13, 13)       # 845 tokens
    assert STCConnector(4, 4, padding=1).output_grid(16, 24, 24) == (9, 13, 13)      # 1521 tokens
    assert STCConnector(4, 4, padding=0).output_grid(16, 27, 27) == (8, 13, 13)      # 1352 tokens
    assert STCConnector(4, 4, padding=0).output_grid(8, 27, 27) == (4, 13, 13)       # 676 tokens


def test_stc_accepts_5d_input_and_keeps_temporal_order():
    torch.manual_seed(0)
    conn = STCConnector(4, 8, padding=0).eval()
    x = torch.randn(1, 4, 6, 6, 4)
    with torch.no_grad():
        y5 = conn(x)
        y4 = conn(x.reshape(1, 4, 36, 4))
    assert torch.allclose(y5, y4)
    # changing only the last two frames changes only the second temporal group of output tokens (t h w order)
    x2 = x.clone()
    x2[:, 2:] += 1.0
    with torch.no_grad():
        y2 = conn(x2)
    assert torch.allclose(y2[:, :9], y5[:, :9]) and not torch.allclose(y2[:, 9:], y5[:, 9:])


# ------------------------------------------------------------------------------------------- fbank
def _tone(freq: float, seconds: float = 1.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("n", [399, 400, 401, 559, 560, 16000, 480000])
def test_fbank_frame_count_follows_kaldi_snip_edges(n):
    expected = 0 if n < 400 else 1 + (n - 400) // 160          # 25 ms window, 10 ms shift at 16 kHz
    assert P.num_kaldi_frames(n) == expected
    assert P.kaldi_fbank(np.zeros(n, np.float32) + 0.1).shape == (expected, 128)


def test_fbank_30s_input_gives_the_beats_grid():
    fb = P.audio_features(np.zeros(5 * 16000, np.float32), from_video=False)
    assert fb.shape == (2998, 128)                                 # 1 + (480000 - 400) // 160
    assert (2998 // 16) * (128 // 16) == 1496                      # BEATs patches → audio tokens


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0, 6000.0])
def test_fbank_pure_tone_lands_in_its_mel_bin(freq):
    fb = P.kaldi_fbank(_tone(freq) * 2 ** 15)
    mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)
    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / (128 + 1)
    centers = np.array([lo + (b + 1) * delta for b in range(128)])
    expected = int(np.argmin(np.abs(centers - mel(freq))))
    peak = fb.mean(0).argmax().item()
    assert abs(peak - expected) <= 1, (peak, expected)
    # the tone's energy dominates: far bins are much lower than the peak
    profile = fb.mean(0)
    far = torch.cat([profile[: max(expected - 10, 0)], profile[expected + 10:]])
    assert profile[peak] - far.max() > 5.0


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_fbank_matches_transformers_numpy_kaldi_emulation():
    """Reference: transformers.audio_utils configured as its AST extractor emulates torchaudio's Kaldi fbank
    (povey window here, as torchaudio's default)."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16000 * 2) + _tone(440.0, 2.0)).astype(np.float32) * 2 ** 15
    mel = mel_filter_bank(num_frequency_bins=257, num_mel_filters=128, min_frequency=20, max_frequency=8000,
                          sampling_rate=16000, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
    ref = spectrogram(wav.astype(np.float64), window_function(400, "povey", periodic=False), frame_length=400,
                      hop_length=160, fft_length=512, power=2.0, center=False, preemphasis=0.97, mel_filters=mel,
                      log_mel="log", mel_floor=1.192092955078125e-07, remove_dc_offset=True).T
    ours = P.kaldi_fbank(wav).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-4)


# -------------------------------------------------------------------------------------- audio clips
def test_video_audio_clip_policy_is_pytorchvideo_constant_clips():
    sr = 16000
    wav = np.arange(20 * sr, dtype=np.float32)                    # 20 s: clip i starts at i * 18 / 8 s
    out = P.video_audio_clips(wav)
    assert out.shape == (8 * 2 * sr,)
    for i in range(8):
        start = int(i * 18 / 8 * sr)
        assert out[i * 2 * sr] == start
    short = np.ones(sr, np.float32)                               # 1 s < clip length: the whole track 8 times
    assert P.video_audio_clips(short).shape == (8 * sr,)
    assert P.pad_or_cut(np.ones(40 * sr, np.float32)).shape == (30 * sr,)
    assert P.pad_or_cut(np.ones(3 * sr, np.float32))[3 * sr:].sum() == 0


# ----------------------------------------------------------------------------------------- frames
def test_uniform_frame_sampling_is_official_v1():
    # duration 100, 8 frames: segment 99/8, midpoints (2i+1)*99/16 rounded
    assert P.frame_sample(100, num_frames=8).tolist() == [6, 19, 31, 43, 56, 68, 80, 93]
    assert P.frame_sample(16, num_frames=8).tolist() == [1, 3, 5, 7, 8, 10, 12, 14]
    assert P.frame_sample(75, mode="fps", fps=25).tolist() == [12, 37, 62]


def test_video_frame_indices_clip_range_and_padding():
    # 10 s at 10 fps, clip 2 s..4 s → frames 19..39
    idx = P.video_frame_indices(100, 10.0, 4, start=2.0, end=4.0)
    assert min(idx) >= 19 and max(idx) <= 39 and len(idx) == 4
    frames = P.finalize_frames(np.full((3, 4, 4, 3), 7, np.uint8), 8)
    assert frames.shape == (8, 4, 4, 3) and frames[3:].sum() == 0      # black frames appended
    assert P.finalize_frames(np.zeros((40, 2, 2, 3), np.uint8), None).shape[0] == P.MAX_FRAMES


# ----------------------------------------------------------------------------------- image processing
def test_siglip_and_clip_preprocessing_shapes_and_normalisation():
    img = np.zeros((1, 90, 160, 3), np.uint8)
    img[..., 0] = 255
    sig = P.ImageProcessor.for_tower("siglip", 56)(img)
    assert sig.shape == (1, 3, 56, 56)
    assert torch.allclose(sig[0, 0], torch.ones(56, 56)) and torch.allclose(sig[0, 1], -torch.ones(56, 56))
    clip = P.ImageProcessor.for_tower("clip", 56)(img)
    assert clip.shape == (1, 3, 56, 56)
    assert abs(clip[0, 0, 0, 0].item() - (1 - 0.48145466) / 0.26862954) < 1e-4


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_preprocessing_equals_transformers_pil_processors(kind):
    """Reference: transformers' PIL image processors (no torchvision) with the hub towers' settings (bicubic;
    SigLIP: square resize, mean/std 0.5; CLIP: shortest edge + centre crop, CLIP mean/std), scaled to 56 px."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
    proc = (SiglipImageProcessorPil(size={"height": 56, "width": 56}) if kind == "siglip" else
            CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (2, 70, 100, 3), dtype=np.uint8)
    ref = proc(images=[Image.fromarray(f) for f in img], return_tensors="pt")["pixel_values"]
    ours = P.ImageProcessor.for_tower(kind, 56)(img)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)


# ------------------------------------------------------------------------------------ tokenisation
class _WordTok:
    """Whitespace tokenizer with offsets (enough to test the multimodal splitter)."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        import re
        toks = [(m.start(), m.end()) for m in re.finditer(r"\S+|\s+", text)]
        out = {"input_ids": [len(text[a:b]) for a, b in toks]}
        if return_offsets_mapping:
            out["offset_mapping"] = toks
        return out


def test_multimodal_tags_become_negative_ids_in_order():
    ids, spans = P.tokenize_multimodal("ab <video>\ncd <audio> ef", _WordTok())
    assert [i for i in ids if i < 0] == [P.VIDEO_TOKEN_INDEX, P.AUDIO_TOKEN_INDEX]
    assert len(ids) == len(spans)
    v = ids.index(P.VIDEO_TOKEN_INDEX)
    assert spans[v] == (3, 10)
    assert spans[v + 1] == (10, 11)                      # the newline after the tag
    assert P.first_token_at(spans, 11) == v + 2          # "cd"

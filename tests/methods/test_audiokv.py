"""AudioKV: SSS on known signals, head budgets against the paper's formula, selection against a naive reference,
and the offline head scoring on synthetic attention."""
import json
import math

import numpy as np
import pytest
import torch

from avkv.methods.audiokv import (AudioKV, HeadHitCounter, align_words, head_budgets, kv_head_scores,
                                  proportional_word_times, spectral_smooth, step_word_index, word_audio_span)
from avkv.methods.base import AUDIO
from avkv.methods.testing import make_request, make_view, modality_ids, naive_attention

SPEC = [("text", 6), ("audio", 64), ("text", 14)]


def naive_sss(s, alpha, gamma):
    s = np.asarray(s, dtype=np.float64)
    n = len(s)
    m = s.mean()
    z = np.fft.rfft(s - m)
    e = np.abs(z) ** 2
    e[0] = 0
    tot = e.sum()
    c = np.cumsum(e)
    kc = next(k for k in range(1, len(z)) if c[k] >= gamma * tot)
    z[kc + 1:] = 0
    low = np.fft.irfft(z, n) + m
    return alpha * low + (1 - alpha) * s


def test_sss_attenuates_high_frequencies_of_a_known_signal():
    n = 128
    t = torch.arange(n, dtype=torch.float64)
    low = torch.sin(2 * math.pi * 2 * t / n)                  # bin 2
    high = 0.3 * torch.sin(2 * math.pi * 40 * t / n)          # bin 40
    s = 1.0 + low + high
    out = spectral_smooth(s, alpha=0.5, gamma=0.9)
    Z0, Z1 = torch.fft.rfft(s).abs(), torch.fft.rfft(out).abs()
    assert float(Z1[40]) == pytest.approx(0.5 * float(Z0[40]), rel=1e-6)   # high band: only (1−α) survives
    assert float(Z1[2]) == pytest.approx(float(Z0[2]), rel=1e-6)          # low band untouched
    assert float(out.mean()) == pytest.approx(float(s.mean()))            # DC kept
    full = spectral_smooth(s, alpha=1.0, gamma=0.9)
    assert float(torch.fft.rfft(full).abs()[40]) < 1e-9             # α = 1 removes it


def test_sss_matches_naive_numpy():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 50, generator=g, dtype=torch.float64)
    for alpha, gamma in [(0.5, 0.9), (0.3, 0.5), (1.0, 0.99)]:
        out = spectral_smooth(s, alpha, gamma)
        for r in range(3):
            np.testing.assert_allclose(out[r].numpy(), naive_sss(s[r].numpy(), alpha, gamma), atol=1e-10)


def test_head_budgets_follow_the_formula():
    g = torch.Generator().manual_seed(1)
    S = torch.rand(4, 3, generator=g, dtype=torch.float64)
    B, n, w, rf = 40, 200, 8, 0.5
    b = head_budgets(S, B, n, w, rf)
    r = rf * (B - w)
    real = w + r + 4 * 3 * (B - w - r) * S / S.sum()
    assert int(b.sum()) == 4 * 3 * B
    assert (b.double() - real).abs().max() < 1.0 + 1e-9
    assert (b >= w).all()
    # clipping at the prompt length: excess moves to the other heads, the total is kept
    S2 = torch.zeros(2, 2, dtype=torch.float64)
    S2[0, 0] = 1.0
    b2 = head_budgets(S2, 40, 60, 8, 0.5)
    assert int(b2.max()) == 60 and int(b2.sum()) == 160


def test_kv_head_scores_mean_over_groups():
    s = torch.tensor([[1.0, 3.0, 0.0, 2.0]])
    assert torch.equal(kv_head_scores(s, 2), torch.tensor([[2.0, 1.0]]))


def write_scores(path, scores, L=4, H=4, Hk=2):
    path.write_text(json.dumps({"scores": scores.tolist(), "num_layers": L, "num_heads": H, "num_kv_heads": Hk}))
    return str(path)


def naive_head_budgets(scores, B, w, r_frac, groups):
    """methods.md §5 by loops: KV-head scores = mean of their query heads; b = w + r + B_score·S/ΣS with
    r = r_frac·(B − w) and B_score = L·H_kv·(B − w − r); integers by largest remainder (no clipping needed here)."""
    L, H = len(scores), len(scores[0])
    kv = [[sum(scores[l][h * groups + g] for g in range(groups)) / groups for h in range(H // groups)] for l in range(L)]
    r = r_frac * (B - w)
    pool = L * len(kv[0]) * (B - w - r)
    tot = sum(sum(row) for row in kv)
    real = [[w + r + pool * x / tot for x in row] for row in kv]
    flat = [x for row in real for x in row]
    out = [math.floor(x) for x in flat]
    for i in sorted(range(len(flat)), key=lambda i: (-(flat[i] - out[i]), i))[: L * len(kv[0]) * B - sum(out)]:
        out[i] += 1
    return [out[l * len(kv[0]):(l + 1) * len(kv[0])] for l in range(L)]


def test_selection_matches_naive_reference(tmp_path):
    mod = modality_ids(SPEC)
    scores = torch.rand(4, 4, generator=torch.Generator().manual_seed(2))
    f = write_scores(tmp_path / "hs.json", scores)
    m = AudioKV(window=8, head_scores=f)
    state = {}
    budgets = naive_head_budgets(scores.tolist(), 30, 8, 0.5, 2)
    assert sum(map(sum, budgets)) == 4 * 2 * 30 and len({b for row in budgets for b in row}) > 1
    for layer in range(4):
        view = make_view(mod, 30, seed=layer, layer_idx=layer, state=state)
        sel = m.compress(view)
        A = naive_attention(view)[:, -8:].mean(1)                       # [H, S]
        s = A.view(2, 2, -1).mean(1)
        aud = (mod == AUDIO).nonzero().flatten()
        s[:, aud] = torch.tensor(np.stack([naive_sss(s[h, aud].numpy(), 0.5, 0.9) for h in range(2)]),
                                 dtype=s.dtype)
        for h in range(2):
            b = budgets[layer][h]
            rest = sorted(range(view.seq_len - 8), key=lambda j: -float(s[h, j]))[: b - 8]
            expect = sorted(rest + list(range(view.seq_len - 8, view.seq_len)))
            got = sel.indices[h][sel.valid[h]] if sel.valid is not None else sel.indices[h]
            assert got.tolist() == expect, (layer, h)
        assert sel.info["head_budgets"] == budgets[layer]


def test_head_score_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibrate_audiokv"):
        AudioKV(head_scores=str(tmp_path / "nope.json"))
    f = write_scores(tmp_path / "hs.json", torch.rand(3, 4), L=3)
    with pytest.raises(ValueError, match="L=3"):
        AudioKV(head_scores=f).compress(make_view(modality_ids(SPEC), 30))
    with pytest.raises(ValueError, match="model folder"):
        AudioKV().begin(make_request(30))
    d = tmp_path / "models" / "tiny_x"
    d.mkdir(parents=True)
    cache = tmp_path / "audiokv"
    with pytest.raises(FileNotFoundError, match="calibrate_audiokv"):
        AudioKV(head_scores_dir=str(cache)).begin(make_request(30, model_path=str(d)))
    write_scores(d / "audiokv_head_scores.json", torch.rand(4, 4))          # next to the checkpoint
    m = AudioKV(head_scores_dir=str(cache))
    m.begin(make_request(30, model_path=str(d)))
    assert m._scores_path == str(d / "audiokv_head_scores.json")
    assert m.compress(make_view(modality_ids(SPEC), 30)).indices.shape[0] == 2
    cache.mkdir()
    write_scores(cache / "tiny_x.json", torch.rand(4, 4))                    # the cache folder comes first
    m = AudioKV(head_scores_dir=str(cache))
    m.begin(make_request(30, model_path=str(d)))
    assert m._scores_path == str(cache / "tiny_x.json")


def test_uniform_allocation_needs_no_file():
    sel = AudioKV(window=8, allocation="uniform").compress(make_view(modality_ids(SPEC), 30))
    assert sel.indices.shape == (2, 30) and sel.valid is None


# ------------------------------------------------------------------ offline scoring on synthetic attention
def test_head_hit_counter_on_synthetic_attention():
    L, H, n_a = 2, 3, 50
    spans = [(5, 8), (20, 24), (40, 41)]
    c = HeadHitCounter(L, H, tolerance=1)
    g = torch.Generator().manual_seed(3)
    for lo, hi in spans:
        att = torch.rand(L, H, n_a, generator=g) * 0.1
        att[0, 0, (lo + hi) // 2] = 1.0          # head (0,0) always on the word
        att[1, 2, hi + 1] = 1.0                  # head (1,2) one token late: inside the tolerance
        att[0, 1, 0 if lo > 10 else 49] = 1.0    # head (0,1) always elsewhere
        att[1, 0, lo if lo == 20 else 30] = 1.0  # head (1,0) hits once
        c.add(att, (lo, hi))
    s = c.scores()
    assert s[0, 0] == 1.0 and s[1, 2] == 1.0 and s[0, 1] == 0.0
    assert s[1, 0] == pytest.approx(1 / 3)


def test_word_alignment_helpers():
    assert word_audio_span(0.10, 0.21, 0.04, 100) == (2, 6)
    assert word_audio_span(5.0, 9.0, 0.04, 100) == (99, 99)
    times = proportional_word_times(["a", "bbb"], 1.0, 3.0)
    assert times[0] == pytest.approx((1.0, 1.0 + 2 / 3)) and times[1][1] == pytest.approx(3.0)
    assert step_word_index(["The", "The c", "The cat", "The cat.", "The cat. A"]) == [0, 1, 1, -1, 2]
    assert align_words(["the", "kat", "sat", "down"], ["The", "cat", "sat", "down."]) == {0: 0, 2: 2, 3: 3}

"""AccKV against a naive reference (materialised attention) and its no-cross-modal-merge property."""
import torch
import torch.nn.functional as F

from avkv.methods.acckv import AccKV
from avkv.methods.base import AUDIO, TEXT, VIDEO
from avkv.methods.testing import make_view, modality_ids, naive_attention

SPEC = [("text", 5), ("video", 30), ("audio", 20), ("video", 10), ("audio", 10), ("text", 12)]


def naive_scores(view):
    A = naive_attention(view)                                   # [H, S, S]
    S = view.seq_len
    i = torch.arange(S, dtype=torch.float32)
    At = A * (i + 1)[None, :, None] / (S - i)[None, None, :]    # Ã[i, j] = A[i, j]·(i+1)/(n−j)
    mod = view.modality
    text, vid, aud = mod == TEXT, mod == VIDEO, mod == AUDIO
    sv = At[:, text][:, :, vid].mean().item()
    sa = At[:, text][:, :, aud].mean().item()
    return At.sum(1), sv, sa


def test_statistics_match_naive_and_are_chunk_invariant():
    view = make_view(modality_ids(SPEC), n_keep=30, seed=1)
    cols, sv, sa = naive_scores(view)
    for chunk in (512, 7):
        c, v_, a_ = AccKV(chunk=chunk).layer_statistics(view)
        torch.testing.assert_close(c, cols, rtol=1e-4, atol=1e-5)
        assert abs(v_ - sv) < 1e-6 and abs(a_ - sa) < 1e-6


def test_selection_matches_naive_reference():
    view = make_view(modality_ids(SPEC), n_keep=45, seed=2)
    w = 8
    sel = AccKV(window=w, merge=False, calibration=False).compress(view)
    cols, sv, sa = naive_scores(view)
    wv, wa = sv / (sv + sa), sa / (sv + sa)
    mod = view.modality
    s = cols.mean(0)
    s = torch.where(mod == VIDEO, s * wv, torch.where(mod == AUDIO, s * wa, s))
    protected = (mod == TEXT) | (torch.arange(view.seq_len) >= view.seq_len - w)
    rest = view.n_keep - int(protected.sum())
    cand = (~protected).nonzero().flatten()
    chosen = cand[s[cand].topk(rest).indices]
    expect = torch.cat([protected.nonzero().flatten(), chosen]).sort().values
    assert torch.equal(sel.indices, expect.expand(view.num_kv_heads, -1))
    assert sel.info["high_priority"] == ("video" if wv >= wa else "audio")
    assert sel.info["kept_text"] == int((mod == TEXT).sum()) * view.num_kv_heads
    kept = mod[sel.indices[0]]
    assert sel.info["kept_audio"] == int((kept == AUDIO).sum()) * view.num_kv_heads
    assert sel.info["kept_video"] == int((kept == VIDEO).sum()) * view.num_kv_heads


def test_text_over_budget_falls_back_to_joint_ranking():
    view = make_view(modality_ids([("text", 30), ("video", 20), ("audio", 10), ("text", 10)]), n_keep=20, seed=3)
    sel = AccKV(window=8, merge=False, calibration=False).compress(view)
    assert sel.indices.shape[1] == 20
    assert (sel.indices[:, -8:] == torch.arange(62, 70)).all()


def test_calibration_matches_naive():
    view = make_view(modality_ids(SPEC), n_keep=50, seed=4)
    m = AccKV(window=8, merge=False, calibration=False)
    base = m.compress(view)
    hi = VIDEO if base.info["high_priority"] == "video" else AUDIO
    lo = AUDIO if hi == VIDEO else VIDEO
    keep = base.indices[0]
    km = view.modality[keep]
    kn = F.normalize(view.keys[:, keep], dim=-1)                             # [kvH, k, D]
    c = torch.stack([(kn[h] @ kn[h][km == hi].T).mean(1) for h in range(view.num_kv_heads)]).mean(0)
    tau = float(c[km == lo].median())                                        # about half of lo is dropped
    sel = AccKV(window=8, merge=False, calibration=True, tau=tau).compress(view)
    drop = (km == lo) & (c < tau)
    assert drop.any()
    assert torch.equal(sel.indices[0], keep[~drop])
    assert sel.info["calibration_evicted"] == int(drop.sum()) * view.num_kv_heads


def test_never_merges_audio_into_video_or_back():
    mod = modality_ids(SPEC)
    view = make_view(mod, n_keep=40, seed=5)
    vid = (mod == VIDEO).nonzero().flatten()
    aud = (mod == AUDIO).nonzero().flatten()
    # tempt cross-modal merging: every audio key is a near copy of a video key
    view.keys[:, aud] = view.keys[:, vid[: aud.numel()]] + 1e-3 * torch.randn(view.num_kv_heads, aud.numel(), 16)
    # values carry a modality signature in their first two dims
    view.values[:, :, :2] = 0
    view.values[:, vid, 1] = 1.0
    view.values[:, aud, 0] = 1.0
    for per_head in (False, True):
        sel = AccKV(window=8, tau=-1.0, per_head=per_head).compress(view)
        km = mod[sel.indices]
        sig = sel.values[..., :2]
        assert torch.equal(sig[km == VIDEO], torch.tensor([0.0, 1.0]).expand(int((km == VIDEO).sum()), 2))
        assert torch.equal(sig[km == AUDIO], torch.tensor([1.0, 0.0]).expand(int((km == AUDIO).sum()), 2))
        # merging happened (some kept entries changed) — within a modality
        changed = (sel.keys - view.keys.gather(1, sel.indices[..., None].expand(-1, -1, 16))).abs().amax(-1) > 0
        assert changed.any()

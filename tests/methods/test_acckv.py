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


def naive_weighted(view):
    """Head-averaged redistributed scores, video × W_v and audio × W_a (methods.md §1 steps 1-2)."""
    cols, sv, sa = naive_scores(view)
    wv, wa = sv / (sv + sa), sa / (sv + sa)
    mod = view.modality
    s = cols.mean(0)
    return torch.where(mod == VIDEO, s * wv, torch.where(mod == AUDIO, s * wa, s)), wv, wa


def naive_calibration(view, keep, hi, lo, w):
    """Kept low-priority entries (outside the window) whose mean key cosine to the kept high-priority entries,
    averaged over KV heads, is below τ are evicted (step 5); raw keys (merge off). Returns the cosine per kept entry."""
    S = view.seq_len
    c = [0.0] * len(keep)
    his = [j for j in keep if int(view.modality[j]) == hi]
    for h in range(view.num_kv_heads):
        kn = F.normalize(view.keys[h], dim=-1)
        for a, j in enumerate(keep):
            c[a] += sum(float(kn[j] @ kn[i]) for i in his) / len(his) / view.num_kv_heads
    is_lo = [int(view.modality[j]) == lo and j < S - w for j in keep]
    return c, is_lo


def test_calibration_matches_naive_without_refill():
    view = make_view(modality_ids(SPEC), n_keep=50, seed=4)
    base = AccKV(window=8, merge=False, calibration=False).compress(view)
    hi = VIDEO if base.info["high_priority"] == "video" else AUDIO
    lo = AUDIO if hi == VIDEO else VIDEO
    keep = base.indices[0].tolist()
    c, is_lo = naive_calibration(view, keep, hi, lo, 8)
    tau = sorted(x for x, l in zip(c, is_lo) if l)[sum(is_lo) // 2]              # about half of lo is dropped
    m = AccKV(window=8, merge=False, calibration=True, tau=tau, refill=False)
    sel = m.compress(view)
    drop = [l and x < tau for x, l in zip(c, is_lo)]
    assert any(drop)
    got = sel.indices[0] if sel.valid is None else sel.indices[0][sel.valid[0]]
    assert got.tolist() == [j for j, d in zip(keep, drop) if not d]
    assert sel.info["calibration_evicted"] == sum(drop) * view.num_kv_heads
    assert m.budget_mode == "achieved" and "refill" in m.budget_reason        # it declares what it holds


def test_refill_gives_freed_slots_to_the_next_best_entries():
    """refill=True (default): the cache keeps the budget; the freed slots hold the best entries not kept before."""
    view = make_view(modality_ids(SPEC), n_keep=50, seed=4)
    s, wv, wa = naive_weighted(view)
    hi, lo = (VIDEO, AUDIO) if wv >= wa else (AUDIO, VIDEO)
    base = AccKV(window=8, merge=False, calibration=False).compress(view).indices[0].tolist()
    c, is_lo = naive_calibration(view, base, hi, lo, 8)
    tau = sorted(x for x, l in zip(c, is_lo) if l)[sum(is_lo) // 2]
    drop = {j for j, x, l in zip(base, c, is_lo) if l and x < tau}
    rest = sorted((j for j in range(view.seq_len) if j not in base), key=lambda j: (-float(s[j]), -j))
    expect = sorted((set(base) - drop) | set(rest[: len(drop)]))
    m = AccKV(window=8, merge=False, calibration=True, tau=tau)
    sel = m.compress(view)
    assert m.refill and m.budget_mode == "held" and m.budget_reason is None
    assert sel.valid is None and sel.indices.shape == (view.num_kv_heads, 50)       # the budget is held
    assert sel.indices[0].tolist() == expect
    assert not drop & set(sel.indices[0].tolist())                                   # evicted entries stay out
    assert sel.info["calibration_evicted"] == len(drop) * view.num_kv_heads
    assert sel.info["refilled"] == len(drop) * view.num_kv_heads and sel.info["calibration_restored"] == 0


def test_refill_merges_into_the_final_kept_set_only():
    """With merging on, evicted media entries merge into the final kept entries of their modality; entries
    calibration evicted are neither kept nor merged anywhere."""
    mod = modality_ids(SPEC)
    view = make_view(mod, n_keep=50, seed=4)
    off = AccKV(window=8, merge=True, calibration=True, tau=2.0, refill=False).compress(view)   # τ > 1: every lo
    on = AccKV(window=8, merge=True, calibration=True, tau=2.0).compress(view)
    assert on.indices.shape[1] == 50 and off.indices.shape[1] < 50
    dropped = set(off.indices[0].tolist()) ^ set(AccKV(window=8, merge=False, calibration=False)
                                                  .compress(view).indices[0].tolist())
    kept = on.indices[0].tolist()
    assert dropped and not dropped & set(kept)
    # reference merge on the final kept set, excluding the calibration-evicted entries (LOOK-M avg, scatter-mean)
    for h in range(view.num_kv_heads):
        K, kn = view.keys[h], F.normalize(view.keys[h], dim=-1)
        acc = {j: [K[j].clone(), 1] for j in kept}
        for e in range(view.seq_len):
            if e in acc or e in dropped or int(mod[e]) == TEXT:
                continue
            same = [j for j in kept if int(mod[j]) == int(mod[e])]
            if same:
                t = max(same, key=lambda j: (float(kn[e] @ kn[j]), -j))
                acc[t][0] += K[e]
                acc[t][1] += 1
        ref = torch.stack([acc[j][0] / acc[j][1] for j in kept])
        torch.testing.assert_close(on.keys[h], ref, rtol=1e-5, atol=1e-5)


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

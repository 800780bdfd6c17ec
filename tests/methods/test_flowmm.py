"""FlowMM against a naive reference: ρ, proxy importance, pivots, gated matching; sensitive pivots get no merges."""
import json

import pytest
import torch
import torch.nn.functional as F

from avkv.methods.base import TEXT
from avkv.methods.flowmm import FlowMM
from avkv.methods.testing import make_view, modality_ids, naive_attention

SPEC = [("text", 6), ("video", 40), ("audio", 20), ("text", 14)]


def naive_importance(view, P):
    A = naive_attention(view)
    I = A[:, -P:].sum(1)                                           # [H, S]
    return I.view(view.num_kv_heads, -1, view.seq_len).mean(1)


def test_rho_matches_naive_and_chunking():
    view = make_view(modality_ids(SPEC), 30, seed=1)
    A = naive_attention(view)
    mod = view.modality
    vis, txt = mod != TEXT, mod == TEXT
    per_head = (A[:, vis][:, :, txt].sum((1, 2)) + A[:, txt][:, :, vis].sum((1, 2))) / view.seq_len
    for chunk in (512, 9):
        assert abs(FlowMM(chunk=chunk).cross_modal_ratio(view) - per_head.mean().item()) < 1e-6


def naive_flowmm(view, P, k, cross, q=0.9, counts=None):
    """Per head: pivots, sensitive set and the LOOK-M pivot merge, written out loop by loop (``counts``: a dict
    that gets the merged / unmerged evicted entries summed over heads)."""
    I = naive_importance(view, P)
    S = view.seq_len
    mod = view.modality
    outK, outV, outI = [], [], []
    for h in range(view.num_kv_heads):
        s = I[h].clone().double()
        s[S - P:] = float("inf")
        keep = s.topk(k).indices.sort().values
        pivots = [j for j in keep.tolist() if j < S - P]
        tau = torch.quantile(I[h, pivots], q)
        sens = {j for j in pivots if I[h, j] > tau}
        K, V = view.keys[h].clone(), view.values[h].clone()
        sumK = {j: K[j].clone() for j in keep.tolist()}
        sumV = {j: V[j].clone() for j in keep.tolist()}
        cnt = {j: 1 for j in keep.tolist()}
        for i in range(S):
            if i in keep.tolist():
                continue
            best, bj = -2.0, None
            for j in pivots:
                if j in sens or (not cross and mod[i] != mod[j]):
                    continue
                c = F.cosine_similarity(K[i], K[j], dim=0).item()
                if c > best:
                    best, bj = c, j
            if counts is not None:
                key = "evicted_unmerged" if bj is None else "merged"
                counts[key] = counts.get(key, 0) + 1
            if bj is None:
                continue
            sumK[bj] += (K[i] + K[bj]) / 2
            sumV[bj] += (V[i] + V[bj]) / 2
            cnt[bj] += 1
        outK.append(torch.stack([sumK[j] / cnt[j] for j in keep.tolist()]))
        outV.append(torch.stack([sumV[j] / cnt[j] for j in keep.tolist()]))
        outI.append((keep, sens))
    return outK, outV, outI


@pytest.mark.parametrize("theta", [0.0, 1.0])             # 0 → cross-modal layer, 1 → intra-modal layer
def test_selection_and_merge_match_naive(theta):
    view = make_view(modality_ids(SPEC), 30, seed=2)
    P = 8
    sel = FlowMM(proxy=P, theta=theta).compress(view)
    assert sel.info["mode"] == ("cross" if theta == 0.0 else "intra")
    counts = {}
    K, V, meta = naive_flowmm(view, P, 30, cross=theta == 0.0, counts=counts)
    assert sel.info["merged"] == counts.get("merged", 0)
    assert sel.info["evicted_unmerged"] == counts.get("evicted_unmerged", 0)
    for h in range(view.num_kv_heads):
        assert torch.equal(sel.indices[h], meta[h][0])
        torch.testing.assert_close(sel.keys[h], K[h], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sel.values[h], V[h], rtol=1e-5, atol=1e-5)


def test_sensitive_pivots_receive_no_merges():
    view = make_view(modality_ids(SPEC), 30, seed=3)
    P = 8
    # make every evicted key a near copy of the most important pivot: without the gate all would merge into it
    I = naive_importance(view, P)
    sel = FlowMM(proxy=P, theta=0.0).compress(view)
    for h in range(view.num_kv_heads):
        keep = sel.indices[h]
        piv = keep[keep < view.seq_len - P]
        top = piv[I[h, piv].argmax()]
        ev = torch.ones(view.seq_len, dtype=torch.bool)
        ev[keep] = False
        view.keys[h, ev] = view.keys[h, top] + 1e-3 * torch.randn(int(ev.sum()), view.keys.shape[-1])
    sel = FlowMM(proxy=P, theta=0.0).compress(view)
    _, _, meta = naive_flowmm(view, P, 30, cross=True)
    for h in range(view.num_kv_heads):
        keep, sens = meta[h]
        assert sens, "the test needs sensitive pivots"
        for col, j in enumerate(keep.tolist()):
            if j in sens:
                assert torch.equal(sel.keys[h, col], view.keys[h, j])
                assert torch.equal(sel.values[h, col], view.values[h, j])
    assert sel.info["sensitive"] > 0 and sel.info["merged"] > 0


def test_intra_mode_keeps_modalities_apart():
    mod = modality_ids(SPEC)
    view = make_view(mod, 30, seed=4)
    view.values[:, :, :4] = 0
    for m in range(4):
        view.values[:, mod == m, m] = 1.0
    sel = FlowMM(proxy=8, theta=1.0).compress(view)
    sig = sel.values[..., :4]
    km = mod[sel.indices]
    assert torch.equal(sig, F.one_hot(km, 4).float())
    cross = FlowMM(proxy=8, theta=0.0).compress(view)
    assert not torch.equal(cross.values[..., :4], F.one_hot(mod[cross.indices], 4).float())


def test_proxy_clipped_to_trailing_text():
    mod = modality_ids([("text", 4), ("video", 30), ("text", 5)])
    assert FlowMM(proxy=32).proxy_len(mod) == 5
    assert FlowMM(proxy=32, clip_proxy_to_text=False).proxy_len(mod) == 32


def test_offline_rho_file(tmp_path):
    f = tmp_path / "rho.json"
    f.write_text(json.dumps({"rho": [0.1, 0.5, 0.1, 0.5]}))
    m = FlowMM(rho_source="offline", calibration_file=str(f), proxy=8)
    modes = [m.compress(make_view(modality_ids(SPEC), 30, layer_idx=i)).info["mode"] for i in range(4)]
    assert modes == ["intra", "cross", "intra", "cross"]
    with pytest.raises(FileNotFoundError, match="calibrate_flowmm"):
        FlowMM(rho_source="offline", calibration_file=str(tmp_path / "missing.json"))


@pytest.mark.parametrize("theta", [0.0, 1.0])
def test_merge_counts_when_a_modality_has_no_target(theta):
    # 12 kept of 80 (8 of them the text proxy): the leading text and the 3 audio entries mostly find no pivot of
    # their own modality in intra mode, so some evicted entries stay unmerged there
    view = make_view(modality_ids([("text", 6), ("video", 60), ("audio", 3), ("text", 11)]), 12, seed=2)
    sel = FlowMM(proxy=8, theta=theta).compress(view)
    counts = {}
    K, _, _ = naive_flowmm(view, 8, 12, cross=theta == 0.0, counts=counts)
    assert (sel.info["merged"], sel.info["evicted_unmerged"]) == (counts.get("merged", 0),
                                                                  counts.get("evicted_unmerged", 0))
    assert theta == 0.0 or counts["evicted_unmerged"] > 0
    for h in range(view.num_kv_heads):
        torch.testing.assert_close(sel.keys[h], K[h], rtol=1e-5, atol=1e-5)

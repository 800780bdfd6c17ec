"""PureKV: CLIE against a naive reference, target layers never touch queries/attention, ST-SpAttn kernel."""
import pytest
import torch
import torch.nn.functional as F

from avkv.methods.purekv import PureKV, st_allowed_mask, st_sparse_attention
from avkv.attention import AttentionBackend
from avkv.methods.base import VIDEO
from avkv.methods.testing import make_request, make_view, modality_ids, naive_attention

SPEC = [("text", 6), ("video", 48), ("text", 14)]
L = 5


def naive_avg_pool(s, kernel, w=8):
    """SnapKV's pooling (its code and kvpress): the prefix before the last ``w`` columns only, 1-D average over
    positions j−k//2 … j+k//2 with the zero padding at the edges counted (the sum divided by ``kernel``); the
    window's columns stay as they are (always kept)."""
    R, S = s.shape
    P = S - w
    out = s.clone()
    for r in range(R):
        for j in range(P):
            lo, hi = max(0, j - kernel // 2), min(P, j + kernel // 2 + 1)
            out[r, j] = sum(float(s[r, i]) for i in range(lo, hi)) / kernel
    return out


def snap_reference(view, w, kernel):
    A = naive_attention(view)[:, -w:]                       # [H, w, S]
    s = A.sum(1)
    s = naive_avg_pool(s, kernel)
    return s, s.view(view.num_kv_heads, -1, view.seq_len).mean(1)


def topk_with_window(score, k, w):
    S = score.shape[-1]
    s = score.clone().double()
    s[:, S - w:] = float("inf")
    return s.topk(k, -1).indices.sort(-1).values


def run_layers(method, mod, n_keep=24, calls=None, layout=None):
    state, out = {}, []
    for layer in range(L):
        seed = 10 + layer
        view = make_view(mod, n_keep, seed=seed, layer_idx=layer, num_layers=L, state=state)
        q = view._q

        def qfn(s, e, layer=layer, q=q):
            if calls is not None:
                calls.append(layer)
            return q[:, s:e]
        view.query_fn = qfn
        out.append((view, method.compress(view)))
    return out


def test_clie_matches_naive_reference():
    mod = modality_ids(SPEC)
    m = PureKV(window=8, source_layer=2, st_spattn=False)
    res = run_layers(m, mod)
    src_view = res[2][0]
    s_src = snap_reference(src_view, 8, 1)[0].mean(0, keepdim=True)     # head-mean of window sums, then pooled
    s_src = naive_avg_pool(s_src, 5)[0]
    for layer, (view, sel) in enumerate(res):
        if layer <= 2:
            _, own = snap_reference(view, 8, 5)
            expect = topk_with_window(own, 24, 8)
            assert sel.info["clie"] == "self"
        else:
            score = s_src[None] * view.values.norm(dim=-1)
            expect = topk_with_window(score, 24, 8)
            assert sel.info["clie"] == "from_layer_2"
        assert torch.equal(sel.indices, expect), layer


def test_target_layers_never_materialise_attention():
    mod = modality_ids(SPEC)
    for mapping in ("single", "groups"):
        calls = []
        m = PureKV(window=8, source_layer=1, mapping=mapping, group_size=2, st_spattn=False)
        res = run_layers(m, mod, calls=calls)
        scoring = {0, 1} if mapping == "single" else {0, 2, 4}
        assert set(calls) == scoring, (mapping, calls)
        for layer, (view, sel) in enumerate(res):
            assert view.attentions is None
            assert (sel.info["clie"] == "self") == (layer in scoring)


def test_target_layer_fails_loudly_without_source():
    mod = modality_ids(SPEC)
    view = make_view(mod, 24, layer_idx=3, num_layers=L)
    with pytest.raises(RuntimeError, match="source layer"):
        PureKV(st_spattn=False).compress(view)


def video_layout(frames=4, per_frame=9, pre=5, gap=3, post=6):
    frame, spatial = [-1] * pre, [-1] * pre
    for t in range(frames):
        frame += [t] * per_frame
        spatial += list(range(per_frame))
        frame += [-1] * gap
        spatial += [-1] * gap
    frame += [-1] * post
    spatial += [-1] * post
    return torch.tensor(frame), torch.tensor(spatial)


@pytest.mark.parametrize("radius,max_prev", [(0, None), (1, None), (0, 2)])
def test_st_sparse_attention_equals_masked_dense(radius, max_prev):
    frame, spatial = video_layout()
    n, H, kvH, D = frame.numel(), 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(H, n, D, generator=g), torch.randn(kvH, n, D, generator=g), torch.randn(kvH, n, D,
                                                                                                generator=g)
    mask = st_allowed_mask(frame, spatial, radius, max_prev)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0), attn_mask=mask,
                                         scale=D ** -0.5)
    for fused in (True, False):
        out = st_sparse_attention(q, k, v, frame, spatial, D ** -0.5, radius, max_prev, max_elems=500, fused=fused)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_st_mask_pattern():
    frame, spatial = video_layout(frames=3, per_frame=4, pre=2, gap=1, post=2)
    m = st_allowed_mask(frame, spatial)
    pos = {(int(t), int(p)): i for i, (t, p) in enumerate(zip(frame, spatial)) if t >= 0}
    q = pos[(2, 1)]
    assert m[q, pos[(1, 1)]] and m[q, pos[(0, 1)]]            # same spatial index, earlier frames
    assert not m[q, pos[(1, 2)]] and not m[q, pos[(0, 0)]]    # other spatial index, earlier frame
    assert m[q, pos[(2, 0)]] and not m[q, pos[(2, 2)]]        # own frame, causal
    assert m[q, 0] and m[q, pos[(1, 3)] + 1]                   # non-video tokens before it
    last = frame.numel() - 1
    assert m[last, : last + 1].all()                           # text queries stay dense


def video_request(frame, spatial, num_layers=4):
    mod = torch.where(frame >= 0, VIDEO, 0)
    return make_request(mod, num_layers=num_layers, layout={"video_frame": frame, "video_spatial": spatial})


def test_begin_fails_loudly_without_layout_and_plans_the_pattern():
    frame, spatial = video_layout()
    with pytest.raises(ValueError, match="video_frame"):
        PureKV().begin(make_request(torch.where(frame >= 0, VIDEO, 0)))
    assert PureKV.prefill_attention
    plan = PureKV().begin(video_request(frame, spatial))
    assert plan.attention.name == "avkv_st_spattn" and plan.prune_from is None
    assert plan.record == {"clie_active": False, "st_spattn_used": False}
    assert PureKV(st_spattn=False).begin(video_request(frame, spatial)).attention is None


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def test_registered_attention_routes_prefill_and_restores():
    model = tiny_qwen2()
    frame, spatial = video_layout()
    ids = torch.randint(0, 64, (1, frame.numel()), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        m = PureKV(st_dense_layers=1)
        plan = m.begin(video_request(frame, spatial))
        with AttentionBackend(model.config) as backend, backend.pattern(plan.attention):   # what the engine does
            assert model.config._attn_implementation == "avkv_st_spattn"
            with pytest.raises(RuntimeError, match="already active"):
                with plan.attention.activate(lambda *a, **k: None):
                    pass
            sparse = model(ids).logits
        assert m._ctx.used_layers == {1, 2, 3} and plan.attention.report() == {"st_spattn_used": True}
        m.end()
        assert model.config._attn_implementation == "sdpa"
        again = model(ids).logits
    torch.testing.assert_close(again, dense)
    assert (sparse - dense).abs().max() > 1e-4                  # video rows changed ...
    first_video = int((frame >= 0).nonzero()[0])
    torch.testing.assert_close(sparse[:, :first_video + 1], dense[:, :first_video + 1])   # ... rows before them not


def test_end_fails_loudly_when_prefill_never_reached_the_function():
    model = tiny_qwen2()
    frame, spatial = video_layout()
    plan = PureKV().begin(video_request(frame, spatial))
    with pytest.raises(RuntimeError, match="never called"):
        with AttentionBackend(model.config) as backend, backend.pattern(plan.attention):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_clie_scope_all_uses_accumulated_attention():
    mod = modality_ids(SPEC)
    res = run_layers(PureKV(window=8, source_layer=1, clie_scope="all", st_spattn=False), mod)
    src_view = res[1][0]
    acc = naive_attention(src_view).sum(1).mean(0, keepdim=True)          # all-query column sums, head mean
    s_src = naive_avg_pool(acc, 5)[0]
    for view, sel in res[2:]:
        assert torch.equal(sel.indices, topk_with_window(s_src[None] * view.values.norm(dim=-1), 24, 8))


def test_st_sparse_attention_with_uneven_frames():
    frame, spatial = video_layout(frames=3, per_frame=6, pre=4, gap=2, post=5)
    keep = ~((frame == 2) & (spatial >= 4))                                 # the last frame is shorter
    frame, spatial = frame[keep], spatial[keep]
    n, H, kvH, D = frame.numel(), 4, 1, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(H, n, D, generator=g), torch.randn(kvH, n, D, generator=g), torch.randn(kvH, n, D,
                                                                                                generator=g)
    ref = F.scaled_dot_product_attention(q, k.expand(H, -1, -1), v.expand(H, -1, -1),
                                         attn_mask=st_allowed_mask(frame, spatial, 1), scale=D ** -0.5)
    torch.testing.assert_close(st_sparse_attention(q, k, v, frame, spatial, D ** -0.5, radius=1), ref,
                               rtol=1e-5, atol=1e-5)

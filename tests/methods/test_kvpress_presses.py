"""The kvpress ports as avkv methods (every method config whose class declares ``kvpress``, found by
``tests/discover.py``): end to end on every tiny family and the AV proxy (the budget held, or declared), the physical
prune equal to the masked full cache on the M-RoPE families, and checks of the mechanisms the parity suite
(tests/parity) cannot see: decode-time compression, key re-rotation through the engine's positions, SimLayerKV's
lazy layers. Parity with kvpress itself is tests/parity (``test_ports.py``: every port has a compared case)."""
import functools

import pytest
import torch

from avkv.config import compose, instantiate
from avkv.engine import CompressionError, Engine
from avkv.methods.base import MODALITIES
from tests import discover
from tests.conftest import adapter, av_prompt, family_prompt, tiny_model_dir
from tests.methods.test_budget_conformance import refusal

pytestmark = pytest.mark.usefixtures("one_thread")

#: every method config whose class declares the kvpress press it reproduces (``Method.kvpress``)
PRESSES = sorted(discover.kvpress_ports())
#: configs whose kept fraction is not the budget (they declare budget_mode=achieved)
ACHIEVED = {"simlayerkv", "per_layer_compression"}
#: every tiny family (configs/model/tiny_*.yaml, variants left out; the image-only ones get the two-image prompt) and
#: the AV proxy
FAMILIES = [*discover.tiny_families(variants=False), "proxy_av"]


def method(name: str, **overrides):
    cfg = compose([f"method={name}"] + [f"++method.{k}={v}" for k, v in overrides.items()])
    return instantiate(cfg.method)


@functools.lru_cache(maxsize=None)
def loaded(family: str):
    if family == "proxy_av":
        ad = instantiate(compose(["model=proxy_av"]).model, device="cpu")
    elif family == "qwen2":
        tiny_model_dir("tiny_qwen2")
        ad = instantiate(compose(["model=tiny_qwen2"]).model, device="cpu")
    else:
        ad = adapter(family)
    prompt = av_prompt() if family in ("proxy_av", "qwen2") else family_prompt(ad)
    if family == "videollama2_av":                      # its audio encoder alone gives ~1500 tokens: video only
        from avkv.tasks.base import Media, Prompt
        prompt = Prompt(context=[Media("video", prompt.context[0].path, with_audio=False)], question=prompt.question)
    return ad, ad.encode(prompt)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", PRESSES)
def test_press_end_to_end_on_every_family(family, name):
    ad, enc = loaded(family)
    overrides = {"n_recent": 16, "lazy_threshold": 0.0} if name == "simlayerkv" else {}
    eng = Engine(ad, method(name, **overrides), budget=0.2, max_new_tokens=3)
    if refusal(family, name):                       # irregular caches: refused by name (test_budget_conformance)
        try:
            r = eng.generate(enc).record
        except CompressionError as e:
            assert f"'{name}'" in str(e) and family in str(e), str(e)
            return
    else:
        r = eng.generate(enc).record
    assert r["new_tokens"] >= 1 and r["compressed"]
    assert r["kv_bytes_ratio"] == pytest.approx(r["kept_ratio"], abs=1e-9)     # stored without padding
    if name in ACHIEVED:
        assert r["budget_mode"] == "achieved" and r["budget_reason"]
        assert r["kept_ratio"] < 1.0
    else:
        assert r["budget_mode"] == "held" and r["budget_held"], (family, name, r["kept_ratio"])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_5_omni"])
@pytest.mark.parametrize("name", PRESSES)
def test_physical_prune_equals_masked_full_cache_on_mrope(family, name):
    """M-RoPE (avkv's own ground): the pruned cache decodes as the full cache with the dropped entries masked —
    for re-rotated keys too (both runs move the later positions by the same shift)."""
    ad, enc = loaded(family)
    overrides = {"n_recent": 16, "lazy_threshold": 0.0} if name == "simlayerkv" else {}
    if name == "decoding":
        overrides = {"interval": 2, "buffer": 4, "scorer.window": 2}
    runs = [Engine(ad, method(name, **overrides), budget=0.3, max_new_tokens=4, mask_only=m).generate(enc)
            for m in (False, True)]
    pruned, masked = runs
    assert pruned.record["kv_bytes_kept"] < masked.record["kv_bytes_kept"]
    assert torch.allclose(pruned.first_logits, masked.first_logits, atol=1e-5), \
        float((pruned.first_logits - masked.first_logits).abs().max())
    if name != "decoding":                               # masking cannot follow a decode-time eviction
        assert pruned.token_ids == masked.token_ids


def test_decoding_compresses_back_every_interval_steps():
    """kvpress DecodingPress: the cache grows for ``interval`` decode steps, then returns to its prefill size."""
    from avkv.methods.decoding import Decoding
    from avkv.methods.snapkv import SnapKV
    ad, enc = loaded("qwen2_5_omni")
    seen = []

    class Spy(Decoding):
        def decode_step(self, view):
            out = super().decode_step(view)
            seen.append((view.layer_idx, view.seq_len, view.n_keep, None if out is None else out.indices.shape[1]))
            return out

    g = Engine(ad, Spy(scorer=SnapKV(window=2), interval=3, buffer=4), budget=0.2, max_new_tokens=8).generate(enc)
    assert g.record["decode_policy"] == "fixed"
    layer0 = [s for s in seen if s[0] == 0]
    assert len(layer0) >= 6
    for step, (_, S, n_keep, kept) in enumerate(layer0, start=1):
        assert S == n_keep + 1 + (step - 1) % 3                          # grows one entry a step ...
        assert kept == (n_keep if step % 3 == 0 else None)                # ... and is cut back every 3rd step


def test_decoding_refuses_a_window_it_cannot_buffer():
    from avkv.methods.decoding import Decoding
    from avkv.methods.snapkv import SnapKV
    with pytest.raises(ValueError, match="window"):
        Decoding(scorer=SnapKV(window=32), interval=8)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_audio"])
def test_rerotated_recent_window_equals_the_plain_window(family):
    """RoPE depends on relative positions only: keeping the last k entries and re-rotating them onto 0..k-1, with
    the rest continuing at k (kvpress's pipeline), moves every position by the same amount, so the logits are those
    of the same entries left in place. (1-D RoPE families; on M-RoPE media entries become text-like positions.)"""
    from avkv.methods.key_rerotation import KeyRerotation
    from avkv.methods.streamingllm import StreamingLLM
    ad, enc = loaded(family)
    eng = dict(budget=0.3, max_new_tokens=4)
    plain = Engine(ad, StreamingLLM(sink=0), **eng).generate(enc)
    moved = Engine(ad, KeyRerotation(scorer=StreamingLLM(sink=0)), **eng).generate(enc)
    gap = Engine(ad, KeyRerotation(scorer=StreamingLLM(sink=0), continue_at="original"), **eng).generate(enc)
    assert torch.allclose(moved.first_logits, plain.first_logits, atol=1e-4), \
        float((moved.first_logits - plain.first_logits).abs().max())
    assert moved.token_ids == plain.token_ids
    assert not torch.allclose(gap.first_logits, plain.first_logits, atol=1e-3)   # the shift is what makes it equal


def test_simlayerkv_keeps_initial_and_recent_in_lazy_layers_only():
    from avkv.methods.simlayerkv import SimLayerKV
    ad, enc = loaded("qwen2_5_omni")
    r = Engine(ad, SimLayerKV(lazy_threshold=0.0, n_recent=16, n_initial=4), budget=0.2,
               max_new_tokens=1).generate(enc).record
    suffix = r["n_prompt"] - r["split"]
    assert r["kept_per_layer"] == [4 + 15 + suffix] * r["layers"]                # every layer lazy at threshold 0
    r = Engine(ad, SimLayerKV(lazy_threshold=1.0, n_recent=16), budget=0.2, max_new_tokens=1).generate(enc).record
    assert r["kept_ratio"] == 1.0                                                # threshold 1 never compresses
    assert all(not v["lazy"] for v in r["method_info"].values())


def test_chunkkv_keeps_whole_chunks_then_fills_the_budget():
    from avkv.methods.chunkkv import ChunkKV
    from avkv.methods.cur import CUR
    ad, enc = loaded("qwen2_5_omni")
    m = ChunkKV(scorer=CUR(), chunk=10)
    kept = {}
    orig = m.compress

    def spy(view):
        sel = orig(view)
        kept[view.layer_idx] = (view.n_keep, view.seq_len, sel.indices)
        return sel
    m.compress = spy
    Engine(ad, m, budget=0.2, max_new_tokens=1).generate(enc)
    assert kept
    for n_keep, S, idx in kept.values():
        assert idx.shape[1] == n_keep and bool((idx == idx[:1]).all())          # the same entries on every head
        got = torch.bincount(idx[0] // 10, minlength=-(-S // 10))
        size = torch.tensor([min(10, S - 10 * c) for c in range(got.numel())])
        assert int(((got > 0) & (got < size)).sum()) <= 1                        # at most one partial chunk


def test_criticaladakv_head_counts_sum_to_the_layer_budget():
    from avkv.methods.criticalkv import CriticalAdaKV
    from avkv.methods.cur import CUR
    ad, enc = loaded("qwen2_5_omni")
    r = Engine(ad, CriticalAdaKV(scorer=CUR()), budget=0.2, max_new_tokens=1).generate(enc).record
    suffix = r["n_prompt"] - r["split"]
    per_head = r["kept_per_head"]
    n_keep = round(0.2 * r["n_prompt"]) - suffix
    assert all(sum(h) == n_keep * r["kv_heads"] for h in per_head)
    assert any(len(set(h)) > 1 for h in per_head)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_5_omni"])
def test_expected_attention_on_mrope_matches_a_reference_from_the_spec(family):
    """Expected Attention on M-RoPE, against a reference written from the paper/kvpress formulas with the model's own
    pieces: pre-RoPE queries from ``q_proj`` of the layer input, the future positions from the adapter's decode
    continuation (``continue_position_ids``) fed to the model's rotary embedding, rotation matrices built entry by
    entry, scores exp-normalised per head, group mean, value norms."""
    import math

    from avkv.methods.expected_attention import ExpectedAttention
    ad, enc = loaded(family)
    ea = ExpectedAttention(future=64)
    got, seen = {}, {}
    orig = ea.score

    def spy(view):
        got[view.layer_idx] = (orig(view), view.keys.clone(), view.values.clone(), view.num_heads)
        return got[view.layer_idx][0]
    ea.score = spy
    layer = ad.decoder_layers()[1].self_attn

    def hook(module, args, kwargs, output):
        seen.setdefault("h", kwargs["hidden_states"][0].clone())
    hd = layer.register_forward_hook(hook, with_kwargs=True)
    eng = Engine(ad, ea, budget=0.3, max_new_tokens=1)
    try:
        eng.generate(enc)
    finally:
        hd.remove()
    s_got, K, V, H = got[1]
    kvH, S, d = K.shape
    h = seen["h"][:S]
    q = layer.q_proj(h).view(S, H, d).transpose(0, 1)                           # [H, S, d] pre-RoPE
    q = q[:, 4:]
    mu = q.mean(1)
    cen = q - mu[:, None]
    cov = cen.transpose(1, 2) @ cen / q.shape[1]
    pos = ad.prompt_position_ids(enc)
    fut = ad.continue_position_ids(pos, S, 64)
    fut = fut[1:] if fut.dim() == 3 and fut.shape[0] == 4 else fut
    cos, sin = ad.rotary_embedding()(torch.zeros(1), fut)
    cos, sin = cos[0].double(), sin[0].double()
    Rbar = torch.zeros(d, d, dtype=torch.float64)
    for t in range(64):                                                          # R_t x = x·cos + rotate_half(x)·sin
        R = torch.diag(cos[t])
        for i in range(d // 2):
            R[i, i + d // 2] = -sin[t, i]
            R[i + d // 2, i] = sin[t, i + d // 2]
        Rbar += R / 64
    mu, cov = mu.double() @ Rbar.T, Rbar @ cov.double() @ Rbar.T
    g = H // kvH
    want = torch.zeros(kvH, S - 4, dtype=torch.float64)
    for head in range(H):
        k = K[head // g, 4:].double()
        logit = k @ mu[head] / math.sqrt(d) + torch.einsum("nd,de,ne->n", k, cov[head], k) / (2 * d)
        want[head // g] += logit.softmax(-1) / g
    want = want * V[:, 4:].double().norm(dim=-1)
    assert torch.allclose(s_got[:, 4:].double(), want, rtol=1e-4, atol=1e-9), \
        float((s_got[:, 4:].double() - want).abs().max() / want.abs().max())
    assert bool((s_got[:, :4] > s_got[:, 4:].max()).all())                       # sinks first

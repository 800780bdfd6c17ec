"""Engine equivalences on every tiny family (the native ports included): budget 1.0 = no compression, split
prefill = one forward, physical pruning = masking, decode positions = generate's, and the cache really shrinks to
the budget."""
import pytest
import torch

from avkv.engine import Compressor, Engine, kv_cache_bytes
from avkv.methods.full import Full
from avkv.methods.h2o import H2O
from avkv.methods.snapkv import SnapKV
from avkv.models.native_adapter import NativeAdapter
from tests.conftest import FAMILIES, NATIVE_FAMILIES, adapter, av_prompt, family_prompt, modalities

#: the transformers families that take images (every one but the audio-only)
IMAGE_FAMILIES = tuple(f for f in FAMILIES if "image" in modalities(f))
from tests.engine_checks import check_budget_one_equals_no_compression, check_split_prefill_equals_one_forward

MAX_NEW = 6


@pytest.fixture(scope="module", params=(*FAMILIES, *NATIVE_FAMILIES))
def fam(request):
    ad = adapter(request.param)
    return ad, ad.encode(family_prompt(ad))


def test_encoding_has_media_and_split_points(fam):
    ad, enc = fam
    n = enc.input_ids.shape[1]
    assert 0 < enc.question_start < enc.assistant_start < n
    assert enc.modality.shape == (n,)
    assert (enc.modality != 0).sum() > 0, "no media position found"
    assert enc.modality[enc.question_start:].eq(0).all(), "question and preamble must be text"
    text = ad.tokenizer.decode(enc.input_ids[0, enc.question_start:enc.assistant_start])
    assert text.startswith("What colour is the moving square?")


def test_full_engine_equals_generate(fam):
    """Manual prefill + decode with explicit positions reproduces `generate` tokens and logits (a native port: its
    own greedy ``generate``, and the logits of one forward over the prompt)."""
    ad, enc = fam
    g = Engine(ad, Full(), max_new_tokens=MAX_NEW).generate(enc)
    if isinstance(ad, NativeAdapter):
        ref = ad.generate(enc, max_new_tokens=MAX_NEW)
        with torch.no_grad():
            first = ad.forward(enc.input_ids, None, ad.prompt_position_ids(enc), ad.media_inputs(enc))[0, -1]
    else:
        with torch.no_grad():
            out = ad.model.generate(**enc.inputs, max_new_tokens=MAX_NEW, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
        ref, first = out.sequences[0, enc.input_ids.shape[1]:].tolist(), out.logits[0][0]
    eos = set(ad.eos_token_ids)
    n_cmp = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
    assert g.token_ids == [t for t in ref[:n_cmp] if t not in eos]
    assert torch.allclose(g.first_logits, first.float(), atol=1e-5)


def test_budget_one_equals_no_compression(fam):
    check_budget_one_equals_no_compression(*fam, MAX_NEW)


def test_split_prefill_equals_one_forward(fam):
    check_split_prefill_equals_one_forward(*fam, MAX_NEW)


@pytest.mark.parametrize("at,name", [("prompt", "snapkv"), ("context", "snapkv"), ("prompt", "full"),
                                     ("prompt", "h2o")])
def test_last_row_prefill_changes_no_cache_entry_and_no_logit(fam, at, name, monkeypatch):
    """The prefill chunk's last decoder layer computes its attention output and MLP for the last row only
    (``Engine.last_row_prefill``), compressed or not (the full cache takes the same path, so the two prefill times
    compare): every layer's cache is bitwise the one of the full last layer, the same entries are kept, and the
    first logits agree within fp32 rounding; the last layer's MLP really saw one row (every row on an irregular
    cache, where the engine does not restrict it). An all-query method (H2O) reads the last layer's attention of every
    row: that attention runs over every row (its statistics are captured, no layer recomputes the softmax from the
    queries more often than without the restriction), and the output projection and MLP take the last row."""
    import contextlib
    ad, enc = fam
    irregular = any(w is not None for w in ad.layer_windows()) or ad.cache_sources() != list(range(len(
        ad.decoder_layers())))
    if irregular and name == "h2o":
        pytest.skip("an irregular cache refuses all-query methods (tests/methods/test_budget_conformance.py)")
    mlp = ad.decoder_layers()[-1].mlp
    import avkv.methods.allquery as aq
    column_pass, recomputed = aq.column_pass, {False: 0, True: 0}
    out = {}
    for restrict in (False, True):
        def spy(queries, keys, scale, num_heads, lse=None, *a, **kw):
            recomputed[restrict] += lse is None
            return column_pass(queries, keys, scale, num_heads, lse, *a, **kw)
        monkeypatch.setattr(aq, "column_pass", spy)
        rows: list[int] = []
        h = mlp.register_forward_hook(lambda m, a, kw, o: rows.append(      # the input after the pre-hooks
            (a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
        eng = Engine(ad, {"snapkv": SnapKV(window=8), "full": Full(), "h2o": H2O()}[name], budget=0.3,
                     compress_at=at, max_new_tokens=1)
        eng.last_row_prefill = restrict
        try:
            with contextlib.ExitStack() as stack:
                p = eng.prefill(enc, stack)
                out[restrict] = (p.logits[0, -1].clone(), [(l.keys, l.values) for l in p.cache.layers],
                                 dict(p.cm.ledger.kept) if p.cm else None, rows[0], p.s)
        finally:
            h.remove()
    (la, ca, ka, ra, s), (lb, cb, kb, rb, _) = out[False], out[True]
    assert recomputed[True] == recomputed[False], recomputed
    assert ra == s and rb == (s if irregular else 1), (ra, rb, s)
    assert ka == kb
    for (k1, v1), (k2, v2) in zip(ca, cb):
        assert (k1 is None and k2 is None) or (torch.equal(k1, k2) and torch.equal(v1, v2))
    assert torch.allclose(la, lb, atol=1e-5) and int(la.argmax()) == int(lb.argmax())


@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_cache_shrinks_to_budget(fam, budget):
    ad, enc = fam
    eng = Engine(ad, SnapKV(window=8), budget=budget, max_new_tokens=2)
    r = eng.generate(enc).record
    # each cache-owning layer keeps min(budget's entries, what it holds uncompressed): n on a dense decoder (the
    # target is then the budget itself), min(n, W - 1) on a sliding-window layer (Gemma-3n)
    n, cap = r["n_prompt"], r.get("capacity_per_layer", [r["n_prompt"]] * r["layers"])
    target = sum(min(eng.target_kept(n), c) for c in cap) / sum(cap)
    assert r["budget_target"] == pytest.approx(target)
    if "capacity_per_layer" not in r:
        assert abs(target - budget) <= 0.5 / n + 1e-12
    assert abs(r["kv_bytes_kept"] / r["kv_bytes_full"] - target) <= 0.02
    assert abs(r["kept_ratio"] - target) <= 0.02
    assert sum(v["kept"] for v in r["kept_by_modality"].values()) == pytest.approx(sum(r["kept_per_layer"]) / r["layers"])
    if isinstance(ad, NativeAdapter):    # a native port's media run keeps entries of each medium (VideoLLaMA2's
        # audio-visual item: its video run and its audio run); not so for every family (SnapKV may drop a medium)
        assert all(r["kept_by_modality"][m]["kept"] > 0 for m in enc.modalities_used)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", [*IMAGE_FAMILIES, *NATIVE_FAMILIES])
def test_physical_prune_equals_masked_full_cache(family, attn):
    ad = adapter(family, attn)
    enc = ad.encode(family_prompt(ad))
    for at in ("question", "context"):
        pruned = Engine(ad, SnapKV(window=8), budget=0.3, compress_at=at, max_new_tokens=MAX_NEW).generate(enc)
        masked = Engine(ad, SnapKV(window=8), budget=0.3, compress_at=at, max_new_tokens=MAX_NEW,
                        mask_only=True).generate(enc)
        assert pruned.record["kv_bytes_kept"] < masked.record["kv_bytes_kept"]     # masking keeps the bytes
        assert torch.allclose(pruned.first_logits, masked.first_logits, atol=1e-5)
        assert pruned.token_ids == masked.token_ids


@pytest.mark.parametrize("name", ["knorm", "tova", "observed_attention", "keydiff"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_5_omni"])
def test_kvpress_scorers_prune_as_the_masked_full_cache_on_mrope(family, name):
    """The scorers added with the kvpress parity suite (issue 13) on the M-RoPE families, where kvpress itself cannot
    run (its query recompute is 1-D RoPE): physical pruning gives the logits and tokens of masking the same entries."""
    from avkv.config import compose, instantiate
    ad = adapter(family)
    enc = ad.encode(av_prompt())
    m = lambda: instantiate(compose([f"method={name}"]).method)
    pruned = Engine(ad, m(), budget=0.3, compress_at="context", max_new_tokens=MAX_NEW).generate(enc)
    masked = Engine(ad, m(), budget=0.3, compress_at="context", max_new_tokens=MAX_NEW, mask_only=True).generate(enc)
    assert pruned.record["kv_bytes_kept"] < masked.record["kv_bytes_kept"]
    assert torch.allclose(pruned.first_logits, masked.first_logits, atol=1e-5)
    assert pruned.token_ids == masked.token_ids


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_decode_positions_after_pruning_equal_generate(family):
    """Compress inside `generate`'s own prefill; our manual decode after the same pruning gives the same tokens
    and logits, so the positions we pass (logical, with M-RoPE deltas) are the ones `generate` uses."""
    ad = adapter(family)
    enc = ad.encode(family_prompt(ad))
    eng = Engine(ad, SnapKV(window=8), budget=0.3, compress_at="prompt", max_new_tokens=MAX_NEW)
    ours, steps = _step_logits(ad, lambda: eng.generate(enc))
    n = enc.input_ids.shape[1]
    req = eng.request(enc)
    assert req.split == n and req.n_keep == eng.target_kept(n)
    from transformers import DynamicCache
    cache = DynamicCache(config=ad.text_config())
    with torch.no_grad(), Compressor(ad, SnapKV(window=8), req) as cm, cm.stage("prefill"):
        out = ad.model.generate(**enc.inputs, past_key_values=cache, max_new_tokens=MAX_NEW,
                                do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = out.sequences[0, n:].tolist()
    eos = set(ad.eos_token_ids)
    k = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
    assert ours.token_ids == [t for t in ref[:k] if t not in eos]
    # logits of every decode step match, not only the first (a position off by one changes them)
    assert torch.allclose(ours.first_logits, out.logits[0][0].float(), atol=1e-5)
    assert len(steps) == min(k, MAX_NEW) >= 2
    for i, a in enumerate(steps):
        assert torch.allclose(a.float(), out.logits[i][0].float(), atol=1e-5), (i, float((a - out.logits[i][0]).abs().max()))
    assert kv_cache_bytes(cache) < ours.record["kv_bytes_full"]


@pytest.mark.parametrize("family", ["qwen2_5_omni", "mobilevlm"])
def test_query_recomputation_matches_cached_keys(family):
    """The engine recomputes post-RoPE queries from hidden states; the same recipe applied to k_proj must
    reproduce the cached (post-RoPE) keys, which checks the rotary handling on M-RoPE (Qwen2.5-Omni) and on a
    native port's spliced 1-D RoPE prefill (MobileVLM's LLaMA)."""
    def rotate_half(x):                         # the rotate-half RoPE of the Qwen2/Llama attention
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    ad = adapter(family)
    enc = ad.encode(av_prompt())
    seen = {}

    def hook(module, args, kwargs, output):
        if "err" in seen:                       # the prefix chunk only
            return
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        k = module.k_proj(h).view(1, h.shape[1], -1, module.head_dim).transpose(1, 2)
        k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
        seen["err"] = (k - kwargs["past_key_values"].layers[module.layer_idx].keys).abs().max().item()

    layer = ad.decoder_layers()[1].self_attn
    hd = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        Engine(ad, Full(), max_new_tokens=1).generate(enc)
    finally:
        hd.remove()
    assert seen["err"] < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_queries_reproduce_attention_weights(family):
    """``ModelAdapter.layer_queries`` gives the queries the layer really used: softmax(q·kᵀ·scaling) over the cached
    keys, causal, equals the attention weights the eager layer returns (for every layer, on the prompt). Checks each
    family's projection, query norm, RoPE and scaling, whichever override it has."""
    ad = adapter(family, "eager")
    enc = ad.encode(av_prompt())
    errs = check_layer_queries(ad, enc)
    layers = len(ad.decoder_layers())
    # every layer whose cache holds all the keys it attended over (a sliding layer past its window does not: it is
    # checked with a widened window in its family's test, tests/models/test_gemma3n.py)
    checked = [i for i in range(layers) if errs[i] is not None]
    assert len(checked) == layers or all(w is not None for i, w in enumerate(ad.layer_windows()) if i not in checked)
    assert checked and max(errs[i] for i in checked) < 1e-4, errs


def check_layer_queries(ad, enc) -> dict:
    """Per decoder layer, max |softmax(q·kᵀ·scaling) − eager weights| over the prompt (None where the layer's cache,
    or its source's for a KV-shared layer, no longer holds every key the layer attended over)."""
    errs = {}
    sources = ad.cache_sources()

    def hook(module, args, kwargs, output):
        i = module.layer_idx
        if i in errs:
            return
        h, (cos, sin) = kwargs["hidden_states"], kwargs["position_embeddings"]
        keys = kwargs["past_key_values"].layers[sources[i]].keys
        if keys.shape[2] != output[1].shape[-1]:
            errs[i] = None
            return
        q = ad.layer_queries(module, h, (cos, sin)).float()                     # [H, T, d]
        k = keys[0].float().repeat_interleave(q.shape[0] // keys.shape[1], 0)   # [H, S, d]
        T, S = q.shape[1], k.shape[1]
        scores = q @ k.transpose(1, 2) * module.scaling
        causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        w = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        errs[i] = float((w - output[1][0].float()).abs().max())

    mods = [layer.self_attn for layer in ad.decoder_layers()]
    hds = [m.register_forward_hook(hook, with_kwargs=True) for m in mods]
    try:
        eng = Engine(ad, Full(), max_new_tokens=1, compress_at="prompt")
        eng.last_row_prefill = False           # every layer's weights over every row (the last layer's too)
        eng.generate(enc)
    finally:
        for hd in hds:
            hd.remove()
    assert len(errs) == len(mods)
    return errs


def _step_logits(ad, run):
    """Run ``run()`` and return the last-position logits of every forward (prefill chunks and decode steps)."""
    seen = []
    hd = ad.model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out[0, -1].clone()))
    try:
        g = run()
    finally:
        hd.remove()
    return g, seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_5_omni"])
def test_ragged_storage_equals_masked_reference(family, attn):
    """Per-head budgets are stored flat without padding (bytes held = entries kept) and decode exactly as the masked
    full cache does: the logits of every step within 1e-5, the same tokens."""
    from avkv.methods.adakv import AdaKV
    ad = adapter(family, attn)
    enc = ad.encode(av_prompt())
    for at in ("question", "context"):
        def run(mask_only):
            eng = Engine(ad, AdaKV(scorer=SnapKV(window=8), floor=0.1), budget=0.3, compress_at=at,
                         max_new_tokens=MAX_NEW, mask_only=mask_only)
            return _step_logits(ad, lambda: eng.generate(enc))
        (ragged, lr), (masked, lm) = run(False), run(True)
        r = ragged.record
        assert r["kv_storage"] == "ragged" and masked.record["kv_storage"] == "masked"
        assert any(len(set(h)) > 1 for h in r["kept_per_head"])              # heads really differ
        entry = 2 * ad.decoder_layers()[0].self_attn.head_dim * 4                  # K and V, float32
        n_entries = sum(sum(h) for h in r["kept_per_head"]) + r["layers"] * r["kv_heads"] * (r["n_prompt"] - r["split"])
        assert r["kv_bytes_kept"] == n_entries * entry                          # no padding anywhere
        assert r["kv_bytes_ratio"] == pytest.approx(r["kept_ratio"], abs=1e-12)
        assert r["budget_held"] and r["budget_achieved"] == pytest.approx(0.3, abs=0.01)
        assert masked.record["kept_ratio"] == pytest.approx(r["kept_ratio"], abs=1e-12)
        assert masked.record["kv_bytes_ratio"] == 1.0
        assert ragged.token_ids == masked.token_ids and len(lr) == len(lm)
        for a, b in zip(lr, lm):
            assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_budget_record_and_rule():
    from avkv.engine import within_budget
    ad, = (adapter("qwen2_5_omni"),)
    enc = ad.encode(av_prompt())
    r = Engine(ad, SnapKV(window=8), budget=0.2, max_new_tokens=1).generate(enc).record
    assert r["budget_mode"] == "held" and r["budget_held"] is True
    assert r["budget_target"] == pytest.approx(round(0.2 * r["n_prompt"]) / r["n_prompt"])
    assert r["budget_achieved"] == r["kv_bytes_ratio"] and r["kv_storage"] == "dense"
    f = Engine(ad, Full(), budget=0.2, max_new_tokens=1).generate(enc).record
    assert f["budget_mode"] == "full" and f["budget_held"] is False and f["budget_achieved"] == 1.0
    assert within_budget(0.2009, 0.2, 10_000) and not within_budget(0.2025, 0.2, 10_000)   # ±1 % of the budget
    assert within_budget(0.101, 0.1, 1000) and not within_budget(0.0975, 0.1, 1000)          # + one entry (1/n)

"""Gemma-3n specifics (docs/methods.md, "What a budget means on each model's cache"): the audio+text model loads
strictly without its vision tower, the prompt is the official processor's, and the cache is accounted and
compressed as it is laid out — KV-shared layers own nothing and read their source's kept entries, sliding layers
hold min(n, W - 1) and keep their window over logical positions while decoding."""
import contextlib
import shutil

import pytest
import torch

from avkv.engine import CompressionError, Engine
from avkv.prealloc import PreallocLayer
from avkv.methods.full import Full
from avkv.methods.snapkv import SnapKV
from tests.conftest import adapter, av_prompt, tiny_model_dir
from tests.test_engine import _step_logits

ENTRY = 2 * 16 * 4                     # K + V, head dim 16, float32


@pytest.fixture(scope="module")
def g3n():
    ad = adapter("gemma3n")
    return ad, ad.encode(av_prompt())


def test_loads_audio_and_text_without_the_vision_tower(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from avkv.models.gemma3n import VISION_PREFIX, Gemma3nAdapter
    src = tiny_model_dir("tiny_gemma3n")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        assert any(k.startswith(VISION_PREFIX) for k in f.keys())          # the hub layout: vision weights present
    ad = adapter("gemma3n")
    assert ad.model.model.vision_tower is None and ad.modalities == ("audio",)
    assert not any(n.startswith("model.vision_tower") for n, _ in ad.model.named_parameters())
    # strict: a renamed (so missing + unexpected) language-model weight is an error, not a random init
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    sd = load_file(bad / "model.safetensors")
    k = next(k for k in sd if ".self_attn.q_proj." in k)
    sd[k.replace("q_proj", "q_projection")] = sd.pop(k)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match the audio\\+text model"):
        Gemma3nAdapter(bad)


def test_prompt_is_the_official_processors(g3n):
    ad, enc = g3n
    tok, proc = ad.tokenizer, ad.processor
    ids = enc.input_ids[0].tolist()
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<bos><start_of_turn>user\n\n\n<start_of_audio><audio_soft_token>")
    assert text.endswith("<end_of_audio>\n\nWhat colour is the moving square? Answer with the letter."
                         "<end_of_turn>\n<start_of_turn>model\n")
    assert ids.count(tok.bos_token_id) == 1                         # the template's <bos> only
    assert ids.count(proc.audio_token_id) == proc.audio_seq_length == int((enc.modality == 3).sum())
    assert set(enc.inputs) >= {"input_features", "input_features_mask"}
    assert tok.decode(ids[enc.assistant_start:]) == "<start_of_turn>model\n"
    assert tok.decode(ids[enc.question_start:enc.assistant_start]).startswith("What colour")




def test_full_decodes_as_generate_at_every_step_past_the_window(g3n):
    """The one decode path (shared layers on their source's storage, sliding layers keeping W entries over logical
    positions) gives transformers' own cache's logits at every step, with the window moving from the first one."""
    ad, enc = g3n
    n, W = enc.input_ids.shape[1], ad.text_config().sliding_window
    assert n > W
    steps = 8
    g, ours = _step_logits(ad, lambda: Engine(ad, Full(), max_new_tokens=steps).generate(enc, max_new_tokens=steps))
    with torch.no_grad():
        out = ad.model.generate(**enc.inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                                output_logits=True, return_dict_in_generate=True)
    ours = ours[1:]                                 # the compressed chunk's forward, then the suffix's and decode's
    assert g.record["decode_cache"] == "prealloc" and len(ours) >= 4      # (the engine stops at an end token)
    assert g.token_ids[:len(ours) - 1] == out.sequences[0, n:n + len(ours) - 1].tolist()
    for i, a in enumerate(ours):
        assert torch.allclose(a.float(), out.logits[i][0].float(), atol=1e-4), (i, float((a - out.logits[i][0]).abs().max()))


def test_full_cache_accounting_counts_owning_layers_at_what_they_hold(g3n):
    ad, enc = g3n
    tc = ad.text_config()
    n, W = enc.input_ids.shape[1], tc.sliding_window
    owners = [i for i, src in enumerate(ad.cache_sources()) if src == i]
    assert owners == [0, 1, 2] and ad.cache_sources()[3:] == [1, 1, 2]
    cap = [n if ad.layer_windows()[i] is None else min(n, W - 1) for i in owners]
    r = Engine(ad, Full(), max_new_tokens=2).generate(enc).record
    assert r["layers"] == len(owners) and r["cache_layers"] == owners and r["capacity_per_layer"] == cap
    assert r["kv_bytes_full"] == r["kv_bytes_kept"] == tc.num_key_value_heads * sum(cap) * ENTRY
    assert r["kept_per_layer"] == [float(c) for c in cap] and r["kept_ratio"] == 1.0
    # by modality: a sliding layer holds the last W - 1 positions only
    audio = [int((enc.modality[n - c:] == 3).sum()) for c in cap]
    assert audio[0] < audio[2] == int((enc.modality == 3).sum())
    assert r["kept_by_modality"]["audio"]["kept"] == pytest.approx(sum(audio) / len(owners))


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.5])
def test_snapkv_holds_the_budget_over_owning_layers(g3n, budget):
    ad, enc = g3n
    n, W = enc.input_ids.shape[1], ad.text_config().sliding_window
    eng = Engine(ad, SnapKV(window=8), budget=budget, max_new_tokens=3)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        p = eng.prefill(enc, stack)
        mods = p.cm.attn_modules
        kept_pos = {i: mods[i]._avkv_positions.clone() for i in (0, 1)}         # the sliding owners
        lengths = [None if layer.keys is None else layer.keys.shape[2] for layer in p.cache.layers]
    r = eng.generate(enc).record
    target = eng.target_kept(n)
    cap = r["capacity_per_layer"]
    assert r["budget_target"] == pytest.approx(sum(min(target, c) for c in cap) / sum(cap))
    assert r["budget_held"] and r["kv_storage"] == "dense"
    assert r["kept_per_layer"] == [float(min(target, c)) for c in cap]
    assert r["kv_bytes_kept"] == round(sum(r["kept_per_layer"]) * r["kv_heads"]) * ENTRY
    assert lengths[3:] == [None, None, None]                                        # shared layers hold nothing
    s = r["split"]
    for i, pos in kept_pos.items():          # a sliding layer keeps chunk entries still in its window at the end
        assert int(pos.min()) >= n - W + 1 and int(pos.max()) < s, (i, pos)


def test_shared_layers_decode_over_their_sources_storage(g3n):
    ad, enc = g3n
    got = {}
    mods = [layer.self_attn for layer in ad.decoder_layers()]

    def grab(name):
        def hook(m, args, kwargs):
            if hasattr(m, "_avkv_decode_layer"):
                got.setdefault(name, m._avkv_decode_layer)
        return hook

    hds = [mods[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (1, 3, 4, 2, 5)]
    try:
        Engine(ad, SnapKV(window=8), budget=0.2, max_new_tokens=3).generate(enc)
    finally:
        for hd in hds:
            hd.remove()
    assert got[3] is got[1] and got[4] is got[1] and got[5] is got[2] and got[1] is not got[2]
    assert isinstance(got[1], PreallocLayer) and got[1].sliding_window == ad.text_config().sliding_window
    assert got[2].sliding_window is None


def test_sliding_decode_layer_keeps_w_entries():
    K = torch.randn(1, 2, 5, 4)
    layer = PreallocLayer(K, K.clone(), extra=4, sliding_window=4, positions=torch.arange(5).expand(1, 2, 5),
                          next_position=5)
    layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))          # token at position 5 sees 2..5
    assert layer.valid[0, 0, :6].tolist() == [False, False, True, True, True, True]
    layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))          # position 6 sees 3..6
    assert layer.valid[0, 0, :7].tolist() == [False, False, False, True, True, True, True]


@pytest.mark.parametrize("name,kwargs", [("adakv", {"budget": 0.5}), ("fastv", {}), ("key_rerotation", {}),
                                         ("snapkv", {"mask_only": True})])
def test_unsupported_is_refused_by_name(g3n, name, kwargs):
    from avkv.config import compose, instantiate
    ad, enc = g3n
    if name == "adakv":                 # refused where its heads keep different counts (on this prompt at 0.5)
        enc = ad.encode(av_prompt(question="What?"))
    kw = {"budget": 0.3, **kwargs}
    with pytest.raises(CompressionError, match=f"'{name}'.*gemma3n"):
        Engine(ad, instantiate(compose([f"method={name}"]).method), max_new_tokens=2, **kw).generate(enc)


def test_batched_decoding_is_refused(g3n):
    from avkv.batching import generate_batch
    ad, enc = g3n
    with pytest.raises(CompressionError, match="gemma3n"):
        generate_batch(Engine(ad, SnapKV(window=8), budget=0.3, max_new_tokens=2), [enc, enc])


def test_layer_queries_on_every_layer_with_a_widened_window():
    """``layer_queries`` on the sliding layers too (their own RoPE θ): with the window widened past the prompt the
    caches hold every key, so each layer's recomputed attention equals the eager weights (the generic test in
    tests/test_engine.py can check only the full-attention layers, the sliding ones having dropped keys)."""
    from avkv.models.gemma3n import Gemma3nAdapter
    from tests.test_engine import check_layer_queries
    ad = Gemma3nAdapter(tiny_model_dir("tiny_gemma3n"), attn_implementation="eager")
    ad.text_config().sliding_window = 4096
    errs = check_layer_queries(ad, ad.encode(av_prompt()))
    assert all(e is not None for e in errs.values()) and max(errs.values()) < 1e-4, errs

"""Every method end to end through the engine on the tiny models (configs instantiated as `run.py` does).

The methods are every ``configs/method/*.yaml`` (``tests/discover.py``): a new config is tested here with no edit.
"""
import json

import pytest
import torch

from avkv.config import compose, instantiate
from avkv.engine import Engine
from avkv.methods.fastv import FastV
from avkv.methods.full import Full
from avkv.methods.h2o import H2O
from tests import discover
from tests.conftest import VLM_FAMILIES, adapter, av_prompt, family_prompt

METHODS = discover.methods(controls=True)
#: the kvpress scorers added with the parity suite (issue 13): also on every other tiny family
KVPRESS_SCORERS = ["knorm", "tova", "observed_attention", "keydiff"]


def method(name: str, **overrides):
    cfg = compose([f"method={name}"] + [f"method.{k}={v}" for k, v in overrides.items()])
    return instantiate(cfg.method)


def head_scores_for(ad, tmp_path) -> str:
    """A head-score file for ``ad``'s architecture (uneven, seeded), for methods whose config reads one (AudioKV)."""
    tc = ad.text_config()
    L, H, Hk = tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads
    f = tmp_path / "head_scores.json"
    scores = torch.rand(L, H, generator=torch.Generator().manual_seed(0)) ** 3
    f.write_text(json.dumps({"scores": scores.tolist(), "num_layers": L, "num_heads": H, "num_kv_heads": Hk}))
    return str(f)


@pytest.fixture(scope="module")
def omni():
    ad = adapter("qwen2_5_omni")
    return ad, ad.encode(av_prompt())


def check_record(r: dict, name: str, budget: float) -> None:
    """The budget is held (±0.02), or the config declares what it holds (``budget_mode: achieved`` and why)."""
    assert r["kv_bytes_kept"] <= r["kv_bytes_full"]
    assert r["decode_policy"] in ("grow", "fixed")
    if name == "full":
        assert r["kept_ratio"] == 1.0
    elif r["budget_mode"] == "achieved":
        assert r["budget_reason"], name
    elif name == "fastv":                               # 2-layer model: the budget cannot be met, the record says
        assert r["hidden_state_pruning"] is True and r["kept_ratio"] < 1.0
        assert r["kept_per_layer"][0] == r["n_prompt"] > r["kept_per_layer"][1]
    else:
        # the budget's share of the cache: the budget itself on a cache of n entries per layer, more where sliding
        # layers hold fewer uncompressed (each keeps min(budget's entries, its own), docs/methods.md)
        assert r["budget_target"] == pytest.approx(budget, abs=0.02) or "capacity_per_layer" in r
        assert r["kept_ratio"] == pytest.approx(r["budget_target"], abs=0.02)
        assert r["kv_bytes_kept"] < r["kv_bytes_full"]
    if r["kv_storage"] == "ragged":                     # per-head budgets: stored per head, without padding
        assert "kept_per_head" in r
    assert r["kv_bytes_ratio"] == pytest.approx(r["kept_ratio"], abs=1e-9)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_on_tiny_omni_sdpa(omni, name, tmp_path):
    ad, enc = omni
    cfg = compose([f"method={name}"]).method
    if "head_scores" in cfg:
        cfg.head_scores = head_scores_for(ad, tmp_path)
    g = Engine(ad, instantiate(cfg), budget=0.2, max_new_tokens=4).generate(enc)
    assert g.record["new_tokens"] >= 1
    check_record(g.record, name, 0.2)


@pytest.mark.parametrize("name", ["h2o", "pyramidkv", "adakv", "fastv", "d2o"])
def test_methods_under_eager(omni, name):
    ad = adapter("qwen2_5_omni", "eager")
    enc = ad.encode(av_prompt())
    r = Engine(ad, method(name), budget=0.3, compress_at="context", max_new_tokens=3).generate(enc).record
    check_record(r, name, 0.3)


@pytest.mark.parametrize("family,name", [("qwen2_5_vl", "fastv"),
                                         ("qwen2_audio", "lookm"), ("qwen2_audio", "pyramidkv"),
                                         ("mobilevlm", "lookm"), ("mobilevlm", "adakv"),
                                         *[(f, m) for f in VLM_FAMILIES for m in ("snapkv", "adakv", "lookm")]])
def test_other_families(family, name):
    ad = adapter(family)
    r = Engine(ad, method(name), budget=0.2, max_new_tokens=3).generate(ad.encode(family_prompt(ad))).record
    check_record(r, name, 0.2)


#: the families the tests here name by hand; every other configs/model/tiny_<family>.yaml (tests/discover.py) runs
#: test_every_discovered_family, so a new family's tiny config is tested end to end with no edit
NAMED = {"qwen2_5_omni", "qwen2_5_vl", "qwen2_audio", "mobilevlm", "videollama2_av", "qwen2", *VLM_FAMILIES}


@pytest.mark.parametrize("name", ["full", "snapkv", "streamingllm", "knorm", "pyramidkv", "random"])
@pytest.mark.parametrize("family", [f for f in discover.tiny_families() if f not in NAMED])
def test_every_discovered_family(family, name):
    ad = adapter(family)
    g = Engine(ad, method(name), budget=0.2, max_new_tokens=3).generate(ad.encode(family_prompt(ad)))
    assert g.record["new_tokens"] >= 1
    check_record(g.record, name, 0.2)
    assert g.record["budget_held"] or name == "full"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_audio", "videollama2_av", "qwen2"])
@pytest.mark.parametrize("name", KVPRESS_SCORERS)
def test_kvpress_scorers_on_every_tiny_family(family, name):
    ad = adapter(family)
    prompt = av_prompt()
    if family == "videollama2_av":                      # its audio encoder alone gives ~1500 tokens: video only
        from avkv.tasks.base import Media, Prompt
        prompt = Prompt(context=[Media("video", prompt.context[0].path, with_audio=False)], question=prompt.question)
    r = Engine(ad, method(name), budget=0.2, max_new_tokens=3).generate(ad.encode(prompt)).record
    check_record(r, name, 0.2)
    assert r["budget_held"]


def test_tova_fixed_decode_holds_the_cache_size(omni):
    """The paper's TOVA: after every decode step the cache is back to its size (one new entry in, one out)."""
    from avkv.methods.tova import TOVA
    ad, enc = omni
    seen = []

    class Spy(TOVA):
        def decode_step(self, view):
            out = super().decode_step(view)
            seen.append((view.seq_len, view.n_keep, None if out is None else out.indices.shape[1]))
            return out

    g = Engine(ad, Spy(decode_policy="fixed"), budget=0.2, max_new_tokens=5).generate(enc)
    assert g.record["decode_policy"] == "fixed" and len(seen) >= 2 * 2
    for S, n_keep, kept in seen:
        assert S == n_keep + 1 and kept == n_keep


def test_fixed_decode_holds_the_cache_size(omni):
    ad, enc = omni
    seen = []

    class Spy(H2O):
        def decode_step(self, view):
            out = super().decode_step(view)
            seen.append((view.layer_idx, view.seq_len, view.n_keep, None if out is None else out.indices.shape[1]))
            return out

    g = Engine(ad, Spy(), budget=0.2, max_new_tokens=5).generate(enc)
    assert g.record["decode_policy"] == "fixed" and len(seen) >= 2 * 2
    for _, S, n_keep, kept in seen:
        assert S == n_keep + 1 and kept == n_keep                    # one new entry in, one evicted


def test_fastv_equals_masking_the_pruned_tokens_in_later_layers():
    """Dropping tokens from the hidden states before layer K gives, for every kept token, the same computation
    as keeping them but hiding them from attention in layers ≥ K: the last logits must agree."""
    ad = adapter("qwen2_5_omni", "eager")
    enc = ad.encode(av_prompt())
    kept = []

    class Spy(FastV):                          # the positions FastV hands the engine to prune to
        def compress(self, view):
            sel = super().compress(view)
            if sel.hidden_keep is not None:
                kept.append(sel.hidden_keep)
            return sel

    got = Engine(ad, Spy(layer=1, ratio=0.5), budget=0.5, compress_at="prompt", max_new_tokens=1).generate(enc)
    assert got.record["fastv_pruned_tokens"] > 0 and len(kept) == 1
    keep = kept[0].cpu()
    n = enc.input_ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[:, ~torch.isin(torch.arange(n), keep)] = False
    allowed |= torch.eye(n, dtype=torch.bool)                          # pruned rows: anything finite
    bias = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]

    def pre(module, args, kwargs):
        kwargs = dict(kwargs, attention_mask=bias)
        return args, kwargs

    layers = ad.decoder_layers()
    hs = [layers[i].register_forward_pre_hook(pre, with_kwargs=True) for i in range(1, len(layers))]
    try:                       # the engine's own prefill (generate's positions), the full cache, masked columns
        ref = Engine(ad, Full(), compress_at="prompt", max_new_tokens=1).generate(enc).first_logits
    finally:
        for h in hs:
            h.remove()
    assert torch.allclose(got.first_logits, ref, atol=1e-5)

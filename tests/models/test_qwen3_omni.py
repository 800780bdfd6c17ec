"""Qwen3-Omni MoE thinker specifics: the thinker loads out of a full-model folder (the hub layout), and the MoE
thinker's cache is one K/V per decoder layer (the router never touches it), so budgets count as on a dense model."""
import torch

from avkv.engine import Engine
from avkv.methods.full import Full
from avkv.methods.snapkv import SnapKV
from tests.conftest import adapter, av_prompt, tiny_model_dir


def test_thinker_loads_from_full_model_folder(tmp_path):
    """The hub checkpoint is the whole model (config model_type qwen3_omni_moe, weights under ``thinker.``): the
    adapter must read the thinker out of it with the same weights, giving the same logits as the thinker folder."""
    import json

    from avkv.models.qwen3_omni import Qwen3OmniAdapter, build_tiny
    full = tmp_path / "full"
    build_tiny(full, full_layout=True)
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_omni_moe" and "thinker_config" in cfg
    from safetensors import safe_open
    with safe_open(str(full / "model.safetensors"), "pt") as f:
        assert all(k.startswith("thinker.") for k in f.keys())
    ref = adapter("qwen3_omni")
    tiny_model_dir("tiny_qwen3_omni")
    ad = Qwen3OmniAdapter(full)
    enc = ad.encode(av_prompt())
    assert torch.equal(enc.input_ids, ref.encode(av_prompt()).input_ids)
    a = Engine(ad, Full(), max_new_tokens=3).generate(enc)
    b = Engine(ref, Full(), max_new_tokens=3).generate(enc)
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-6) and a.token_ids == b.token_ids


def test_moe_thinker_cache_is_one_kv_per_layer():
    ad = adapter("qwen3_omni")
    tc = ad.text_config()
    assert tc.num_experts > 1 and ad.decoder_layers()[0].self_attn.q_norm is not None
    enc = ad.encode(av_prompt())
    r = Engine(ad, SnapKV(window=8), budget=0.4, max_new_tokens=2).generate(enc).record
    assert r["layers"] == tc.num_hidden_layers and r["kv_heads"] == tc.num_key_value_heads
    entry = 2 * tc.head_dim * 4                                             # K and V, float32
    assert r["kv_bytes_full"] == r["layers"] * r["kv_heads"] * r["n_prompt"] * entry
    assert r["budget_held"] and abs(r["kv_bytes_ratio"] - 0.4) <= 0.01

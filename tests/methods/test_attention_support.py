"""Methods under flash-attn: ``avkv.attention_support`` names the ones that cannot run there, and the declaration is
checked against what the engine does (a method that switches decoding to avkv's masked attention must be listed),
and the check stops a run before its model loads."""
import json

import pytest
import torch

from avkv.attention_support import attention_problem, varying_cache
from avkv.config import CONFIG_DIR, ConfigError, compose, instantiate
from avkv.engine import Engine
from avkv.experiment import check_environment
from avkv.methods.base import Method
from tests.conftest import av_prompt, tiny_model_dir

METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    tiny_model_dir("tiny_qwen2_5_omni_deep")
    ad = instantiate(compose(["model=tiny_qwen2_5_omni_deep"]).model, device="cpu")
    tc = ad.text_config()
    L, H, Hk = tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads
    f = tmp_path_factory.mktemp("hs") / "scores.json"             # uneven head scores for AudioKV
    scores = torch.rand(L, H, generator=torch.Generator().manual_seed(0)) ** 3
    f.write_text(json.dumps({"scores": scores.tolist(), "num_layers": L, "num_heads": H, "num_kv_heads": Hk}))
    return ad, ad.encode(av_prompt(question="What?")), str(f)


def test_every_method_that_uses_the_masked_attention_is_declared(deep):
    """Caches of different lengths across layers (``kept_per_layer``) or heads (``kv_storage: ragged``) are what
    sends decoding through avkv's masked attention; every method config that leaves them must be listed."""
    ad, enc, head_scores = deep
    varying = set()
    for name in METHODS:
        cfg = compose([f"method={name}"]).method
        if "head_scores" in cfg:
            cfg.head_scores = head_scores
        for budget in (0.5, 0.2):
            rec = Engine(ad, instantiate(cfg), budget=budget, compress_at="question").generate(
                enc, max_new_tokens=1).record
            if len(set(rec["kept_per_layer"])) > 1 or rec["kv_storage"] == "ragged":
                varying.add(name)
                assert varying_cache(instantiate(cfg)), f"{name} leaves caches of different lengths but is not listed"
    assert {"adakv", "pyramidkv", "fastv", "d2o"} <= varying      # the check itself sees the known cases
    for name in ("snapkv", "h2o", "streamingllm", "full"):
        assert name not in varying and not varying_cache(instantiate(compose([f"method={name}"]).method))


@pytest.mark.parametrize("method,ok", [("adakv", False), ("pyramidkv", False), ("fastv", False), ("snapkv", True),
                                       ("h2o", True), ("composed", True)])
def test_flash_attention_is_refused_before_the_model_loads(method, ok):
    cfg = compose(["model=tiny_qwen2_5_omni", "model.path=/nonexistent/never/loaded", f"method={method}",
                   "model.attn_implementation=flash_attention_2"])
    if ok:
        check_environment(cfg)
        return
    with pytest.raises(ConfigError) as e:
        check_environment(cfg)
    msg = str(e.value)
    assert "model.attn_implementation" in msg and repr(instantiate(cfg.method).name) in msg and "sdpa" in msg


def test_attention_weights_need_eager():
    class Reads(Method):
        name = "reads_weights"
        requires_attentions = True
    assert "eager" in attention_problem(Reads(), "sdpa")
    assert "eager" in attention_problem(Reads(), "flash_attention_2")
    assert attention_problem(Reads(), "eager") is None


def test_nested_methods_are_seen():
    composed = instantiate(compose(["method=composed"]).method)
    assert not varying_cache(composed)
    composed.methods = [*composed.methods, instantiate(compose(["method=adakv"]).method)]
    assert varying_cache(composed)

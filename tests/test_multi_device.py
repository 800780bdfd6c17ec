"""The multi-device path (``model.device_map``): a checkpoint that does not fit one device loads with its layers
spread by ``from_pretrained``/accelerate, and the engine's hooks, pruning, storage and accounting are unchanged.

Tested here on CPU with a real split: decoder layer 1 offloaded to disk (its weights on the meta device, loaded by
accelerate's hooks at each forward), everything else on the CPU. What needs two GPUs (caches of different layers
on different GPUs, the synchronizing clock, per-GPU peak memory) is checked for its bookkeeping only."""
import pytest
import torch

from avkv.engine import Clock, Engine, MemoryTracker, kv_bytes_by_device
from avkv.methods.adakv import AdaKV
from avkv.methods.snapkv import SnapKV
from tests.conftest import adapter, av_prompt, tiny_model_dir

SPLIT = {"model.audio_tower": "cpu", "model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
         "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
         "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def split_adapter(tmp_path_factory):
    from avkv.config import compose, instantiate
    tiny_model_dir("tiny_qwen3_omni")
    cfg = compose(["model=tiny_qwen3_omni"])
    return instantiate(cfg.model, device="cpu", device_map=SPLIT,
                       offload_folder=str(tmp_path_factory.mktemp("offload")))


def test_layers_really_split(split_adapter):
    layers = split_adapter.decoder_layers()
    assert layers[0].self_attn.q_proj.weight.device.type == "cpu"
    assert layers[1].self_attn.q_proj.weight.device.type == "meta"          # offloaded: loaded per forward
    assert getattr(layers[1], "_hf_hook", None) is not None
    assert split_adapter.device == torch.device("cpu") and split_adapter.devices == [torch.device("cpu")]


@pytest.mark.parametrize("method", ["snapkv", "adakv"])
def test_split_model_compresses_as_one_device(split_adapter, method):
    """Same tokens, same first logits, same entries and bytes kept, dense and ragged storage alike."""
    one = adapter("qwen3_omni")
    enc = one.encode(av_prompt())
    make = {"snapkv": lambda: SnapKV(window=8), "adakv": lambda: AdaKV(scorer=SnapKV(window=8), floor=0.1)}[method]
    a = Engine(split_adapter, make(), budget=0.3, max_new_tokens=4).generate(enc)
    b = Engine(one, make(), budget=0.3, max_new_tokens=4).generate(enc)
    assert a.token_ids == b.token_ids
    assert torch.allclose(a.first_logits, b.first_logits, atol=1e-5)
    for k in ("kept_ratio", "kv_bytes_kept", "kv_bytes_full", "kept_per_layer", "kv_storage", "budget_held"):
        assert a.record[k] == b.record[k], k
    assert a.record["budget_held"] and abs(a.record["kv_bytes_ratio"] - 0.3) <= 0.01


def test_device_map_refused_where_unsupported(tmp_path):
    from avkv.models.base import ModelAdapter
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="device_map is not supported"):
        ModelAdapter(tmp_path, device_map="auto")


def test_kv_bytes_by_device_counts_each_layers_device():
    from transformers import DynamicCache
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)                        # cpu: 2·(2·5·4)·4 B
    cache.update(torch.zeros(1, 2, 3, 4, device="meta", dtype=torch.bfloat16),
                 torch.zeros(1, 2, 3, 4, device="meta", dtype=torch.bfloat16), 1)           # meta: 2·(2·3·4)·2 B
    assert kv_bytes_by_device(cache) == {"cpu": 320, "meta": 96}


def test_two_gpu_bookkeeping():
    """With layers on two GPUs the clock synchronizes both and reads wall time (one GPU's events miss the other's
    work), and peak memory is summed over both; one GPU keeps CUDA events; CPU keeps perf_counter and RSS."""
    two = [torch.device("cuda:0"), torch.device("cuda:1")]
    c = Clock(torch.device("cuda:0"), two)
    assert not c.cuda and c.sync == two
    one = Clock(torch.device("cuda:0"), [torch.device("cuda:0")])
    assert one.cuda and one.sync == []
    assert not Clock(torch.device("cpu")).cuda and Clock(torch.device("cpu")).sync == []
    assert MemoryTracker(torch.device("cuda:0"), two).kind == "cuda_max_allocated_sum"
    assert MemoryTracker(torch.device("cuda:0")).kind == "cuda_max_allocated"
    assert MemoryTracker(torch.device("cpu")).kind == "cpu_process_peak_rss"

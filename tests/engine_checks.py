"""Engine equivalences shared by every model family's tests (Qwen families in test_engine.py, VideoLLaMA2)."""
import torch

from avkv.engine import Engine
from avkv.methods.full import Full
from avkv.methods.snapkv import SnapKV
from avkv.methods.streamingllm import StreamingLLM


def check_budget_one_equals_no_compression(ad, enc, max_new: int) -> None:
    full = Engine(ad, Full(), max_new_tokens=max_new).generate(enc)
    for method in (SnapKV(window=8), StreamingLLM()):
        b1 = Engine(ad, method, budget=1.0, max_new_tokens=max_new).generate(enc)
        assert b1.token_ids == full.token_ids
        assert torch.allclose(b1.first_logits, full.first_logits, atol=1e-5)
        assert b1.record["kv_bytes_kept"] == b1.record["kv_bytes_full"]


def check_split_prefill_equals_one_forward(ad, enc, max_new: int) -> None:
    one = Engine(ad, Full(), compress_at="prompt", max_new_tokens=max_new).generate(enc)
    for at in ("question", "context"):
        split = Engine(ad, Full(), compress_at=at, max_new_tokens=max_new).generate(enc)
        assert split.record["split"] < enc.input_ids.shape[1]
        assert torch.allclose(split.first_logits, one.first_logits, atol=1e-5)
        assert split.token_ids == one.token_ids

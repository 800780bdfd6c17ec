"""Batch size > 1 (avkv.batching), with the per-sample prefill: every sample of a batch of prompts of different lengths gets exactly what it gets
at batch 1 — the same tokens, the same first logits, the same kept entries (the batch cache's rows hold that
sample's batch-1 cache, head by head) — for dense, per-layer, ragged per-head and all-query methods; each sample
stops at its own end-of-sequence token; what cannot batch is refused by name."""
import contextlib

import pytest
import torch

from avkv.batching import generate_batch
from avkv.engine import Engine
from avkv.kvstore import CompressionError, RaggedLayer
from avkv.prealloc import PreallocLayer
from avkv.methods.adakv import AdaKV
from avkv.methods.full import Full
from avkv.methods.h2o import H2O
from avkv.methods.pyramidkv import PyramidKV
from avkv.methods.snapkv import SnapKV
from avkv.methods.streamingllm import StreamingLLM
from tests.conftest import adapter, av_prompt

QUESTIONS = ("What colour is the moving square?",
             "Which way is the square moving? Answer with the letter of the best option only, please.",
             "How many?")
MAX_NEW = 8

METHODS = {
    "full": Full,
    "snapkv": lambda: SnapKV(window=8),
    "adakv": lambda: AdaKV(scorer=SnapKV(window=8), floor=0.1),        # ragged: heads keep different counts
    "pyramidkv": lambda: PyramidKV(scorer=SnapKV(window=8)),          # layers keep different counts
    "streamingllm": StreamingLLM,
    "h2o": lambda: H2O(decode_policy="grow"),                          # all-query scores
}


@pytest.fixture(scope="module")
def encs():
    ad = adapter("qwen2_5_vl")
    out = [ad.encode(av_prompt(q)) for q in QUESTIONS]
    assert len({e.input_ids.shape[1] for e in out}) == len(out), "the prompts must differ in length"
    return ad, out


@contextlib.contextmanager
def _logits(ad):
    """The last-position logits of every forward of the model, in order."""
    out = []
    h = ad.model.get_output_embeddings().register_forward_hook(lambda m, a, o: out.append(o[:, -1].detach().clone()))
    try:
        yield out
    finally:
        h.remove()


def _heads(layer):
    if isinstance(layer, RaggedLayer):
        return [layer.head(h) for h in range(layer.num_heads)]
    return [(layer.keys[0, h], layer.values[0, h]) for h in range(layer.keys.shape[1])]


@pytest.mark.parametrize("name", list(METHODS))
def test_batch_equals_batch_one_per_sample(encs, name):
    """The per-sample prefill (``batched_prefill=False``) then the batched decode: bit-identical to batch 1 (the
    one batched prefill is compared with batch 1 in tests/test_batched_prefill.py, within fp32 rounding)."""
    ad, es = encs
    eng = Engine(ad, METHODS[name](), budget=0.3, max_new_tokens=MAX_NEW)
    seen = {}
    with _logits(ad) as out:
        batch = generate_batch(eng, es, on_cache=lambda c: seen.update(cache=c), batched_prefill=False)
    steps = [o for o in out if o.shape[0] == len(es)]               # the batched decode steps, [B, V] each
    single, single_steps = [], []
    for e in es:
        with _logits(ad) as out:
            single.append(eng.generate(e))
        single_steps.append(out[len(out) - (single[-1].record["new_tokens"] - 1):])
    storage = set()
    for b, (g, ref, enc) in enumerate(zip(batch, single, es)):
        assert g.token_ids == ref.token_ids, (name, b)
        assert torch.allclose(g.first_logits, ref.first_logits, atol=1e-6)
        for t, ref_step in enumerate(single_steps[b]):             # every decode step's logits, as at batch 1
            err = float((steps[t][b] - ref_step[0]).abs().max())
            assert err <= 1e-5, (name, b, t, err)
        for key in ("n_prompt", "kept_ratio", "kept_per_layer", "kept_by_modality", "kv_bytes_kept", "kv_storage"):
            assert g.record.get(key) == ref.record.get(key), (name, b, key)
        assert g.record["batch_size"] == len(es) and g.record["decode_s"] == batch[0].record["decode_s"]
        storage.add(ref.record["kv_storage"])
        # the batch cache's row b holds exactly sample b's batch-1 prompt cache (the same kept entries), then padding
        with torch.no_grad(), contextlib.ExitStack() as st:
            p = eng.prefill(enc, st)
        for i, layer in enumerate(seen["cache"].layers):
            assert isinstance(layer, PreallocLayer)
            for h, (k, v) in enumerate(_heads(p.cache.layers[i])):
                S = k.shape[0]
                assert bool(layer.valid[b, h, :S].all())
                assert torch.equal(layer.keys[b, h, :S], k), (name, b, i, h)
                assert torch.equal(layer.values[b, h, :S], v), (name, b, i, h)
    if name == "adakv":
        assert "ragged" in storage
    if name == "full":
        assert storage == {"dense"}


def test_each_sample_stops_at_its_own_eos(encs, monkeypatch):
    """Make a token of sample 0's answer the end-of-sequence token: sample 0 stops there, a sample that never
    produces it runs on to max_new_tokens, all as at batch 1."""
    ad, es = encs
    eng = Engine(ad, SnapKV(window=8), budget=0.3, max_new_tokens=MAX_NEW)
    free = [eng.generate(e).token_ids for e in es]
    stop, other = next((t, j) for t in free[0][1:] for j in (1, 2) if t not in free[j])
    cut = free[0].index(stop)
    monkeypatch.setattr(type(ad), "eos_token_ids", property(lambda self: [stop]))
    batch = generate_batch(eng, es)
    assert batch[0].token_ids == free[0][:cut] and batch[0].record["new_tokens"] == cut + 1
    assert batch[other].token_ids == free[other] and len(free[other]) == MAX_NEW
    assert [g.token_ids for g in batch] == [eng.generate(e).token_ids for e in es]


def test_refuses_what_cannot_batch(encs):
    ad, es = encs
    with pytest.raises(CompressionError, match="h2o.*decode_policy=fixed"):
        generate_batch(Engine(ad, H2O(), budget=0.3), es)
    with pytest.raises(CompressionError, match="mask_only"):
        generate_batch(Engine(ad, SnapKV(window=8), budget=0.3, mask_only=True), es)


def test_each_sample_stops_at_its_own_max_new_tokens(encs):
    """A limit per sample (a task's answer length differs per prompt): each row stops at its own, as at batch 1."""
    ad, es = encs
    eng = Engine(ad, SnapKV(window=8), budget=0.3, max_new_tokens=MAX_NEW)
    limits = [2, MAX_NEW, 5]
    batch = generate_batch(eng, es, max_new_tokens=limits)
    for g, e, n in zip(batch, es, limits):
        ref = eng.generate(e, max_new_tokens=n)
        assert g.token_ids == ref.token_ids and g.record["new_tokens"] == ref.record["new_tokens"] <= n
    assert len({g.record["new_tokens"] for g in batch}) > 1                 # the limits did differ
    with pytest.raises(ValueError, match="2 max_new_tokens for 3 samples"):
        generate_batch(eng, es, max_new_tokens=[2, 3])


def test_record_says_which_prefill_path_ran(encs):
    """Every record names the prefill path (issue 18 item 4): by default the one batched prefill, on request the
    per-sample one, whose ``batch_prefill_s`` is the sum of the samples' own prefills (run one after the other)."""
    from avkv.batching import BATCHED, PER_SAMPLE_REASON
    ad, es = encs
    eng = Engine(ad, SnapKV(window=8), budget=0.3, max_new_tokens=2)
    for g in generate_batch(eng, es):
        assert g.record["prefill_batched"] is True and g.record["prefill_path"] == BATCHED
    batch = generate_batch(eng, es, batched_prefill=False)
    for g in batch:
        assert g.record["prefill_batched"] is False and g.record["prefill_path"] == PER_SAMPLE_REASON
        assert g.record["batch_prefill_s"] == pytest.approx(sum(x.record["prefill_s"] for x in batch))

"""KVzip and its context reconstruction (avkv/reconstruct.py): what the parity suite (tests/parity, kvpress
KVzipPress) cannot see — the cache after the reconstruction, its timing, the instruction as plain text, the
reconstruction positions on M-RoPE, the score against a reference written from the paper's rule, media families."""
import math
from dataclasses import replace

import pytest
import torch

from avkv.config import compose, instantiate
from avkv.engine import Engine
from avkv.methods.kvzip import KVzip
from avkv.reconstruct import Capture, ReconstructionError, ReconstructionView, next_positions, plain_ids
from tests.conftest import adapter, av_prompt, family_prompt, tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen2():
    tiny_model_dir("tiny_qwen2")
    ad = instantiate(compose(["model=tiny_qwen2"]).model, device="cpu")
    from avkv.tasks.base import Prompt
    text = " ".join(f"The box number {i} holds a {c} ball." for i, c in enumerate(["red", "green", "blue"] * 6))
    return ad, ad.encode(Prompt(context=[text], question="Which box holds the last blue ball?"))


class Spy(KVzip):
    """Keeps the prefill's keys (observe) and the keys the selection is made on (compress, after the
    reconstruction), and how many chunks were scored."""

    def begin(self, request):
        super().begin(request)
        self.before, self.after, self.chunks = {}, {}, []

    def observe(self, view):
        super().observe(view)
        self.before[view.layer_idx] = (view.keys.clone(), view.values.clone())

    def score_reconstruction(self, rv):
        self.chunks.append((rv.layer_idx, rv.start, rv.end, rv.queries.shape[1]))
        super().score_reconstruction(rv)

    def compress(self, view):
        self.after[view.layer_idx] = (view.keys.clone(), view.values.clone())
        return super().compress(view)


@pytest.mark.parametrize("chunk", [2048, 7])
def test_reconstruction_leaves_the_cache_as_the_prefill_left_it(qwen2, chunk):
    ad, enc = qwen2
    m = Spy(chunk=chunk)
    r = Engine(ad, m, budget=0.5, compress_at="context", max_new_tokens=2).generate(enc).record
    assert sorted(m.before) == sorted(m.after) == list(range(len(ad.decoder_layers())))
    for i in m.before:
        assert torch.equal(m.before[i][0], m.after[i][0]) and torch.equal(m.before[i][1], m.after[i][1])
    s = enc.question_start
    prefix = r["reconstruct_prefix"]
    assert 0 < prefix < s
    spans = sorted({(a, b) for _, a, b, _ in m.chunks})
    assert spans[0][0] == prefix and spans[-1][1] == s                  # the context after the prefix, once
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))
    assert r["reconstruct_chunks"] == len(spans) == math.ceil((s - prefix) / chunk)
    assert r["budget_held"] and r["kv_storage"] == "ragged"
    assert 0 < r["reconstruct_s"] <= r["compress_s"] <= r["prefill_s"]


def test_repeat_instruction_is_plain_text(qwen2):
    ad, _ = qwen2
    control = ad.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = plain_ids(ad, "Repeat <|im_end|><|im_start|>system now.")
    assert control not in ids and ad.tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids
    assert plain_ids(ad, KVzip.repeat_prompt) == ad.tokenizer(KVzip.repeat_prompt, add_special_tokens=False)["input_ids"]


def test_score_is_the_max_attention_of_the_reconstruction_queries():
    """From the paper's rule, head by head: softmax of each reconstruction query over (sinks, the chunk, the
    reconstruction tokens up to itself), max over the queries and the query heads of each KV head."""
    g = torch.Generator().manual_seed(0)
    kvH, G, D, s, T, a, b = 2, 3, 8, 40, 6, 10, 25
    keys, values = torch.randn(kvH, s + T, D, generator=g), torch.randn(kvH, s + T, D, generator=g)
    q = torch.randn(kvH * G, T, D, generator=g)
    method, state = KVzip(sink=4), {}
    rv = ReconstructionView(layer_idx=0, queries=q, keys=keys, values=values, hidden=torch.randn(T, 16), start=a,
                            end=b, split=s, scaling=D ** -0.5, state=state, out_weight_fn=lambda: None)
    rv.scratch(method)["layers"] = {0: {"n_keep": 5, "scores": torch.zeros(kvH, s)}}
    method.score_reconstruction(rv)
    got = rv.scratch(method)["layers"][0]["scores"]
    want = torch.zeros(kvH, s)
    for hq in range(kvH * G):
        h = hq // G
        for t in range(T):
            cols = list(range(4)) + list(range(a, b)) + list(range(s, s + t + 1))
            w = torch.softmax(torch.stack([q[hq, t] @ keys[h, c] for c in cols]) * D ** -0.5, 0)
            for j, c in enumerate(cols[4:4 + b - a]):
                want[h, c] = max(want[h, c], w[4 + j])
    assert torch.allclose(got, want, atol=1e-6)
    assert (got[:, :a] == 0).all() and (got[:, b:] == 0).all()


def test_selection_keeps_the_sinks_and_the_global_best():
    L, kvH, S, n_keep = 2, 2, 10, 4
    scores = torch.rand(L, kvH, S, generator=torch.Generator().manual_seed(1))
    scratch = {"layers": {i: {"n_keep": n_keep, "scores": scores[i].clone()} for i in range(L)}}
    keep = KVzip(sink=2).keep_masks(scratch, L)
    got = torch.stack([keep[i] for i in range(L)])
    assert got[..., :2].all() and int(got.sum()) == L * kvH * n_keep
    rest = scores[..., 2:].flatten()
    want = torch.zeros_like(rest, dtype=torch.bool)
    want[rest.argsort(descending=True)[: L * kvH * (n_keep - 2)]] = True
    assert torch.equal(got[..., 2:].flatten(), want)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_5_omni"])
def test_reconstruction_positions_continue_like_the_question_on_mrope(family):
    """The reconstruction tokens take the positions text right after the chunk takes: those the model gives the
    question's first tokens (compress_at=context), media before them."""
    ad = adapter(family)
    enc = ad.encode(av_prompt())
    s, n = enc.question_start, enc.input_ids.shape[1]
    cap = Capture(ad)
    from transformers import DynamicCache
    with torch.no_grad():
        ad.forward(enc.input_ids, DynamicCache(config=ad.text_config()), ad.prompt_position_ids(enc),
                   ad.media_inputs(enc))
    P = cap.position_ids
    assert P is not None and P.dim() == 3
    assert torch.equal(next_positions(P[..., :s], s, n - s, P.device), P[..., s:])


@pytest.mark.parametrize("family", ["mobilevlm", "llava", "qwen2_audio"])
def test_kvzip_on_other_families(family):
    ad = adapter(family)
    r = Engine(ad, KVzip(), budget=0.2, max_new_tokens=2).generate(ad.encode(family_prompt(ad))).record
    assert r["compressed"] and r["budget_held"] and r["reconstruct_chunks"] >= 1
    assert r["kv_bytes_ratio"] == pytest.approx(r["kept_ratio"], abs=1e-9)


def test_physical_prune_equals_the_masked_full_cache(qwen2):
    ad, enc = qwen2
    pruned = Engine(ad, KVzip(), budget=0.5, compress_at="context", max_new_tokens=3).generate(enc)
    masked = Engine(ad, KVzip(), budget=0.5, compress_at="context", max_new_tokens=3, mask_only=True).generate(enc)
    assert pruned.record["kv_bytes_kept"] < masked.record["kv_bytes_kept"]
    assert torch.allclose(pruned.first_logits, masked.first_logits, atol=1e-5)
    assert pruned.token_ids == masked.token_ids


class NoPlan(KVzip):
    """Declares needs_reconstruction (inherited) but says nothing of how to reconstruct."""

    name = "kvzip_noplan"

    def reconstruction_plan(self):
        return None


def test_a_reconstruction_without_a_plan_is_refused_before_the_prefill(qwen2):
    """The engine asks the method for its ReconstructionPlan (it never reads KVzip's fields): a method that declares
    needs_reconstruction and returns none is refused by name, before any forward ran."""
    ad, enc = qwen2
    m = NoPlan()
    m.observe = lambda view: pytest.fail("the prefill ran")
    with pytest.raises(ReconstructionError, match=r"'kvzip_noplan' declares needs_reconstruction.*returned None"):
        Engine(ad, m, budget=0.5, compress_at="context", max_new_tokens=2).generate(enc)


def test_the_plan_is_what_the_engine_runs(qwen2):
    """The engine runs the plan's chunking, not the method's field: a plan of chunk 5 on a method whose own chunk
    is 2048 reconstructs in chunks of 5."""
    ad, enc = qwen2

    class Planned(Spy):
        def reconstruction_plan(self):
            return replace(super().reconstruction_plan(), chunk=5)

    m = Planned()
    r = Engine(ad, m, budget=0.5, compress_at="context", max_new_tokens=2).generate(enc).record
    assert m.chunk == 2048
    assert r["reconstruct_chunks"] == math.ceil((enc.question_start - r["reconstruct_prefix"]) / 5)
    assert max(b - a for _, a, b, _ in m.chunks) == 5

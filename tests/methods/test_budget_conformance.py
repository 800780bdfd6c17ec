"""One budget means one budget: every method config × budgets {0.5, 0.2, 0.1} × every tiny family and the 8-layer
model (both lists read from ``configs/`` by ``tests/discover.py``: a new method or tiny model config is tested here
with no edit) holds the budget in entries *and* bytes (±1 %, one entry of rounding aside) — or declares what it holds
(``budget_mode: achieved`` with a reason, or FastV's ``budget_infeasible`` where even pruning every media token from
layer 1 cannot reach it, checked here to be really so). Bytes are counted from the cache tensors, so storage
padding would show.

Cheap on purpose: one short prompt per model (VideoLLaMA2 video-only: its audio encoder alone gives ~1500
tokens), each method config composed once, one new token.
"""
import functools
import json
from dataclasses import dataclass, replace

import pytest
import torch

from avkv.attention_support import method_parts
from avkv.config import compose, instantiate
from avkv.engine import CompressionError, Engine, within_budget
from avkv.methods.snapkv import SnapKV
from tests import discover
from tests.conftest import VLM_FAMILIES, av_prompt, family_prompt, tiny_model_dir

#: tiny families left out, and why (every other configs/model/tiny_*.yaml is tested)
SKIP_FAMILIES = {"qwen2": "text-only: the media are dropped, the prompt is 47 tokens and every budget here keeps fewer "
                           "than its uncompressed question (the engine refuses: CompressionError)"}
FAMILIES = tuple(f for f in discover.tiny_families() if f not in SKIP_FAMILIES)
METHODS = discover.methods()                      # every configs/method/*.yaml but the full cache
BUDGETS = (0.5, 0.2, 0.1)
#: families whose cache is not one full-attention K/V per layer: the engine refuses there what a method declares it
#: needs (``avkv.compressor``: capabilities when the prefill starts, a failure on a layer's view, a ragged selection)
_IRREGULAR = "Gemma-3n's cache has sliding-window and KV-shared layers (docs/methods.md): "
IRREGULAR = ("gemma3n",)
#: why, by the method's declaration (the first that applies, in this order; the engine's message lists them all):
#: each budget either raises a CompressionError naming the method and the model, or holds the budget as any other
#: (at least one budget raises, so a declared refusal that stops is noticed)
IRREGULAR_REASONS = (
    (lambda m: m.decode_policy == "fixed", "eviction while decoding (decode_policy=fixed) is not implemented on it"),
    (lambda m: m.all_query_stats, "the all-query statistics route would replace the sliding layers' masks"),
    (lambda m: m.prunes_hidden_states, "hidden-state pruning re-runs layers whose cache others read"),
    (lambda m: m.needs_reconstruction, "its context reconstruction is not run on it"),
    (lambda m: m.prefill_attention, "its prefill attention pattern would replace the sliding layers' masks"),
    (lambda m: m.indexes_prompt_positions, "a sliding layer's view holds only its window, not the question it indexes"),
    (lambda m: m.needs_every_layer, "its conserved allocation expects every decoder layer to hold a cache"),
    (lambda m: m.ragged_heads, "per-head budgets (ragged storage) are not, where its heads keep different counts"),
)
#: families whose adapter has no single rotary embedding (``ModelAdapter.rotary_embedding`` raises): every method
#: that declares ``needs_rope`` (it reads ``view.rope``; itself or a method nested in it) is refused on them
NO_ROPE = {"gemma3n": _IRREGULAR + "re-rotating keys needs one RoPE (sliding and full layers have their own θ)"}


@functools.lru_cache(maxsize=None)
def configured(name: str):
    return instantiate(compose([f"method={name}"]).method)


@functools.lru_cache(maxsize=None)
def needs_rope(name: str) -> bool:
    """The method config ``name`` declares needs_rope (the class flag, on it or a nested method)."""
    return any(getattr(m, "needs_rope", False) for m in method_parts(configured(name)))


def irregular_refusal(name: str) -> str | None:
    """Why the engine refuses ``name`` on an irregular cache, from what the method declares (None: it runs)."""
    m = configured(name)
    return next((_IRREGULAR + why for asks, why in IRREGULAR_REASONS if asks(m)), None)


def refusal(family: str, name: str) -> str | None:
    """Why the engine refuses ``name`` on ``family`` (None: it runs): the irregular cache's refusals, then
    needs_rope, both from the method's declarations."""
    why = irregular_refusal(name) if family in IRREGULAR else None
    return why if why is not None or family not in NO_ROPE or not needs_rope(name) else NO_ROPE[family]


#: the configs known to declare budget_mode: achieved; a config that starts declaring it fails until listed here,
#: so a method cannot leave the budget by a config edit alone
DECLARED = {"drop_media", "simlayerkv", "per_layer_compression"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def method_cfgs():
    return {m: compose([f"method={m}"]).method for m in METHODS}


_MODELS: dict = {}


def model(family, tmp_path_factory):
    if family not in _MODELS:
        tiny_model_dir(f"tiny_{family}")
        ad = instantiate(compose([f"model=tiny_{family}"]).model, device="cpu")
        from avkv.tasks.base import Media, Prompt
        p = av_prompt(question="What?") if family not in VLM_FAMILIES else family_prompt(ad, question="What?")
        if family == "videollama2_av":
            p = Prompt(context=[Media("video", p.context[0].path, with_audio=False)], question=p.question)
        tc = ad.text_config()
        L, H, Hk = tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads
        scores = torch.rand(L, H, generator=torch.Generator().manual_seed(0)) ** 3     # uneven head budgets
        f = tmp_path_factory.mktemp("audiokv") / f"{family}.json"
        f.write_text(json.dumps({"scores": scores.tolist(), "num_layers": L, "num_heads": H, "num_kv_heads": Hk}))
        _MODELS[family] = (ad, ad.encode(p), str(f))
    return _MODELS[family]


def check_conformance(r: dict, name: str, n: int, entry: int, where) -> None:
    """One record against the rule: bytes = entries (no padding), and the budget held in both within ±1 % (one
    entry aside), unless the config is a known declared exception or FastV's checked infeasibility."""
    assert r["budget_achieved"] == r["kv_bytes_ratio"]
    held_entries = sum(r["kept_per_layer"]) * r["kv_heads"]
    assert r["kv_bytes_kept"] == round(held_entries) * entry, where             # bytes = entries, no padding
    if name in DECLARED:
        assert r["budget_mode"] == "achieved" and r["budget_reason"], where
        return
    assert r["budget_mode"] == "held", where
    if r.get("budget_infeasible"):                # FastV only, and only where it truly cannot reach it
        assert name == "fastv", where
        assert r["fastv_layer"] == 1 and r["fastv_ratio"] == 1.0, where
        assert r["fastv_pruned_tokens"] == r["fastv_media_tokens"], where
        assert r["kept_ratio"] > r["budget_target"], where
        return
    assert r["budget_held"], where
    assert within_budget(r["kept_ratio"], r["budget_target"], n), where
    assert within_budget(r["kv_bytes_ratio"], r["budget_target"], n), where


def run_budgets(family, name, cfg_of, tmp_path_factory):
    ad, enc, head_scores = model(family, tmp_path_factory)
    n = enc.input_ids.shape[1]
    entry = 2 * ad.decoder_layers()[0].self_attn.head_dim * 4                  # K + V, float32
    refused = 0
    for budget in BUDGETS:
        cfg = cfg_of(name).copy()
        if "head_scores" in cfg:                       # a method that reads per-model head scores (AudioKV)
            cfg.head_scores = head_scores
        eng = Engine(ad, instantiate(cfg), budget=budget, max_new_tokens=1)
        if refusal(family, name):
            try:
                r = eng.generate(enc).record
            except CompressionError as e:
                assert f"'{name}'" in str(e) and family in str(e), str(e)
                refused += 1
                continue
        else:
            r = eng.generate(enc).record
        where = (family, name, budget, round(r["kept_ratio"], 4), round(r["kv_bytes_ratio"], 4))
        # each cache-owning layer keeps min(the budget's entries, what it holds uncompressed: n, or min(n, W - 1)
        # on a sliding-window layer), as a share of the whole
        cap = r.get("capacity_per_layer", [n] * r["layers"])
        assert r["budget_target"] == pytest.approx(sum(min(eng.target_kept(n), c) for c in cap) / sum(cap))
        if "capacity_per_layer" not in r:
            assert r["budget_target"] == pytest.approx(round(budget * n) / n)
        check_conformance(r, name, n, entry, where)
    assert refused or not refusal(family, name), f"{(family, name)} is listed as refused but ran at every budget"


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_holds_its_budget_or_declares_it(family, name, method_cfgs, tmp_path_factory):
    run_budgets(family, name, method_cfgs.__getitem__, tmp_path_factory)


def test_a_new_method_config_is_discovered_and_a_bad_budget_caught(tmp_path, tmp_path_factory, monkeypatch):
    """A config dropped into configs/method/ is listed by discovery (so parametrised above), and a method that keeps
    less than its budget, or declares ``achieved`` without being a known exception, fails the check."""
    cfgs = tmp_path / "method"
    cfgs.mkdir()
    (cfgs / "half_snapkv.yaml").write_text("_target_: tests.methods.test_budget_conformance.HalfSnapKV\n")
    monkeypatch.setattr(discover, "CONFIG_DIR", tmp_path)
    assert discover.methods() == ["half_snapkv"]
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"_target_": "tests.methods.test_budget_conformance.HalfSnapKV"})
    with pytest.raises(AssertionError):
        run_budgets("qwen2_5_omni", "half_snapkv", lambda _: cfg, tmp_path_factory)
    declared = OmegaConf.create({"_target_": "tests.methods.test_budget_conformance.HalfSnapKV",
                                 "declare": True})
    with pytest.raises(AssertionError, match="half_snapkv"):
        run_budgets("qwen2_5_omni", "half_snapkv", lambda _: declared, tmp_path_factory)


@dataclass
class HalfSnapKV(SnapKV):
    """A deliberately wrong method: SnapKV keeping half its budget (``declare``: and claiming ``achieved``)."""

    declare: bool = False

    @property
    def budget_mode(self) -> str:  # type: ignore[override]
        return "achieved" if self.declare else "held"

    @property
    def budget_reason(self) -> str | None:  # type: ignore[override]
        return "keeps half" if self.declare else None

    def compress(self, view):
        return super().compress(replace(view, n_keep=max(1, view.n_keep // 2)))


def test_proxy_table_flags_cells_off_budget_both_ways_on_entries_and_bytes():
    import importlib.util

    from avkv.config import ROOT
    spec = importlib.util.spec_from_file_location("proxy_table", ROOT / "scripts" / "proxy_table.py")
    pt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pt)

    def cell(budget, **rec):
        rec.setdefault("n_prompt", 800)
        return dict(budget=budget, **pt.budget_fields([rec], budget))

    assert pt.over(cell(0.5, kept_ratio=0.5, kv_bytes_ratio=0.5), 0.5) == ""
    under = pt.over(cell(0.5, kept_ratio=0.362, kv_bytes_ratio=0.362), 0.5)                 # AccKV without refill
    assert "0.36 entries" in under and "off budget" in under
    assert "0.63 bytes" in pt.over(cell(0.5, kept_ratio=0.5, kv_bytes_ratio=0.628), 0.5)     # padded storage
    assert "infeasible" in pt.over(cell(0.2, kept_ratio=0.557, kv_bytes_ratio=0.557, budget_held=False,
                                        budget_infeasible=True), 0.2)
    assert "declared" in pt.over(cell(0.2, kept_ratio=0.45, kv_bytes_ratio=0.45, budget_held=False,
                                      budget_mode="achieved"), 0.2)


def test_needs_rope_is_refused_before_the_prefill(tmp_path_factory):
    """The refusal follows the declaration, not the first view.rope call: a SnapKV that declares needs_rope (and
    never reads it) is refused on Gemma-3n by name before any layer is compressed; undeclared, it runs."""
    ad, enc, _ = model("gemma3n", tmp_path_factory)

    @dataclass
    class Declared(SnapKV):
        name = "snapkv_rope"
        needs_rope = True

        def compress(self, view):
            pytest.fail("a layer was compressed")

    with pytest.raises(CompressionError, match=r"'snapkv_rope' reads the rotary embedding \(needs_rope\).*gemma3n"):
        Engine(ad, Declared(), budget=0.5, max_new_tokens=1).generate(enc)
    from avkv.methods.per_layer_compression import PerLayerCompression
    with pytest.raises(CompressionError, match=r"\(needs_rope\).*gemma3n"):             # declared by a nested scorer
        Engine(ad, PerLayerCompression(scorer=Declared(), ratios=[0.5]), budget=0.5, max_new_tokens=1).generate(enc)
    assert Engine(ad, SnapKV(), budget=0.5, max_new_tokens=1).generate(enc).record["compressed"]

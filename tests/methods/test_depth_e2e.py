"""Depth-dependent mechanisms end to end on the 8-layer tiny Omni (``tiny_qwen2_5_omni_deep``) with the methods'
default configs, and what the records say where a 2-layer model lacks the layers."""
import logging

import pytest

from avkv.config import compose, instantiate
from avkv.engine import Engine
from avkv.methods import base
from tests.conftest import adapter, av_prompt, tiny_model_dir


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def deep():
    ad = adapter("qwen2_5_omni_deep")
    assert ad.text_config().num_hidden_layers == 8
    return ad, ad.encode(av_prompt())


def method(name, **overrides):
    return instantiate(compose([f"method={name}"] + [f"method.{k}={v}" for k, v in overrides.items()]).method)


def test_purekv_default_runs_clie_and_st_spattn(deep):
    ad, enc = deep
    r = Engine(ad, method("purekv"), budget=0.2, max_new_tokens=2).generate(enc).record
    assert r["clie_active"] is True and r["st_spattn_used"] is True
    info = r["method_info"]
    assert [info[str(i)]["clie"] for i in range(8)] == ["self"] * 3 + ["from_layer_2"] * 5
    assert [info[str(i)]["st_spattn"] for i in range(8)] == [False, False] + [True] * 6
    assert r["budget_held"]


def test_purekv_on_two_layers_warns_once_and_says_nothing_ran(caplog):
    ad = adapter("qwen2_5_omni")
    enc = ad.encode(av_prompt())
    base._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="avkv"):
        recs = [Engine(ad, method("purekv"), budget=0.2, max_new_tokens=1).generate(enc).record for _ in range(2)]
    assert all(r["clie_active"] is False and r["st_spattn_used"] is False for r in recs)
    msgs = [m for m in caplog.messages if m.startswith("PureKV")]
    assert len(msgs) == 2 and any("CLIE" in m for m in msgs) and any("ST-SpAttn" in m for m in msgs)  # once each


def test_acckv_focus_changes_with_depth_and_refill_holds_the_budget(deep):
    ad, enc = deep
    r = Engine(ad, method("acckv"), budget=0.2, max_new_tokens=2).generate(enc).record
    info = [r["method_info"][str(i)] for i in range(8)]
    assert len({i["high_priority"] for i in info}) == 2, [i["high_priority"] for i in info]   # it flips with depth
    assert max(i["w_video"] for i in info) - min(i["w_video"] for i in info) > 0.1
    evicted = sum(i["calibration_evicted"] for i in info)
    assert evicted > 0 and sum(i.get("refilled", 0) + i.get("calibration_restored", 0) for i in info) == evicted
    assert r["budget_held"] and r["budget_mode"] == "held"


def test_madakv_compensates_across_layers(deep):
    ad, enc = deep
    r = Engine(ad, method("madakv"), budget=0.2, max_new_tokens=2).generate(enc).record
    info = [r["method_info"][str(i)] for i in range(8)]
    totals = r["madakv_layer_totals"]
    kvH, n_keep = r["kv_heads"], round(0.2 * r["n_prompt"]) - (r["n_prompt"] - r["split"])
    assert sum(totals) == 8 * kvH * n_keep                               # L·H·B exactly
    assert len(set(totals)) > 1                                          # budget moved between layers ...
    demand = [i["demand"] for i in info]
    order = sorted(range(8), key=lambda l: demand[l])
    assert totals[order[-1]] > totals[order[0]]                          # ... towards the layers that need more
    assert min(totals) > kvH * 32                                        # no layer starved to the proxy
    assert r["kv_storage"] == "ragged" and r["budget_held"]


def test_pyramidkv_schedule_shrinks_with_depth(deep):
    ad, enc = deep
    r = Engine(ad, method("pyramidkv"), budget=0.3, max_new_tokens=1).generate(enc).record
    assert r["layer_schedule"] == "pyramid"
    kept = r["kept_per_layer"]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1] and r["budget_held"]


def test_fastv_chooses_k_and_r_for_the_budget():
    """16 frames (229 media tokens of 366): K=2 meets 0.6, only K=1 meets 0.5, nothing meets 0.2."""
    tiny_model_dir("tiny_qwen2_5_omni_deep")
    ad = instantiate(compose(["model=tiny_qwen2_5_omni_deep", "model.num_frames=16"]).model, device="cpu")
    enc = ad.encode(av_prompt())
    recs = {b: Engine(ad, method("fastv"), budget=b, max_new_tokens=1).generate(enc).record for b in (0.6, 0.5, 0.2)}
    r = recs[0.6]
    assert (r["fastv_layer"], r["budget_infeasible"], r["budget_held"]) == (2, False, True) and r["fastv_ratio"] < 1
    r = recs[0.5]
    assert (r["fastv_layer"], r["fastv_layer_requested"], r["budget_infeasible"], r["budget_held"]) == (1, 2, False, True)
    r = recs[0.2]
    assert r["budget_infeasible"] is True and r["fastv_layer"] == 1 and r["fastv_ratio"] == 1.0
    n, text = r["n_prompt"], r["n_prompt"] - r["fastv_media_tokens"]
    assert r["kept_ratio"] == pytest.approx((n + 7 * text) / (8 * n))       # the floor: every media token from 1
    for rec in recs.values():
        assert rec["kept_per_layer"][0] == rec["n_prompt"]                    # layers < K keep everything

"""The seed methods end to end on the tiny checkpoints (few and fast): AccKV and FlowMM on Omni with audio+video,
AudioKV on Qwen2-Audio and Omni (head scores calibrated here), PureKV and MadaKV on Qwen2.5-VL with video."""
import importlib.util
import json

import pytest
import torch

from avkv.config import ROOT
from avkv.engine import Engine
from avkv.methods.acckv import AccKV
from avkv.methods.audiokv import AudioKV
from avkv.methods.flowmm import FlowMM
from avkv.methods.madakv import MadaKV
from avkv.methods.purekv import PureKV
from tests.conftest import adapter, av_prompt

MAX_NEW = 3


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def omni():
    ad = adapter("qwen2_5_omni")
    enc = ad.encode(av_prompt())
    assert (enc.modality == 2).any() and (enc.modality == 3).any(), "the Omni prompt must hold video and audio"
    return ad, enc


@pytest.fixture(scope="module")
def vl():
    ad = adapter("qwen2_5_vl")
    enc = ad.encode(av_prompt())
    assert (enc.layout["video_frame"] >= 0).any()
    return ad, enc


def check_record(rec, budget, tol=0.02):
    assert rec["compressed"]
    assert abs(rec["kept_ratio"] - budget) <= tol + 1.0 / rec["n_prompt"], rec["kept_ratio"]
    assert rec["kv_bytes_kept"] < rec["kv_bytes_full"]
    assert set(rec["method_info"]) == {str(i) for i in range(rec["layers"])}


def test_acckv_on_omni_audio_video(omni):
    ad, enc = omni
    g = Engine(ad, AccKV(window=8, tau=-1.0), budget=0.6, max_new_tokens=MAX_NEW).generate(enc)
    rec = g.record
    check_record(rec, 0.6)
    for layer, info in rec["method_info"].items():
        assert info["high_priority"] in ("audio", "video")
        assert abs(info["w_video"] + info["w_audio"] - 1) < 1e-5
        assert info["kept_audio"] + info["kept_video"] > 0          # text fits: the rest goes to audio ∪ video
    # the per-layer counts add up to what the engine measured on the compressed chunk
    mk = sum(i["kept_text"] + i["kept_audio"] + i["kept_video"] for i in rec["method_info"].values())
    suffix = rec["n_prompt"] - rec["split"]
    assert mk == pytest.approx((sum(rec["kept_per_layer"]) - suffix * rec["layers"]) * rec["kv_heads"])
    # at a budget that keeps both media, cross-calibration with the paper's τ evicts low-priority tokens (random
    # keys are not aligned with the high-priority ones); refill=false leaves the slots empty and says so,
    # the default refills them and holds the budget
    both = Engine(ad, AccKV(window=8, tau=-1.0), budget=0.8, max_new_tokens=MAX_NEW).generate(enc).record
    assert all(i["kept_audio"] > 0 and i["kept_video"] > 0 for i in both["method_info"].values())
    cal = Engine(ad, AccKV(window=8, tau=0.6, refill=False), budget=0.8, max_new_tokens=MAX_NEW).generate(enc).record
    assert sum(i["calibration_evicted"] for i in cal["method_info"].values()) > 0
    assert cal["kept_ratio"] < both["kept_ratio"]
    assert cal["budget_mode"] == "achieved" and not cal["budget_held"] and "refill" in cal["budget_reason"]
    ref = Engine(ad, AccKV(window=8, tau=0.6), budget=0.8, max_new_tokens=MAX_NEW).generate(enc).record
    evicted = sum(i["calibration_evicted"] for i in ref["method_info"].values())
    assert evicted > 0 and sum(i["refilled"] + i["calibration_restored"] for i in ref["method_info"].values()
                               if "refilled" in i) == evicted
    assert ref["budget_mode"] == "held" and ref["budget_held"] and ref["kept_ratio"] == both["kept_ratio"]


def test_flowmm_on_omni_online_and_offline(omni, tmp_path):
    ad, enc = omni
    rec = Engine(ad, FlowMM(), budget=0.3, max_new_tokens=MAX_NEW).generate(enc).record
    check_record(rec, 0.3)
    rhos = [i["rho"] for i in rec["method_info"].values()]
    assert all(0.0 < r < 1.0 for r in rhos)
    # offline: the calibration script's ρ file drives the per-layer mode
    from avkv.config import compose
    cfg = compose(["model=tiny_qwen2_5_omni", "method=flowmm", "budget=0.3"])
    cal = script("calibrate_flowmm").calibrate(cfg, samples=1, log=lambda *_: None)
    assert len(cal["rho"]) == rec["layers"]
    f = tmp_path / "rho.json"
    f.write_text(json.dumps(cal))
    off = Engine(ad, FlowMM(rho_source="offline", calibration_file=str(f), theta=cal["rho"][0] + 1e-3),
                 budget=0.3, max_new_tokens=MAX_NEW).generate(enc).record
    assert off["method_info"]["0"]["mode"] == "intra"
    assert off["method_info"]["0"]["rho"] == pytest.approx(cal["rho"][0], abs=1e-6)


@pytest.mark.parametrize("family", ["qwen2_audio", "qwen2_5_omni"])
def test_audiokv_head_scores_and_budgets(family, tmp_path):
    cal = script("calibrate_audiokv")
    eager = adapter(family, "eager")
    samples = cal.write_synthetic(tmp_path / "wav", 1)
    scores = cal.calibrate(eager, samples, teacher_forcing=True, log=lambda *_: None)
    tc = eager.text_config()
    assert torch.tensor(scores["scores"]).shape == (tc.num_hidden_layers, tc.num_attention_heads)
    assert scores["steps"] > 0
    f = tmp_path / "hs.json"
    # a fixed, clearly uneven score matrix so the head budgets differ (tiny random models give near-flat scores)
    scores["scores"] = [[1.0, 1.0, 0.0, 0.0], [0.2, 0.2, 0.1, 0.1]]
    f.write_text(json.dumps(scores))
    ad = adapter(family)
    enc = ad.encode(av_prompt())
    rec = Engine(ad, AudioKV(window=8, head_scores=str(f)), budget=0.3, max_new_tokens=MAX_NEW).generate(enc).record
    budgets = [info["head_budgets"] for info in rec["method_info"].values()]
    assert len({b for layer in budgets for b in layer}) > 1          # heads keep different counts
    assert rec["kept_per_head"] == budgets
    assert rec["kv_storage"] == "ragged"                              # per-head segments, no padding
    assert rec["kv_bytes_ratio"] == pytest.approx(rec["kept_ratio"], abs=1e-12)
    assert abs(rec["kept_ratio"] - 0.3) <= 0.02
    assert rec["kept_by_modality"]["audio"]["kept"] > 0


def test_purekv_on_qwen25vl_video(vl):
    ad, enc = vl
    m = PureKV(window=8, source_layer=0, st_dense_layers=1)
    g = Engine(ad, m, budget=0.3, max_new_tokens=MAX_NEW).generate(enc)
    rec = g.record
    check_record(rec, 0.3)
    assert rec["method_info"]["0"] == {"clie": "self", "st_spattn": False}
    assert rec["method_info"]["1"] == {"clie": "from_layer_0", "st_spattn": True}
    assert ad.text_config()._attn_implementation == "sdpa"           # restored after the sample
    # with two layers only a sparse layer 0 can change what follows (layer 1's keys/values and the logits)
    sparse0 = Engine(ad, PureKV(window=8, source_layer=0, st_dense_layers=0), budget=0.3,
                     max_new_tokens=MAX_NEW).generate(enc)
    assert sparse0.record["method_info"]["0"]["st_spattn"] is True
    dense = Engine(ad, PureKV(window=8, source_layer=0, st_spattn=False), budget=0.3,
                   max_new_tokens=MAX_NEW).generate(enc)
    assert torch.allclose(g.first_logits, dense.first_logits, atol=1e-5)
    assert not torch.allclose(sparse0.first_logits, dense.first_logits, atol=1e-5)


def test_madakv_on_qwen25vl_video(vl):
    ad, enc = vl
    rec = Engine(ad, MadaKV(proxy=8), budget=0.3, max_new_tokens=MAX_NEW).generate(enc).record
    check_record(rec, 0.3)
    info = rec["method_info"]
    for layer, d in info.items():
        assert sum(d["per_head"]) == d["layer_total"]
    last = info[str(rec["layers"] - 1)]
    assert last["budget_spent"] == last["budget_total"]                # the global budget is conserved
    assert sum(d["layer_total"] for d in info.values()) == last["budget_total"]

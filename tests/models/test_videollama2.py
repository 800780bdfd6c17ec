"""VideoLLaMA2 port on the tiny AV checkpoint: end to end, engine equivalences, run.py, checkpoint names and loading."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avkv.config import compose
from avkv.engine import Engine
from avkv.experiment import run
from avkv.methods.base import AUDIO, IMAGE, TEXT, VIDEO
from avkv.methods.full import Full
from avkv.methods.snapkv import SnapKV
from avkv.models.videollama2 import CheckpointKeyError, VideoLLaMA2Config, build_tiny, from_pretrained
from avkv.models.videollama2.modeling import build_model, official_key_groups, official_state_dict
from avkv.tasks.base import Media, Prompt
from tests.conftest import adapter, av_prompt, fixtures_dir, tiny_model_dir
from tests.models.test_native_ports import rewrite as _rewrite

MAX_NEW = 6
FAMILY = "videollama2_av"


@pytest.fixture(scope="module")
def av():
    ad = adapter(FAMILY)
    return ad, ad.encode(av_prompt())


# ------------------------------------------------------------------------------------------- end to end
def test_video_with_audio_is_one_item_video_run_then_audio_run(av):
    ad, enc = av
    n = enc.input_ids.shape[1]
    assert enc.modalities_used == ["audio", "video"]
    (span,) = enc.layout["media_spans"]
    assert span["kind"] == "video" and span["n_visual"] == ad.model.num_visual_tokens(8) == 4 * 4 * 4
    assert span["n_audio"] == 1496                       # 30 s fbank → 187 × 8 BEATs patches
    mod = enc.modality
    assert mod[span["start"]:span["start"] + span["n_visual"]].eq(VIDEO).all()
    assert mod[span["start"] + span["n_visual"]:span["end"]].eq(AUDIO).all()
    assert mod[:span["start"]].eq(TEXT).all() and mod[span["end"]:].eq(TEXT).all()
    assert (enc.input_ids[0] < 0).sum() == span["end"] - span["start"]
    assert 0 < enc.question_start < enc.assistant_start < n
    text = ad.tokenizer.decode(enc.input_ids[0, enc.question_start:enc.assistant_start])
    assert text.startswith("What colour is the moving square?")
    assert ad.tokenizer.decode(enc.input_ids[0, enc.assistant_start:]) == "<|im_start|>assistant\n"
    frames = enc.layout["video_frame"]
    assert frames[mod == VIDEO].tolist() == [j // 16 for j in range(64)]
    assert frames[mod != VIDEO].eq(-1).all()


def test_prompt_renders_the_official_qwen2_conversation(av):
    ad, enc = av
    ids = [i for i in enc.input_ids[0].tolist() if i >= 0]
    text = ad.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_generate_video_and_audio(av):
    ad, enc = av
    out = ad.generate(enc, max_new_tokens=MAX_NEW)
    assert 1 <= len(out) <= MAX_NEW
    assert all(0 <= t < ad.text_config().vocab_size for t in out)


def test_splice_puts_encoder_features_at_the_placeholders(av):
    ad, enc = av
    m = ad.model
    (item,) = enc.inputs["media"]
    n = enc.input_ids.shape[1]
    with torch.no_grad():
        emb = m.embed(enc.input_ids, torch.arange(n)[None], [item])[0]
        feats = m.encode_item(item)
        text_emb = m.model.embed_tokens(enc.input_ids[0, :item.start])
    assert torch.equal(emb[item.start:item.end], feats)
    assert torch.equal(emb[:item.start], text_emb)


def test_media_run_split_across_chunks_gives_the_one_forward_logits(av):
    """Prefill in two chunks cutting the audio run: rows are picked by absolute position, so logits match."""
    from transformers import DynamicCache
    ad, enc = av
    (item,) = enc.inputs["media"]
    n = enc.input_ids.shape[1]
    pos = torch.arange(n)[None]
    mm = {"media": [item]}
    with torch.no_grad():
        one = ad.forward(enc.input_ids, DynamicCache(config=ad.text_config()), pos, mm)
        cache = DynamicCache(config=ad.text_config())
        cut = item.start + item.n_visual + 100
        ad.forward(enc.input_ids[:, :cut], cache, pos[:, :cut], mm)
        two = ad.forward(enc.input_ids[:, cut:], cache, pos[:, cut:], mm)
    assert torch.allclose(one, two, atol=1e-5)


def test_placeholders_without_media_fail_loudly(av):
    ad, enc = av
    from transformers import DynamicCache
    with pytest.raises(ValueError, match="placeholder positions without media"):
        ad.forward(enc.input_ids, DynamicCache(config=ad.text_config()), torch.arange(enc.input_ids.shape[1])[None])


def test_image_is_repeated_to_num_frames_and_audio_file_alone(tmp_path):
    from PIL import Image
    import soundfile as sf
    ad = adapter(FAMILY)
    img = tmp_path / "x.png"
    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(img)
    wav = tmp_path / "x.wav"
    sf.write(wav, (0.2 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32), 16000)
    enc = ad.encode(Prompt(context=[Media("image", str(img)), "and", Media("audio", str(wav))], question="Same?"))
    spans = enc.layout["media_spans"]
    assert [s["kind"] for s in spans] == ["image", "audio"]
    assert spans[0]["n_visual"] == ad.model.num_visual_tokens(ad.model.config.num_frames)
    assert enc.modality.eq(IMAGE).sum() == spans[0]["n_visual"] and enc.modality.eq(AUDIO).sum() == 1496
    text = ad.tokenizer.decode([i for i in enc.input_ids[0].tolist() if i >= 0])
    assert "user\n\nand\n\nSame?" in text                  # "<image>\nand\n<audio>\nSame?" with the tags cut out
    # an image is the same frame num_frames times: every temporal group of the STC output is identical
    with torch.no_grad():
        f = ad.model.encode_item(enc.inputs["media"][0])
    per = f.shape[0] // ad.model.video_grid()[0]
    assert torch.allclose(f[:per], f[per:2 * per], atol=1e-5)
    assert len(ad.generate(enc, max_new_tokens=2)) >= 1


# ------------------------------------------------------------------------------------------- engine
# the engine equivalences (generate, budget 1, split prefill, physical pruning, budget conformance with both media
# kept) run on every family, this one included, in tests/test_engine.py


def test_snapkv_end_to_end_on_the_default_av_dataset(tmp_path):
    """The experiment loop on this family (in process; the run.py command line itself is tested once, in
    tests/tasks/test_end_to_end.py)."""
    tiny_model_dir("tiny_videollama2_av")
    fixtures_dir()
    s = run(compose(["model=tiny_videollama2_av", "method=snapkv", "budget=0.2", "dataset.limit=2",
                     "max_new_tokens=3", f"paths.runs={tmp_path}", "progress=false"]))
    recs = [json.loads(x) for x in (Path(s["run_dir"]) / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for r in recs:
        assert r["error"] is None
        assert abs(r["kept_ratio"] - 0.2) <= 0.02
        assert r["kept_by_modality"]["video"]["kept"] > 0 and r["kept_by_modality"]["audio"]["kept"] > 0


# ------------------------------------------------------------------------------------ checkpoint names
def official_names_tiny_av(raw: dict) -> set[str]:
    """Tensor names of the official ``Videollama2Qwen2ForCausalLM`` for the tiny AV config, written from the
    official module tree (DAMO-NLP-SG/VideoLLaMA2, branch audio_visual):

    * ``videollama2_qwen2.py``: ``Qwen2ForCausalLM`` → ``model.*`` + ``lm_head``; ``Videollama2MetaModel`` adds
      ``model.vision_tower`` / ``model.mm_projector`` / ``model.audio_tower`` / ``model.mm_projector_a``;
    * ``encoder.py``: ``SiglipVisionTower.vision_tower = SiglipVisionModel`` (transformers 4.42: ``vision_model.*``
      with ``embeddings``, ``encoder.layers``, ``post_layernorm``, ``head``);
    * ``projector.py``: ``STCConnectorV35`` = ``s1`` / ``sampler`` / ``s2`` (timm ``RegStage`` of ``Bottleneck``
      blocks ``b1..b4``: ``conv1``/``conv2``/``conv3`` as ``ConvNormAct`` (``conv``, ``bn``), ``se.fc1``/``se.fc2``,
      ``downsample`` only when the width changes) and ``readout`` (``build_mlp``: Linear 0, GELU 1, Linear 2);
      ``build_audio_projector`` ``mlp2x_gelu`` → ``mm_projector_a.0`` / ``.2``;
    * ``beats/BEATs.py`` + ``backbone.py``: ``patch_embedding`` (no bias), ``post_extract_proj``, ``layer_norm``,
      ``encoder.pos_conv.0`` (weight_norm → ``weight_g``, ``weight_v``, ``bias``), ``encoder.layers.{i}`` with
      ``self_attn.{k,v,q,out}_proj``, ``relative_attention_bias`` (layer 0's module, reachable from every layer),
      ``grep_linear``, ``grep_a``, ``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``;
      ``encoder.layer_norm``; ``predictor`` (fine-tuned BEATs).
    """
    wb = ("weight", "bias")
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {p + f"self_attn.{x}_proj.{w}" for x in "qkv" for w in wb} | {p + "self_attn.o_proj.weight"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    v = "model.vision_tower.vision_tower.vision_model."
    names |= {v + "embeddings.patch_embedding.weight", v + "embeddings.patch_embedding.bias",
              v + "embeddings.position_embedding.weight", v + "post_layernorm.weight", v + "post_layernorm.bias",
              v + "head.probe", v + "head.attention.in_proj_weight", v + "head.attention.in_proj_bias"}
    names |= {v + f"head.{m}.{w}" for m in ("attention.out_proj", "layernorm", "mlp.fc1", "mlp.fc2") for w in wb}
    for i in range(raw["vision_config"]["num_hidden_layers"]):
        p = v + f"encoder.layers.{i}."
        names |= {p + f"{m}.{w}" for m in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                           "self_attn.out_proj", "layer_norm1", "mlp.fc1", "mlp.fc2",
                                           "layer_norm2") for w in wb}
    pr = "model.mm_projector."
    for stage in ("s1", "s2"):
        for b in range(1, 5):
            p = f"{pr}{stage}.b{b}."
            names |= {p + f"{c}.conv.weight" for c in ("conv1", "conv2", "conv3")}
            names |= {p + f"{c}.bn.{w}" for c in ("conv1", "conv2", "conv3") for w in wb}
            names |= {p + f"se.{f}.{w}" for f in ("fc1", "fc2") for w in wb}
            if stage == "s1" and b == 1 and raw["mm_hidden_size"] != raw["hidden_size"]:
                names |= {p + "downsample.conv.weight", p + "downsample.bn.weight", p + "downsample.bn.bias"}
    names |= {pr + f"sampler.0.{w}" for w in wb} | {pr + f"readout.{i}.{w}" for i in (0, 2) for w in wb}
    a = "model.audio_tower."
    names |= {a + "patch_embedding.weight", a + "post_extract_proj.weight", a + "post_extract_proj.bias",
              a + "layer_norm.weight", a + "layer_norm.bias", a + "encoder.layer_norm.weight",
              a + "encoder.layer_norm.bias", a + "encoder.pos_conv.0.weight_g", a + "encoder.pos_conv.0.weight_v",
              a + "encoder.pos_conv.0.bias", a + "predictor.weight", a + "predictor.bias"}
    for i in range(raw["audio_config"]["encoder_layers"]):
        p = a + f"encoder.layers.{i}."
        names |= {p + f"self_attn.{x}_proj.{w}" for x in ("k", "v", "q", "out") for w in wb}
        names |= {p + "self_attn.relative_attention_bias.weight", p + "self_attn.grep_a"}
        names |= {p + f"{m}.{w}" for m in ("self_attn.grep_linear", "self_attn_layer_norm", "fc1", "fc2",
                                           "final_layer_norm") for w in wb}
    names |= {f"model.mm_projector_a.{i}.{w}" for i in (0, 2) for w in wb}
    return names


@pytest.fixture(scope="module")
def tiny_dir():
    return tiny_model_dir("tiny_videollama2_av")


def _raw(folder):
    return json.loads((folder / "config.json").read_text())


def test_module_tree_names_equal_the_official_names(tiny_dir):
    raw = _raw(tiny_dir)
    model = build_model(VideoLLaMA2Config.from_dict(raw))
    ours = {k for g in official_key_groups(model) for k in g}
    official = official_names_tiny_av(raw)
    assert ours - official == set(), "names the official tree does not have"
    assert official - ours == set(), "official names the port lacks"
    shared = [g for g in official_key_groups(model) if len(g) > 1]
    assert shared == [[f"model.audio_tower.encoder.layers.{i}.self_attn.relative_attention_bias.weight"
                       for i in range(raw["audio_config"]["encoder_layers"])]]


def test_timm_regstage_shapes_follow_the_official_block(tiny_dir):
    """Bottleneck(bottle_ratio=1, group_size=1 → depthwise 3x3, se_ratio=0.25 of the block *input* width)."""
    raw = _raw(tiny_dir)
    sd = official_state_dict(build_model(VideoLLaMA2Config.from_dict(raw)))
    d_in, d = raw["mm_hidden_size"], raw["hidden_size"]
    p = "model.mm_projector."
    assert sd[p + "s1.b1.conv1.conv.weight"].shape == (d, d_in, 1, 1)
    assert sd[p + "s1.b1.conv2.conv.weight"].shape == (d, 1, 3, 3)
    assert sd[p + "s1.b1.se.fc1.weight"].shape == (round(d_in * 0.25), d, 1, 1)
    assert sd[p + "s1.b2.se.fc1.weight"].shape == (round(d * 0.25), d, 1, 1)
    assert sd[p + "s1.b1.downsample.conv.weight"].shape == (d, d_in, 1, 1)
    assert sd[p + "sampler.0.weight"].shape == (d, d, 2, 2, 2)
    assert sd["model.audio_tower.encoder.pos_conv.0.weight_g"].shape == (1, 1, raw["audio_config"]["conv_pos"])


# the round trip, the deterministic builder and the strict name and shape checks: tests/models/test_native_ports.py
def test_strict_loading_of_shared_tensors(tiny_dir, tmp_path):
    # every name of the shared BEATs bias table may be present (deepspeed-consolidated saves) if the values agree
    rel = "model.audio_tower.encoder.layers.{}.self_attn.relative_attention_bias.weight"
    ok = _rewrite(tiny_dir, tmp_path / "alias", lambda sd: sd.__setitem__(rel.format(1), sd[rel.format(0)].clone()))
    from_pretrained(ok)
    bad2 = _rewrite(tiny_dir, tmp_path / "alias_bad",
                    lambda sd: sd.__setitem__(rel.format(1), sd[rel.format(0)] + 1.0))
    with pytest.raises(CheckpointKeyError, match="different values"):
        from_pretrained(bad2)


def test_config_parsing_of_official_fields(tiny_dir):
    raw = _raw(tiny_dir)
    cfg = VideoLLaMA2Config.from_dict(raw)
    assert (cfg.llm, cfg.vision_kind, cfg.projector_type, cfg.num_frames) == ("qwen2", "siglip", "stc_connector_v35", 8)
    assert cfg.select_layer == -2 and cfg.has_audio and cfg.projector_a_type == "mlp2x_gelu"
    assert cfg.text_config.rope_parameters["rope_theta"] == 1e6            # legacy rope_theta is read
    # the released checkpoints name their towers; their published configs are known without the hub
    real = dict(raw, mm_vision_tower="google/siglip-so400m-patch14-384", mm_hidden_size=1152)
    real.pop("vision_config")
    v = VideoLLaMA2Config.from_dict(real)
    assert (v.vision_config.hidden_size, v.vision_config.num_hidden_layers, v.patches_per_side) == (1152, 27, 27)
    clip = dict(real, mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024)
    c = VideoLLaMA2Config.from_dict(clip)
    assert c.vision_kind == "clip" and c.patches_per_side == 24
    no_audio = {k: v for k, v in raw.items() if k not in ("mm_audio_tower", "audio_config")}
    assert not VideoLLaMA2Config.from_dict(no_audio).has_audio
    # BEATs defaults = the official BEATsConfig() (what the official model builds for a checkpoint)
    d = VideoLLaMA2Config.from_dict({k: v for k, v in raw.items() if k != "audio_config"} | {"mm_hidden_size_a": 768})
    assert (d.beats.encoder_layers, d.beats.encoder_embed_dim, d.beats.embed_dim, d.beats.num_buckets) == (12, 768, 512, 320)
    with pytest.raises(ValueError, match="model_type"):
        VideoLLaMA2Config.from_dict(dict(raw, model_type="videollama2_phi3"))


# ------------------------------------------------------------------------------------ VideoLLaMA2 (Mistral)
def test_mistral_clip_variant_end_to_end(tmp_path):
    from avkv.models.videollama2 import VideoLLaMA2Adapter
    folder = build_tiny(tmp_path / "v2", variant="v2")
    ad = VideoLLaMA2Adapter(folder)
    assert ad.modalities == ("video", "image")
    prompt = av_prompt()
    enc = ad.encode(prompt)
    (span,) = enc.layout["media_spans"]
    assert span["n_visual"] == 5 * 5 * 5 and span["n_audio"] == 0          # STC v1 (padding 1): 8 frames, 8×8
    assert enc.modalities_used == ["video"]
    text = ad.tokenizer.decode([i for i in enc.input_ids[0].tolist() if i >= 0])
    assert text.startswith("<s>[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
    assert text.endswith("<</SYS>>\n\n\n" + prompt.question + " [/INST]")
    assert ad.tokenizer.decode(enc.input_ids[0, enc.assistant_start:]) == " [/INST]"
    full = Engine(ad, Full(), max_new_tokens=3).generate(enc)
    b1 = Engine(ad, SnapKV(window=4), budget=1.0, max_new_tokens=3).generate(enc)
    assert b1.token_ids == full.token_ids
    with pytest.raises(ValueError, match="no audio tower"):
        ad.encode(Prompt(context=[Media("audio", prompt.context[0].path)], question="?"))


def _silent_video(path, frames=6, size=64):
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), 30 * i, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_notes_record_what_the_input_lost_or_gained(tmp_path):
    import soundfile as sf
    ad = adapter(FAMILY)
    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.zeros(31 * 16000, np.float32), 16000)
    enc = ad.encode(Prompt(context=[Media("audio", str(long_wav))], question="?"))
    assert any("31.0s of audio, the 30s window from" in n for n in enc.notes)
    silent = _silent_video(tmp_path / "silent.mp4")
    enc = ad.encode(Prompt(context=[Media("video", str(silent), with_audio=True)], question="?"))
    assert any("no audio track" in n for n in enc.notes)
    assert enc.layout["media_spans"][0]["n_audio"] == 1496          # official: 30 s of silence, still encoded
    assert enc.modalities_used == ["audio", "video"]


@pytest.mark.parametrize("variant", ["av", "v2"])
def test_vision_features_come_from_the_select_layer(variant, tmp_path):
    """hidden_states[-2] = the input of the last encoder layer; CLIP drops its CLS token ('patch')."""
    folder = tiny_model_dir("tiny_videollama2_av") if variant == "av" else build_tiny(tmp_path / "v2", "v2")
    m = from_pretrained(folder)
    tower = m.model.vision_tower
    vm = tower.vision_tower
    px = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        h = vm.embeddings(px)
        if tower.kind == "clip":
            h = vm.pre_layrnorm(h)
        for layer in vm.encoder.layers[:-1]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        ref = h[:, 1:] if tower.kind == "clip" else h
        assert torch.allclose(tower(px), ref, atol=1e-5)
    assert ref.shape[1] == 64

"""Parse an official VideoLLaMA2 ``config.json`` into the pieces the port builds.

The official config is a flat LLM config (``Qwen2Config`` for ``model_type=videollama2_qwen2``,
``MistralConfig`` for ``videollama2`` / ``videollama2_mistral``) plus the multimodal fields the training code
writes: ``mm_vision_tower``, ``mm_hidden_size``, ``mm_vision_select_layer``, ``mm_vision_select_feature``,
``mm_projector_type``, ``num_frames`` and, for the audio-visual model, ``mm_audio_tower``,
``mm_projector_a_type``, ``mm_hidden_size_a``, ``hidden_size_a``.

The vision tower's own config is not in that file (the official code fetches it from the hub by the
``mm_vision_tower`` name), so it comes from, in order: a ``vision_config`` dict in config.json (written by the
tiny builder), ``vision_tower_path/config.json`` when given, or the published config of the two towers the
released checkpoints use. The BEATs config likewise is the official ``BEATsConfig()`` default unless config.json
carries an ``audio_config`` dict (tiny checkpoints only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import CLIPVisionConfig, MistralConfig, PretrainedConfig, Qwen2Config, SiglipVisionConfig

from avkv.models.native import tower_config
from avkv.models.videollama2.beats import BEATsConfig
from avkv.models.videollama2.processing import NUM_FRAMES

#: model_type → (LLM family, transformers config class)
LLM_FAMILIES = {
    "videollama2": ("mistral", MistralConfig),
    "videollama2_mistral": ("mistral", MistralConfig),
    "videollama2_qwen2": ("qwen2", Qwen2Config),
}

#: published configs of the vision towers the released checkpoints name in ``mm_vision_tower``
VISION_PRESETS: dict[str, tuple[str, dict]] = {
    "siglip-so400m-patch14-384": ("siglip", dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
        patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3)),
    "clip-vit-large-patch14-336": ("clip", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768, num_channels=3)),
}

#: config.json keys that describe the multimodal parts (everything else is the LLM's config)
MM_KEYS = {"mm_vision_tower", "vision_tower", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
           "mm_projector_type", "num_frames", "mm_audio_tower", "audio_tower", "mm_projector_a_type",
           "mm_hidden_size_a", "hidden_size_a", "vision_config", "audio_config", "image_aspect_ratio",
           "tune_mm_mlp_adapter", "tune_mm_mlp_adapter_a", "tune_audio_tower", "tune_adapter_llm",
           "freeze_mm_mlp_adapter", "mm_use_im_start_end", "mm_use_im_patch_token", "use_mm_proj", "mm_use_x_start_end",
           "pretrain_mm_mlp_adapter", "pretrain_mm_mlp_adapter_a", "model_type"}


def vision_kind(name: str) -> str:
    """The official ``build_vision_tower`` rule: 'clip' in the name → CLIP, else 'siglip' in it → SigLIP."""
    if "clip" in name:
        return "clip"
    if "siglip" in name:
        return "siglip"
    raise ValueError(f"unknown vision tower {name!r}: the official code accepts names containing 'clip' or 'siglip'")


@dataclass
class VideoLLaMA2Config:
    raw: dict[str, Any]
    llm: str                                    # "qwen2" | "mistral"
    text_config: PretrainedConfig
    vision_tower_name: str
    vision_kind: str                            # "siglip" | "clip"
    vision_config: PretrainedConfig
    select_layer: int = -2
    select_feature: str = "patch"
    projector_type: str = "linear"
    mm_hidden_size: int = 0
    num_frames: int = NUM_FRAMES
    has_audio: bool = False
    beats: BEATsConfig | None = None
    projector_a_type: str = "linear"
    mm_hidden_size_a: int = 0
    hidden_size_a: int = 0

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @classmethod
    def from_dict(cls, raw: dict, vision_tower_path: str | Path | None = None) -> "VideoLLaMA2Config":
        model_type = raw.get("model_type")
        if model_type not in LLM_FAMILIES:
            raise ValueError(f"config.json model_type {model_type!r} is not a supported VideoLLaMA2 model "
                             f"(supported: {sorted(LLM_FAMILIES)})")
        llm, cfg_cls = LLM_FAMILIES[model_type]
        text_kwargs = {k: v for k, v in raw.items() if k not in MM_KEYS}
        text_config = cfg_cls(**text_kwargs)

        tower = raw.get("mm_vision_tower", raw.get("vision_tower"))
        if tower is None:
            raise ValueError("config.json has no mm_vision_tower: not a VideoLLaMA2 checkpoint")
        kind = vision_kind(tower)
        vcls = SiglipVisionConfig if kind == "siglip" else CLIPVisionConfig
        vcfg = tower_config(raw, tower, vision_tower_path, vcls, {k: p[1] for k, p in VISION_PRESETS.items()})
        mm_hidden = vcfg.hidden_size
        select_feature = raw.get("mm_vision_select_feature", "patch")
        if select_feature not in ("patch", "cls_patch") or (kind == "siglip" and select_feature != "patch"):
            raise ValueError(f"unsupported mm_vision_select_feature {select_feature!r} for a {kind} tower")

        has_audio = "mm_audio_tower" in raw          # the official test: hasattr(config, "mm_audio_tower")
        beats = BEATsConfig.from_dict(raw.get("audio_config")) if has_audio else None
        out = cls(raw=raw, llm=llm, text_config=text_config, vision_tower_name=tower, vision_kind=kind,
                  vision_config=vcfg, select_layer=int(raw.get("mm_vision_select_layer", -2)),
                  select_feature=select_feature, projector_type=raw.get("mm_projector_type", "linear"),
                  mm_hidden_size=mm_hidden, num_frames=int(raw.get("num_frames") or NUM_FRAMES), has_audio=has_audio,
                  beats=beats)
        if has_audio:
            out.projector_a_type = raw.get("mm_projector_a_type", "linear")
            out.mm_hidden_size_a = int(raw.get("mm_hidden_size_a", beats.encoder_embed_dim))
            out.hidden_size_a = int(raw.get("hidden_size_a", text_config.hidden_size))
            if out.mm_hidden_size_a != beats.encoder_embed_dim:
                raise ValueError(f"mm_hidden_size_a {out.mm_hidden_size_a} != BEATs encoder_embed_dim "
                                 f"{beats.encoder_embed_dim}")
            if out.hidden_size_a != text_config.hidden_size:
                raise ValueError(f"hidden_size_a {out.hidden_size_a} != LLM hidden_size {text_config.hidden_size}")
        return out

    @classmethod
    def from_pretrained(cls, folder: str | Path, vision_tower_path: str | Path | None = None) -> "VideoLLaMA2Config":
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text()), vision_tower_path)

"""Parse an official MobileVLM ``config.json`` into the pieces the port builds.

The official checkpoint (``MobileLlamaForCausalLM``, ``model_type: mobilevlm``) writes a flat ``LlamaConfig`` (the
MobileLLaMA decoder) plus the multimodal fields its training script sets: ``mm_vision_tower``,
``vision_tower_type`` (must be ``clip``), ``mm_hidden_size``, ``mm_vision_select_layer``,
``mm_vision_select_feature``, ``mm_projector_type`` (``ldpnetv2`` for MobileVLM V2), ``image_aspect_ratio``
(``pad`` for V2), ``mm_use_im_start_end``, ``mm_use_im_patch_token`` and training bookkeeping (``tune_mm_mlp_adapter``,
``mm_projector_lr``, ``tokenizer_model_max_length`` …).

The CLIP tower's own config is not in that file (the official code reads it from the hub by the
``mm_vision_tower`` name). It comes from, in order: a ``vision_config`` dict in config.json (written by the tiny
builder), ``vision_tower_path/config.json`` when given, or the published config of
``openai/clip-vit-large-patch14-336`` (the tower of every released MobileVLM).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig

from avkv.models.native import tower_config
from avkv.models.videollama2.config import VISION_PRESETS

#: config.json keys that are not the decoder's (the multimodal and training fields the official code writes)
MM_KEYS = {"mm_vision_tower", "vision_tower", "vision_tower_type", "mm_hidden_size", "mm_vision_select_layer",
           "mm_vision_select_feature", "mm_projector_type", "image_aspect_ratio", "mm_use_im_start_end",
           "mm_use_im_patch_token", "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
           "mm_projector_lr", "tokenizer_padding_side", "tokenizer_model_max_length", "image_grid_pinpoints",
           "pretrain_mm_mlp_adapter", "vision_config", "model_type", "architectures"}

def projector_kind(projector_type: str) -> str:
    """``ldpnetv2`` | ``mlp`` | ``linear``, by the official ``build_vision_projector`` dispatch order."""
    if projector_type == "linear":
        return "linear"
    if re.fullmatch(r"mlp\d+x_gelu", projector_type):
        return "mlp"
    if projector_type.startswith("ldpnetv2"):
        return "ldpnetv2"
    if projector_type.startswith("ldpnet"):
        raise ValueError(f"mm_projector_type {projector_type!r} is MobileVLM V1's LDP block (MobileNetV3 inverted "
                         f"residuals), which this port does not implement; MobileVLM V2 checkpoints use ldpnetv2")
    raise ValueError(f"unsupported mm_projector_type {projector_type!r} (supported: ldpnetv2, linear, mlpNx_gelu)")


@dataclass
class MobileVLMConfig:
    raw: dict[str, Any]
    text_config: LlamaConfig
    vision_tower_name: str
    vision_config: CLIPVisionConfig
    select_layer: int = -2
    select_feature: str = "patch"
    projector_type: str = "ldpnetv2"
    mm_hidden_size: int = 0
    image_aspect_ratio: str | None = "pad"
    mm_use_im_patch_token: bool = True

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def projector_kind(self) -> str:
        return projector_kind(self.projector_type)

    @property
    def tower_from_checkpoint(self) -> bool:
        """The official ``load_pretrained_model`` keeps the checkpoint's tower weights only when ``'v2'`` is in
        ``mm_projector_type`` (it then loads just the image processor); otherwise it reloads the tower from the
        ``mm_vision_tower`` hub id, replacing the checkpoint's tensors."""
        return "v2" in self.projector_type

    @classmethod
    def from_dict(cls, raw: dict, vision_tower_path: str | Path | None = None) -> "MobileVLMConfig":
        if raw.get("model_type") != "mobilevlm":
            raise ValueError(f"config.json model_type {raw.get('model_type')!r} is not 'mobilevlm' (the official "
                             f"MobileVLMConfig): not a MobileVLM checkpoint")
        text_kwargs = {k: v for k, v in raw.items() if k not in MM_KEYS}
        if text_kwargs.get("rope_scaling", 0) is None:     # 4.33 wrote rope_scaling: null (v5: rope_parameters)
            del text_kwargs["rope_scaling"]
        text_config = LlamaConfig(**text_kwargs)
        tower = raw.get("mm_vision_tower", raw.get("vision_tower"))
        if tower is None:
            raise ValueError("config.json has no mm_vision_tower: not a multimodal MobileVLM checkpoint")
        # official build_vision_tower: only vision_tower_type == "clip" builds a tower
        if raw.get("vision_tower_type") != "clip":
            raise ValueError(f"config.json vision_tower_type {raw.get('vision_tower_type')!r}: the official "
                             f"build_vision_tower only accepts 'clip'")
        vcfg = tower_config(raw, tower, vision_tower_path, CLIPVisionConfig,
                            {"clip-vit-large-patch14-336": VISION_PRESETS["clip-vit-large-patch14-336"][1]})
        mm_hidden = vcfg.hidden_size
        select_feature = raw.get("mm_vision_select_feature", "patch")
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"unsupported mm_vision_select_feature {select_feature!r} (official: patch, cls_patch)")
        if raw.get("mm_use_im_start_end"):
            raise ValueError("mm_use_im_start_end=true checkpoints wrap images in <im_start>/<im_end> tokens; the "
                             "official V2 training scripts set it false and the port does not implement it")
        out = cls(raw=raw, text_config=text_config, vision_tower_name=tower, vision_config=vcfg,
                  select_layer=int(raw.get("mm_vision_select_layer", -2)), select_feature=select_feature,
                  projector_type=raw.get("mm_projector_type", "linear"), mm_hidden_size=mm_hidden,
                  image_aspect_ratio=raw.get("image_aspect_ratio"),
                  # load_pretrained_model's default when the field is absent
                  mm_use_im_patch_token=bool(raw.get("mm_use_im_patch_token", True)))
        if projector_kind(out.projector_type) == "ldpnetv2" and select_feature != "patch":   # raises if unsupported
            raise ValueError("ldpnetv2 pools a square patch grid: mm_vision_select_feature must be 'patch'")
        return out

    @classmethod
    def from_pretrained(cls, folder: str | Path, vision_tower_path: str | Path | None = None) -> "MobileVLMConfig":
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text()), vision_tower_path)

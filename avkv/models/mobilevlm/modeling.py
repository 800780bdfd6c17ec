"""MobileVLM (V2) on transformers v5 classes, loading the official checkpoint by its own tensor names.

Module tree (the official ``MobileLlamaForCausalLM``)::

    model                       LlamaModel (embed_tokens, layers, norm): MobileLLaMA
    model.vision_tower          CLIPVisionTower → .vision_tower = CLIPVisionModel
    model.mm_projector          LDPv2 (mlp, dwn, peg) | linear | mlpNx_gelu
    lm_head

transformers v5 dropped the ``vision_model.`` level of ``CLIPVisionModel``; checkpoint names keep it
(``model.vision_tower.vision_tower.vision_model.encoder…``), and :func:`avkv.models.native.official_name` /
:func:`~avkv.models.native.module_name` translate. Everything else has the same name in both. Splicing, greedy
decoding and the strict loader are the native ports' (:mod:`avkv.models.native`).

Images enter LLaVA style. The official ``prepare_inputs_labels_for_multimodal`` replaces each ``-200`` id by the
image's projected features (144 rows for LDPv2) and runs the decoder on the embeddings with positions
``0 … n-1`` of the expanded sequence. Here the prompt already holds one run of ``-200`` placeholders per image,
as long as its features, so ids, positions and the KV cache are 1:1 with what the decoder sees; the forward
fills those rows with the features and calls the decoder with ``inputs_embeds``. Decoding is plain LLaMA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionModel, LlamaModel

from avkv.models import native
# the port's API: the loader's error and the official-name helpers
from avkv.models.native import CheckpointKeyError, official_key_groups, official_state_dict  # noqa: F401
from avkv.models.mobilevlm.config import MobileVLMConfig
from avkv.models.mobilevlm.projector import build_vision_projector


@dataclass
class MediaItem:
    """One image (or a video as its frames, each an image) of a prompt, and where its placeholder run sits."""

    kind: str                                   # "image" | "video"
    start: int                                  # first prompt position of its run
    n_visual: int                               # feature rows (images × tokens per image)
    pixel_values: torch.Tensor                  # [k, 3, S, S]

    @property
    def end(self) -> int:
        return self.start + self.n_visual


class MobileVLMForCausalLM(native.NativeLM):
    config_class = MobileVLMConfig
    port_name = "MobileVLM"
    feature_name = "image"

    def __init__(self, cfg: MobileVLMConfig) -> None:
        super().__init__(cfg, LlamaModel)
        # where the official MobileVLMMetaModel puts them (CLIPVisionTower drops CLS with select_feature='patch')
        self.model.vision_tower = native.VisionTower(CLIPVisionModel(cfg.vision_config), cfg.select_layer,
                                                     drop_cls=cfg.select_feature == "patch")
        self.model.mm_projector = build_vision_projector(cfg.projector_type, cfg.mm_hidden_size,
                                                         cfg.text_config.hidden_size)

    def tokens_per_image(self) -> int:
        """Feature rows one image becomes: 144 for LDPv2, else one per selected tower token."""
        tokens = self.config.patches_per_side ** 2 + (self.config.select_feature == "cls_patch")
        return self.model.mm_projector.num_tokens(tokens)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[k, 3, S, S] → [k, tokens_per_image, D] (official ``encode_images``)."""
        return self.model.mm_projector(self.model.vision_tower(pixel_values))

    def encode_item(self, item: MediaItem) -> torch.Tensor:
        feats = self.encode_images(item.pixel_values.to(self.lm_head.weight.device)).flatten(0, 1)
        if feats.shape[0] != item.n_visual:
            raise RuntimeError(f"{item.kind} at position {item.start}: the encoder gave {feats.shape[0]} features "
                               f"for a run of {item.n_visual} placeholders")
        return feats

    def legacy_buffers(self) -> dict[str, torch.Tensor]:
        """CLIP's ``embeddings.position_ids`` (``arange``) and LLaMA's per-layer ``rotary_emb.inv_freq``, which
        transformers 4.x saved in checkpoints."""
        out = {native.TOWER_OFFICIAL + "embeddings.position_ids":
               self.model.vision_tower.vision_tower.embeddings.position_ids}
        inv = self.model.rotary_emb.inv_freq
        for i in range(self.config.text_config.num_hidden_layers):
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv
        return out

    def bundled_tower_ignored(self) -> str | None:
        if self.config.tower_from_checkpoint:
            return None
        return (f"mm_projector_type {self.config.projector_type!r}: the official loader replaces the bundled tower "
                f"by {self.config.vision_tower_name!r} from the hub")


#: the strict loader (:func:`avkv.models.native.load_official_weights`); ``vision_tower_path`` supplies the tower
#: as the official code loads it from the ``mm_vision_tower`` hub id
load_official_weights = native.load_official_weights
build_model = MobileVLMForCausalLM.build
from_pretrained = MobileVLMForCausalLM.from_pretrained

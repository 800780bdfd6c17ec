"""VideoLLaMA2 / VideoLLaMA2.1(-AV) on transformers v5 classes.

Module tree (the official ``Videollama2{Qwen2,Mistral}ForCausalLM``)::

    model                       Qwen2Model | MistralModel (embed_tokens, layers, norm)
    model.vision_tower          VisionTower → .vision_tower = SiglipVisionModel | CLIPVisionModel
    model.mm_projector          STC connector (or linear / mlp for the mean-pooled variants)
    model.audio_tower           BEATs                         (AV checkpoints)
    model.mm_projector_a        mlp2x_gelu                    (AV checkpoints)
    lm_head

transformers v5 dropped the ``vision_model.`` level of ``SiglipVisionModel`` / ``CLIPVisionModel``; checkpoint
names keep it (``model.vision_tower.vision_tower.vision_model.encoder…``), and
:func:`avkv.models.native.official_name` / :func:`~avkv.models.native.module_name` translate. Everything else has
the same name in both. Splicing, greedy decoding and the strict loader are the native ports'
(:mod:`avkv.models.native`).

Media enter LLaVA style: the prompt holds one run of placeholder ids per media item (``-201`` for video frames,
``-202`` for audio, ``-200`` for an image; an audio-visual video is its video run followed by its audio run, as
the official model concatenates ``[video features, audio features]`` at the ``<video>`` tag), and the forward
replaces those positions' embeddings with the encoder features before calling the decoder with
``inputs_embeds``. Decoding is then plain Qwen2 / Mistral with 1-D RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionModel, MistralModel, Qwen2Model, SiglipVisionModel

from avkv.models import native
# the port's API: the loader's error and the official-name helpers
from avkv.models.native import CheckpointKeyError, official_key_groups, official_state_dict  # noqa: F401
from avkv.models.videollama2.beats import BEATs
from avkv.models.videollama2.config import VideoLLaMA2Config
from avkv.models.videollama2.audio import AUDIO_PAD_S, AUDIO_SR, num_kaldi_frames
from avkv.models.videollama2.projector import STCConnector, build_audio_projector, build_vision_projector


@dataclass
class MediaItem:
    """One media item of a prompt, preprocessed, and where its placeholder run sits in the prompt."""

    kind: str                                   # "video" | "image" | "audio"
    start: int                                  # first prompt position of its run
    n_visual: int                               # feature rows of the frames (0 for audio)
    n_audio: int                                # feature rows of the audio (0 without audio)
    pixel_values: torch.Tensor | None = None    # [T, 3, H, W] (an image: [1, 3, H, W])
    fbank: torch.Tensor | None = None           # [frames, 128]

    @property
    def end(self) -> int:
        return self.start + self.n_visual + self.n_audio


class VideoLLaMA2ForCausalLM(native.NativeLM):
    config_class = VideoLLaMA2Config
    port_name = "VideoLLaMA2"

    def __init__(self, cfg: VideoLLaMA2Config) -> None:
        super().__init__(cfg, Qwen2Model if cfg.llm == "qwen2" else MistralModel)
        tc = cfg.text_config
        # the multimodal parts hang off ``model`` exactly where the official Videollama2MetaModel puts them: the
        # official SiglipVisionTower / CLIPVisionTower (CLIP drops its CLS token with select_feature='patch')
        tower = (SiglipVisionModel if cfg.vision_kind == "siglip" else CLIPVisionModel)(cfg.vision_config)
        drop_cls = cfg.vision_kind == "clip" and cfg.select_feature == "patch"
        self.model.vision_tower = native.VisionTower(tower, cfg.select_layer, drop_cls, kind=cfg.vision_kind)
        self.model.mm_projector = build_vision_projector(cfg.projector_type, cfg.mm_hidden_size, tc.hidden_size)
        if cfg.has_audio:
            self.model.audio_tower = BEATs(cfg.beats)
            self.model.mm_projector_a = build_audio_projector(cfg.projector_a_type, cfg.mm_hidden_size_a,
                                                              cfg.hidden_size_a)

    # ------------------------------------------------------------------------------- token counts
    def video_grid(self, num_frames: int | None = None) -> tuple[int, int, int]:
        """(t, h, w) of the visual features one video (or image) becomes."""
        t = num_frames or self.config.num_frames
        s = self.config.patches_per_side
        proj = self.model.mm_projector
        if isinstance(proj, STCConnector):
            return proj.output_grid(t, s, s)
        return 1, s, s                          # linear / mlp: mean over frames

    def num_visual_tokens(self, num_frames: int | None = None) -> int:
        t, h, w = self.video_grid(num_frames)
        return t * h * w

    def num_audio_tokens(self, fbank_frames: int | None = None) -> int:
        if not self.config.has_audio:
            return 0
        frames = fbank_frames if fbank_frames is not None else num_kaldi_frames(AUDIO_PAD_S * AUDIO_SR)
        return self.model.audio_tower.num_patches(frames)

    # ------------------------------------------------------------------------------------ encoders
    def encode_frames(self, pixel_values: torch.Tensor, kind: str) -> torch.Tensor:
        """[T, 3, H, W] → visual features [n_visual, D]. An image is repeated to ``num_frames`` frames."""
        feats = self.model.vision_tower(pixel_values)                       # [T, N, d]
        if kind == "image":
            feats = feats[:1].expand(self.config.num_frames, -1, -1)       # same features for every copy
        feats = feats.unsqueeze(0)                                          # b t n d
        if isinstance(self.model.mm_projector, STCConnector):
            return self.model.mm_projector(feats)[0]
        return self.model.mm_projector(feats.mean(1))[0]                   # linear / mlp: mean pooling

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """[frames, 128] → audio features [n_audio, D]."""
        if not self.config.has_audio:
            raise ValueError("this checkpoint has no audio tower (no mm_audio_tower in config.json)")
        tower = self.model.audio_tower
        x = tower.extract_features(fbank.unsqueeze(0).to(tower.patch_embedding.weight.dtype))
        return self.model.mm_projector_a(x)[0]

    def encode_item(self, item: MediaItem) -> torch.Tensor:
        dev = self.lm_head.weight.device
        parts = []
        if item.pixel_values is not None:
            parts.append(self.encode_frames(item.pixel_values.to(dev), item.kind))
        if item.fbank is not None:
            parts.append(self.encode_audio(item.fbank.to(dev)))
        feats = torch.cat(parts, dim=0)
        if feats.shape[0] != item.n_visual + item.n_audio:
            raise RuntimeError(f"{item.kind} item at position {item.start}: encoders gave {feats.shape[0]} "
                               f"features for a run of {item.n_visual + item.n_audio} placeholders")
        return feats


#: the strict loader (:func:`avkv.models.native.load_official_weights`); ``vision_tower_path`` supplies the tower
#: as the official code loads it from the ``mm_vision_tower`` hub id
load_official_weights = native.load_official_weights
build_model = VideoLLaMA2ForCausalLM.build
from_pretrained = VideoLLaMA2ForCausalLM.from_pretrained

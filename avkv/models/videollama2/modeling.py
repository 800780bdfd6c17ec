"""VideoLLaMA2 / VideoLLaMA2.1(-AV) on transformers v5 classes.

Module tree (the official ``Videollama2{Qwen2,Mistral}ForCausalLM``)::

    model                       Qwen2Model | MistralModel (embed_tokens, layers, norm)
    model.vision_tower          VisionTower → .vision_tower = SiglipVisionModel | CLIPVisionModel
    model.mm_projector          STC connector (or linear / mlp for the mean-pooled variants)
    model.audio_tower           BEATs                         (AV checkpoints)
    model.mm_projector_a        mlp2x_gelu                    (AV checkpoints)
    lm_head

transformers v5 dropped the ``vision_model.`` level of ``SiglipVisionModel`` / ``CLIPVisionModel``; checkpoint
names keep it (``model.vision_tower.vision_tower.vision_model.encoder…``), and :func:`official_name` /
:func:`module_name` translate. Everything else has the same name in both.

Media enter LLaVA style: the prompt holds one run of placeholder ids per media item (``-201`` for video frames,
``-202`` for audio, ``-200`` for an image; an audio-visual video is its video run followed by its audio run, as
the official model concatenates ``[video features, audio features]`` at the ``<video>`` tag), and the forward
replaces those positions' embeddings with the encoder features before calling the decoder with
``inputs_embeds``. Decoding is then plain Qwen2 / Mistral with 1-D RoPE.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPVisionModel, DynamicCache, MistralModel, Qwen2Model, SiglipVisionModel

from avkv.models.videollama2.beats import BEATs
from avkv.models.videollama2.config import VideoLLaMA2Config
from avkv.models.videollama2.processing import AUDIO_PAD_S, AUDIO_SR, num_kaldi_frames
from avkv.models.videollama2.projector import STCConnector, build_audio_projector, build_vision_projector


class CheckpointKeyError(KeyError):
    """The checkpoint's tensor names do not match the model's: the message lists every offending name."""

    def __str__(self) -> str:                     # KeyError would repr() the message
        return str(self.args[0])


# ------------------------------------------------------------------------------------------- modules
class VisionTower(nn.Module):
    """Official ``SiglipVisionTower`` / ``CLIPVisionTower``: per-frame features from ``hidden_states[select_layer]``
    (CLIP drops its CLS token with ``select_feature='patch'``)."""

    def __init__(self, cfg: VideoLLaMA2Config) -> None:
        super().__init__()
        cls = SiglipVisionModel if cfg.vision_kind == "siglip" else CLIPVisionModel
        self.vision_tower = cls(cfg.vision_config)
        self.kind, self.select_layer, self.select_feature = cfg.vision_kind, cfg.select_layer, cfg.select_feature

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values=pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.kind == "clip" and self.select_feature == "patch":
            feats = feats[:, 1:]
        return feats


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


class VideoLLaMA2ForCausalLM(nn.Module):
    def __init__(self, cfg: VideoLLaMA2Config) -> None:
        super().__init__()
        self.config = cfg
        tc = cfg.text_config
        self.model = (Qwen2Model if cfg.llm == "qwen2" else MistralModel)(tc)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        if getattr(tc, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        # the multimodal parts hang off ``model`` exactly where the official Videollama2MetaModel puts them
        self.model.vision_tower = VisionTower(cfg)
        self.model.mm_projector = build_vision_projector(cfg.projector_type, cfg.mm_hidden_size, tc.hidden_size)
        if cfg.has_audio:
            self.model.audio_tower = BEATs(cfg.beats)
            self.model.mm_projector_a = build_audio_projector(cfg.projector_a_type, cfg.mm_hidden_size_a,
                                                              cfg.hidden_size_a)
        self.generation_config = None

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

    # ------------------------------------------------------------------------------------ splicing
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              media: list[MediaItem] | None = None) -> torch.Tensor:
        """Token embeddings with every placeholder position replaced by its media feature row.

        ``position_ids`` are the absolute prompt positions of ``input_ids`` (1-D RoPE: position = index), so a
        chunk that holds part of a media run gets the matching rows."""
        ids = input_ids.reshape(-1)
        emb = self.model.embed_tokens(ids.clamp(min=0))
        holes = ids < 0
        if not holes.any():
            return emb.unsqueeze(0)
        pos = position_ids.reshape(-1).to(ids.device)
        filled = torch.zeros_like(holes)
        for item in media or []:
            sel = holes & (pos >= item.start) & (pos < item.end)
            if sel.any():
                feats = self.encode_item(item)
                emb[sel] = feats[pos[sel] - item.start].to(emb.dtype)
                filled |= sel
        if not torch.equal(filled, holes):
            missing = pos[holes & ~filled].tolist()
            raise ValueError(f"placeholder positions without media features: {missing[:10]}"
                             f"{' …' if len(missing) > 10 else ''} (mm_inputs missing or misaligned)")
        return emb.unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, past_key_values=None, position_ids: torch.Tensor | None = None,
                media: list[MediaItem] | None = None, logits_to_keep: int = 1, use_cache: bool = True,
                **kwargs) -> torch.Tensor:
        """Logits of the last ``logits_to_keep`` positions (0: all) of ``input_ids`` appended to the cache."""
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        embeds = self.embed(input_ids, position_ids, media)
        out = self.model(inputs_embeds=embeds, past_key_values=past_key_values, position_ids=position_ids,
                         use_cache=use_cache, **kwargs)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, media: list[MediaItem] | None = None, max_new_tokens: int = 16,
                 eos_token_ids: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding with a DynamicCache and explicit positions (the official inference is greedy)."""
        cache = DynamicCache(config=self.config.text_config)
        n = input_ids.shape[1]
        logits = self(input_ids, cache, torch.arange(n, device=input_ids.device)[None], media)
        out: list[int] = []
        for step in range(max_new_tokens):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            if tok in eos_token_ids:
                break
            logits = self(torch.tensor([[tok]], device=input_ids.device), cache,
                          torch.tensor([[n + step]], device=input_ids.device))
        return out


# ------------------------------------------------------------------------------------ checkpoint names
_TOWER = "model.vision_tower.vision_tower."


def official_name(name: str) -> str:
    """Our parameter name → the name in official checkpoints (re-inserts the ``vision_model.`` level)."""
    return _TOWER + "vision_model." + name[len(_TOWER):] if name.startswith(_TOWER) else name


def module_name(name: str) -> str:
    """Official checkpoint name → our parameter name."""
    p = _TOWER + "vision_model."
    return _TOWER + name[len(p):] if name.startswith(p) else name


def official_key_groups(model: nn.Module) -> list[list[str]]:
    """Official names of the model's tensors, grouped by shared storage (a group > 1 is one tensor that the
    official tree reaches by several names: BEATs' layer-shared relative-position table, tied embeddings).
    Each group is sorted; a checkpoint must hold at least one name of every group."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(official_name(name))
    return [sorted(g, key=_natural_key) for g in groups.values()]


def _natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors under their official names, one name per shared tensor (the first of its group), as
    ``save_pretrained`` writes a tied tensor once."""
    sd = model.state_dict()
    return {g[0]: sd[module_name(g[0])].detach().contiguous() for g in official_key_groups(model)}


def _checkpoint_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """tensor name → (safetensors file, name in that file), from ``model.safetensors.index.json`` or a single
    ``model.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: (folder / v, k) for k, v in wm.items()}
    single = folder / "model.safetensors"
    if single.exists():
        from safetensors import safe_open
        with safe_open(str(single), framework="pt") as f:
            return {k: (single, k) for k in f.keys()}
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                            f"(only safetensors checkpoints are loaded)")


def _listing(names, limit: int = 40) -> str:
    names = sorted(names, key=_natural_key)
    more = f"\n  … and {len(names) - limit} more" if len(names) > limit else ""
    return "\n  " + "\n  ".join(names[:limit]) + more


def load_official_weights(model: VideoLLaMA2ForCausalLM, folder: str | Path,
                          vision_tower_path: str | Path | None = None) -> dict:
    """Load an official safetensors checkpoint into ``model`` with a strict name check.

    Every checkpoint tensor must name a model tensor and every model tensor must be named (a shared tensor by
    at least one of its names; several names of one shared tensor must hold equal values). Shapes must match.
    ``vision_tower_path`` (a local SigLIP/CLIP safetensors folder, transformers 4.x ``vision_model.*`` names or
    unprefixed) supplies the tower instead of the tensors bundled in the checkpoint, as the official code loads
    the tower from the ``mm_vision_tower`` hub id; it is required when the checkpoint bundles none. The same
    strict rule applies to it. Returns a small report."""
    from safetensors import safe_open
    folder = Path(folder)
    files = _checkpoint_files(folder)
    groups = official_key_groups(model)
    expected = {k for g in groups for k in g}
    tower_prefix = _TOWER + "vision_model."
    if vision_tower_path is not None or not any(k.startswith(tower_prefix) for k in files):
        if vision_tower_path is None:
            missing_tower = sorted(k for k in expected if k.startswith(tower_prefix))
            raise CheckpointKeyError(
                f"{folder}: the checkpoint has no vision tower tensors ({len(missing_tower)} missing, e.g. "
                f"{missing_tower[0]}); pass vision_tower_path= a local copy of "
                f"{model.config.vision_tower_name!r}")
        vfolder = Path(vision_tower_path)
        for k, src in _checkpoint_files(vfolder).items():
            # a SigLIP/CLIP folder holds ``vision_model.*`` (and, for a full dual model, ``text_model.*``)
            if k.startswith("vision_model."):
                files[_TOWER + k] = src
            elif not k.startswith(("text_model.", "logit_", "visual_projection", "text_projection")):
                files[tower_prefix + k] = src
    unexpected = set(files) - expected
    missing = [g for g in groups if not any(k in files for k in g)]
    if unexpected or missing:
        msg = [f"checkpoint {folder} does not match the VideoLLaMA2 module tree:"]
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected tensor name(s):{_listing(unexpected)}")
        if missing:
            msg.append(f"{len(missing)} missing tensor name(s):{_listing(g[0] for g in missing)}")
        raise CheckpointKeyError("\n".join(msg))

    params = model.state_dict(keep_vars=True)
    handles: dict[Path, object] = {}
    mismatched, differing = [], []
    try:
        for g in groups:
            target = params[module_name(g[0])]
            first = None
            for k in (k for k in g if k in files):
                f, src = files[k]
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt")
                t = handles[f].get_tensor(src)
                if tuple(t.shape) != tuple(target.shape):
                    mismatched.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(target.shape)}")
                    continue
                if first is None:
                    first = t
                    with torch.no_grad():
                        target.copy_(t.to(target.dtype))
                elif not torch.equal(first, t):
                    differing.append(k)
    finally:
        handles.clear()
    if mismatched or differing:
        msg = [f"checkpoint {folder} does not fit the VideoLLaMA2 module tree:"]
        if mismatched:
            msg.append(f"{len(mismatched)} shape mismatch(es):{_listing(mismatched)}")
        if differing:
            msg.append(f"{len(differing)} name(s) of one shared tensor hold different values:{_listing(differing)}")
        raise CheckpointKeyError("\n".join(msg))
    return {"tensors": len(files), "files": len({f for f, _ in files.values()}),
            "shared_groups": sum(len(g) > 1 for g in groups)}


def build_model(cfg: VideoLLaMA2Config, dtype: torch.dtype = torch.float32, init: bool = True) -> VideoLLaMA2ForCausalLM:
    """Instantiate the module tree in ``dtype``; ``init=False`` skips transformers' weight init (real loads)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if init:
            model = VideoLLaMA2ForCausalLM(cfg)
        else:
            from transformers.initialization import no_init_weights
            with no_init_weights():
                model = VideoLLaMA2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def from_pretrained(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    vision_tower_path: str | Path | None = None,
                    attn_implementation: str | None = None) -> VideoLLaMA2ForCausalLM:
    """config.json + safetensors (official layout) → an eval-mode model on ``device``."""
    folder = Path(folder)
    cfg = VideoLLaMA2Config.from_pretrained(folder, vision_tower_path)
    if attn_implementation:
        cfg.text_config._attn_implementation = attn_implementation
    model = build_model(cfg, dtype, init=False)
    load_official_weights(model, folder, vision_tower_path)
    gen = folder / "generation_config.json"
    if gen.exists():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.to(device).eval()


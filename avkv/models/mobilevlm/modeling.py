"""MobileVLM (V2) on transformers v5 classes, loading the official checkpoint by its own tensor names.

Module tree (the official ``MobileLlamaForCausalLM``)::

    model                       LlamaModel (embed_tokens, layers, norm): MobileLLaMA
    model.vision_tower          CLIPVisionTower → .vision_tower = CLIPVisionModel
    model.mm_projector          LDPv2 (mlp, dwn, peg) | linear | mlpNx_gelu
    lm_head

transformers v5 dropped the ``vision_model.`` level of ``CLIPVisionModel``; checkpoint names keep it
(``model.vision_tower.vision_tower.vision_model.encoder…``), and :func:`official_name` / :func:`module_name`
translate. Everything else has the same name in both.

Images enter LLaVA style. The official ``prepare_inputs_labels_for_multimodal`` replaces each ``-200`` id by the
image's projected features (144 rows for LDPv2) and runs the decoder on the embeddings with positions
``0 … n-1`` of the expanded sequence. Here the prompt already holds one run of ``-200`` placeholders per image,
as long as its features, so ids, positions and the KV cache are 1:1 with what the decoder sees; the forward
fills those rows with the features and calls the decoder with ``inputs_embeds``. Decoding is plain LLaMA.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPVisionModel, DynamicCache, LlamaModel

from avkv.models.mobilevlm.config import MobileVLMConfig
from avkv.models.mobilevlm.projector import build_vision_projector


class CheckpointKeyError(KeyError):
    """The checkpoint's tensor names do not match the model's: the message lists every offending name."""

    def __str__(self) -> str:                     # KeyError would repr() the message
        return str(self.args[0])


class VisionTower(nn.Module):
    """Official ``CLIPVisionTower``: features of ``hidden_states[select_layer]``, the CLS token dropped with
    ``select_feature='patch'``."""

    def __init__(self, cfg: MobileVLMConfig) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionModel(cfg.vision_config)
        self.select_layer, self.select_feature = cfg.select_layer, cfg.select_feature

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values=pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        return feats[:, 1:] if self.select_feature == "patch" else feats


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


class MobileVLMForCausalLM(nn.Module):
    def __init__(self, cfg: MobileVLMConfig) -> None:
        super().__init__()
        self.config = cfg
        tc = cfg.text_config
        self.model = LlamaModel(tc)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        if getattr(tc, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        # where the official MobileVLMMetaModel puts them
        self.model.vision_tower = VisionTower(cfg)
        self.model.mm_projector = build_vision_projector(cfg.projector_type, cfg.mm_hidden_size, tc.hidden_size)
        self.generation_config = None

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

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              media: list[MediaItem] | None = None) -> torch.Tensor:
        """Token embeddings with every placeholder replaced by its image feature row, picked by the absolute
        position (a chunk holding part of a run gets the matching rows)."""
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
                emb[sel] = self.encode_item(item)[pos[sel] - item.start].to(emb.dtype)
                filled |= sel
        if not torch.equal(filled, holes):
            missing = pos[holes & ~filled].tolist()
            raise ValueError(f"placeholder positions without image features: {missing[:10]}"
                             f"{' …' if len(missing) > 10 else ''} (mm_inputs missing or misaligned)")
        return emb.unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, past_key_values=None, position_ids: torch.Tensor | None = None,
                media: list[MediaItem] | None = None, logits_to_keep: int = 1, use_cache: bool = True,
                **kwargs) -> torch.Tensor:
        """Logits of the last ``logits_to_keep`` positions (0: all) of ``input_ids`` appended to the cache."""
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        out = self.model(inputs_embeds=self.embed(input_ids, position_ids, media), past_key_values=past_key_values,
                         position_ids=position_ids, use_cache=use_cache, **kwargs)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, media: list[MediaItem] | None = None, max_new_tokens: int = 16,
                 eos_token_ids: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding with a DynamicCache (the official evaluation runs ``temperature 0``: greedy)."""
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
_TOWER_OFFICIAL = _TOWER + "vision_model."


def official_name(name: str) -> str:
    """Our parameter name → its name in official checkpoints (re-inserts the ``vision_model.`` level)."""
    return _TOWER_OFFICIAL + name[len(_TOWER):] if name.startswith(_TOWER) else name


def module_name(name: str) -> str:
    """Official checkpoint name → our parameter name."""
    return _TOWER + name[len(_TOWER_OFFICIAL):] if name.startswith(_TOWER_OFFICIAL) else name


def _natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def official_key_groups(model: nn.Module) -> list[list[str]]:
    """Official names of the model's tensors grouped by shared storage (tied embeddings: one tensor, two names);
    a checkpoint must hold at least one name of every group."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(official_name(name))
    return [sorted(g, key=_natural_key) for g in groups.values()]


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors under their official names, one name per shared tensor (as ``save_pretrained`` writes it)."""
    sd = model.state_dict()
    return {g[0]: sd[module_name(g[0])].detach().contiguous() for g in official_key_groups(model)}


def legacy_buffers(model: "MobileVLMForCausalLM") -> dict[str, torch.Tensor]:
    """Buffers that older transformers versions saved in checkpoints and v5 keeps out of the state dict, under their
    official names, with the value the model computes: a checkpoint may hold them, and they must then agree.
    CLIP's ``embeddings.position_ids`` (``arange``) and LLaMA's per-layer ``rotary_emb.inv_freq``."""
    out = {_TOWER_OFFICIAL + "embeddings.position_ids": model.model.vision_tower.vision_tower.embeddings.position_ids}
    inv = model.model.rotary_emb.inv_freq
    for i in range(model.config.text_config.num_hidden_layers):
        out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv
    return out


# ------------------------------------------------------------------------------------ checkpoint files
def checkpoint_files(folder: Path, allow_pickle: bool = False) -> dict[str, tuple[Path, str]]:
    """tensor name → (file, name in that file): safetensors (``model.safetensors`` or its index); with
    ``allow_pickle`` also ``pytorch_model.bin`` or its index (read with ``torch.load(weights_only=True)``)."""
    def from_index(index: Path) -> dict[str, tuple[Path, str]]:
        wm = json.loads(index.read_text())["weight_map"]
        return {k: (folder / v, k) for k, v in wm.items()}

    if (folder / "model.safetensors.index.json").exists():
        return from_index(folder / "model.safetensors.index.json")
    if (folder / "model.safetensors").exists():
        from safetensors import safe_open
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return {k: (folder / "model.safetensors", k) for k in f.keys()}
    if allow_pickle:
        if (folder / "pytorch_model.bin.index.json").exists():
            return from_index(folder / "pytorch_model.bin.index.json")
        if (folder / "pytorch_model.bin").exists():
            sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
            return {k: (folder / "pytorch_model.bin", k) for k in sd}
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json"
                            + ("" if allow_pickle else " (pickle weights load only with allow_pickle_weights)"))


class _Reader:
    """Reads tensors from safetensors and (opted-in) pickle files, each file opened once."""

    def __init__(self) -> None:
        self.open: dict[Path, object] = {}

    def get(self, f: Path, name: str) -> torch.Tensor:
        if f not in self.open:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                self.open[f] = safe_open(str(f), framework="pt")
            else:
                self.open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        h = self.open[f]
        return h.get_tensor(name) if f.suffix == ".safetensors" else h[name]


def _listing(names, limit: int = 40) -> str:
    names = sorted(names, key=_natural_key)
    more = f"\n  … and {len(names) - limit} more" if len(names) > limit else ""
    return "\n  " + "\n  ".join(names[:limit]) + more


def load_official_weights(model: MobileVLMForCausalLM, folder: str | Path,
                          vision_tower_path: str | Path | None = None, allow_pickle: bool = False) -> dict:
    """Load an official checkpoint into ``model`` with a strict name check.

    Every checkpoint tensor must name a model tensor (or a :func:`legacy_buffers` entry, whose value must then
    equal the model's), and every model tensor must be named (a shared tensor by at least one of its names, several
    names holding equal values). Shapes must match. The vision tower comes from the checkpoint when the official
    loader keeps it (``'v2'`` in ``mm_projector_type``); ``vision_tower_path`` (a local CLIP folder, transformers
    4.x ``vision_model.*`` names) supplies it instead — required when the checkpoint bundles none or when the
    official loader would reload it from the hub (the other projector types). Returns a small report."""
    folder = Path(folder)
    files = checkpoint_files(folder, allow_pickle)
    groups = official_key_groups(model)
    expected = {k for g in groups for k in g}
    legacy = legacy_buffers(model)
    bundled = any(k.startswith(_TOWER_OFFICIAL) for k in files)
    tower_source = "checkpoint"
    if vision_tower_path is not None or not bundled or not model.config.tower_from_checkpoint:
        if vision_tower_path is None:
            why = ("the checkpoint has no vision tower tensors" if not bundled else
                   f"mm_projector_type {model.config.projector_type!r}: the official loader replaces the bundled "
                   f"tower by {model.config.vision_tower_name!r} from the hub")
            raise CheckpointKeyError(f"{folder}: {why}; pass vision_tower_path= a local copy of "
                                     f"{model.config.vision_tower_name!r}")
        files = {k: v for k, v in files.items() if not k.startswith(_TOWER_OFFICIAL)}
        for k, src in checkpoint_files(Path(vision_tower_path), allow_pickle).items():
            if k.startswith("vision_model."):         # a CLIP folder: vision_model.* (+ text_model.* in a full one)
                files[_TOWER + k] = src
            elif not k.startswith(("text_model.", "logit_scale", "visual_projection", "text_projection")):
                files[_TOWER_OFFICIAL + k] = src
        tower_source = str(vision_tower_path)
    unexpected = set(files) - expected - set(legacy)
    missing = [g for g in groups if not any(k in files for k in g)]
    if unexpected or missing:
        msg = [f"checkpoint {folder} does not match the MobileVLM module tree:"]
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected tensor name(s):{_listing(unexpected)}")
        if missing:
            msg.append(f"{len(missing)} missing tensor name(s):{_listing(g[0] for g in missing)}")
        raise CheckpointKeyError("\n".join(msg))

    params = model.state_dict(keep_vars=True)
    reader = _Reader()
    mismatched, differing, legacy_seen = [], [], []
    for g in groups:
        target = params[module_name(g[0])]
        first = None
        for k in (k for k in g if k in files):
            t = reader.get(*files[k])
            if tuple(t.shape) != tuple(target.shape):
                mismatched.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(target.shape)}")
                continue
            if first is None:
                first = t
                with torch.no_grad():
                    target.copy_(t.to(target.dtype))
            elif not torch.equal(first, t):
                differing.append(k)
    for k in sorted(set(files) & set(legacy)):
        t, ref = reader.get(*files[k]), legacy[k]
        if tuple(t.shape) != tuple(ref.shape) or not torch.allclose(t.to(ref.device, torch.float64),
                                                                      ref.to(torch.float64), rtol=1e-3, atol=0):
            differing.append(f"{k} (a buffer the model computes)")
        legacy_seen.append(k)
    reader.open.clear()
    if mismatched or differing:
        msg = [f"checkpoint {folder} does not fit the MobileVLM module tree:"]
        if mismatched:
            msg.append(f"{len(mismatched)} shape mismatch(es):{_listing(mismatched)}")
        if differing:
            msg.append(f"{len(differing)} tensor(s) disagree with another name of the same tensor or with the "
                       f"value the model computes:{_listing(differing)}")
        raise CheckpointKeyError("\n".join(msg))
    return {"tensors": len(files), "files": len({f for f, _ in files.values()}), "vision_tower": tower_source,
            "legacy_buffers": len(legacy_seen), "shared_groups": sum(len(g) > 1 for g in groups)}


def build_model(cfg: MobileVLMConfig, dtype: torch.dtype = torch.float32, init: bool = True) -> MobileVLMForCausalLM:
    """Instantiate the module tree in ``dtype``; ``init=False`` skips transformers' weight init (real loads)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if init:
            model = MobileVLMForCausalLM(cfg)
        else:
            from transformers.initialization import no_init_weights
            with no_init_weights():
                model = MobileVLMForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def from_pretrained(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    vision_tower_path: str | Path | None = None, attn_implementation: str | None = None,
                    allow_pickle: bool = False) -> MobileVLMForCausalLM:
    """config.json + weights (official layout) → an eval-mode model on ``device``; ``model.load_report`` says what
    was read."""
    folder = Path(folder)
    cfg = MobileVLMConfig.from_pretrained(folder, vision_tower_path)
    if attn_implementation:
        cfg.text_config._attn_implementation = attn_implementation
    model = build_model(cfg, dtype, init=False)
    model.load_report = load_official_weights(model, folder, vision_tower_path, allow_pickle)
    gen = folder / "generation_config.json"
    if gen.exists():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.to(device).eval()

"""What the native ports share (VideoLLaMA2 in ``videollama2/``, MobileVLM in ``mobilevlm/``): LLaVA-style models
rebuilt on transformers v5 classes that load an official checkpoint by its own tensor names, without remote code.

* :class:`NativeLM`: a decoder (``model``: a transformers text model) and ``lm_head``, with the encoders hanging off
  ``model`` where the official code puts them. A prompt holds one run of negative placeholder ids per media item,
  as long as its features; the forward replaces those rows' embeddings with the features (picked by absolute
  position, so a chunk holding part of a run gets the matching rows; an item's features are computed once per
  model) and calls the decoder with ``inputs_embeds``.
  Decoding is plain 1-D RoPE; :meth:`NativeLM.generate` is greedy (the official evaluations are).
* Checkpoint names: transformers v5 dropped the ``vision_model.`` level of ``CLIPVisionModel`` /
  ``SiglipVisionModel``; checkpoints keep it (``model.vision_tower.vision_tower.vision_model.…``), and
  :func:`official_name` / :func:`module_name` translate. :func:`load_official_weights` loads with a strict name
  check.

The adapter side is :class:`avkv.models.native_adapter.NativeAdapter`.
"""
from __future__ import annotations

import json
import re
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import DynamicCache


class CheckpointKeyError(KeyError):
    """The checkpoint's tensor names do not match the model's: the message lists every offending name."""

    def __str__(self) -> str:                     # KeyError would repr() the message
        return str(self.args[0])


class VisionTower(nn.Module):
    """The official ``CLIPVisionTower`` / ``SiglipVisionTower``: per-image features of
    ``hidden_states[select_layer]``, the CLS token dropped when ``drop_cls`` (CLIP with ``select_feature='patch'``)."""

    def __init__(self, tower: nn.Module, select_layer: int, drop_cls: bool, kind: str = "clip") -> None:
        super().__init__()
        self.vision_tower = tower
        self.kind, self.select_layer, self.drop_cls = kind, select_layer, drop_cls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values=pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        return feats[:, 1:] if self.drop_cls else feats


class NativeLM(nn.Module):
    """Decoder + ``lm_head`` + placeholder splicing + greedy decoding. Subclasses build the encoders and implement
    :meth:`encode_item` (a media item, with ``start``/``end`` prompt positions, → its feature rows ``[n, D]``)."""

    #: the port's name in error messages
    port_name = "native"
    #: what the features are called in the missing-features error
    feature_name = "media"
    #: the port's config class (``from_pretrained(folder, vision_tower_path)`` parses an official config.json)
    config_class: type = object

    def __init__(self, cfg: Any, decoder_cls: type) -> None:
        super().__init__()
        self.config = cfg
        tc = cfg.text_config
        self.model = decoder_cls(tc)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        if getattr(tc, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.generation_config = None

    def encode_item(self, item: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def legacy_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers older transformers versions saved in checkpoints (official name → the value the model computes);
        a checkpoint may hold them, and they must then agree."""
        return {}

    def bundled_tower_ignored(self) -> str | None:
        """Why the official loader would not use the vision tower bundled in a checkpoint (None: it uses it)."""
        return None

    def item_features(self, item: Any) -> torch.Tensor:
        """:meth:`encode_item`, computed once per item and model where no gradient is recorded: a split prefill
        (each chunk holding part of a run) and every further run over the same encoded prompt reuse the rows."""
        if torch.is_grad_enabled():
            return self.encode_item(item)
        memo = item.__dict__.get("_features")
        if memo is None or memo[0]() is not self:
            memo = (weakref.ref(self), self.encode_item(item))
            item.__dict__["_features"] = memo
        return memo[1]

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, media: list | None = None) -> torch.Tensor:
        """Token embeddings with every placeholder position replaced by its media feature row."""
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
                emb[sel] = self.item_features(item)[pos[sel] - item.start].to(emb.dtype)
                filled |= sel
        if not torch.equal(filled, holes):
            missing = pos[holes & ~filled].tolist()
            raise ValueError(f"placeholder positions without {self.feature_name} features: {missing[:10]}"
                             f"{' …' if len(missing) > 10 else ''} (mm_inputs missing or misaligned)")
        return emb.unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, past_key_values=None, position_ids: torch.Tensor | None = None,
                media: list | None = None, logits_to_keep: int = 1, use_cache: bool = True,
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
    def generate(self, input_ids: torch.Tensor, media: list | None = None, max_new_tokens: int = 16,
                 eos_token_ids: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding with a DynamicCache and explicit positions."""
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


    @classmethod
    def build(cls, cfg: Any, dtype: torch.dtype = torch.float32, init: bool = True) -> "NativeLM":
        """Instantiate the module tree in ``dtype``; ``init=False`` skips transformers' weight init (real loads)."""
        return build_model(cls, cfg, dtype, init)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", vision_tower_path: str | Path | None = None,
                        attn_implementation: str | None = None, allow_pickle: bool = False) -> "NativeLM":
        """config.json + weights (official layout) → an eval-mode model on ``device``; ``model.load_report`` says
        what was read (:func:`load_official_weights`)."""
        cfg = cls.config_class.from_pretrained(folder, vision_tower_path)
        return from_pretrained(cls, cfg, folder, dtype, device, vision_tower_path, attn_implementation, allow_pickle)


def build_model(model_cls: type, cfg: Any, dtype: torch.dtype = torch.float32, init: bool = True) -> NativeLM:
    """Instantiate ``model_cls(cfg)`` in ``dtype``; ``init=False`` skips transformers' weight init (real loads)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if init:
            model = model_cls(cfg)
        else:
            from transformers.initialization import no_init_weights
            with no_init_weights():
                model = model_cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def from_pretrained(model_cls: type, cfg: Any, folder: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", vision_tower_path: str | Path | None = None,
                    attn_implementation: str | None = None, allow_pickle: bool = False) -> NativeLM:
    """``cfg`` (parsed from ``folder``'s config.json) + the official weights → an eval-mode model on ``device``;
    ``model.load_report`` says what was read."""
    folder = Path(folder)
    if attn_implementation:
        cfg.text_config._attn_implementation = attn_implementation
    model = build_model(model_cls, cfg, dtype, init=False)
    model.load_report = load_official_weights(model, folder, vision_tower_path, allow_pickle)
    if (folder / "generation_config.json").exists():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.to(device).eval()


def tower_config(raw: dict, tower: str, vision_tower_path: str | Path | None, config_cls: type,
                 presets: dict[str, dict]) -> Any:
    """The vision tower's config, which the official config.json lacks (the official code reads it from the hub by
    the ``mm_vision_tower`` name ``tower``): a ``vision_config`` dict in config.json (the tiny builders write one),
    else ``vision_tower_path/config.json``, else the published config among ``presets`` (hub name part → fields)
    whose key ``tower`` contains. ``mm_hidden_size`` must equal the tower's width."""
    if raw.get("vision_config"):
        vcfg = config_cls(**raw["vision_config"])
    elif vision_tower_path is not None:
        vraw = json.loads((Path(vision_tower_path) / "config.json").read_text())
        vraw = vraw.get("vision_config", vraw)          # a full CLIP/SigLIP folder nests it
        vcfg = config_cls(**{k: v for k, v in vraw.items() if k != "model_type"})
    else:
        preset = next((p for key, p in presets.items() if key in tower), None)
        if preset is None:
            raise ValueError(f"no config for vision tower {tower!r}: pass vision_tower_path= a local copy of it")
        vcfg = config_cls(**preset)
    mm_hidden = int(raw.get("mm_hidden_size", vcfg.hidden_size))
    if mm_hidden != vcfg.hidden_size:
        raise ValueError(f"mm_hidden_size {mm_hidden} != vision tower hidden_size {vcfg.hidden_size}")
    return vcfg


# ------------------------------------------------------------------------------------ checkpoint names
TOWER = "model.vision_tower.vision_tower."
TOWER_OFFICIAL = TOWER + "vision_model."


def official_name(name: str) -> str:
    """Our parameter name → its name in official checkpoints (re-inserts the ``vision_model.`` level)."""
    return TOWER_OFFICIAL + name[len(TOWER):] if name.startswith(TOWER) else name


def module_name(name: str) -> str:
    """Official checkpoint name → our parameter name."""
    return TOWER + name[len(TOWER_OFFICIAL):] if name.startswith(TOWER_OFFICIAL) else name


def natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def official_key_groups(model: nn.Module) -> list[list[str]]:
    """Official names of the model's tensors grouped by shared storage (a group > 1 is one tensor the official tree
    reaches by several names: tied embeddings, BEATs' layer-shared relative-position table). Each group is sorted;
    a checkpoint must hold at least one name of every group."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(official_name(name))
    return [sorted(g, key=natural_key) for g in groups.values()]


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors under their official names, one name per shared tensor (the first of its group), as
    ``save_pretrained`` writes a tied tensor once."""
    sd = model.state_dict()
    return {g[0]: sd[module_name(g[0])].detach().contiguous() for g in official_key_groups(model)}


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
    names = sorted(names, key=natural_key)
    more = f"\n  … and {len(names) - limit} more" if len(names) > limit else ""
    return "\n  " + "\n  ".join(names[:limit]) + more


def _tower_files(files: dict, folder: Path, vision_tower_path: str | Path, allow_pickle: bool) -> dict:
    """``files`` with the vision tower's tensors taken from ``vision_tower_path`` (a local CLIP/SigLIP folder,
    transformers 4.x ``vision_model.*`` names or unprefixed; a full dual model's text side is skipped)."""
    files = {k: v for k, v in files.items() if not k.startswith(TOWER_OFFICIAL)}
    for k, src in checkpoint_files(Path(vision_tower_path), allow_pickle).items():
        if k.startswith("vision_model."):
            files[TOWER + k] = src
        elif not k.startswith(("text_model.", "logit_", "visual_projection", "text_projection")):
            files[TOWER_OFFICIAL + k] = src
    return files


def load_official_weights(model: NativeLM, folder: str | Path, vision_tower_path: str | Path | None = None,
                          allow_pickle: bool = False) -> dict:
    """Load an official checkpoint into ``model`` with a strict name check.

    Every checkpoint tensor must name a model tensor (or a :meth:`NativeLM.legacy_buffers` entry, whose value must
    then equal the model's), and every model tensor must be named (a shared tensor by at least one of its names,
    several names holding equal values). Shapes must match. ``vision_tower_path`` (a local CLIP/SigLIP folder)
    supplies the vision tower instead of the tensors bundled in the checkpoint, as the official code loads the tower
    from the ``mm_vision_tower`` hub id; it is required when the checkpoint bundles none or when the official loader
    would not use the bundled one (:meth:`NativeLM.bundled_tower_ignored`). Returns a small report."""
    folder = Path(folder)
    files = checkpoint_files(folder, allow_pickle)
    groups = official_key_groups(model)
    expected = {k for g in groups for k in g}
    legacy = model.legacy_buffers()
    bundled = any(k.startswith(TOWER_OFFICIAL) for k in files)
    ignored = model.bundled_tower_ignored() if bundled else None
    tower_source = "checkpoint"
    if vision_tower_path is not None or not bundled or ignored:
        if vision_tower_path is None:
            tower = sorted(k for k in expected if k.startswith(TOWER_OFFICIAL))
            why = ignored or (f"the checkpoint has no vision tower tensors ({len(tower)} missing, e.g. "
                              f"{tower[0] if tower else '-'})")
            raise CheckpointKeyError(f"{folder}: {why}; pass vision_tower_path= a local copy of "
                                     f"{model.config.vision_tower_name!r}")
        files = _tower_files(files, folder, vision_tower_path, allow_pickle)
        tower_source = str(vision_tower_path)
    unexpected = set(files) - expected - set(legacy)
    missing = [g for g in groups if not any(k in files for k in g)]
    if unexpected or missing:
        msg = [f"checkpoint {folder} does not match the {model.port_name} module tree:"]
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected tensor name(s):{_listing(unexpected)}")
        if missing:
            msg.append(f"{len(missing)} missing tensor name(s):{_listing(g[0] for g in missing)}")
        raise CheckpointKeyError("\n".join(msg))

    params = model.state_dict(keep_vars=True)
    reader = _Reader()
    mismatched, differing, legacy_seen = [], [], []
    try:
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
    finally:
        reader.open.clear()
    if mismatched or differing:
        msg = [f"checkpoint {folder} does not fit the {model.port_name} module tree:"]
        if mismatched:
            msg.append(f"{len(mismatched)} shape mismatch(es):{_listing(mismatched)}")
        if differing:
            msg.append(f"{len(differing)} tensor(s) hold different values than another name of the same tensor or "
                       f"the value the model computes:{_listing(differing)}")
        raise CheckpointKeyError("\n".join(msg))
    return {"tensors": len(files), "files": len({f for f, _ in files.values()}), "vision_tower": tower_source,
            "legacy_buffers": len(legacy_seen), "shared_groups": sum(len(g) > 1 for g in groups)}

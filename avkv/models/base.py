"""The model-adapter contract: everything model-specific lives behind it.

An adapter loads a checkpoint folder with ``from_pretrained``, turns a :class:`~avkv.schema.Prompt` into
processor inputs (:class:`Encoded`), says where the decoder layers are, gives the modality of every prompt
position, and produces the position ids the engine passes explicitly to every forward (so decode positions
continue from the logical prompt length, never from a pruned cache length).

Untrusted input stays data here: weights load from safetensors only (``use_safetensors=True``) unless a model
config sets ``allow_pickle_weights: true``; and :meth:`ModelAdapter.safe_prompt` escapes every control-token
string (the tokenizer's added tokens, and media tags such as VideoLLaMA2's ``<video>``) found in a prompt's text,
so dataset text can never become a chat control token or a media placeholder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avkv.schema import AUDIO, IMAGE, TEXT, VIDEO, Media, Prompt


def weights_digest(model_path: str | Path) -> str:
    """sha256 over a checkpoint's safetensors files: results and calibrations derived from weights name them."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted(Path(model_path).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class CheckpointMissing(FileNotFoundError):
    pass


class UnsafeCheckpoint(ValueError):
    """A checkpoint folder with pickle weights only, and no ``allow_pickle_weights`` opt-in."""


#: inserted after the first character of a control-token string found in prompt text: the string stays readable
#: and is tokenized as ordinary text (U+200B ZERO WIDTH SPACE)
ESCAPE = "\u200b"


def escape_controls(text: str, controls: list[str]) -> tuple[str, list[str]]:
    """``text`` with every occurrence of a string of ``controls`` broken by :data:`ESCAPE`; and which were found."""
    found = []
    for c in sorted(controls, key=len, reverse=True):
        if len(c) > 1 and c in text:
            found.append(c)
            text = text.replace(c, c[0] + ESCAPE + c[1:])
    return text, found


@dataclass
class Encoded:
    """Processor output for one prompt, plus what the engine needs to split and account for it."""

    inputs: dict[str, Any]                 # kwargs for the model forward (input_ids, pixel values, grids, ...)
    input_ids: torch.Tensor                # [1, n]
    modality: torch.Tensor                 # [n] long, ids into MODALITIES
    question_start: int                    # first token of the question text (compress_at=context splits here)
    assistant_start: int                   # first token of the assistant preamble (compress_at=question)
    media_s: float = 0.0                   # time spent decoding media files (kept out of prefill time)
    layout: dict = field(default_factory=dict)   # extras for methods (video frame/spatial index per position)
    modalities_used: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what the adapter changed about the input (recorded)
    #: what the model was fed, per media item (mode, frames used and their indices, resized size, audio seconds)
    preprocessing: dict = field(default_factory=dict)


#: ``preprocessing`` modes: ``official`` reproduces the family's official input pipeline (its parameters in the
#: config's ``official:`` block); ``fixed_frames`` samples ``num_frames`` frames evenly (controlled experiments,
#: the tiny and proxy checkpoints)
PREPROCESSING_MODES = ("official", "fixed_frames")


class ModelAdapter:
    """Base adapter. Subclasses implement ``_load``, ``encode`` and the position logic."""

    family: str = "base"
    #: media inputs the model reads only up to a length it derives per item (e.g. LLaVA-OneVision's anyres patches:
    #: ``pixel_values[i, :num_patches(image_sizes[i])]``), by input name: the dimension the batched prefill
    #: (:func:`avkv.batch_prefill.media_batch`) may zero-pad to the rows' longest before concatenating
    batch_pad_dims: dict[str, int] = {}
    #: modalities the model can take as input
    modalities: tuple[str, ...] = ()

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu",
                 attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                 make_hint: str | None = None, num_frames: int = 8, fps: float | None = None,
                 max_audio_s: float | None = None, preprocessing: str = "fixed_frames",
                 official: dict | None = None, max_image_pixels: int | None = None,
                 allow_pickle_weights: bool = False, device_map: str | dict | None = None,
                 max_memory: dict | None = None, offload_folder: str | None = None,
                 **processor_kwargs: Any) -> None:
        self.path = Path(path).expanduser()
        if not (self.path / "config.json").exists():
            hint = f" Create it with: {make_hint}" if make_hint else ""
            raise CheckpointMissing(f"model checkpoint folder not found or incomplete: {self.path} "
                                    f"(no config.json).{hint}")
        if not allow_pickle_weights and not any(self.path.glob("*.safetensors")):
            pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in self.path.glob(ext))
            if pickles:
                raise UnsafeCheckpoint(
                    f"{self.path} holds pickle weights only ({', '.join(pickles[:3])}); avkv loads safetensors only "
                    f"(a pickle can run code when loaded). Convert them to safetensors, or, if you trust the file, "
                    f"set model.allow_pickle_weights=true")
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device = torch.device(device)
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.allow_pickle_weights = bool(allow_pickle_weights)
        self.num_frames, self.fps, self.max_audio_s = num_frames, fps, max_audio_s
        if preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"model.preprocessing={preprocessing!r}: allowed values are {PREPROCESSING_MODES}")
        from avkv.models import media_io
        self.preprocessing = preprocessing
        self.official = {**media_io.OFFICIAL_DEFAULTS, **dict(official or {})}
        unknown = sorted(set(self.official) - set(media_io.OFFICIAL_DEFAULTS))
        if unknown:
            raise ValueError(f"model.official has unknown keys {unknown}; allowed: {sorted(media_io.OFFICIAL_DEFAULTS)}")
        self.max_image_pixels = media_io.DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else int(max_image_pixels)
        self.processor_kwargs = processor_kwargs
        if device_map is not None and not self.supports_device_map:
            raise ValueError(f"model.device_map is not supported by the {self.family} adapter (it loads onto one "
                             f"device: model.device)")
        self.device_map = dict(device_map) if isinstance(device_map, dict) else device_map
        self.max_memory = dict(max_memory) if max_memory else None
        self.offload_folder = offload_folder
        self.model, self.processor = self._load()
        self.model.eval()
        if self.device_map is not None:
            # layers spread over devices: inputs go where the token embeddings are (accelerate's hooks move every
            # layer's inputs to its own device); ``devices`` lists every device holding weights
            self.device = self.model.get_input_embeddings().weight.device
        self.devices = sorted({p.device for p in self.model.parameters() if p.device.type != "meta"}, key=str) \
            or [self.device]
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)

    #: whether ``model.device_map`` (layers spread over devices by ``from_pretrained``/accelerate) is supported
    supports_device_map: bool = False

    def _placement_kwargs(self) -> dict:
        """``from_pretrained`` kwargs that place the weights: ``device_map`` (``auto``, ``balanced``, or a module ->
        device mapping; ``cpu``/``disk`` entries offload, with ``offload_folder`` for ``disk``) and ``max_memory``
        when the config sets them; nothing otherwise (see :meth:`_placed`)."""
        if self.device_map is None:
            return {}
        out = {"device_map": self.device_map}
        if self.max_memory:
            out["max_memory"] = self.max_memory
        if self.offload_folder:
            out["offload_folder"] = str(self.offload_folder)
        return out

    def _placed(self, model: torch.nn.Module) -> torch.nn.Module:
        """The loaded model on ``model.device``, or as ``device_map`` already dispatched it."""
        return model if self.device_map is not None else model.to(self.device)

    # ---------------------------------------------------------------- model knowledge the engine asks for

    def layer_queries(self, module: torch.nn.Module, hidden: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The rotated queries of one attention layer for some prompt positions, as its forward computes them.

        ``module`` is the layer's attention module, ``hidden`` its input hidden states ``[1, T, D]`` for those
        positions and ``position_embeddings`` their ``(cos, sin)`` ``[1, T, d]``. Returns ``[H, T, d]`` (query heads).
        The default is the Qwen2/Llama recipe (``q_proj``, optional per-head ``q_norm``, rotate-half RoPE; M-RoPE's
        sections are already folded into cos/sin by the model's rotary embedding); a family whose attention differs
        overrides this, so the engine never needs to know a model's projection names.
        """
        T = hidden.shape[1]
        q = module.q_proj(hidden).view(1, T, -1, module.head_dim).transpose(1, 2)
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        cos, sin = position_embeddings
        c, s = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
        x1, x2 = q[..., : q.shape[-1] // 2], q[..., q.shape[-1] // 2:]
        return (q * c + torch.cat((-x2, x1), dim=-1) * s)[0]

    def cache_sources(self) -> list[int]:
        """Per decoder layer, the layer whose KV cache its attention reads: itself (the default), or for a layer
        that owns no cache (KV sharing: Gemma-3n's last layers) the earlier layer it reuses. The engine gives such a
        layer its source's storage, so it attends over exactly the entries its source kept."""
        return list(range(len(self.decoder_layers())))

    def layer_windows(self) -> list[int | None]:
        """Per decoder layer, its sliding attention window (None: full attention, the default)."""
        return [None] * len(self.decoder_layers())

    def rotary_embedding(self) -> torch.nn.Module:
        """The decoder's rotary embedding module (``rotary_emb(x, position_ids) -> (cos, sin)``): by default the
        ``rotary_emb`` of the module that holds the decoder layers (every transformers text model)."""
        first = self.decoder_layers()[0]
        for m in self.model.modules():
            layers = getattr(m, "layers", None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) and layers[0] is first \
                    and isinstance(getattr(m, "rotary_emb", None), torch.nn.Module):
                return m.rotary_emb
        raise NotImplementedError(f"{type(self).__name__}: no rotary_emb next to the decoder layers; override "
                                  "rotary_embedding()")

    def output_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The attention layer's output projection as ``[H, d, hidden]``: query head h's slice of ``o_proj``
        (the Qwen2/Llama layout; a family whose projection differs overrides this)."""
        w = module.o_proj.weight                                       # [hidden, H*d]
        H = module.config.num_attention_heads
        return w.t().reshape(H, module.head_dim, w.shape[0])

    def fit_prompt(self, prompt: Prompt) -> Prompt:
        """``prompt`` as this model can take it, before encoding (where a task's prompt meets the model).

        A task writes the item as the dataset has it (a video with its audio track); the model knows what it takes:
        a model that hears but cannot see gets a with-audio video as that audio track (same file and clip bounds).
        A text-only model refuses a prompt that carries media (its answer would not be about them), and so does a
        model that can take none of the prompt's media (a vision model on a speech set, an image model on video):
        the sample is recorded with that error instead of being answered from the text alone.
        """
        media = [c for c in prompt.context if isinstance(c, Media)]
        if media and not self.modalities:
            raise ValueError(f"the {self.family} model takes text only; this prompt carries "
                             f"{', '.join(sorted({m.kind for m in media}))}")
        takes = set(self.modalities)
        if media and not any(m.kind in takes or (m.kind == "video" and m.with_audio and "audio" in takes)
                             for m in media):
            raise ValueError(f"the {self.family} model takes {', '.join(sorted(takes))}; this prompt carries only "
                             f"{', '.join(sorted({m.kind for m in media}))}, so none of its media would reach the model")
        if "video" in self.modalities or "audio" not in self.modalities:
            return prompt
        context = [Media("audio", c.path, start=c.start, end=c.end)
                   if isinstance(c, Media) and c.kind == "video" and c.with_audio else c for c in prompt.context]
        return dataclasses.replace(prompt, context=context)

    # ---------------------------------------------------------------- to implement per family
    def _load(self) -> tuple[torch.nn.Module, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, prompt: Prompt) -> Encoded:  # pragma: no cover - interface
        raise NotImplementedError

    def decoder_layers(self) -> list[torch.nn.Module]:  # pragma: no cover - interface
        raise NotImplementedError

    def text_config(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def prompt_position_ids(self, enc: Encoded) -> torch.Tensor:
        """Position ids of the whole prompt as ``generate`` computes them (1-D [1, n] or M-RoPE [4, 1, n])."""
        kwargs = {k: v for k, v in enc.inputs.items() if k != "input_ids"}
        kwargs.update(input_ids=enc.input_ids, attention_mask=torch.ones_like(enc.input_ids))
        return self.model._prepare_position_ids_for_generation(enc.input_ids, kwargs)

    def media_inputs(self, enc: Encoded) -> dict:
        """The processor outputs other than ``input_ids`` (pixel values, audio features, grids), on the model's
        device, floating tensors in the model's dtype: the extra kwargs of the prefill forward."""
        out = {}
        for k, v in enc.inputs.items():
            if k == "input_ids":
                continue
            if torch.is_tensor(v):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def continue_position_ids(self, prompt_pos: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """Position ids for logical positions start..start+length-1 after the prompt (decode / suffix chunks)."""
        n = prompt_pos.shape[-1]
        if start + length <= n:
            return prompt_pos[..., start:start + length]
        text = torch.arange(start, start + length, device=prompt_pos.device)[None]
        if prompt_pos.dim() == 2:                               # 1-D RoPE
            return text
        # M-RoPE: row 0 is the text position, rows 1-3 continue from the last prompt position (rope delta)
        delta = prompt_pos[1:, :, -1:] - prompt_pos[0:1, :, -1:]      # [3, 1, 1]
        return torch.cat([text[None], text[None] + delta], dim=0)

    # ---------------------------------------------------------------- shared behaviour
    #: strings that are control input to this family besides the tokenizer's added tokens (media tags)
    extra_control_strings: tuple[str, ...] = ()

    def control_strings(self) -> list[str]:
        """Every string the tokenizer or the processor treats as control input: added tokens and media tags."""
        if getattr(self, "_controls", None) is None:
            added = getattr(self.tokenizer, "get_added_vocab", dict)()
            self._controls = sorted({*added, *getattr(self.tokenizer, "all_special_tokens", []),
                                     *self.extra_control_strings})
        return self._controls

    def safe_prompt(self, prompt: Prompt, notes: list[str] | None = None) -> Prompt:
        """``prompt`` with control-token strings in its text escaped (:func:`escape_controls`), except in the
        pieces the task wrote itself (``prompt.verbatim``). What was escaped is added to ``notes``."""
        controls = self.control_strings()
        keep = set(prompt.verbatim)
        found: list[str] = []

        def esc(t: str) -> str:
            if t in keep:
                return t
            t, f = escape_controls(t, controls)
            found.extend(f)
            return t

        context = [esc(c) if isinstance(c, str) else c for c in prompt.context]
        question = esc(prompt.question)
        if not found:
            return prompt
        if notes is not None:
            notes.append("escaped control-token strings in the prompt text: " + ", ".join(sorted(set(found))))
        return dataclasses.replace(prompt, context=context, question=question)

    def _weights_kwargs(self) -> dict:
        """``from_pretrained`` kwargs: safetensors only, unless the config allows pickle (``allow_pickle_weights``)."""
        return {"use_safetensors": None if self.allow_pickle_weights else True}

    @property
    def eos_token_ids(self) -> list[int]:
        ids = set()
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
            if e is not None:
                ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def token_modality(self, input_ids: torch.Tensor, ids: dict[str, int | None]) -> torch.Tensor:
        """Modality per position from placeholder token ids (works for interleaved audio-in-video)."""
        ids_1d = input_ids.reshape(-1)
        mod = torch.full_like(ids_1d, TEXT)
        for name, code in (("image", IMAGE), ("video", VIDEO), ("audio", AUDIO)):
            tid = ids.get(name)
            if tid is not None:
                mod[ids_1d == tid] = code
        return mod

    def forward(self, input_ids: torch.Tensor, cache: Any, position_ids: torch.Tensor,
                mm_inputs: dict | None = None, logits_to_keep: int = 1,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One forward over ``input_ids`` appended to ``cache``; returns logits of the last ``logits_to_keep``.
        ``attention_mask`` [B, S] (1 = token, 0 = padding; the batched prefill's left padding): passed to the model;
        None (batch 1, no padding): the causal mask is implied."""
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        out = self.model(input_ids=input_ids, past_key_values=cache, position_ids=position_ids, use_cache=True,
                         logits_to_keep=logits_to_keep, **extra, **(mm_inputs or {}))
        return out.logits

    def describe(self) -> dict:
        tc = self.text_config()
        return {"family": self.family, "path": str(self.path), "dtype": str(self.dtype).replace("torch.", ""),
                "attn_implementation": self.attn_implementation, "num_layers": tc.num_hidden_layers,
                "num_kv_heads": tc.num_key_value_heads, "num_heads": tc.num_attention_heads,
                "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads}


"""Tiny offline checkpoints: a byte-level BPE tokenizer trained here, the families' special tokens and real chat
templates, random weights from small configs. Each family module defines ``build_tiny(out_dir)`` using these
helpers; ``scripts/make_tiny_models.py`` calls the builder named by each ``configs/model/tiny_*.yaml``.

The checkpoints go through ``save_pretrained`` and are loaded back with ``from_pretrained`` by the same adapter
code that loads real checkpoints, so the real loading path is the one tested.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",   # Qwen-VL
    "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>",                                              # Qwen2-Audio / Omni
    "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>",                               # Omni
    "<|en|>",
]

OMNI_TOKEN_ATTRS = {
    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}

# A small English corpus: enough for a tokenizer whose ids cover the words our fixtures and prompts use.
WORDS = ("the a an is are what which how many colour color shape square circle moving left right up down red green "
          "blue yellow black white beep beeps tone high low pitch sound audio video frame image picture heard seen "
          "first second third answer with letter option options only one two three four five six seven eight nine "
          "ten zero yes no choose best from given choices directly question describe happening where when why "
          "come used for before next both visual speech transcribe english recognize text say says said word words "
          "cat dog car bird music instrument playing plays violin piano flute guitar loud quiet object on in of to "
          "and or it this that there you your please think about clip shown A B C D E").split()


def train_tokenizer(vocab_size: int = 640, seed: int = 0, extra_specials: list[str] | None = None,
                    texts: list[str] | None = None):
    """Train a byte-level BPE tokenizer offline (seconds) and wrap it as a transformers fast tokenizer.

    ``texts`` are added to the corpus (200 times each), so the words a trained proxy reads become few tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = random.Random(seed)

    def corpus():
        for _ in range(4000):
            yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + rng.choice([".", "?", "!", ":"])
        yield "system user assistant You are a helpful assistant. Audio 1: Picture Video (A) (B) (C) (D)\n"
        for t in texts or ():
            for _ in range(200):
                yield t

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = QWEN_SPECIAL_TOKENS + list(extra_specials or [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


def hf_tokenizer(chat_template: str, extra_special_tokens: dict | None = None, vocab_size: int = 640,
                 texts: list[str] | None = None):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(vocab_size, texts=texts), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=chat_template,
                                   extra_special_tokens=extra_special_tokens or {})


def chat_template(family: str) -> str:
    return (TEMPLATES / f"{family}.jinja").read_text()


def mrope_section(head_dim: int) -> list[int]:
    """Qwen M-RoPE sections for a head dim (sum must be head_dim/2); the real 128-dim model uses [16, 24, 24]."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def qwen_text_config(tok, hidden: int, layers: int, mrope: list[int] | None = None, **extra) -> dict:
    """The text decoder of every tiny Qwen family: ``layers`` layers of width ``hidden``, 4 query / 2 KV heads, the
    ChatML special tokens of ``tok``; ``mrope`` (sections) gives an M-RoPE decoder, ``extra`` adds or overrides
    fields (Qwen2-Audio's ``model_type``, Qwen3-Omni's MoE sizes)."""
    t = tok.convert_tokens_to_ids
    cfg = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if mrope is not None:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}
    cfg.update(bos_token_id=t("<|endoftext|>"), eos_token_id=t("<|im_end|>"), pad_token_id=t("<|endoftext|>"))
    cfg.update(extra)
    return cfg


def eval_model(model_cls, cfg, tok):
    """``model_cls(cfg)`` in eval mode, generation stopping at ``<|im_end|>`` (every ChatML tiny model)."""
    model = model_cls(cfg).eval()
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    return model


def save_checkpoint(out_dir: str | Path, model, processor, then=None) -> None:
    """Write ``model`` and ``processor`` (and its video processor, if any) atomically to ``out_dir``; ``then(folder)``
    may rewrite the folder before it is moved into place."""
    with atomic_dir(out_dir) as d:
        model.save_pretrained(d)
        processor.save_pretrained(d)
        if getattr(processor, "video_processor", None) is not None:
            processor.video_processor.save_pretrained(d)
        if then is not None:
            then(d)


@contextmanager
def atomic_dir(out_dir: str | Path):
    """Write a checkpoint into a temp folder and move it into place at the end (no half-written checkpoints)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def scale_qk(checkpoint: str | Path, scale: float, prefix: str = "", extra: dict | None = None) -> None:
    """Multiply the query and key projections (names under ``prefix``) of ``checkpoint/model.safetensors`` by
    ``scale`` so attention is peaky, as in trained models (at the default init, std 0.02, it is nearly uniform); add
    the ``extra`` tensors; write the file back."""
    from safetensors.torch import load_file, save_file
    f = Path(checkpoint) / "model.safetensors"
    sd = load_file(f)
    for k in sd:
        if k.startswith(prefix) and (".self_attn.q_proj." in k or ".self_attn.k_proj." in k):
            sd[k] = sd[k] * scale
    sd.update(extra or {})
    save_file(sd, f, metadata={"format": "pt"})


def builder_fingerprint(builder: str) -> str:
    """Hash of the source file defining a tiny builder: a checkpoint made by older code is rebuilt."""
    import hashlib
    import importlib
    import inspect
    module = importlib.import_module(builder.rsplit(".", 1)[0])
    src = inspect.getsource(module) + inspect.getsource(importlib.import_module(__name__))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def ensure_tiny(config_path: str | Path, out_root: str | Path, force: bool = False) -> tuple[Path, bool]:
    """Write the tiny checkpoint a ``configs/model/tiny_*.yaml`` names, unless an up-to-date one exists.

    Returns (folder, built).
    """
    from hydra.utils import get_method
    from omegaconf import OmegaConf
    builder = OmegaConf.load(config_path).get("tiny_builder")
    if not builder:
        raise ValueError(f"{config_path} names no tiny_builder")
    out = Path(out_root) / Path(config_path).stem
    stamp = out / "avkv_builder.txt"
    fp = builder_fingerprint(builder)
    if not force and (out / "config.json").exists() and stamp.exists() and stamp.read_text().strip() == fp:
        return out, False
    get_method(builder)(out)
    stamp.write_text(fp + "\n")
    return out, True


def build_tiny_omni_deep(out_dir: str | Path, qk_scale: float = 12.0) -> None:
    """The tiny Qwen2.5-Omni thinker with 8 text layers instead of 2, so every depth-dependent mechanism has the
    layers it needs (PureKV's source layer 2 and dense layers 0-1, FastV's K = 2, PyramidKV's schedule, MadaKV's
    cross-layer compensation, AccKV's per-layer focus); same tokenizer, towers and seed otherwise.

    The text layers' query and key projections are scaled by ``qk_scale``: at the default init (std 0.02) every
    layer's attention is nearly uniform, so nothing that depends on where a layer attends (AccKV's focus, MadaKV's
    demand) could differ between layers; scaled, attention is peaky and differs by layer, as in trained models.
    """
    from avkv.models.qwen2_5_omni import build_tiny
    build_tiny(out_dir, layers=8)
    scale_qk(out_dir, qk_scale, prefix="model.layers.")

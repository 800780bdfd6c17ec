"""A tiny random MobileVLM V2 checkpoint in the official on-disk layout (for tests and CPU runs).

* ``config.json``: the official field names — a flat ``LlamaConfig`` as transformers 4.33 wrote it (no
  ``rope_theta``: the default 10000) with ``model_type: mobilevlm``, plus ``mm_vision_tower``,
  ``vision_tower_type: clip``, ``mm_projector_type: ldpnetv2``, ``image_aspect_ratio: pad`` … The CLIP tower's
  config, which the official code fetches from the hub, is written inline as ``vision_config``: a 24×24 patch grid
  (96 px, patch 4) as the real 336/14 tower has, so LDPv2 pools 2×2 cells to its 12×12 grid exactly as there.
* ``model.safetensors``: random weights (fixed seed) under the official names, the tower included (as the V2
  checkpoints bundle it).
* The tokenizer as the official checkpoints ship it: a SentencePiece model (``tokenizer.model``: BPE with byte
  fallback, digits split, a dummy prefix, no normalisation — LLaMA's settings), trained offline here on a small
  corpus, with ``tokenizer_config.json`` naming ``LlamaTokenizer`` (BOS added, no EOS) and no chat template
  (MobileVLM renders its own conversation).
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

from avkv.models.mobilevlm.config import MobileVLMConfig
from avkv.models.mobilevlm.modeling import build_model, official_state_dict
from avkv.models.mobilevlm.processing import V1_SYSTEM
from avkv.models.tiny import WORDS, atomic_dir

SEED = 0
SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}


def train_sentencepiece(vocab_size: int = 640, seed: int = 0) -> bytes:
    """A LLaMA-style SentencePiece BPE model trained offline on a small English corpus; the serialized model."""
    import sentencepiece as spm
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + rng.choice([".", "?", "!", ":"])
             for _ in range(4000)]
    lines += [f"{V1_SYSTEM} USER: What is shown? ASSISTANT: A red square.", "Answer the question using a single "
              "word or phrase.", "Choice list: Your answer is: Look at the frames and answer the question."] * 50
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece=SPECIALS["unk"], bos_piece=SPECIALS["bos"],
        eos_piece=SPECIALS["eos"], num_threads=1, minloglevel=2)
    return out.getvalue()


def tokenizer_files(vocab_size: int = 640) -> dict[str, bytes]:
    """``tokenizer.model`` + the JSON files transformers 4.x writes for a ``LlamaTokenizer``."""
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
           "bos_token": SPECIALS["bos"], "eos_token": SPECIALS["eos"], "unk_token": SPECIALS["unk"],
           "pad_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 2048,
           "padding_side": "right", "sp_model_kwargs": {}}
    special = {"bos_token": SPECIALS["bos"], "eos_token": SPECIALS["eos"], "unk_token": SPECIALS["unk"]}
    return {"tokenizer.model": train_sentencepiece(vocab_size),
            "tokenizer_config.json": json.dumps(cfg, indent=2).encode(),
            "special_tokens_map.json": json.dumps(special, indent=2).encode()}


def tiny_config(vocab_size: int) -> dict:
    """The official-layout config.json of the tiny checkpoint."""
    return {
        "architectures": ["MobileLlamaForCausalLM"],
        "model_type": "mobilevlm",
        # LlamaConfig fields as transformers 4.33 wrote them (MobileLLaMA: multi-head attention, no bias)
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "initializer_range": 0.02, "pretraining_tp": 1, "rope_scaling": None,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": True,
        "torch_dtype": "float32", "transformers_version": "4.33.1",
        # multimodal fields (official names and V2 values)
        "mm_vision_tower": "tiny-clip-vit-patch4-96", "vision_tower_type": "clip", "mm_hidden_size": 32,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "ldpnetv2",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "use_mm_proj": True, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "mm_projector_lr": None,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        # the tower config the official code would fetch from the hub
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "image_size": 96, "patch_size": 4, "hidden_act": "quick_gelu",
                          "layer_norm_eps": 1e-5, "projection_dim": 32},
    }


def build_tiny(out_dir: str | Path) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (replacing what is there) and return the folder."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    files = tokenizer_files()
    import sentencepiece as spm
    vocab = spm.SentencePieceProcessor(model_proto=files["tokenizer.model"]).get_piece_size()
    raw = tiny_config(vocab)
    torch.manual_seed(SEED)
    model = build_model(MobileVLMConfig.from_dict(raw))
    out = Path(out_dir)
    with atomic_dir(out) as d:
        save_file(official_state_dict(model), str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(raw, indent=2))
        for name, data in files.items():
            (d / name).write_bytes(data)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False).save_pretrained(str(d))
    return out

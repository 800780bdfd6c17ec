"""Tiny random VideoLLaMA2 checkpoints in the official on-disk layout (for tests and CPU runs).

``build_tiny`` writes a VideoLLaMA2.1-AV-shaped one (Qwen2 + SigLIP + STC v35 + BEATs); ``variant="v2"`` a
VideoLLaMA2-7B-shaped one (Mistral + CLIP + STC v1, video only).

``config.json`` uses the official field names (a flat Qwen2 config with ``rope_theta`` as transformers 4.42
wrote it, plus ``mm_*`` / ``num_frames`` / audio fields); the two tower configs the official code would fetch
from the hub are written inline as ``vision_config`` / ``audio_config``. Weights are random (fixed seed), saved
under their official names in ``model.safetensors`` (one name per shared tensor, as ``save_pretrained`` does).
The tokenizer is a byte-level BPE trained offline with the family's special tokens and chat template.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from avkv.models.tiny import atomic_dir, train_tokenizer
from avkv.models.videollama2.config import VideoLLaMA2Config
from avkv.models.videollama2.modeling import build_model, official_state_dict
from avkv.models.videollama2.processing import chat_template

SEED = 0
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>"]


def build_tokenizer(llm: str = "qwen2"):
    """The project's offline byte-level BPE with the family's special tokens and VideoLLaMA2 chat template."""
    from transformers import PreTrainedTokenizerFast
    if llm == "qwen2":
        return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", chat_template=chat_template(llm))
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(extra_specials=MISTRAL_SPECIALS), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", chat_template=chat_template(llm))


def tiny_config(vocab_size: int, eos_id: int, pad_id: int) -> dict:
    """The official-layout config.json of the tiny AV checkpoint."""
    return {
        "architectures": ["Videollama2Qwen2ForCausalLM"],
        "model_type": "videollama2_qwen2",
        # Qwen2 fields, as transformers 4.42 wrote them
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
        "sliding_window": 4096, "max_window_layers": 2, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": pad_id, "eos_token_id": eos_id, "use_cache": True, "torch_dtype": "float32",
        # vision branch (official fields)
        "mm_vision_tower": "tiny-siglip-patch14-112", "mm_hidden_size": 32, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_projector_type": "stc_connector_v35", "num_frames": 8,
        "image_aspect_ratio": "pad", "use_mm_proj": True, "tune_mm_mlp_adapter": False,
        # audio branch (official fields)
        "mm_audio_tower": "audio_tower.bin", "mm_projector_a_type": "mlp2x_gelu", "mm_hidden_size_a": 32,
        "hidden_size_a": 64,
        # tower configs the official code would fetch from the hub / take from the BEATs defaults
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "image_size": 112, "patch_size": 14,
                          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
        "audio_config": {"input_patch_size": 16, "embed_dim": 48, "encoder_layers": 2, "encoder_embed_dim": 32,
                         "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 2, "conv_pos": 16,
                         "conv_pos_groups": 4, "finetuned_model": True, "predictor_class": 527},
    }


def tiny_config_v2(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """config.json of the tiny VideoLLaMA2(-7B)-shaped checkpoint: Mistral + CLIP + stc_connector, no audio."""
    return {
        "architectures": ["Videollama2MistralForCausalLM"],
        "model_type": "videollama2_mistral",
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "use_cache": True, "torch_dtype": "float32",
        "mm_vision_tower": "tiny-clip-vit-patch14-112", "mm_hidden_size": 32, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_projector_type": "stc_connector", "num_frames": 8,
        "image_aspect_ratio": "pad", "use_mm_proj": True, "tune_mm_mlp_adapter": False,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "image_size": 112, "patch_size": 14, "hidden_act": "quick_gelu",
                          "layer_norm_eps": 1e-5, "projection_dim": 32},
    }


def build_tiny(out_dir: str | Path, variant: str = "av") -> Path:
    """Write a tiny checkpoint to ``out_dir`` (replacing what is there) and return the folder.

    ``variant``: ``av`` (VideoLLaMA2.1-AV shape, the default) or ``v2`` (VideoLLaMA2-7B shape)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    out = Path(out_dir)
    if variant not in ("av", "v2"):
        raise ValueError(f"unknown tiny VideoLLaMA2 variant {variant!r} (av | v2)")
    tok = build_tokenizer("qwen2" if variant == "av" else "mistral")
    if variant == "av":
        eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
        raw, stop = tiny_config(len(tok), eos, pad), [eos, pad]
    else:
        bos, eos = tok.convert_tokens_to_ids("<s>"), tok.convert_tokens_to_ids("</s>")
        raw, stop, pad = tiny_config_v2(len(tok), bos, eos), [eos], eos
    torch.manual_seed(SEED)
    model = build_model(VideoLLaMA2Config.from_dict(raw))
    with atomic_dir(out) as d:
        save_file(official_state_dict(model), str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(raw, indent=2))
        tok.save_pretrained(str(d))
        GenerationConfig(eos_token_id=stop, pad_token_id=pad, do_sample=False).save_pretrained(str(d))
    return out

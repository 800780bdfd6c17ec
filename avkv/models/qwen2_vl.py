"""Qwen2-VL (images and video; M-RoPE without absolute time). Real checkpoints: ``Qwen/Qwen2-VL-7B-Instruct``
(EffiVLM-Bench's Qwen2-VL). The prompt, media handling and input pipeline are Qwen2.5-VL's (same chat template,
placeholders and qwen-vl-utils preprocessing); the model differs (no window attention in the vision tower, M-RoPE
temporal positions counted in frames, not seconds)."""
from __future__ import annotations

from pathlib import Path

import torch

from avkv.models.qwen2_5_vl import Qwen25VLAdapter
from avkv.models.video_processing import TorchQwenVideoProcessor


class Qwen2VLAdapter(Qwen25VLAdapter):
    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, vision_hidden: int = 32, vision_depth: int = 2,
               min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, vocab_size: int = 640, layers: int = 2) -> None:
    """Tiny random Qwen2-VL: ``layers`` text layers (default 2; hidden 64, 4 heads / 2 KV heads, M-RoPE), a 2-block
    vision tower; the Qwen-VL tokenizer tokens and chat template (Qwen2-VL renders as Qwen2.5-VL)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, \
        Qwen2VLProcessor
    from avkv.models.tiny import chat_template, eval_model, hf_tokenizer, mrope_section, qwen_text_config, \
        save_checkpoint
    torch.manual_seed(seed)
    template = chat_template("qwen2_5_vl")
    tok = hf_tokenizer(template, vocab_size=vocab_size)
    t = tok.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config=qwen_text_config(tok, hidden, layers, mrope=mrope_section(hidden // 4)),
        vision_config=dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2, num_heads=2),
        image_token_id=t("<|image_pad|>"), video_token_id=t("<|video_pad|>"),
        vision_start_token_id=t("<|vision_start|>"), vision_end_token_id=t("<|vision_end|>"))
    model = eval_model(Qwen2VLForConditionalGeneration, cfg, tok)
    pix = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pix), tokenizer=tok,
                            video_processor=TorchQwenVideoProcessor(**pix), chat_template=template)
    save_checkpoint(out_dir, model, proc)

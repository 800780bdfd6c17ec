"""Qwen2-VL (images and video; M-RoPE without absolute time). Real checkpoints: ``Qwen/Qwen2-VL-7B-Instruct``
(EffiVLM-Bench's Qwen2-VL). The prompt, media handling and input pipeline are Qwen2.5-VL's (same chat template,
placeholders and qwen-vl-utils preprocessing); the model differs (no window attention in the vision tower, M-RoPE
temporal positions counted in frames, not seconds)."""
from __future__ import annotations

from pathlib import Path

import torch

from avkv.models.qwen2_5_vl import Qwen25VLAdapter
from avkv.models.video_processing import TorchQwenVideoProcessor, stock_video_processor_available


class Qwen2VLAdapter(Qwen25VLAdapter):
    family = "qwen2_vl"

    def _load(self):
        from transformers import Qwen2VLForConditionalGeneration
        model = Qwen2VLForConditionalGeneration.from_pretrained(self.path, **self._from_pretrained_kwargs())
        return model.to(self.device), load_processor(self.path, self.trust_remote_code, **self.processor_kwargs)


def load_processor(path: Path, trust_remote_code: bool = False, **kwargs):
    """The real Qwen2-VL processor; the torch-only video processor stands in where torchvision is missing."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor
    if stock_video_processor_available():
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs),
                            tokenizer=AutoTokenizer.from_pretrained(path),
                            video_processor=TorchQwenVideoProcessor.from_pretrained(path, **kwargs),
                            chat_template=(Path(path) / "chat_template.jinja").read_text())


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, vision_hidden: int = 32, vision_depth: int = 2,
               min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, vocab_size: int = 640, layers: int = 2) -> None:
    """Tiny random Qwen2-VL: ``layers`` text layers (default 2; hidden 64, 4 heads / 2 KV heads, M-RoPE), a 2-block
    vision tower; the Qwen-VL tokenizer tokens and chat template (Qwen2-VL renders as Qwen2.5-VL)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, \
        Qwen2VLProcessor
    from avkv.models.tiny import atomic_dir, chat_template, hf_tokenizer, mrope_section
    torch.manual_seed(seed)
    template = chat_template("qwen2_5_vl")
    tok = hf_tokenizer(template, vocab_size=vocab_size)
    t = tok.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": mrope_section(hidden // 4)},
                         bos_token_id=t("<|endoftext|>"), eos_token_id=t("<|im_end|>"), pad_token_id=t("<|endoftext|>")),
        vision_config=dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2, num_heads=2),
        image_token_id=t("<|image_pad|>"), video_token_id=t("<|video_pad|>"),
        vision_start_token_id=t("<|vision_start|>"), vision_end_token_id=t("<|vision_end|>"))
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = t("<|im_end|>")
    pix = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pix), tokenizer=tok,
                            video_processor=TorchQwenVideoProcessor(**pix), chat_template=template)
    with atomic_dir(out_dir) as d:
        model.save_pretrained(d)
        proc.save_pretrained(d)
        proc.video_processor.save_pretrained(d)

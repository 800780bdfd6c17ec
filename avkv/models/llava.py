"""LLaVA-1.5 (``LlavaForConditionalGeneration``; images only, 1-D RoPE, Llama/Vicuna decoder).

Real checkpoints: the llava-hf conversions (``llava-hf/llava-1.5-7b-hf``), loaded with their own processor (CLIP
336 px, 576 tokens per image) and chat template (``USER: <image>\\n… ASSISTANT:``). Each image is its ``<image>\\n``
tag at its place in the prompt (:mod:`avkv.models.hf_vlm`); a video item is left out and noted (the model has no
video input).
"""
from __future__ import annotations

from pathlib import Path

import torch

from avkv.models.hf_vlm import TagAdapter


class LlavaAdapter(TagAdapter):
    family = "llava"
    modalities = ("image",)
    placeholder_tokens = {"image": "<image>"}
    media_tags = {"image": "<image>\n"}

    def _load(self):
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(self.path, **self._from_pretrained_kwargs())
        proc = AutoProcessor.from_pretrained(self.path, trust_remote_code=self.trust_remote_code,
                                             **self.processor_kwargs)
        return model.to(self.device), proc


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, vision_hidden: int = 32, image_size: int = 112,
               vocab_size: int = 640, layers: int = 2) -> None:
    """Tiny random LLaVA-1.5: a Llama decoder of ``layers`` layers (hidden 64, 4 heads / 2 KV heads), a 2-layer CLIP
    vision tower on ``image_size`` px (patch 14: 64 tokens per image), the 2-layer GELU projector, the penultimate
    vision layer without CLS (as llava-1.5), the llava-hf processor layout (pad to square, CLIP crop) and a
    Llama-style tokenizer that adds ``<s>``."""
    from tokenizers import processors
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from avkv.models.tiny import atomic_dir, chat_template, train_tokenizer
    torch.manual_seed(seed)
    template = chat_template("llava")
    bpe = train_tokenizer(vocab_size, extra_specials=["<s>", "</s>", "<unk>", "<image>"])
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>", chat_template=template, extra_special_tokens={"image_token": "<image>"})
    t = tok.convert_tokens_to_ids
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=14,
                           projection_dim=vision_hidden),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=t("<s>"), eos_token_id=t("</s>"),
                         pad_token_id=t("<unk>")),
        image_token_id=t("<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = t("</s>")
    ip = LlavaImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                do_pad=True)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template)
    with atomic_dir(out_dir) as d:
        model.save_pretrained(d)
        proc.save_pretrained(d)

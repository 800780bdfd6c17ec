"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``; Qwen2 decoder, SigLIP tower, 1-D RoPE).

Real checkpoints: the llava-hf conversions (``llava-hf/llava-onevision-qwen2-7b-ov-hf``; EffiVLM-Bench's
LLaVA-OV-7B), loaded with their own processor (AnyRes-max-9 crops of 384 px, 729 tokens per crop plus a newline
token per row) and chat template. Each image is its ``<image>\\n`` tag, each video its ``<video>\\n`` tag, at its
place in the prompt (:mod:`avkv.models.hf_vlm`). transformers' OneVision video processor needs torchvision; where it
is missing a plain-torch stand-in (:class:`~avkv.models.video_processing.TorchResizeVideoProcessor`) takes its place.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from avkv.models.hf_vlm import TagAdapter


class LlavaOnevisionAdapter(TagAdapter):
    family = "llava_onevision"
    modalities = ("image", "video")
    placeholder_tokens = {"image": "<image>", "video": "<video>"}
    media_tags = {"image": "<image>\n", "video": "<video>\n"}
    #: the model takes image ``i``'s first ``image_size_to_num_patches(image_sizes[i])`` patches (its own unpadding
    #: of the processor's padded stack), so rows whose images have different patch counts share one forward
    batch_pad_dims = {"pixel_values": 1}

    def _load(self):
        from transformers import LlavaOnevisionForConditionalGeneration
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(self.path, **self._from_pretrained_kwargs())
        return model.to(self.device), load_processor(self.path, self.trust_remote_code, **self.processor_kwargs)

    def _video_layout(self, inputs: dict, modality: torch.Tensor) -> dict:
        """Frame and spatial index of every video position (PureKV's ST-SpAttn): a video is its frames' pooled grids
        (ceil(g/2)² cells each, g = image_size / patch_size), frame after frame in row-major order, then one newline
        token (-1: not a frame cell)."""
        from avkv.schema import VIDEO
        pv = inputs.get("pixel_values_videos")
        if pv is None:
            return {}
        vc = self.model.config.vision_config
        g = vc.image_size // vc.patch_size
        per = math.ceil(g / 2) ** 2
        fr, sp, offset = [], [], 0
        for _ in range(pv.shape[0]):
            t = int(pv.shape[1])
            idx = torch.arange(t * per)
            fr += [idx // per + offset, torch.tensor([-1])]
            sp += [idx % per, torch.tensor([-1])]
            offset += t
        pos = (modality == VIDEO).nonzero().flatten()
        fr_all, sp_all = torch.cat(fr), torch.cat(sp)
        if len(pos) != len(fr_all):
            raise ValueError(f"llava_onevision: {len(pos)} video positions, the layout expects {len(fr_all)}")
        frame, spatial = torch.full_like(modality, -1), torch.full_like(modality, -1)
        frame[pos], spatial[pos] = fr_all, sp_all
        return {"video_frame": frame, "video_spatial": spatial}


def load_processor(path: Path, trust_remote_code: bool = False, **kwargs):
    """The checkpoint's processor; without torchvision it is assembled from its parts with the torch video processor."""
    from avkv.models.video_processing import TorchResizeVideoProcessor, stock_video_processor_available
    from transformers import AutoProcessor, AutoTokenizer, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil
    if stock_video_processor_available():
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    import json
    cfg = {}
    f = Path(path) / "processor_config.json"
    if f.is_file():
        cfg = {k: v for k, v in json.loads(f.read_text()).items()
               if k in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")}
    tmpl = Path(path) / "chat_template.jinja"
    return LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(path, **kwargs),
                                   tokenizer=AutoTokenizer.from_pretrained(path),
                                   video_processor=TorchResizeVideoProcessor.from_pretrained(path, **kwargs),
                                   chat_template=tmpl.read_text() if tmpl.is_file() else None, **cfg)


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, vision_hidden: int = 32, image_size: int = 112,
               vocab_size: int = 640, layers: int = 2) -> None:
    """Tiny random LLaVA-OneVision: a Qwen2 decoder of ``layers`` layers (hidden 64, 4 heads / 2 KV heads), a 2-layer
    SigLIP tower on ``image_size`` px crops (patch 14: 64 tokens per crop, 16 per video frame after the 2×2 pooling),
    AnyRes grid pinpoints up to 1×2 crops,
    ``anyres_max_9``, full features of the last layer (as the real checkpoints)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import \
        LlavaOnevisionImageProcessorPil
    from avkv.models.tiny import atomic_dir, chat_template, train_tokenizer
    torch.manual_seed(seed)
    template = chat_template("llava_onevision")
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(vocab_size, extra_specials=["<image>", "<video>"]),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template,
                                  extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    t = tok.convert_tokens_to_ids
    s = image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s]]
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_hidden_layers=2, num_attention_heads=2, image_size=s, patch_size=14),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=t("<|endoftext|>"), eos_token_id=t("<|im_end|>"),
                         pad_token_id=t("<|endoftext|>")),
        image_token_index=t("<image>"), video_token_index=t("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = t("<|im_end|>")
    ip = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    from avkv.models.video_processing import TorchResizeVideoProcessor
    vp = TorchResizeVideoProcessor(size={"height": s, "width": s})
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                   num_image_tokens=(s // 14) ** 2, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9", chat_template=template)
    with atomic_dir(out_dir) as d:
        model.save_pretrained(d)
        proc.save_pretrained(d)
        proc.video_processor.save_pretrained(d)

"""Qwen2.5-VL (images and video; audio tracks are not heard). Real checkpoints: ``Qwen/Qwen2.5-VL-7B-Instruct``."""
from __future__ import annotations

from pathlib import Path

import torch

from avkv.models.qwen_common import QwenAdapter
from avkv.models.video_processing import TorchQwenVideoProcessor
from avkv.schema import Media


class Qwen25VLAdapter(QwenAdapter):
    family = "qwen2_5_vl"
    modalities = ("image", "video")
    placeholder_tokens = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"

    def _media_content(self, item: Media, dec: dict, media: dict) -> list[dict]:
        if item.kind == "video":
            media["videos"].append(dec["frames"])
            info = dec.get("info") or {}
            if self.preprocessing == "official" and "video_fps" in info:
                # qwen-vl-utils' metadata (return_video_metadata): the processor's time step per temporal patch
                # is temporal_patch_size / sampled fps, sampled fps = frames / clip frames * video fps
                media["video_metadata"].append({"total_num_frames": info["clip_frames"], "fps": info["video_fps"],
                                                "frames_indices": info["frame_indices"]})
            return [{"type": "video"}]
        if item.kind == "image":
            media["images"].append(dec["image"])
            return [{"type": "image"}]
        return []          # audio-only items are not visible to this model

    def _new_media_lists(self) -> dict[str, list]:
        return {"images": [], "videos": [], "audio": [], "video_metadata": []}


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, vision_hidden: int = 32, vision_depth: int = 2,
               texts: list[str] | None = None, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112,
               vocab_size: int = 640, layers: int = 2) -> None:
    """Tiny random Qwen2.5-VL: ``layers`` text layers (default 2; hidden 64, 4 heads / 2 KV heads), 2-block vision
    tower.

    Sizes, the tokenizer's extra corpus and the pixel range are parameters (the trained proxies use them)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, \
        Qwen2VLImageProcessorPil
    from avkv.models.tiny import chat_template, eval_model, hf_tokenizer, mrope_section, qwen_text_config, \
        save_checkpoint
    torch.manual_seed(seed)
    template = chat_template("qwen2_5_vl")
    tok = hf_tokenizer(template, texts=texts, vocab_size=vocab_size)
    t = tok.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(
        text_config=qwen_text_config(tok, hidden, layers, mrope=mrope_section(hidden // 4)),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                           out_hidden_size=hidden,
                           window_size=56, fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2),
        image_token_id=t("<|image_pad|>"), video_token_id=t("<|video_pad|>"),
        vision_start_token_id=t("<|vision_start|>"), vision_end_token_id=t("<|vision_end|>"))
    model = eval_model(Qwen2_5_VLForConditionalGeneration, cfg, tok)
    pix = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pix), tokenizer=tok,
                               video_processor=TorchQwenVideoProcessor(**pix), chat_template=template)
    save_checkpoint(out_dir, model, proc)

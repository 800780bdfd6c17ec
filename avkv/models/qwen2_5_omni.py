"""Qwen2.5-Omni thinker (images, video, audio; a video's audio track is interleaved with its frames).

Only the thinker (the text-generating part) is loaded; the talker and token2wav are irrelevant to KV work.
Real checkpoints: ``Qwen/Qwen2.5-Omni-7B`` (the thinker's weights are read from the full checkpoint).
"""
from __future__ import annotations

from pathlib import Path

import torch

from avkv.models.qwen_common import QwenAdapter
from avkv.models.video_processing import TorchQwenVideoProcessor
from avkv.schema import Media, Prompt


class Qwen25OmniAdapter(QwenAdapter):
    family = "qwen2_5_omni"
    modalities = ("image", "video", "audio")
    placeholder_tokens = {"image": "<|IMAGE|>", "video": "<|VIDEO|>", "audio": "<|AUDIO|>"}
    model_class = "Qwen2_5OmniThinkerForConditionalGeneration"
    processor_class = "Qwen2_5OmniProcessor"

    def __init__(self, *args, use_audio_in_video: bool = True, **kwargs):
        self.use_audio_in_video = use_audio_in_video
        super().__init__(*args, **kwargs)

    def _media_content(self, item: Media, dec: dict, media: dict) -> list[dict]:
        if item.kind == "video":
            media["videos"].append(dec["frames"])
            wav = dec.get("audio")
            if wav is not None and self.use_audio_in_video:
                wav = self.fit_audio(wav)
                media["audio_from_video"].append((len(media["videos"]) - 1, len(media["audio"])))
                media["audio"].append(wav)
            return [{"type": "video"}]
        if item.kind == "image":
            media["images"].append(dec["image"])
            return [{"type": "image"}]
        media["audio"].append(self.fit_audio(dec["audio"]))
        media["standalone_audio"].append(len(media["audio"]) - 1)
        return [{"type": "audio"}]

    def _new_media_lists(self) -> dict[str, list]:
        # two bookkeeping lists beside the media: which audio came from which video, which audio stands alone
        return {"images": [], "videos": [], "audio": [], "audio_from_video": [], "standalone_audio": []}

    def _processor_kwargs(self, media: dict) -> dict:
        interleaved = media.pop("audio_from_video", [])
        media.pop("standalone_audio", None)
        kw = super()._processor_kwargs(media)
        if interleaved:
            # audio_from_video_indices: one slot per audio; the video index it came from, None if standalone
            slots = [None] * len(media["audio"])
            for vid, aud in interleaved:
                slots[aud] = vid
            kw.update(load_audio_from_video=True, audio_from_video_indices=slots)
        return kw

    def encode_decoded(self, prompt: Prompt, decoded: list, media_s: float = 0.0):
        enc = super().encode_decoded(prompt, decoded, media_s)
        if "video_second_per_grid" in enc.inputs and "audio" in enc.modalities_used and self.use_audio_in_video:
            enc.inputs["use_audio_in_video"] = True
        return enc


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, vision_hidden: int = 32, vision_depth: int = 2, audio_hidden: int = 32,
               texts: list[str] | None = None, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112,
               chunk_s: int = 30, vocab_size: int = 640, layers: int = 2) -> None:
    """Tiny random Omni thinker: ``layers`` text layers (default 2; hidden 64, 4 heads / 2 KV heads), small vision
    and audio towers.

    The sizes, the tokenizer's extra corpus (``texts``), the video pixel range and the audio chunk are
    parameters so the trained proxies (``avkv/proxies/build.py``) start from the same builder.
    """
    from transformers import (Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig,
                              Qwen2_5OmniThinkerForConditionalGeneration, Qwen2VLImageProcessorPil,
                              WhisperFeatureExtractor)
    from avkv.models.tiny import OMNI_TOKEN_ATTRS, chat_template, eval_model, hf_tokenizer, mrope_section, \
        qwen_text_config, save_checkpoint
    torch.manual_seed(seed)
    template = chat_template("qwen2_5_omni")
    tok = hf_tokenizer(template, extra_special_tokens=OMNI_TOKEN_ATTRS, texts=texts, vocab_size=vocab_size)
    t = tok.convert_tokens_to_ids
    cfg = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=2 * audio_hidden, d_model=audio_hidden, max_source_positions=1500,
                          n_window=50, output_dim=hidden),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                           out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1], window_size=56),
        text_config=qwen_text_config(tok, hidden, layers, mrope=mrope_section(hidden // 4)),
        audio_token_index=t("<|AUDIO|>"), image_token_index=t("<|IMAGE|>"), video_token_index=t("<|VIDEO|>"),
        audio_start_token_id=t("<|audio_bos|>"), audio_end_token_id=t("<|audio_eos|>"),
        # read by get_rope_index; real checkpoints carry them although the v5 dataclass does not declare them
        vision_start_token_id=t("<|vision_bos|>"), vision_end_token_id=t("<|vision_eos|>"))
    model = eval_model(Qwen2_5OmniThinkerForConditionalGeneration, cfg, tok)
    pix = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    proc = Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessorPil(**pix), video_processor=TorchQwenVideoProcessor(**pix),
                                feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000,
                                                                          chunk_length=chunk_s),
                                tokenizer=tok, chat_template=template)
    save_checkpoint(out_dir, model, proc)

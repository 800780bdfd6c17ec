"""Qwen3-Omni MoE thinker (images, video, audio; a video's audio track interleaved with its frames; M-RoPE).

Only the thinker loads (``Qwen3OmniMoeThinkerForConditionalGeneration``); the talker and code2wav do not touch the
text KV cache. Real checkpoints: ``Qwen/Qwen3-Omni-30B-A3B-Instruct`` (AudioKV Table 1). The full checkpoint's
folder holds the whole model (``model_type: qwen3_omni_moe``, weights under ``thinker.``):
:meth:`~Qwen3OmniAdapter._from_pretrained_kwargs` reads the thinker's config from it and maps ``thinker.*`` weights
onto the thinker, so the talker's weights are never read. Everything else (prompt, media, audio-in-video
interleaving) is Qwen2.5-Omni's adapter.

KV semantics are the Qwen2/Llama ones: one K/V per decoder layer, every layer full attention. The MoE sits in the
MLP (router + experts) and never touches the cache, so a budget means the same as on a dense model. The attention
has a per-head RMSNorm on queries and keys (``q_norm``/``k_norm``) before RoPE, which the base adapter's
:meth:`~avkv.models.base.ModelAdapter.layer_queries` applies. Deepstack visual features are added to the hidden
states of the first decoder layers at visual positions during the prefill chunk that holds the media (the engine's
prefix), so they are in the cached keys like any other input.

At 30B parameters (bf16 ≈ 61 GiB) the thinker does not fit one 40 GB card: ``model.device_map=auto`` spreads it over
the node's GPUs (docs/architecture.md, multi-device).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from avkv.models.qwen2_5_omni import Qwen25OmniAdapter
from avkv.models.video_processing import TorchQwenVideoProcessor


class Qwen3OmniAdapter(Qwen25OmniAdapter):
    family = "qwen3_omni"
    placeholder_tokens = {"image": "<|image_pad|>", "video": "<|video_pad|>", "audio": "<|audio_pad|>"}
    model_class = "Qwen3OmniMoeThinkerForConditionalGeneration"
    processor_class = "Qwen3OmniMoeProcessor"

    def _from_pretrained_kwargs(self) -> dict:
        kwargs = super()._from_pretrained_kwargs()
        raw = json.loads((self.path / "config.json").read_text())
        if raw.get("model_type") == "qwen3_omni_moe":            # the full model's folder: its thinker part
            from transformers import Qwen3OmniMoeConfig
            kwargs.update(config=Qwen3OmniMoeConfig.from_pretrained(self.path).thinker_config,
                          key_mapping={r"^thinker\.": ""})
        return kwargs


#: Qwen3-Omni's media tokens (the real tokenizer's added tokens; the processor reads them by these attribute names)
QWEN3_OMNI_TOKEN_ATTRS = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, vision_hidden: int = 32, audio_hidden: int = 32,
               layers: int = 2, experts: int = 4, vocab_size: int = 640, chunk_s: int = 30,
               min_pixels: int = 64 * 64, max_pixels: int = 128 * 128, full_layout: bool = False) -> None:
    """Tiny random Qwen3-Omni MoE thinker: ``layers`` text layers (hidden 64, 4 heads / 2 KV heads, head dim 16,
    q/k norm, M-RoPE), every MLP a sparse MoE of ``experts`` experts (top-2), a 2-block vision tower with one
    deepstack layer, a 2-layer audio encoder.

    ``full_layout`` writes the checkpoint as the hub's full model is laid out (``Qwen3OmniMoeConfig`` with the
    thinker inside it, weights under ``thinker.``), to test that the adapter reads the thinker out of it.
    """
    from safetensors.torch import save_file
    from transformers import (PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen3OmniMoeProcessor,
                              Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration,
                              WhisperFeatureExtractor)
    from avkv.models.tiny import chat_template, eval_model, qwen_text_config, save_checkpoint, train_tokenizer
    torch.manual_seed(seed)
    template = chat_template("qwen3_omni")
    extra = [s for s in QWEN3_OMNI_TOKEN_ATTRS.values()]
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(vocab_size, extra_specials=extra),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template,
                                  extra_special_tokens=QWEN3_OMNI_TOKEN_ATTRS)
    t = tok.convert_tokens_to_ids
    head_dim = hidden // 4
    cfg = Qwen3OmniMoeThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=2 * audio_hidden, d_model=audio_hidden, max_source_positions=1500,
                          n_window=50, n_window_infer=400, output_dim=hidden, downsample_hidden_size=16),
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        text_config=qwen_text_config(tok, hidden, layers, head_dim=head_dim, moe_intermediate_size=hidden,
                                     num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                      "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        audio_token_id=t("<|audio_pad|>"), image_token_id=t("<|image_pad|>"), video_token_id=t("<|video_pad|>"),
        audio_start_token_id=t("<|audio_start|>"), vision_start_token_id=t("<|vision_start|>"),
        position_id_per_seconds=13)
    cfg.audio_end_token_id = t("<|audio_end|>")
    cfg.vision_end_token_id = t("<|vision_end|>")
    model = eval_model(Qwen3OmniMoeThinkerForConditionalGeneration, cfg, tok)
    pix = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    proc = Qwen3OmniMoeProcessor(image_processor=Qwen2VLImageProcessorPil(patch_size=16, **pix),
                                 video_processor=TorchQwenVideoProcessor(patch_size=16, **pix),
                                 feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000,
                                                                           chunk_length=chunk_s),
                                 tokenizer=tok, chat_template=template)

    def full_model_layout(d: Path) -> None:      # the thinker inside Qwen3OmniMoeConfig, weights under thinker.
        from safetensors.torch import load_file
        from transformers import Qwen3OmniMoeConfig
        sd = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            sd.update({"thinker." + k: v for k, v in load_file(f).items()})
            f.unlink()
        Qwen3OmniMoeConfig(thinker_config=cfg.to_dict(), enable_audio_output=False).save_pretrained(d)
        save_file(sd, Path(d) / "model.safetensors", metadata={"format": "pt"})

    save_checkpoint(out_dir, model, proc, then=full_model_layout if full_layout else None)

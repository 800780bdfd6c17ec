"""Qwen2-Audio (speech and sound; 1-D RoPE). Real checkpoints: ``Qwen/Qwen2-Audio-7B-Instruct``."""
from __future__ import annotations

from pathlib import Path

import torch

from avkv.models.qwen_common import QwenAdapter
from avkv.schema import Media


class Qwen2AudioAdapter(QwenAdapter):
    family = "qwen2_audio"
    modalities = ("audio",)
    placeholder_tokens = {"audio": "<|AUDIO|>"}
    model_class = "Qwen2AudioForConditionalGeneration"

    def _media_content(self, item: Media, dec: dict, media: dict) -> list[dict]:
        if dec.get("audio") is None:          # a silent video or an image: nothing this model can hear
            return []
        media["audio"].append(self.fit_audio(dec["audio"]))
        return [{"type": "audio"}]


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, audio_hidden: int = 32,
               texts: list[str] | None = None, chunk_s: int = 5, vocab_size: int = 640, layers: int = 2) -> None:
    """Tiny random Qwen2-Audio: a Qwen2 decoder of ``layers`` layers (default 2; hidden 64, 4 heads / 2 KV heads)
    and a 2-layer audio encoder.

    The feature extractor's chunk is 5 s (the real model: 30 s), which keeps CPU tests fast. Sizes, the
    tokenizer's extra corpus and the chunk are parameters (the trained proxies use them).
    """
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, \
        WhisperFeatureExtractor
    from avkv.models.tiny import chat_template, eval_model, hf_tokenizer, qwen_text_config, save_checkpoint
    torch.manual_seed(seed)
    template = chat_template("qwen2_audio")
    tok = hf_tokenizer(template, texts=texts, vocab_size=vocab_size)
    t = tok.convert_tokens_to_ids
    cfg = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=128, encoder_layers=2,
                          encoder_attention_heads=2, encoder_ffn_dim=2 * audio_hidden, d_model=audio_hidden,
                          max_source_positions=chunk_s * 100 // 2),
        text_config=qwen_text_config(tok, hidden, layers, model_type="qwen2"),
        audio_token_index=t("<|AUDIO|>"))
    model = eval_model(Qwen2AudioForConditionalGeneration, cfg, tok)
    from transformers.models.whisper.modeling_whisper import sinusoids
    with torch.no_grad():             # Whisper's sinusoidal start for the learned positions (random init hides time)
        pos = next(m for n, m in model.named_modules() if n.endswith("audio_tower.embed_positions"))
        pos.weight.copy_(sinusoids(*pos.weight.shape))
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=chunk_s)
    proc = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=template)
    save_checkpoint(out_dir, model, proc)

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

    def _load(self):
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
        model = Qwen2AudioForConditionalGeneration.from_pretrained(self.path, **self._from_pretrained_kwargs())
        proc = AutoProcessor.from_pretrained(self.path, trust_remote_code=self.trust_remote_code,
                                             **self.processor_kwargs)
        return self._placed(model), proc

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
    from avkv.models.tiny import atomic_dir, chat_template, hf_tokenizer
    torch.manual_seed(seed)
    template = chat_template("qwen2_audio")
    tok = hf_tokenizer(template, texts=texts, vocab_size=vocab_size)
    t = tok.convert_tokens_to_ids
    cfg = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=128, encoder_layers=2,
                          encoder_attention_heads=2, encoder_ffn_dim=2 * audio_hidden, d_model=audio_hidden,
                          max_source_positions=chunk_s * 100 // 2),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=t("<|endoftext|>"),
                         eos_token_id=t("<|im_end|>"), pad_token_id=t("<|endoftext|>")),
        audio_token_index=t("<|AUDIO|>"))
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    from transformers.models.whisper.modeling_whisper import sinusoids
    with torch.no_grad():             # Whisper's sinusoidal start for the learned positions (random init hides time)
        pos = next(m for n, m in model.named_modules() if n.endswith("audio_tower.embed_positions"))
        pos.weight.copy_(sinusoids(*pos.weight.shape))
    model.generation_config.eos_token_id = t("<|im_end|>")
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=chunk_s)
    proc = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=template)
    with atomic_dir(out_dir) as d:
        model.save_pretrained(d)
        proc.save_pretrained(d)

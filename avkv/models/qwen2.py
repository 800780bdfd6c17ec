"""Qwen2 text-only decoders (``Qwen2ForCausalLM``; 1-D RoPE), e.g. ``Qwen/Qwen2.5-0.5B-Instruct``.

The family kvpress supports natively, so it is the model of the reference-parity suite (``tests/parity``): the
tiny checkpoint written by :func:`build_tiny` is loaded both by avkv (main venv) and by kvpress 0.5.5 (its side
venv, transformers 5.2). Media in a prompt are not something this model can take: an adapter for text only drops
them and says so in the record's ``input_notes``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from avkv.measure import Stopwatch
from avkv.models.qwen_common import QwenAdapter
from avkv.schema import Media, Prompt


class Qwen2Adapter(QwenAdapter):
    family = "qwen2"
    modalities: tuple[str, ...] = ()

    def _load(self):
        from transformers import AutoTokenizer, Qwen2ForCausalLM
        model = Qwen2ForCausalLM.from_pretrained(self.path, **self._from_pretrained_kwargs())
        tok = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code,
                                            **self.processor_kwargs)
        return model.to(self.device), tok

    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.model.model.layers)

    def text_config(self) -> Any:
        return self.model.config

    def prompt_position_ids(self, enc) -> torch.Tensor:
        return torch.arange(enc.input_ids.shape[1])[None]

    def _media_content(self, item: Media, dec: dict, media: dict) -> list[dict]:
        self._notes.append(f"{item.kind} input dropped: {self.family} is a text-only model")
        return []

    def decode_media(self, m: Media) -> dict:
        return {}

    def _processor_kwargs(self, media: dict) -> dict:
        return {}

    def encode(self, prompt: Prompt):
        with Stopwatch() as media:
            decoded = [None if isinstance(m, str) else {} for m in prompt.context]
        return self.encode_decoded(prompt, decoded, media_s=media.s)


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 128, layers: int = 2, heads: int = 8,
               kv_heads: int = 4, qk_scale: float = 8.0, vocab_size: int = 640) -> None:
    """Tiny random ``Qwen2ForCausalLM``: ``layers`` decoder layers (2), hidden 128, 8 query heads over 4 KV heads
    (GQA, head_dim 16), the byte-level BPE tokenizer of the other tiny families and a ChatML template.

    The query and key projections are scaled by ``qk_scale`` so attention is peaky (at the default init, std 0.02,
    every row is nearly uniform and window scores are all but tied); weights are written in safetensors.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from avkv.models.tiny import atomic_dir, chat_template, hf_tokenizer, scale_qk
    torch.manual_seed(seed)
    tok = hf_tokenizer(chat_template("qwen2"), vocab_size=vocab_size)
    t = tok.convert_tokens_to_ids
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, bos_token_id=t("<|endoftext|>"), eos_token_id=t("<|im_end|>"),
                      pad_token_id=t("<|endoftext|>"), tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = t("<|im_end|>")
    with atomic_dir(out_dir) as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        scale_qk(d, qk_scale)

"""Gemma-3n (text + audio; 1-D RoPE). Real checkpoints: ``google/gemma-3n-E2B-it``, ``google/gemma-3n-E4B-it``
(AudioKV Table 1).

Only the language model, the audio tower (a USM conformer) and the two multimodal embedders are built: the vision
tower is a timm model, and timm (which needs torchvision) is not in the CPU lock. :class:`Gemma3nAudioText` is
``Gemma3nForConditionalGeneration`` without it, loaded from the hub checkpoint's own safetensors names with strict
checks (:func:`check_loading`: no weight missing, no shape mismatch, and the only unused weights are the vision
tower's ``model.vision_tower.*``). So the adapter takes text and audio; an image prompt is refused as for any model
that cannot see (``ModelAdapter.fit_prompt``), and a video with audio is heard as its audio track.

The prompt is what the official processor makes: the chat template renders an audio part as ``<audio_soft_token>``
and ``Gemma3nProcessor`` expands it to ``"\\n\\n<start_of_audio>" + audio_seq_length × <audio_soft_token> +
"<end_of_audio>\\n\\n"`` (188 soft tokens on the real model, however long the clip: the encoder's output is padded to
that many); the feature extractor (``Gemma3nAudioFeatureExtractor``, numpy only) takes at most 30 s, so a longer clip
is cut and the cut recorded.

The cache is not one K/V per layer (docs/methods.md, "What a budget means on each model's cache"):

* the last ``num_kv_shared_layers`` layers own no cache (``DummyLayer``, keys None) and attend over the K/V of the
  last earlier layer of their type — :meth:`Gemma3nAdapter.cache_sources` says which, and the engine gives a shared
  layer its source's decode storage, so it sees exactly the source's kept entries;
* sliding layers hold the last ``sliding_window - 1`` entries — :meth:`Gemma3nAdapter.layer_windows`; the engine
  counts such a layer at min(n, W - 1) uncompressed, compresses it among the entries still in its window at the end
  of the prompt, and keeps the window over logical positions while decoding (``PreallocLayer`` with ``window``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from avkv.models.qwen_common import QwenAdapter
from avkv.schema import Media


def _model_classes():
    """``Gemma3nModel`` / ``Gemma3nForConditionalGeneration`` without the vision tower (built lazily: transformers
    is imported on first use only)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from transformers import AutoModel, Gemma3nForConditionalGeneration, Gemma3nModel
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nMultimodalEmbedder, Gemma3nPreTrainedModel

    class Gemma3nAudioTextModel(Gemma3nModel):
        """The text decoder, the audio tower and both embedders of ``Gemma3nModel`` under its own attribute names
        (so the hub's ``model.*`` weights load by name); ``vision_tower`` is None. ``embed_vision`` is kept: the
        forward embeds image-range hard tokens (``<end_of_image>``, ``<image_soft_token>``) with it."""

        def __init__(self, config):
            Gemma3nPreTrainedModel.__init__(self, config)
            self.vision_tower = None
            self.vocab_size = config.text_config.vocab_size
            self.vocab_size_per_layer_input = config.text_config.vocab_size_per_layer_input
            self.language_model = AutoModel.from_config(config.text_config)
            self.audio_tower = AutoModel.from_config(config.audio_config)
            self.embed_vision = Gemma3nMultimodalEmbedder(config.vision_config, config.text_config)
            self.embed_audio = Gemma3nMultimodalEmbedder(config.audio_config, config.text_config)
            self.post_init()

        def get_image_features(self, *args, **kwargs):
            raise ValueError("this Gemma-3n model is built without its vision tower (timm): it takes text and audio")

    class Gemma3nAudioText(Gemma3nForConditionalGeneration):
        #: the hub checkpoint's vision tower, left unread (not reported; every other unread weight is an error)
        _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower\."]

        def __init__(self, config):
            Gemma3nPreTrainedModel.__init__(self, config)
            self.model = Gemma3nAudioTextModel(config)
            self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
            self.post_init()

    _CLASSES = (Gemma3nAudioTextModel, Gemma3nAudioText)
    return _CLASSES


_CLASSES = None

#: the prefix of the hub checkpoint's vision-tower weights: the only weights left unread
VISION_PREFIX = "model.vision_tower."


def check_loading(info: dict, path: Path) -> None:
    """Strict load: every weight of the built model was in the checkpoint (the tied ``lm_head`` aside), none had
    another shape, and every checkpoint weight not read is the vision tower's."""
    missing = [k for k in info.get("missing_keys", ()) if k != "lm_head.weight"]
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.startswith(VISION_PREFIX)]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: the Gemma-3n checkpoint does not match the audio+text model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}")


def load_config(path: Path):
    """The checkpoint's ``Gemma3nConfig``. A vision config without ``label_names`` would ask timm for ImageNet's
    labels while parsing; the labels are unused here (no vision tower), so a placeholder pair is given."""
    from transformers import Gemma3nConfig
    raw = json.loads((path / "config.json").read_text())
    vision = raw.setdefault("vision_config", {})
    if vision.get("label_names") is None:
        vision["label_names"] = ["LABEL_0", "LABEL_1"]
    return Gemma3nConfig.from_dict(raw)


class Gemma3nAdapter(QwenAdapter):
    family = "gemma3n"
    modalities = ("audio",)
    placeholder_tokens = {"audio": "<audio_soft_token>"}
    supports_device_map = False

    def _load(self):
        from transformers import Gemma3nProcessor
        _, cls = _model_classes()
        model, info = cls.from_pretrained(self.path, config=load_config(self.path), dtype=self.dtype,
                                          attn_implementation=self.attn_implementation, output_loading_info=True,
                                          **self._weights_kwargs())
        check_loading(info, self.path)
        # the processor as the checkpoint configures it; its Siglip image processor falls back to the PIL backend
        # where torchvision is missing (never used: no image reaches this model)
        proc = Gemma3nProcessor.from_pretrained(self.path, **self.processor_kwargs)
        return model.to(self.device), proc

    # ---------------------------------------------------------------- the cache's layout (docs/methods.md)
    def cache_sources(self) -> list[int]:
        """Per decoder layer, the layer whose cache its attention reads: a KV-shared layer (``reuse``) reads the
        ``store`` layer of its type (the last cache-owning layer of that type); every other layer its own."""
        tc = self.text_config()
        modes, types = list(tc.kv_sharing_modes), list(tc.layer_types)
        store = {types[i]: i for i, m in enumerate(modes) if m == "store"}
        return [store[types[i]] if m == "reuse" else i for i, m in enumerate(modes)]

    def layer_windows(self) -> list[int | None]:
        tc = self.text_config()
        return [tc.sliding_window if t == "sliding_attention" else None for t in tc.layer_types]

    def rotary_embedding(self) -> torch.nn.Module:
        raise NotImplementedError("gemma3n: the rotary embedding differs per layer type (sliding layers θ = 10⁴, "
                                  "full layers θ = 10⁶); re-rotating kept keys is not supported on this model")

    # ---------------------------------------------------------------- prompt
    def prompt_position_ids(self, enc) -> torch.Tensor:
        return torch.arange(enc.input_ids.shape[1])[None]

    def media_inputs(self, enc) -> dict:
        out = super().media_inputs(enc)
        out.pop("token_type_ids", None)          # per-token modality ids for training losses; unused by the forward
        return out

    def _media_content(self, item: Media, dec: dict, media: dict) -> list[dict]:
        if dec.get("audio") is None:          # a silent video or an image: nothing this model can hear
            return []
        media["audio"].append(self.fit_audio(dec["audio"]))
        return [{"type": "audio"}]

    #: what ``Gemma3nAudioFeatureExtractor.__call__`` keeps by default (``max_length=480_000`` samples at 16 kHz)
    max_audio_samples = 480_000

    def fit_audio(self, wav):
        fe = self.processor.feature_extractor
        if len(wav) > self.max_audio_samples:
            self._notes.append(f"audio cut from {len(wav) / fe.sampling_rate:.1f}s to the feature extractor's "
                               f"{self.max_audio_samples / fe.sampling_rate:.0f}s window")
        return wav[: self.max_audio_samples]

    def _processor_kwargs(self, media: dict[str, list]) -> dict:
        kw = super()._processor_kwargs(media)
        kw["add_special_tokens"] = False      # the template writes <bos> itself
        return kw

    def _assistant_start(self, messages: list[dict], text: str, input_ids: torch.Tensor) -> int:
        """Token index of the assistant preamble: the last ``<start_of_turn>``."""
        sot = self.tokenizer.convert_tokens_to_ids("<start_of_turn>")
        return int((input_ids[0] == sot).nonzero().max())

    def _question_start(self, text: str, question: str, n: int) -> int:
        return super()._question_start(text, question.strip(), n)     # the template trims every text part

    def text_config(self) -> Any:
        return self.model.config.get_text_config()


#: Gemma-3n's control tokens (the real tokenizer's; the processor reads the media ones by these attribute names)
GEMMA3N_TOKEN_ATTRS = {
    "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>",
}


def build_tiny(out_dir: str | Path, seed: int = 0, hidden: int = 64, layers: int = 6, shared: int = 3,
               sliding_window: int = 32, audio_hidden: int = 32, audio_tokens: int = 64, vocab_size: int = 640,
               qk_scale: float = 8.0) -> None:
    """Tiny random Gemma-3n (audio + text): ``layers`` decoder layers (hidden 64, 4 heads / 2 KV heads, head dim 16)
    typed sliding, sliding, full, … (window ``sliding_window``), the last ``shared`` of them KV-shared (with the
    defaults: layers 0-2 own a cache, 3-4 read layer 1's, 5 reads layer 2's); a 2-layer audio conformer; the
    processor expands an audio part to ``audio_tokens`` soft tokens (the real model: 188).

    The vocabulary is laid out as the real one: text ids, then the image range (``<end_of_image>``,
    ``<image_soft_token>``), then the audio range (``<end_of_audio>``, ``<audio_soft_token>``). The checkpoint is
    written in the hub's layout, with one vision-tower tensor under ``model.vision_tower.`` (what the loader must
    leave unread). Query/key projections are scaled by ``qk_scale`` (peaky attention, as in trained models).
    """
    from transformers import (Gemma3nAudioFeatureExtractor, Gemma3nConfig, Gemma3nProcessor,
                              PreTrainedTokenizerFast, SiglipImageProcessorPil)
    from avkv.models.tiny import atomic_dir, chat_template, scale_qk, train_tokenizer
    torch.manual_seed(seed)
    template = chat_template("gemma3n")
    head = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<start_of_audio>"]
    raw = train_tokenizer(vocab_size, extra_specials=head)
    n_text = raw.get_vocab_size()
    tail = ["<end_of_image>", "<image_soft_token>", "<end_of_audio>", "<audio_soft_token>"]
    raw.add_special_tokens(tail)               # ids n_text .. n_text+3: the image range, then the audio range
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  chat_template=template, extra_special_tokens=GEMMA3N_TOKEN_ATTRS)
    t = tok.convert_tokens_to_ids
    assert [t(x) for x in tail] == list(range(n_text, n_text + 4))
    types = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(layers)]
    text = dict(vocab_size=n_text + 4, vocab_size_per_layer_input=n_text, hidden_size=hidden,
                hidden_size_per_layer_input=16, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, sliding_window=sliding_window,
                layer_types=types, num_kv_shared_layers=shared, laurel_rank=8, max_position_embeddings=4096,
                pad_token_id=t("<pad>"), eos_token_id=t("<eos>"), bos_token_id=t("<bos>"))
    audio = dict(vocab_size=2, vocab_offset=n_text + 2, input_feat_size=128, hidden_size=audio_hidden,
                 conf_num_attention_heads=2, conf_num_hidden_layers=2, sscp_conv_channel_size=[16, 8])
    vision = dict(vocab_size=2, vocab_offset=n_text, hidden_size=32, label_names=["LABEL_0", "LABEL_1"])
    cfg = Gemma3nConfig(text_config=text, audio_config=audio, vision_config=vision,
                        audio_soft_tokens_per_image=audio_tokens, vision_soft_tokens_per_image=4,
                        boi_token_id=t("<start_of_image>"), eoi_token_id=t("<end_of_image>"),
                        image_token_id=t("<image_soft_token>"), boa_token_id=t("<start_of_audio>"),
                        eoa_token_id=t("<end_of_audio>"), audio_token_id=t("<audio_soft_token>"))
    _, cls = _model_classes()
    model = cls(cfg).eval()
    model.generation_config.eos_token_id = [t("<eos>"), t("<end_of_turn>")]
    model.config.architectures = ["Gemma3nForConditionalGeneration"]      # as the hub's config names it
    proc = Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(),
                            image_processor=SiglipImageProcessorPil(size={"height": 64, "width": 64}),
                            tokenizer=tok, chat_template=template, audio_seq_length=audio_tokens,
                            image_seq_length=4)
    with atomic_dir(out_dir) as d:
        model.save_pretrained(d)
        proc.save_pretrained(d)
        scale_qk(d, qk_scale, extra={VISION_PREFIX + "timm_model.conv_stem.conv.weight": torch.randn(8, 3, 3, 3)})

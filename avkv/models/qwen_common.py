"""What the Qwen families share: loading by class name, the processor (assembled with the torch-only video
processor where torchvision is missing), chat-template rendering through the real processor, split points,
modality per position and the video layout. Family files (``qwen2_5_vl.py``, ``qwen2_vl.py``, ``qwen2_audio.py``,
``qwen2_5_omni.py``, ``qwen3_omni.py``) name their transformers classes, say which media each model takes, and
build their tiny checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from avkv.measure import Stopwatch
from avkv.models import media_io
from avkv.models.base import Encoded, ModelAdapter
from avkv.models.video_processing import TorchQwenVideoProcessor, stock_video_processor_available
from avkv.schema import VIDEO, Media, Prompt


def load_processor(path: str | Path, processor_class: str | None = None, trust_remote_code: bool = False,
                   audio: bool = False, **kwargs):
    """The checkpoint's real processor (``AutoProcessor``). Where torchvision is missing (the stock video processor
    needs it) the transformers class ``processor_class`` is assembled from its parts with the torch-only video
    processor; ``audio`` adds the Whisper feature extractor. ``processor_class=None``: a model without video."""
    from transformers import AutoProcessor
    if processor_class is None or stock_video_processor_available():
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, WhisperFeatureExtractor
    parts = dict(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs),
                 video_processor=TorchQwenVideoProcessor.from_pretrained(path, **kwargs),
                 tokenizer=AutoTokenizer.from_pretrained(path),
                 chat_template=(Path(path) / "chat_template.jinja").read_text())
    if audio:
        parts["feature_extractor"] = WhisperFeatureExtractor.from_pretrained(path)
    return getattr(transformers, processor_class)(**parts)


class QwenAdapter(ModelAdapter):
    supports_device_map = True
    #: placeholder token string per modality (looked up in the tokenizer)
    placeholder_tokens: dict[str, str] = {}
    #: the transformers model class :meth:`_load` reads the checkpoint with
    model_class: str = ""
    #: the transformers processor class :func:`load_processor` assembles where torchvision is missing (None: the
    #: model takes no video, ``AutoProcessor`` always)
    processor_class: str | None = None

    def _load(self):
        import transformers
        model = getattr(transformers, self.model_class).from_pretrained(self.path, **self._from_pretrained_kwargs())
        proc = load_processor(self.path, self.processor_class, self.trust_remote_code, audio="audio" in self.modalities,
                              **self.processor_kwargs)
        return self._placed(model), proc

    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.model.model.language_model.layers)

    def text_config(self) -> Any:
        cfg = self.model.config
        cfg = getattr(cfg, "thinker_config", cfg)
        return cfg.get_text_config()

    def _from_pretrained_kwargs(self) -> dict:
        return dict(dtype=self.dtype, attn_implementation=self.attn_implementation,
                    trust_remote_code=self.trust_remote_code, **self._weights_kwargs(), **self._placement_kwargs())

    # ---------------------------------------------------------------------------------------------- encode
    def _messages(self, prompt: Prompt, decoded: list[dict]) -> tuple[list[dict], dict[str, list]]:
        """Chat messages + the media lists for the processor. Media the model cannot take are left out."""
        content: list[dict] = []
        media = self._new_media_lists()
        for item, dec in zip(prompt.context, decoded):
            if isinstance(item, str):
                content.append({"type": "text", "text": item})
                continue
            content.extend(self._media_content(item, dec, media))
        content.append({"type": "text", "text": prompt.question})
        messages = []
        if prompt.system is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
        messages.append({"role": "user", "content": content})
        return messages, media

    def _new_media_lists(self) -> dict[str, list]:
        return {"images": [], "videos": [], "audio": []}

    def _media_content(self, item: Media, dec: dict, media: dict[str, list]) -> list[dict]:  # pragma: no cover
        raise NotImplementedError

    def fit_audio(self, wav):
        """The feature extractor pads or cuts audio to its window (30 s for Qwen2-Audio); a cut is recorded."""
        fe = self.processor.feature_extractor
        limit = int(fe.chunk_length * fe.sampling_rate)
        if len(wav) > limit:
            self._notes.append(f"audio cut from {len(wav) / fe.sampling_rate:.1f}s to the feature extractor's "
                               f"{fe.chunk_length}s window")
        return wav[:limit]

    def _processor_kwargs(self, media: dict[str, list]) -> dict:
        kw = {k: v for k, v in media.items() if v}
        if "audio" in kw:
            kw["sampling_rate"] = media_io.SAMPLE_RATE
        return kw

    def decode_media(self, m: Media) -> dict:
        """One media item as this adapter's ``preprocessing`` mode reads it (``media_io``)."""
        want_audio = "audio" in self.modalities
        if self.preprocessing == "official":
            return media_io.load_official(m, self.official, want_audio=want_audio,
                                          want_video="video" in self.modalities,
                                          max_image_pixels=self.max_image_pixels)
        return media_io.load(m, num_frames=self.num_frames, fps=self.fps, max_audio_s=self.max_audio_s,
                             want_audio=want_audio, max_image_pixels=self.max_image_pixels)

    def encode(self, prompt: Prompt) -> Encoded:
        with Stopwatch() as media:
            decoded = [None if isinstance(m, str) else self.decode_media(m) for m in prompt.context]
        return self.encode_decoded(prompt, decoded, media_s=media.s)

    def _preprocessing_record(self, decoded: list[dict | None]) -> dict:
        """Per media item: what the processor was given (frames, frame size, sampled fps, audio seconds)."""
        items = []
        for dec in decoded:
            if dec is None:
                continue
            info = dict(dec.get("info") or {})
            idx = info.get("frame_indices")
            if idx is not None and len(idx) > 64:           # long videos: the range, not every index
                info["frame_indices"] = {"first": idx[0], "last": idx[-1], "count": len(idx)}
            if dec.get("frames") is not None:
                info.setdefault("frames", int(len(dec["frames"])))
                info.setdefault("resized", [int(x) for x in dec["frames"].shape[1:3]])
                info.setdefault("sample_fps", float(dec.get("fps") or 0.0))
            if dec.get("image") is not None:
                info.setdefault("resized", [int(dec["image"].size[1]), int(dec["image"].size[0])])
            if dec.get("audio") is not None:
                info.setdefault("audio_s", len(dec["audio"]) / media_io.SAMPLE_RATE)
            items.append(info)
        return {"mode": self.preprocessing, "items": items}

    def encode_decoded(self, prompt: Prompt, decoded: list[dict | None], media_s: float = 0.0) -> Encoded:
        """:meth:`encode` on media already decoded (``media_io.load``'s dicts, None for text pieces); the
        proxy training stream feeds generated arrays through here, the same path as evaluation."""
        self._notes: list[str] = []
        prompt = self.safe_prompt(prompt, self._notes)     # dataset text never becomes a control token
        messages, media = self._messages(prompt, decoded)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = dict(self.processor(text=[text], return_tensors="pt", **self._processor_kwargs(media)))
        inputs.pop("attention_mask", None)          # batch size 1, no padding: the causal mask is implied
        input_ids = inputs["input_ids"]
        n = input_ids.shape[1]
        assistant_start = self._assistant_start(messages, text, input_ids)
        question_start = self._question_start(text, prompt.question, n)
        modality = self.token_modality(input_ids, self.placeholder_ids())
        used = sorted({name for name, key in (("image", "images"), ("video", "videos"), ("audio", "audio"))
                       if media.get(key)})
        return Encoded(inputs=inputs, input_ids=input_ids, modality=modality, question_start=question_start,
                       assistant_start=assistant_start, media_s=media_s, modalities_used=used, notes=self._notes,
                       layout=self._video_layout(inputs, modality),
                       preprocessing=self._preprocessing_record(decoded))

    def _assistant_start(self, messages: list[dict], text: str, input_ids: torch.Tensor) -> int:
        """Token index of the assistant preamble: the last ``<|im_start|>`` (ChatML templates)."""
        im_start = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        return int((input_ids[0] == im_start).nonzero().max())

    def _question_start(self, text: str, question: str, n: int) -> int:
        """Token index where the question text starts, counted on the un-expanded template text."""
        cut = text.rfind(question)
        if cut < 0:
            raise ValueError("the rendered chat template does not contain the question text")
        tok = self.tokenizer
        n_text = len(tok(text, add_special_tokens=False)["input_ids"])
        n_prefix = len(tok(text[:cut], add_special_tokens=False)["input_ids"])
        return n_prefix + (n - n_text)

    def placeholder_ids(self) -> dict[str, int | None]:
        tok = self.tokenizer
        out = {}
        for name, s in self.placeholder_tokens.items():
            tid = tok.convert_tokens_to_ids(s)
            out[name] = tid if tid is not None and tid != tok.unk_token_id else None
        return out

    def _video_layout(self, inputs: dict, modality: torch.Tensor) -> dict:
        """Frame (temporal patch) and spatial index of every video position, -1 elsewhere (PureKV's ST-SpAttn)."""
        grids = inputs.get("video_grid_thw")
        frame = torch.full_like(modality, -1)
        spatial = torch.full_like(modality, -1)
        if grids is None:
            return {}
        merge = getattr(self.processor.video_processor, "merge_size", 2)
        fr, sp, offset = [], [], 0
        for t, h, w in grids.tolist():
            per = (h // merge) * (w // merge)
            idx = torch.arange(t * per)
            fr.append(idx // per + offset)
            sp.append(idx % per)
            offset += t
        pos = (modality == VIDEO).nonzero().flatten()
        fr_all, sp_all = torch.cat(fr), torch.cat(sp)
        if len(pos) == len(fr_all):                 # video tokens appear in frame order (also when interleaved)
            frame[pos], spatial[pos] = fr_all, sp_all
        return {"video_frame": frame, "video_spatial": spatial}

"""The avkv adapter for VideoLLaMA2 / VideoLLaMA2.1 / VideoLLaMA2.1-AV."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from avkv.models.base import Encoded, ModelAdapter
from avkv.models.videollama2 import processing as P
from avkv.models.videollama2.modeling import MediaItem, VideoLLaMA2ForCausalLM, from_pretrained
from avkv.schema import AUDIO, IMAGE, MODALITIES, TEXT, VIDEO, Media, Prompt

_TAG = {"video": "<video>", "image": "<image>", "audio": "<audio>"}


class VideoLLaMA2Adapter(ModelAdapter):
    """VideoLLaMA2 (Mistral, CLIP) and VideoLLaMA2.1(-AV) (Qwen2, SigLIP, BEATs) from an official checkpoint folder.

    Prompts follow the official ``mm_infer``: the user turn is ``<tag>\\n…\\n{question}`` rendered with the
    checkpoint's chat template (Mistral models get the official system message). Every media tag becomes a run of
    placeholder ids as long as its features, so ``input_ids``, ``modality`` and positions are 1:1 with the
    sequence the decoder sees; :meth:`forward` splices the features in through ``inputs_embeds``.
    A video with ``with_audio`` given to the AV model is one ``<video>`` item whose run is the video features
    followed by its audio features (the official audio-visual input).
    """

    family = "videollama2"
    modalities = ("video", "image", "audio")
    extra_control_strings = tuple(_TAG.values())

    def __init__(self, path: str | Path, num_frames: int | None = None, vision_tower_path: str | None = None,
                 video_audio: str = "whole", audio_window_seed: int | None = 0, **kwargs: Any) -> None:
        if video_audio not in ("whole", "clip"):
            raise ValueError(f"model.video_audio={video_audio!r}: allowed values are 'whole' (official: the whole "
                             f"audio track of a clipped video) and 'clip' (the track cut to the clip)")
        self.vision_tower_path = vision_tower_path
        self.video_audio, self.audio_window_seed = video_audio, audio_window_seed
        super().__init__(path, num_frames=num_frames, **kwargs)

    # ------------------------------------------------------------------------------------ loading
    def _load(self):
        from transformers import AutoTokenizer
        model = from_pretrained(self.path, dtype=self.dtype, device=self.device,
                                vision_tower_path=self.vision_tower_path,
                                attn_implementation=self.attn_implementation)
        # the LLM config tells AutoTokenizer the family (the official code registers videollama2_* model types)
        tok = AutoTokenizer.from_pretrained(str(self.path), config=model.config.text_config)
        if not tok.chat_template:
            tok.chat_template = P.chat_template(model.config.llm)
        cfg = model.config
        self.num_frames = self.num_frames or cfg.num_frames
        self.image_processor = P.ImageProcessor.for_tower(cfg.vision_kind, cfg.vision_config.image_size)
        self.modalities = ("video", "image", "audio") if cfg.has_audio else ("video", "image")
        return model, tok

    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.model.model.layers)

    def text_config(self):
        return self.model.config.text_config

    # ------------------------------------------------------------------------------------ encoding
    def _media_item(self, media: Media, notes: list[str], record: list[dict] | None = None) -> MediaItem:
        """Decode and preprocess one media item; what differs from the file as given is added to ``notes``,
        what the model is fed to ``record``."""
        model: VideoLLaMA2ForCausalLM = self.model
        info: dict = {"kind": media.kind}
        if record is not None:
            record.append(info)
        if media.kind == "video":
            frames = P.read_video_frames(media.path, self.num_frames, media.start, media.end, notes)
            info.update(frames=int(len(frames)), size=[int(x) for x in frames.shape[1:3]])
            fbank = None
            if media.with_audio and model.config.has_audio:
                wav = P.read_video_audio(media.path, media.start, media.end, clip=self.video_audio == "clip")
                if wav is None:
                    notes.append(f"{Path(media.path).name}: no audio track, 30 s of silence (official behaviour)")
                info.update(audio_s=0.0 if wav is None else len(wav) / P.AUDIO_SR, video_audio=self.video_audio)
                fbank = P.audio_features(wav, from_video=True, window_seed=self.audio_window_seed)
            elif media.with_audio:
                notes.append(f"{Path(media.path).name}: audio track not used (this checkpoint has no audio tower)")
            return MediaItem("video", 0, model.num_visual_tokens(len(frames)),
                             model.num_audio_tokens(fbank.shape[0]) if fbank is not None else 0,
                             pixel_values=self.image_processor(frames), fbank=fbank)
        if media.kind == "image":
            return MediaItem("image", 0, model.num_visual_tokens(self.model.config.num_frames), 0,
                             pixel_values=self.image_processor(P.read_image(media.path, self.max_image_pixels)))
        if media.kind == "audio":
            if not model.config.has_audio:
                raise ValueError(f"{media.path}: this VideoLLaMA2 checkpoint has no audio tower")
            wav = P.audio_file_waveform(media.path, media.start, media.end, self.audio_window_seed, notes)
            info.update(audio_s=P.AUDIO_PAD_S, window_seed=self.audio_window_seed)
            fbank = P.fbank_features(wav)
            return MediaItem("audio", 0, 0, model.num_audio_tokens(fbank.shape[0]), fbank=fbank)
        raise ValueError(f"unsupported media kind {media.kind!r}")

    def messages(self, prompt: Prompt) -> list[dict]:
        """The chat messages of ``prompt`` (official ``mm_infer``: media tag + newline before the text)."""
        parts = [_TAG[p.kind] if isinstance(p, Media) else p for p in prompt.context]
        user = "\n".join([*parts, prompt.question])
        msgs = [{"role": "user", "content": user}]
        system = prompt.system
        if system is None and self.model.config.llm == "mistral":
            system = P.MISTRAL_SYSTEM_MESSAGE
        return ([{"role": "system", "content": system}] if system else []) + msgs

    def encode(self, prompt: Prompt) -> Encoded:
        t0 = time.perf_counter()
        notes: list[str] = []
        prompt = self.safe_prompt(prompt, notes)            # dataset text never becomes a control token or tag
        record: list[dict] = []
        items = [self._media_item(p, notes, record) for p in prompt.context if isinstance(p, Media)]
        media_s = time.perf_counter() - t0

        msgs = self.messages(prompt)
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        head = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        ids, spans = P.tokenize_multimodal(text, self.tokenizer)
        q_char = text.rfind(prompt.question) if prompt.question else -1
        if q_char < 0:
            raise ValueError("the rendered prompt does not contain the question text")
        q_end = q_char + len(prompt.question)
        # the assistant preamble: the generation prompt where the template has one (Qwen2), else what follows
        # the question (Mistral: " [/INST]")
        a_char = len(head) if text.startswith(head) and len(head) < len(text) and len(head) >= q_end else q_end
        q_tok, a_tok = P.first_token_at(spans, q_char), P.first_token_at(spans, a_char)

        tags = [i for i, t in enumerate(ids) if t < 0]
        if len(tags) != len(items):
            raise ValueError(f"prompt has {len(tags)} media tags for {len(items)} media items")
        out_ids: list[int] = []
        modality: list[int] = []
        frame: list[int] = []
        spatial: list[int] = []
        new_index = []                      # new position of each original token
        spans_out = []
        t_offset = 0
        it = iter(items)
        for t in ids:
            new_index.append(len(out_ids))
            if t >= 0:
                out_ids.append(t)
                modality.append(TEXT)
                frame.append(-1)
                spatial.append(-1)
                continue
            item = next(it)
            item.start = len(out_ids)
            vis_mod = IMAGE if item.kind == "image" else VIDEO
            if item.n_visual:
                out_ids += [P.IMAGE_TOKEN_INDEX if item.kind == "image" else P.VIDEO_TOKEN_INDEX] * item.n_visual
                modality += [vis_mod] * item.n_visual
                if item.kind == "video":        # STC output order is (t h w): temporal group, then spatial cell
                    gt, gh, gw = self.model.video_grid(item.pixel_values.shape[0])
                    frame += [t_offset + j // (gh * gw) for j in range(item.n_visual)]
                    spatial += [j % (gh * gw) for j in range(item.n_visual)]
                    t_offset += gt
                else:
                    frame += [-1] * item.n_visual
                    spatial += [-1] * item.n_visual
            out_ids += [P.AUDIO_TOKEN_INDEX] * item.n_audio
            modality += [AUDIO] * item.n_audio
            frame += [-1] * item.n_audio
            spatial += [-1] * item.n_audio
            spans_out.append({"kind": item.kind, "start": item.start, "end": item.end,
                              "n_visual": item.n_visual, "n_audio": item.n_audio})
        new_index.append(len(out_ids))
        input_ids = torch.tensor([out_ids], dtype=torch.long)
        mod = torch.tensor(modality, dtype=torch.long)
        used = sorted(MODALITIES[m] for m in set(modality) if m != TEXT)     # as the other adapters record it
        layout = {"video_frame": torch.tensor(frame), "video_spatial": torch.tensor(spatial), "media_spans": spans_out}
        return Encoded(inputs={"input_ids": input_ids, "media": items}, input_ids=input_ids, modality=mod,
                       question_start=new_index[q_tok], assistant_start=new_index[a_tok], media_s=media_s,
                       layout=layout, modalities_used=used, notes=notes,
                       preprocessing={"mode": "official", "items": record})

    # ------------------------------------------------------------------------------------ forward
    def prompt_position_ids(self, enc: Encoded) -> torch.Tensor:
        return torch.arange(enc.input_ids.shape[1], device=enc.input_ids.device)[None]

    def forward(self, input_ids: torch.Tensor, cache: Any, position_ids: torch.Tensor,
                mm_inputs: dict | None = None, logits_to_keep: int = 1) -> torch.Tensor:
        media = (mm_inputs or {}).get("media")
        return self.model(input_ids.to(self.device), cache, position_ids.to(self.device), media=media,
                          logits_to_keep=logits_to_keep)

    def generate(self, enc: Encoded, max_new_tokens: int = 16) -> list[int]:
        """Greedy decoding without any compression (reference path for tests)."""
        return self.model.generate(enc.input_ids.to(self.device), enc.inputs["media"], max_new_tokens,
                                   self.eos_token_ids)

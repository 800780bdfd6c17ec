"""The avkv adapter for VideoLLaMA2 / VideoLLaMA2.1 / VideoLLaMA2.1-AV."""
from __future__ import annotations

from pathlib import Path
from typing import Any


from avkv.models.base import Encoded
from avkv.models.native_adapter import NativeAdapter
from avkv.models.videollama2 import processing as P
from avkv.models.videollama2.modeling import MediaItem, VideoLLaMA2ForCausalLM, from_pretrained
from avkv.schema import AUDIO, IMAGE, VIDEO, Media, Prompt

_TAG = {"video": "<video>", "image": "<image>", "audio": "<audio>"}


class VideoLLaMA2Adapter(NativeAdapter):
    """VideoLLaMA2 (Mistral, CLIP) and VideoLLaMA2.1(-AV) (Qwen2, SigLIP, BEATs) from an official checkpoint folder.

    Prompts follow the official ``mm_infer``: the user turn is ``<tag>\\n…\\n{question}`` rendered with the
    checkpoint's chat template (Mistral models get the official system message). Every media tag becomes a run of
    placeholder ids as long as its features, so ``input_ids``, ``modality`` and positions are 1:1 with the
    sequence the decoder sees; the forward splices the features in through ``inputs_embeds``
    (:mod:`avkv.models.native`).
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
        self.video_audio, self.audio_window_seed = video_audio, audio_window_seed
        super().__init__(path, num_frames=num_frames, vision_tower_path=vision_tower_path, **kwargs)

    # ------------------------------------------------------------------------------------ loading
    def _load(self):
        model, tok = self._load_native(from_pretrained)
        if not tok.chat_template:
            tok.chat_template = P.chat_template(model.config.llm)
        cfg = model.config
        self.num_frames = self.num_frames or cfg.num_frames
        self.image_processor = P.ImageProcessor.for_tower(cfg.vision_kind, cfg.vision_config.image_size)
        self.modalities = ("video", "image", "audio") if cfg.has_audio else ("video", "image")
        return model, tok

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
        prompt, items, notes, record, media_s = self._prepared(prompt)

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

        return self._expanded(ids, items, q_tok, a_tok, media_s, notes, record)

    def _run(self, item: MediaItem, t_offset: int):
        nv, na = item.n_visual, item.n_audio
        ids, mod, frame, spatial, groups = [], [], [], [], 0
        if nv:
            ids += [P.IMAGE_TOKEN_INDEX if item.kind == "image" else P.VIDEO_TOKEN_INDEX] * nv
            mod += [IMAGE if item.kind == "image" else VIDEO] * nv
            if item.kind == "video":        # STC output order is (t h w): temporal group, then spatial cell
                gt, gh, gw = self.model.video_grid(item.pixel_values.shape[0])
                frame += [t_offset + j // (gh * gw) for j in range(nv)]
                spatial += [j % (gh * gw) for j in range(nv)]
                groups = gt
            else:
                frame += [-1] * nv
                spatial += [-1] * nv
        return (ids + [P.AUDIO_TOKEN_INDEX] * na, mod + [AUDIO] * na, frame + [-1] * na, spatial + [-1] * na, groups,
                {"n_visual": nv, "n_audio": na})

"""The avkv adapter for MobileVLM V2 (MobileLLaMA + CLIP ViT-L/14-336 + LDPv2), from an official checkpoint."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from avkv.models import media_io
from avkv.models.base import Encoded, ModelAdapter
from avkv.models.mobilevlm import processing as P
from avkv.models.mobilevlm.modeling import MediaItem, MobileVLMForCausalLM, from_pretrained
from avkv.schema import IMAGE, MODALITIES, TEXT, VIDEO, Media, Prompt


class MobileVLMAdapter(ModelAdapter):
    """MobileVLM V2 as its official evaluation runs it (``model_vqa_loader``: the ``v1`` conversation,
    ``tokenizer_image_token``, ``process_images`` with ``image_aspect_ratio: pad``, greedy decoding).

    Every ``<image>`` becomes a run of ``-200`` placeholders as long as its features (144 for LDPv2), so
    ``input_ids``, ``modality`` and positions are 1:1 with the sequence the decoder sees; :meth:`forward` splices
    the features in through ``inputs_embeds``.

    MobileVLM reads images only. A video is given to it as ``num_frames`` frames (media_io's even sampling), each
    encoded as an image, their runs back to back behind one ``<image>`` slot — an avkv extension (the official
    code has no video input), recorded in the sample's notes; its positions carry the VIDEO modality and a frame /
    spatial layout. Audio is not heard (a note says so); an audio-only item is an error.
    """

    family = "mobilevlm"
    modalities = ("image", "video")
    extra_control_strings = (P.IMAGE_TAG,)

    def __init__(self, path: str | Path, vision_tower_path: str | None = None, **kwargs: Any) -> None:
        self.vision_tower_path = vision_tower_path
        super().__init__(path, **kwargs)

    # ------------------------------------------------------------------------------------ loading
    def _load(self):
        from transformers import AutoTokenizer
        model = from_pretrained(self.path, dtype=self.dtype, device=self.device,
                                vision_tower_path=self.vision_tower_path,
                                attn_implementation=self.attn_implementation,
                                allow_pickle=self.allow_pickle_weights)
        # the LLM config tells AutoTokenizer the family (the official code registers the mobilevlm model type)
        tok = AutoTokenizer.from_pretrained(str(self.path), config=model.config.text_config)
        if model.config.mm_use_im_patch_token:          # official load_pretrained_model (never in a prompt)
            tok.add_tokens([P.IMAGE_PATCH_TOKEN], special_tokens=True)
        self.image_size = model.config.vision_config.image_size
        return model, tok

    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.model.model.layers)

    def text_config(self):
        return self.model.config.text_config

    # ------------------------------------------------------------------------------------ encoding
    def _media_item(self, media: Media, notes: list[str], record: list[dict]) -> MediaItem:
        model: MobileVLMForCausalLM = self.model
        aspect = model.config.image_aspect_ratio
        info: dict = {"kind": media.kind, "image_aspect_ratio": aspect, "size": self.image_size}
        record.append(info)
        if media.kind == "image":
            img = media_io.load_image(media.path, self.max_image_pixels)
            info["original_size"] = [img.size[1], img.size[0]]
            px = P.process_images([img], self.image_size, aspect)
        elif media.kind == "video":
            from PIL import Image
            frames, _ = media_io.load_video_frames(media.path, self.num_frames, self.fps, media.start, media.end,
                                                   media.frame_rate, self.max_image_pixels)
            notes.append(f"{Path(media.path).name}: video given to MobileVLM (an image model) as {len(frames)} "
                         f"frames, each encoded as an image (avkv extension)")
            if media.with_audio:
                notes.append(f"{Path(media.path).name}: audio track not used (MobileVLM has no audio input)")
            info.update(frames=int(len(frames)), original_size=[int(x) for x in frames.shape[1:3]])
            px = P.process_images([Image.fromarray(f) for f in frames], self.image_size, aspect)
        else:
            raise ValueError(f"{media.path}: MobileVLM reads images (and videos as frames), not {media.kind}")
        return MediaItem(media.kind, 0, px.shape[0] * model.tokens_per_image(), pixel_values=px)

    def user_text(self, prompt: Prompt) -> str:
        return P.user_turn([None if isinstance(p, Media) else p for p in prompt.context], prompt.question)

    def encode(self, prompt: Prompt) -> Encoded:
        t0 = time.perf_counter()
        notes: list[str] = []
        prompt = self.safe_prompt(prompt, notes)            # dataset text never becomes a control token or tag
        record: list[dict] = []
        items = [self._media_item(p, notes, record) for p in prompt.context if isinstance(p, Media)]
        media_s = time.perf_counter() - t0

        user = self.user_text(prompt)
        text = P.v1_prompt(user) if prompt.system is None else P.v1_prompt(user, prompt.system)
        ids, spans = P.tokenize_image_prompt(text, self.tokenizer)
        q_char = text.rfind(prompt.question) if prompt.question else -1
        if q_char < 0:
            raise ValueError("the rendered prompt does not contain the question text")
        a_char = q_char + len(prompt.question)             # " ASSISTANT:" follows the question
        q_tok = next((i for i, (_, e) in enumerate(spans) if e > q_char), len(spans))
        a_tok = next((i for i, (_, e) in enumerate(spans) if e > a_char), len(spans))

        tags = [i for i, t in enumerate(ids) if t < 0]
        if len(tags) != len(items):
            raise ValueError(f"prompt has {len(tags)} <image> tags for {len(items)} media items")
        per = self.model.tokens_per_image()
        out_ids: list[int] = []
        modality: list[int] = []
        frame: list[int] = []
        spatial: list[int] = []
        new_index = []
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
            out_ids += [P.IMAGE_TOKEN_INDEX] * item.n_visual
            if item.kind == "video":                # frame k's run: its 12×12 grid, row-major
                modality += [VIDEO] * item.n_visual
                frame += [t_offset + j // per for j in range(item.n_visual)]
                spatial += [j % per for j in range(item.n_visual)]
                t_offset += item.n_visual // per
            else:
                modality += [IMAGE] * item.n_visual
                frame += [-1] * item.n_visual
                spatial += [-1] * item.n_visual
            spans_out.append({"kind": item.kind, "start": item.start, "end": item.end, "n_visual": item.n_visual,
                              "images": int(item.pixel_values.shape[0])})
        new_index.append(len(out_ids))
        input_ids = torch.tensor([out_ids], dtype=torch.long)
        mod = torch.tensor(modality, dtype=torch.long)
        used = sorted(MODALITIES[m] for m in set(modality) if m != TEXT)
        layout = {"video_frame": torch.tensor(frame), "video_spatial": torch.tensor(spatial),
                  "media_spans": spans_out}
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

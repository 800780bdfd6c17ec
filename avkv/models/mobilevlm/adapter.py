"""The avkv adapter for MobileVLM V2 (MobileLLaMA + CLIP ViT-L/14-336 + LDPv2), from an official checkpoint."""
from __future__ import annotations

from pathlib import Path

from avkv.models import media_io
from avkv.models.base import Encoded
from avkv.models.mobilevlm import processing as P
from avkv.models.mobilevlm.modeling import MediaItem, MobileVLMForCausalLM, from_pretrained
from avkv.models.native_adapter import NativeAdapter
from avkv.schema import IMAGE, VIDEO, Media, Prompt


class MobileVLMAdapter(NativeAdapter):
    """MobileVLM V2 as its official evaluation runs it (``model_vqa_loader``: the ``v1`` conversation,
    ``tokenizer_image_token``, ``process_images`` with ``image_aspect_ratio: pad``, greedy decoding).

    Every ``<image>`` becomes a run of ``-200`` placeholders as long as its features (144 for LDPv2), so
    ``input_ids``, ``modality`` and positions are 1:1 with the sequence the decoder sees; the forward splices the
    features in through ``inputs_embeds`` (:mod:`avkv.models.native`).

    MobileVLM reads images only. A video is given to it as ``num_frames`` frames (media_io's even sampling), each
    encoded as an image, their runs back to back behind one ``<image>`` slot — an avkv extension (the official
    code has no video input), recorded in the sample's notes; its positions carry the VIDEO modality and a frame /
    spatial layout. Audio is not heard (a note says so); an audio-only item is an error.
    """

    family = "mobilevlm"
    modalities = ("image", "video")
    extra_control_strings = (P.IMAGE_TAG,)
    tag_name = "<image> tags"

    # ------------------------------------------------------------------------------------ loading
    def _load(self):
        model, tok = self._load_native(from_pretrained)
        if model.config.mm_use_im_patch_token:          # official load_pretrained_model (never in a prompt)
            tok.add_tokens([P.IMAGE_PATCH_TOKEN], special_tokens=True)
        self.image_size = model.config.vision_config.image_size
        return model, tok

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
        prompt, items, notes, record, media_s = self._prepared(prompt)

        user = self.user_text(prompt)
        text = P.v1_prompt(user) if prompt.system is None else P.v1_prompt(user, prompt.system)
        ids, spans = P.tokenize_image_prompt(text, self.tokenizer)
        q_char = text.rfind(prompt.question) if prompt.question else -1
        if q_char < 0:
            raise ValueError("the rendered prompt does not contain the question text")
        a_char = q_char + len(prompt.question)             # " ASSISTANT:" follows the question
        q_tok = next((i for i, (_, e) in enumerate(spans) if e > q_char), len(spans))
        a_tok = next((i for i, (_, e) in enumerate(spans) if e > a_char), len(spans))

        return self._expanded(ids, items, q_tok, a_tok, media_s, notes, record)

    def _run(self, item: MediaItem, t_offset: int):
        n = item.n_visual
        extra = {"n_visual": n, "images": int(item.pixel_values.shape[0])}
        if item.kind == "video":                # frame k's run: its 12×12 grid, row-major
            per = self.model.tokens_per_image()
            return ([P.IMAGE_TOKEN_INDEX] * n, [VIDEO] * n, [t_offset + j // per for j in range(n)],
                    [j % per for j in range(n)], n // per, extra)
        return [P.IMAGE_TOKEN_INDEX] * n, [IMAGE] * n, [-1] * n, [-1] * n, 0, extra

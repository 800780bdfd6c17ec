"""MobileVLM input processing: the official prompt, image preprocessing and image-token tokenisation.

* **Prompt**: the ``v1`` conversation (``conv_vicuna_v1``, the ``--conv-mode`` of every official evaluation script):
  ``{SYSTEM} USER: {user turn} ASSISTANT:`` — the system text, a space, the role and ``": "`` before the user turn,
  a space before ``ASSISTANT:``, which ends the prompt (an assistant turn would end with ``</s>``).
* **User turn**: the official single-image scripts write ``<image>\\n{question}``. Interleaved prompts (MileBench)
  are written as MileBench's LLaVA worker does: the text as given, every image slot replaced by ``<image>``
  in place, and two adjacent slots ``<image><image>`` written ``<image>\\n<image>\\n``.
* **Images** (``process_images`` with ``image_aspect_ratio: pad``): padded to a square with the CLIP mean colour
  ``(122, 116, 104)`` (``int(255 × mean)``), the image centred, then the ``openai/clip-vit-large-patch14-336``
  processor: shortest edge to 336 (bicubic), centre crop 336, scaled to [0, 1], normalised by the CLIP mean/std.
  Without ``pad`` the processor alone (which crops a non-square image).
* **Tokens** (``tokenizer_image_token``): the prompt split at ``<image>``, each piece tokenised on its own *with*
  the tokenizer's special tokens (LLaMA: a BOS), the first piece's BOS kept once, the first token of every later
  piece dropped (its BOS) and ``-200`` (``IMAGE_TOKEN_INDEX``) put between the pieces.
"""
from __future__ import annotations

import numpy as np

IMAGE_TOKEN_INDEX = -200
IMAGE_TAG = "<image>"
IMAGE_PATCH_TOKEN = "<im_patch>"           # added to the tokenizer when mm_use_im_patch_token (never in prompts)

#: ``conv_vicuna_v1`` (``conv_templates["v1"]``)
V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
V1_ROLES = ("USER", "ASSISTANT")
V1_SEP, V1_SEP2 = " ", "</s>"

#: the CLIP processor of ``openai/clip-vit-large-patch14-336``
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def v1_prompt(user: str, system: str = V1_SYSTEM) -> str:
    """``conv_vicuna_v1`` with one user message and the open assistant turn (``append_message(roles[1], None)``)."""
    return f"{system}{V1_SEP}{V1_ROLES[0]}: {user}{V1_SEP}{V1_ROLES[1]}:"


def user_turn(pieces: list[str | None], question: str) -> str:
    """The user message from context pieces (text, or None for an image slot) and the question.

    A context that is one image and nothing else gives the official ``<image>\\n{question}``; anything else is
    MileBench's rendering (slots in place, ``<image><image>`` → ``<image>\\n<image>\\n``)."""
    if len(pieces) == 1 and pieces[0] is None:
        return IMAGE_TAG + "\n" + question
    slot = "<ImageHere>"                                   # MileBench's slot string, replaced as its worker does
    text = "".join(slot if p is None else p for p in pieces) + question
    return text.replace(slot + slot, slot + "\n" + slot + "\n").replace(slot, IMAGE_TAG)


def expand2square(img, background: tuple[int, int, int]):
    """Official ``expand2square``: a square canvas of the longer side in ``background``, the image centred
    (offset ``(long - short) // 2``)."""
    from PIL import Image
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def pad_colour(mean: tuple[float, float, float] = CLIP_MEAN) -> tuple[int, int, int]:
    """``tuple(int(x * 255) for x in image_processor.image_mean)``."""
    return tuple(int(x * 255) for x in mean)


def process_images(images: list, size: int, aspect_ratio: str | None):
    """PIL RGB images → float32 pixel values ``[k, 3, size, size]`` (official ``process_images``)."""
    import torch

    from avkv.models.videollama2.processing import ImageProcessor
    proc = ImageProcessor("clip", size, CLIP_MEAN, CLIP_STD)      # shortest edge, bicubic, centre crop (PIL)
    if aspect_ratio == "pad":
        images = [expand2square(im, pad_colour(CLIP_MEAN)) for im in images]
    return torch.cat([proc(np.asarray(im.convert("RGB"))[None]) for im in images])


def tokenize_image_prompt(prompt: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Official ``tokenizer_image_token`` with character spans: the ids (``-200`` per ``<image>``) and, per id, its
    ``(start, end)`` in ``prompt`` (the BOS and the tags get the span of where they stand)."""
    pieces, starts, pos = [], [], 0
    while True:
        cut = prompt.find(IMAGE_TAG, pos)
        end = len(prompt) if cut < 0 else cut
        pieces.append(prompt[pos:end])
        starts.append(pos)
        if cut < 0:
            break
        pos = cut + len(IMAGE_TAG)
    encs = [tokenizer(p, return_offsets_mapping=True) for p in pieces]
    chunks = [(list(e["input_ids"]), [(s + a, s + b) for a, b in e["offset_mapping"]]) for e, s in zip(encs, starts)]
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    offset = 0
    first_ids, first_spans = chunks[0]
    if first_ids and first_ids[0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(first_ids[0])
        spans.append((0, 0))
    for k, (c_ids, c_spans) in enumerate(chunks):
        if k:                                           # the separator: [-200] * (offset + 1), then [offset:]
            tag_at = starts[k] - len(IMAGE_TAG)
            sep = [IMAGE_TOKEN_INDEX] * (offset + 1)
            ids.extend(sep[offset:])
            spans.extend([(tag_at, starts[k])] * len(sep[offset:]))
        ids.extend(c_ids[offset:])
        spans.extend(c_spans[offset:])
    return ids, spans

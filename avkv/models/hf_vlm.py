"""What the transformers vision-language families with a placeholder *tag* share (LLaVA-1.5, LLaVA-OneVision,
InternVL): the user turn is one text in which each media item is its tag (``<image>\\n``, ``<video>\\n``) at its
place in the prompt, rendered by the checkpoint's own chat template and expanded by its own processor.

Why one text: the llava-hf chat templates put every image of a turn before the turn's text, which would move
MileBench's interleaved images away from the sentences that refer to them; the original LLaVA conversation format
writes ``<image>\\n`` where the image is, and a text part is rendered verbatim by every template, so the order of
the prompt survives. Dataset text is escaped first (:meth:`~avkv.models.base.ModelAdapter.safe_prompt`), so a
tag in a question stays text.

Split points are found with the fast tokenizer's character offsets on the rendered (un-expanded) text: the question
starts at its first character, the assistant preamble where ``add_generation_prompt`` begins; the processor's
expansions (and a BOS token) all lie before either point, so they shift both by ``n - n_text``.
"""
from __future__ import annotations

import torch

from avkv.models.qwen_common import QwenAdapter
from avkv.schema import Media, Prompt


class TagAdapter(QwenAdapter):
    #: the text each media kind becomes in the user turn ("" for kinds the family cannot take)
    media_tags: dict[str, str] = {}

    def _messages(self, prompt: Prompt, decoded: list[dict]) -> tuple[list[dict], dict[str, list]]:
        parts: list[str] = []
        media = self._new_media_lists()
        for item, dec in zip(prompt.context, decoded):
            if isinstance(item, str):
                parts.append(item)
                continue
            tag = self.media_tags.get(item.kind, "")
            if tag:
                self._add_media(item, dec, media)
                parts.append(tag)
            else:
                self._notes.append(f"{item.kind} item left out: {self.family} does not take {item.kind}")
        parts.append(prompt.question)
        messages = []
        if prompt.system is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
        messages.append({"role": "user", "content": [{"type": "text", "text": "".join(parts)}]})
        return messages, media

    def _add_media(self, item: Media, dec: dict, media: dict[str, list]) -> None:
        if item.kind == "image":
            media["images"].append(dec["image"])
        elif item.kind == "video":
            media["videos"].append(dec["frames"])
        else:                                                   # pragma: no cover - media_tags prevents it
            raise ValueError(f"{self.family}: unsupported media kind {item.kind!r}")

    def _token_at(self, text: str, char: int, n: int) -> int:
        """Index in the expanded prompt (``n`` tokens) of the token holding character ``char`` of ``text``."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offs = enc["offset_mapping"]
        i = next((j for j, (_, b) in enumerate(offs) if b > char), len(offs))
        return i + (n - len(offs))

    def _question_start(self, text: str, question: str, n: int) -> int:
        cut = text.rfind(question)
        if cut < 0:
            raise ValueError("the rendered chat template does not contain the question text")
        return self._token_at(text, cut, n)

    def _assistant_start(self, messages: list[dict], text: str, input_ids: torch.Tensor) -> int:
        head = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        if not (text.startswith(head) and len(head) < len(text)):
            raise ValueError(f"{self.family}: the chat template adds no generation prompt")
        return self._token_at(text, len(head), input_ids.shape[1])

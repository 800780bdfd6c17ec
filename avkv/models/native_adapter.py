"""The adapter side of the native ports (:mod:`avkv.models.native`; VideoLLaMA2, MobileVLM): loading through the
port's ``from_pretrained``, the expansion of a tokenised prompt's media tags into placeholder runs, the forward and
the reference generation. A family renders its prompt, preprocesses its media and says how one media item becomes a
run (:meth:`NativeAdapter._run`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from avkv.measure import Stopwatch
from avkv.models.base import Encoded, ModelAdapter
from avkv.schema import MODALITIES, TEXT, Media, Prompt


class NativeAdapter(ModelAdapter):
    """The adapter side of a native port: the model's prompt holds one run of placeholder ids per media item, as
    long as its features, so ``input_ids``, ``modality`` and positions are 1:1 with the sequence the decoder sees.
    Subclasses implement ``_load`` (with :meth:`_load_native`), ``encode`` and :meth:`_run`."""

    def __init__(self, path: str | Path, vision_tower_path: str | None = None, **kwargs: Any) -> None:
        self.vision_tower_path = vision_tower_path
        super().__init__(path, **kwargs)

    def _load_native(self, from_pretrained_fn):
        """The port's model (``from_pretrained_fn``) and the checkpoint's tokenizer; the LLM config tells
        AutoTokenizer the family (the official code registers its own model types)."""
        from transformers import AutoTokenizer
        model = from_pretrained_fn(self.path, dtype=self.dtype, device=self.device,
                                   vision_tower_path=self.vision_tower_path,
                                   attn_implementation=self.attn_implementation,
                                   allow_pickle=self.allow_pickle_weights)
        return model, AutoTokenizer.from_pretrained(str(self.path), config=model.config.text_config)

    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.model.model.layers)

    def text_config(self):
        return self.model.config.text_config

    def _media_item(self, media: Media, notes: list[str], record: list[dict]) -> Any:  # pragma: no cover
        """One media item decoded and preprocessed (what differs from the file is added to ``notes``, what the
        model is fed to ``record``)."""
        raise NotImplementedError

    def _prepared(self, prompt: Prompt) -> tuple[Prompt, list, list[str], list[dict], float]:
        """``prompt`` with its text made safe (dataset text never becomes a control token or tag), its media items,
        the notes, the preprocessing record and the seconds spent on media."""
        media = Stopwatch()
        notes: list[str] = []
        prompt = self.safe_prompt(prompt, notes)
        record: list[dict] = []
        items = [self._media_item(p, notes, record) for p in prompt.context if isinstance(p, Media)]
        return prompt, items, notes, record, media.s

    def _run(self, item: Any, t_offset: int) -> tuple[list[int], list[int], list[int], list[int], int, dict]:
        """One media item's placeholder run: (ids, modality, frame, spatial per position, temporal groups it adds
        to the frame counter, extra fields of its ``media_spans`` entry)."""
        raise NotImplementedError  # pragma: no cover - interface

    def _expanded(self, ids: list[int], items: list, q_tok: int, a_tok: int, media_s: float, notes: list[str],
                  record: list[dict]) -> Encoded:
        """The tokenised prompt ``ids`` (one negative id per media tag) with every tag replaced by its item's run
        (:meth:`_run`); ``q_tok``/``a_tok`` index ``ids`` and are moved to the expanded positions."""
        tags = [i for i, t in enumerate(ids) if t < 0]
        if len(tags) != len(items):
            raise ValueError(f"prompt has {len(tags)} {self.tag_name} for {len(items)} media items")
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
            r_ids, r_mod, r_frame, r_spatial, groups, extra = self._run(item, t_offset)
            out_ids += r_ids
            modality += r_mod
            frame += r_frame
            spatial += r_spatial
            t_offset += groups
            spans_out.append({"kind": item.kind, "start": item.start, "end": item.end, **extra})
        new_index.append(len(out_ids))
        input_ids = torch.tensor([out_ids], dtype=torch.long)
        used = sorted(MODALITIES[m] for m in set(modality) if m != TEXT)     # as the other adapters record it
        layout = {"video_frame": torch.tensor(frame), "video_spatial": torch.tensor(spatial), "media_spans": spans_out}
        return Encoded(inputs={"input_ids": input_ids, "media": items}, input_ids=input_ids,
                       modality=torch.tensor(modality, dtype=torch.long), question_start=new_index[q_tok],
                       assistant_start=new_index[a_tok], media_s=media_s, layout=layout, modalities_used=used,
                       notes=notes, preprocessing={"mode": "official", "items": record})

    #: the media tags in the prompt-mismatch error
    tag_name = "media tags"

    def prompt_position_ids(self, enc: Encoded) -> torch.Tensor:
        return torch.arange(enc.input_ids.shape[1], device=enc.input_ids.device)[None]

    def forward(self, input_ids: torch.Tensor, cache: Any, position_ids: torch.Tensor,
                mm_inputs: dict | None = None, logits_to_keep: int = 1,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError(f"the native port {self.family!r} takes no attention mask (no padded batches)")
        media = (mm_inputs or {}).get("media")
        return self.model(input_ids.to(self.device), cache, position_ids.to(self.device), media=media,
                          logits_to_keep=logits_to_keep)

    def generate(self, enc: Encoded, max_new_tokens: int = 16) -> list[int]:
        """Greedy decoding without any compression (reference path for tests)."""
        return self.model.generate(enc.input_ids.to(self.device), enc.inputs["media"], max_new_tokens,
                                   self.eos_token_ids)

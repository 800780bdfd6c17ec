"""The records every layer shares, and nothing else: documents, media items, prompts and the modality ids.

This module sits below tasks, models and methods (it imports nothing of avkv): a task yields :class:`Doc` records
and turns them into a :class:`Prompt`; a model adapter encodes a prompt and labels every position with a modality
id; a method reads those ids. ``tests/test_layers.py`` keeps it a leaf.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: modality ids of prompt positions: 0 text, 1 image, 2 video, 3 audio (``Encoded.modality``, ``LayerView.modality``)
MODALITIES = ("text", "image", "video", "audio")
TEXT, IMAGE, VIDEO, AUDIO = range(4)


@dataclass
class Media:
    """One media item of a prompt. ``kind`` is ``video``, ``audio`` or ``image``.

    For a video, ``with_audio`` says its audio track belongs to the prompt too (a model that hears gets it;
    Qwen2.5-Omni interleaves it with the frames). ``start``/``end`` clip the file in seconds. A video may also
    be a folder of frame images (sorted by name) sampled at ``frame_rate`` frames per second.
    """

    kind: str
    path: str
    start: float | None = None
    end: float | None = None
    with_audio: bool = False
    frame_rate: float | None = None


@dataclass
class Doc:
    """One evaluation item."""

    id: str
    media: list[Media]
    question: str
    target: Any
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)
    #: where the item comes from (``<file>: item #3 (id 7)``), named by the duplicate-id error
    origin: str = ""
    #: set when the item cannot be run (a media path outside the dataset, a segment that cannot be built): the
    #: run records it as this sample's error without calling the model
    error: str | None = None


@dataclass
class Prompt:
    """What the model adapter renders into the chat template.

    ``context`` is the user turn before the question: media and text pieces in order (MileBench interleaves
    them). ``question`` is the last text of the user turn: the engine's ``compress_at=context`` compresses
    before it. ``system`` overrides the family's default system prompt when set.
    """

    context: list[Media | str]
    question: str
    system: str | None = None
    max_new_tokens: int | None = None
    #: text pieces (by value) the task wrote itself that may hold control tokens on purpose (Qwen2-Audio's ASR
    #: prompt ends with ``<|en|>``); every other piece is escaped by the adapter (``ModelAdapter.safe_prompt``)
    verbatim: tuple[str, ...] = ()

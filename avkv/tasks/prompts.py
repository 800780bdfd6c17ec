"""Per-family prompt text as data: a dataset config's ``prompts`` mapping, lmms-eval style.

A dataset config names its instruction once per model family it differs for, plus a ``default``::

    prompts:
      default: "Transcribe the audio into text."
      qwen2_audio: "Detect the language and recognize the speech: <|fr|>"
      qwen2_5_omni: "Transcribe the French audio into text without any punctuation marks."

and the task asks :class:`PromptSet` for the text of the running family, so the task's code never branches on a
family name. ``{field}`` placeholders are filled from the doc's fields (``str.format_map`` on plain values only; a
missing field is an error naming the prompt). Keys are checked when the task is built: an unknown family name
or a missing ``default`` (when not every family is listed) fails at once, naming the config key.
"""
from __future__ import annotations

import string
from typing import Any, Mapping

from avkv.tasks.common import FAMILIES, check_family


class PromptSet:
    """The ``prompts`` mapping of one dataset config (``where`` names it in errors, e.g. ``dataset.prompts``)."""

    def __init__(self, prompts: Mapping[str, str] | str | None, where: str = "dataset.prompts",
                 families: tuple[str, ...] = FAMILIES) -> None:
        if prompts is None:
            raise ValueError(f"{where}: no prompts given (a mapping with at least a 'default' entry)")
        if isinstance(prompts, str):
            prompts = {"default": prompts}
        if not isinstance(prompts, Mapping):
            raise ValueError(f"{where} must map model families (or 'default') to text, got {type(prompts).__name__}")
        self.where = where
        self.families = tuple(families)
        self.table: dict[str, str] = {}
        for k, v in prompts.items():
            if k != "default" and k not in FAMILIES:
                raise ValueError(f"{where}.{k}: unknown model family; known: default, {', '.join(FAMILIES)}")
            if not isinstance(v, str):
                raise ValueError(f"{where}.{k} must be a string, got {type(v).__name__}")
            for _, name, _, _ in string.Formatter().parse(v):
                if name is not None and not name.isidentifier():
                    raise ValueError(f"{where}.{k}: placeholder {{{name}}} is not a plain field name")
            self.table[str(k)] = v
        if "default" not in self.table and any(f not in self.table for f in self.families):
            missing = [f for f in self.families if f not in self.table]
            raise ValueError(f"{where} has no 'default' entry and none for {', '.join(missing)}")

    def text(self, family: str, **fields: Any) -> str:
        """The prompt of ``family`` (its own entry, else ``default``), placeholders filled from ``fields``."""
        check_family(family)
        key = family if family in self.table else "default"
        tmpl = self.table[key]
        try:
            return tmpl.format_map({k: v for k, v in fields.items() if isinstance(v, (str, int, float))})
        except KeyError as e:
            raise ValueError(f"{self.where}.{key}: placeholder {e} is not a field of the sample") from None

    def as_dict(self) -> dict[str, str]:
        return dict(self.table)

"""Per-family prompt text as data: a dataset config's ``prompts`` mapping, lmms-eval style.

A dataset config names its instruction once per model family it differs for, plus a ``default``::

    prompts:
      default: "Transcribe the audio into text."
      qwen2_audio: "Detect the language and recognize the speech: <|fr|>"
      qwen2_5_omni: "Transcribe the French audio into text without any punctuation marks."
      mobilevlm: null          # this dataset is not run on that family

and the task asks :class:`PromptSet` for the text of the running family, so the task's code never branches on a
family name (and the task layer keeps no list of families: the model layer owns them, and
``tests/tasks/test_prompt_data.py`` checks every key of every committed config is one). ``{field}`` placeholders
are filled from the fields the task passes (``str.format_map`` on plain values only; a missing field is an error
naming the prompt). A family with no entry takes ``default``; with neither, or with a ``null`` entry, the dataset
refuses that family (:meth:`PromptSet.refusal`, checked where a task meets a model: ``experiment.build_prompt``).
"""
from __future__ import annotations

import string
from typing import Any, Mapping


class PromptSet:
    """The ``prompts`` mapping of one dataset config (``where`` names it in errors, e.g. ``dataset.prompts``)."""

    def __init__(self, prompts: Mapping[str, str | None] | str | None, where: str = "dataset.prompts") -> None:
        self.where = where
        self.table: dict[str, str | None] = {}
        self.given = prompts is not None
        if prompts is None:
            return
        if isinstance(prompts, str):
            prompts = {"default": prompts}
        if not isinstance(prompts, Mapping):
            raise ValueError(f"{where} must map model families (or 'default') to text, got {type(prompts).__name__}")
        for k, v in prompts.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise ValueError(f"{where}.{k}: keys are 'default' or a model family name")
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{where}.{k} must be a string (or null: not run on that family), "
                                 f"got {type(v).__name__}")
            for _, name, _, _ in string.Formatter().parse(v or ""):
                if name is not None and not name.isidentifier():
                    raise ValueError(f"{where}.{k}: placeholder {{{name}}} is not a plain field name")
            self.table[k] = v

    def refusal(self, family: str) -> str | None:
        """Why this dataset is not run on ``family`` (a ``null`` entry, or no entry and no default); else None."""
        if not self.given:
            return None
        if family in self.table:
            return None if self.table[family] is not None else \
                f"{self.where}.{family} is null: this dataset is not run on the {family} model family"
        if self.table.get("default") is None:
            listed = [k for k, v in self.table.items() if v is not None]
            return (f"{self.where} has no entry for the {family} model family and no default "
                    f"(it runs on: {', '.join(listed) or 'none'})")
        return None

    def text(self, family: str, **fields: Any) -> str:
        """The prompt of ``family`` (its own entry, else ``default``), placeholders filled from ``fields``."""
        if not self.given:
            raise ValueError(f"{self.where}: no prompts given (a mapping with at least a 'default' entry)")
        why = self.refusal(family)
        if why:
            raise ValueError(why)
        key = self.key(family)
        tmpl = self.table[key]
        assert tmpl is not None
        try:
            return tmpl.format_map({k: v for k, v in fields.items() if isinstance(v, (str, int, float))})
        except KeyError as e:
            raise ValueError(f"{self.where}.{key}: placeholder {e} is not a field of the sample") from None

    def key(self, family: str) -> str:
        """The entry ``family`` runs with: its own, else ``default``."""
        return family if family in self.table else "default"

    def template(self, family: str) -> str | None:
        """The unfilled text ``family`` runs with (None: the dataset refuses it)."""
        return self.table.get(self.key(family))

    def families(self) -> list[str]:
        """The model families this config names (every key but ``default``)."""
        return [k for k in self.table if k != "default"]

    def as_dict(self) -> dict[str, str | None]:
        return dict(self.table)

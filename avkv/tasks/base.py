"""The task contract: load documents from an official on-disk layout, render prompts, parse, score, aggregate.

A task never touches the model or the cache. It yields :class:`Doc` records (media are *paths*, never decoded
here), turns a doc into a :class:`Prompt` (per model family: the prompt text is the dataset config's data), and scores the model's raw text output.

Two rules hold for every task, enforced here once:

* **Sample ids are unique.** :class:`Task` wraps every subclass's ``docs()`` with :func:`unique_ids`: a repeated id
  is a :class:`DatasetError` naming both items (their ``Doc.origin``: file and item). A dataset whose official
  files really repeat an id makes it unique in its loader by a documented rule.
* **Media stay inside the dataset.** A path taken from an index file goes through :func:`inside` (or
  :meth:`Task.media_path`): an absolute path, or one whose ``..`` leaves the dataset root (or the media folder a
  config declares, e.g. ``dataset.video_dir``), is not opened; the doc carries ``error`` and the run records it
  as that sample's error.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from avkv.schema import Doc, Media, Prompt  # noqa: F401 - the task contract's records
from avkv.tasks.prompts import PromptSet


class DatasetError(ValueError):
    """A malformed index file or a missing field: names the file, the item and the field."""


def read_json(path: str | Path, what: str = "index file") -> Any:
    """Parse a JSON file; a missing or malformed file raises :class:`DatasetError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{what} {path} is not valid JSON: {e}") from e


def inside(base: str | Path, rel: Any, what: str = "media path") -> Path:
    """``base/rel`` when ``rel`` (a path taken from dataset text) is relative and stays inside ``base``; else
    :class:`UnsafePath` naming both. The check is lexical (``..`` is resolved, symlinks inside the dataset are
    the dataset's own layout and are followed when the file is opened)."""
    text = str(rel)
    if "\x00" in text:
        raise UnsafePath(f"{what} {text!r} contains a NUL byte")
    if os.path.isabs(text) or text.startswith("~"):
        raise UnsafePath(f"{what} {text!r} is absolute; dataset paths must be relative to {base}")
    root = os.path.normpath(str(base))
    full = os.path.normpath(os.path.join(root, text))
    if full != root and not full.startswith(root.rstrip(os.sep) + os.sep):
        raise UnsafePath(f"{what} {text!r} leaves {base} (resolves to {full})")
    return Path(full)


class UnsafePath(DatasetError):
    """A path from dataset text that points outside the dataset root (or its declared media folder)."""


def unique_ids(docs: Iterable[Doc], task: str = "task") -> Iterator[Doc]:
    """``docs`` as they come, or a :class:`DatasetError` at the first repeated id, naming both items."""
    seen: dict[str, str] = {}
    for k, doc in enumerate(docs):
        sid = str(doc.id)
        here = doc.origin or f"{task} doc #{k}"
        if sid in seen:
            raise DatasetError(f"duplicate sample id {sid!r}: {seen[sid]} and {here} (sample ids must be unique: "
                               f"results are stored and resumed by id)")
        seen[sid] = here
        yield doc


def require(item: Any, key: str, file: str | Path, where: str, types: type | tuple[type, ...] | None = None) -> Any:
    """``item[key]``, or a :class:`DatasetError` naming the file, the item and the field."""
    if not isinstance(item, dict):
        raise DatasetError(f"{file}: item {where} is a {type(item).__name__}, expected an object")
    if key not in item or item[key] is None:
        raise DatasetError(f"{file}: item {where} has no field '{key}'")
    val = item[key]
    if types is not None and (not isinstance(val, types) or (isinstance(val, bool) and bool not in
                                                              (types if isinstance(types, tuple) else (types,)))):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DatasetError(f"{file}: item {where} field '{key}' is {type(val).__name__} {val!r:.60}, expected {names}")
    return val


def record_field(record: dict, key: str) -> Any:
    """A breakdown key from a results record: top level, then ``meta``, then ``scores`` (engine-agnostic)."""
    if key in record:
        return record[key]
    for sub in ("meta", "scores", "score_info"):
        d = record.get(sub)
        if isinstance(d, dict) and key in d:
            return d[key]
    return None


def is_failed(record: dict) -> bool:
    return record.get("error") is not None


class Task:
    """Base class for a dataset (one official layout). Subclasses set ``name`` and implement the five methods."""

    name: str = "task"
    #: the dataset config's per-family prompt text (:mod:`avkv.tasks.prompts`); none given: every family runs
    prompts: PromptSet = PromptSet(None)
    #: the headline metric reported in summaries (e.g. ``accuracy``, ``wer``, ``rouge_l``)
    metric: str = "score"
    higher_is_better: bool = True

    def __init__(self, root: str | Path, limit: int | None = None, **kwargs: Any) -> None:
        self.root = Path(root)
        self.limit = limit

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "docs" in cls.__dict__:                     # every loader's docs() checks its ids (module docstring)
            loader = cls.__dict__["docs"]

            @functools.wraps(loader)
            def docs(self, *a: Any, **k: Any) -> Iterator[Doc]:
                yield from unique_ids(loader(self, *a, **k), getattr(self, "name", cls.__name__))

            docs.__wrapped_by_unique_ids__ = True
            cls.docs = docs

    def docs(self) -> Iterator[Doc]:  # pragma: no cover - interface
        raise NotImplementedError

    def media_path(self, base: str | Path, rel: Any, what: str = "media path") -> tuple[str, str | None]:
        """(path, None) for a dataset-given path inside ``base``, else (the path as given, the error): the doc
        keeps the error and that sample is recorded as failed (:func:`inside`)."""
        try:
            return str(inside(base, rel, what)), None
        except UnsafePath as e:
            return str(rel), str(e)

    def prompt(self, doc: Doc, family: str) -> Prompt:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, doc: Doc, prediction: str) -> dict:  # pragma: no cover - interface
        """Per-sample scoring. Must return at least ``score`` (float) and ``parsed_ok`` (bool)."""
        raise NotImplementedError

    def remember(self, doc: Doc, **keys: Any) -> Doc:
        """Keep a doc's breakdown keys by id, so ``aggregate`` can place a *failed* record (which carries no
        score fields) in its breakdown groups. Returns the doc."""
        self.__dict__.setdefault("_remembered", {})[str(doc.id)] = keys
        return doc

    def field(self, record: dict, key: str) -> Any:
        """A breakdown key of a record: from the record itself, else from what ``remember`` kept for its id."""
        v = record_field(record, key)
        if v is None:
            v = self.__dict__.get("_remembered", {}).get(str(record.get("sample_id")), {}).get(key)
        return v

    def aggregate(self, records: list[dict]) -> dict:
        """Dataset-level metrics from the per-sample records (the default: mean score + parse failures)."""
        ok = [r for r in records if r.get("error") is None]
        scores = [r["score"] for r in ok if r.get("score") is not None]
        return {
            self.metric: (sum(scores) / len(scores)) if scores else None,
            "n": len(records),
            "n_failed": len(records) - len(ok),
            "n_unparsed": sum(1 for r in ok if r.get("parsed_ok") is False),
        }

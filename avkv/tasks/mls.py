"""Multilingual LibriSpeech (OpenSLR 94, Pratap et al. 2020): read audiobooks in French, German, Spanish, ...

Official layout (``root`` is one language folder, ``mls_french`` or ``mls_french_opus``)::

    metainfo.txt                                   SPEAKER | GENDER | PARTITION | MINUTES | BOOK ID | TITLE | CHAPTER
    <split>/transcripts.txt                        lines "<speaker>_<book>_<utt>\\t<lower-case transcript>"
    <split>/segments.txt                           the LibriVox source of every utterance (not read)
    <split>/audio/<speaker>/<book>/<speaker>_<book>_<utt>.flac   (.opus in the *_opus release)

(as read by the corpus' own consumers: lhotse ``recipes/mls.py``, the Hugging Face ``multilingual_librispeech``
loader). Scoring: corpus WER after Whisper's BasicTextNormalizer, the non-English path of Qwen2-Audio's
``evaluate_asr.py`` (lower case, punctuation and symbols to spaces, accents kept), reported by AudioKV as
``max(100 - WER, 0)``; WER per speaker too.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from avkv.tasks.base import DatasetError, Doc, Media
from avkv.tasks.speech_common import ASRTask

ID = re.compile(r"^(\d+)_(\d+)_(\d+)$")


class MLS(ASRTask):
    name = "mls"
    breakdown = "speaker"

    def __init__(self, root: str | Path, split: str = "test", limit: int | None = None, language: str = "fr",
                 audio_ext: str | None = None, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(root, limit, language=language, **kwargs)
        self.split = split
        if name:
            self.name = name
        self.audio_ext = audio_ext or ("opus" if self.root.name.endswith("_opus") else "flac")
        if self.audio_ext not in ("flac", "opus"):
            raise ValueError(f"dataset.audio_ext must be flac or opus, got {self.audio_ext!r}")

    def docs(self) -> Iterator[Doc]:
        sdir = self.root / self.split
        trans = sdir / "transcripts.txt"
        if not trans.is_file():
            raise DatasetError(f"MLS transcripts not found: {trans} (root must be a language folder such as "
                               f"mls_french, holding <split>/transcripts.txt)")
        seen: set[str] = set()
        n = 0
        for ln, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            uid, tab, text = line.partition("\t")
            uid = uid.strip()
            m = ID.match(uid)
            if not m:
                raise DatasetError(f"{trans}: line {ln} field 'id' {uid!r} is not <speaker>_<book>_<utterance>")
            if not tab or not text.strip():
                raise DatasetError(f"{trans}: line {ln} (item {uid}) has no field 'transcript'")
            if uid in seen:
                raise DatasetError(f"{trans}: line {ln} field 'id' repeats {uid}")
            seen.add(uid)
            spk, book = m.group(1), m.group(2)
            audio = sdir / "audio" / spk / book / f"{uid}.{self.audio_ext}"
            yield self.remember(Doc(id=uid, media=[Media("audio", str(audio))], question="", target=text.strip(),
                                    meta={"speaker": spk, "book": book, "language": self.language}), speaker=spk)
            n += 1
            if self.limit is not None and n >= self.limit:
                return
        if not seen:
            raise DatasetError(f"{trans} holds no transcribed utterance")

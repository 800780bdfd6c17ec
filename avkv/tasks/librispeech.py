"""LibriSpeech ASR (openslr 12): ``test-clean`` / ``test-other``, and the long-form variant (AudioKV's regime).

Official layout (``root`` is the ``LibriSpeech`` folder)::

    <split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac      16 kHz mono FLAC
    <split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt           lines "<utt-id> UPPER CASE TRANSCRIPT"
    SPEAKERS.TXT  CHAPTERS.TXT  BOOKS.TXT

Long form (``long_form=true``): each chapter's utterances, in order, are concatenated into segments of
``min_s``..``max_s`` seconds (default 60-120 s, the LibriSpeech-long regime of AudioKV / Qwen2.5-Omni), with the
transcripts joined by spaces. The concatenated FLACs are written once to ``long_dir`` (default: a
``LibriSpeech-long/<split>-<min>-<max>s`` folder beside ``root``) and reused; ``scripts/prepare_librispeech.py``
does the same ahead of a run. A leftover shorter than ``min_s`` at the end of a chapter is dropped. A segment
whose FLACs cannot be read or decoded (a truncated file) costs that segment only: it is recorded as failed with an
error naming the file, and the other segments run.
``chunk_s`` (e.g. 30, the Whisper-style encoders' window) gives a long segment to the model as consecutive audio
clips of at most that length instead of one clip the adapter would cut to its window.

Scoring is Qwen2-Audio's ``evaluate_asr.py`` (== lmms-eval ``asr_wer_utils``): Whisper English normalisation,
then corpus-level WER = sum of edit distances / sum of reference words, reported in percent, per ``source``
(split) too, and AudioKV's ``max(100 - WER, 0)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from avkv.metrics.text import edit_counts
from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task
from avkv.tasks.prompts import PromptSet
from avkv.tasks.speech_common import asr_aggregate

WORDS_PER_S = 2.7          # duration estimate for an utterance whose FLAC header cannot be read


def _read_transcript(path: Path) -> str:
    """A ``*.trans.txt`` as text; bytes that are not UTF-8 are a :class:`DatasetError` naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                           f"LibriSpeech transcripts are UTF-8 text") from None


def _probe(path: Path) -> tuple[float | None, str | None]:
    """(duration in seconds, None), or (None, an error naming the file) when its header cannot be read."""
    import soundfile as sf
    if not Path(path).is_file():
        return None, f"audio file not found: {path}"
    try:
        return float(sf.info(str(path)).duration), None
    except Exception as e:  # noqa: BLE001 - corrupt header
        return None, f"cannot read {path}: {e}"


class LibriSpeech(Task):
    name = "librispeech"
    metric = "wer"
    higher_is_better = False

    def __init__(self, root: str | Path, split: str | list[str] = "test-clean", limit: int | None = None,
                 long_form: bool = False, min_s: float = 60.0, max_s: float = 120.0,
                 long_dir: str | Path | None = None, language: str = "en", max_new_tokens: int | None = None,
                 chunk_s: float | None = None, prompts: Any = None, **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.prompts = PromptSet(prompts, "dataset.prompts")
        self.splits = [split] if isinstance(split, str) else list(split)
        self.long_form = bool(long_form)
        self.min_s, self.max_s = float(min_s), float(max_s)
        if self.long_form and not 0 < self.min_s <= self.max_s:
            raise ValueError(f"long form needs 0 < min_s <= max_s, got {min_s}, {max_s}")
        self.long_dir = Path(long_dir) if long_dir else None
        self.language = language
        self.max_new_tokens = max_new_tokens or (1024 if self.long_form else 256)
        self.chunk_s = float(chunk_s) if chunk_s else None
        if self.long_form:
            self.name = "librispeech_long"

    # ------------------------------------------------------------------------------------------- loading
    def utterances(self, split: str) -> list[dict]:
        """All utterances of one split in (speaker, chapter, utterance) order, from the trans.txt files."""
        sdir = self.root / split
        if not sdir.is_dir():
            raise DatasetError(f"LibriSpeech split folder not found: {sdir} (root must be the LibriSpeech folder)")
        out = []
        for spk in sorted((p for p in sdir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
            for chap in sorted((p for p in spk.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
                trans = chap / f"{spk.name}-{chap.name}.trans.txt"
                if not trans.is_file():
                    raise DatasetError(f"LibriSpeech chapter {chap} has no transcript file {trans.name}")
                for ln, line in enumerate(_read_transcript(trans).splitlines(), 1):
                    if not line.strip():
                        continue
                    uid, _, text = line.strip().partition(" ")
                    if not text.strip():
                        raise DatasetError(f"{trans}: line {ln} (item {uid!r}) has no field 'transcript'")
                    if not uid.startswith(f"{spk.name}-{chap.name}-"):
                        raise DatasetError(f"{trans}: line {ln} field 'utterance id' {uid!r} does not belong to "
                                           f"speaker {spk.name} chapter {chap.name}")
                    out.append({"id": uid, "path": chap / f"{uid}.flac", "text": text.strip(), "split": split,
                                "speaker": spk.name, "chapter": chap.name, "origin": f"{trans}: line {ln}"})
        if not out:
            raise DatasetError(f"LibriSpeech split {sdir} holds no transcribed utterance")
        return out

    def docs(self) -> Iterator[Doc]:
        n = 0
        for split in self.splits:
            utts = self.utterances(split)
            items = self._long_docs(split, utts) if self.long_form else (
                Doc(id=u["id"], media=[Media("audio", str(u["path"]))], question="", target=u["text"],
                    meta={"source": split, "speaker": u["speaker"], "chapter": u["chapter"]}, origin=u["origin"])
                for u in utts)
            for d in items:
                yield self.remember(d, source=split)
                n += 1
                if self.limit is not None and n >= self.limit:
                    return

    # ------------------------------------------------------------------------------------------- long form
    def long_folder(self, split: str) -> Path:
        base = self.long_dir or (self.root.parent / "LibriSpeech-long")
        return base / f"{split}-{self.min_s:g}-{self.max_s:g}s"

    @staticmethod
    def _duration(path: Path) -> float | None:
        return _probe(path)[0]

    def segments(self, utts: list[dict]) -> list[list[dict]]:
        """Group each chapter's consecutive utterances into segments of min_s..max_s seconds."""
        groups: list[list[dict]] = []
        by_chapter: dict[tuple, list[dict]] = {}
        for u in utts:
            by_chapter.setdefault((u["speaker"], u["chapter"]), []).append(u)
        for chapter in by_chapter.values():
            cur: list[dict] = []
            dur = 0.0
            for u in chapter:
                d, u["read_error"] = _probe(u["path"])
                u["duration"] = d
                d = d if d is not None else len(u["text"].split()) / WORDS_PER_S
                if cur and dur + d > self.max_s:
                    if dur >= self.min_s:
                        groups.append(cur)
                    cur, dur = [], 0.0
                cur.append(u)
                dur += d
                if dur >= self.min_s:
                    groups.append(cur)
                    cur, dur = [], 0.0
        return groups

    def _long_docs(self, split: str, utts: list[dict]) -> Iterator[Doc]:
        folder = self.long_folder(split)
        segments = self.segments(utts)
        if not segments:
            longest = max(sum((u["duration"] or 0.0) for u in utts if (u["speaker"], u["chapter"]) == key)
                          for key in {(u["speaker"], u["chapter"]) for u in utts})
            raise DatasetError(f"LibriSpeech {self.root / split}: no chapter reaches min_s={self.min_s:g} s for the "
                               f"long form (longest chapter {longest:.1f} s); lower dataset.min_s/max_s "
                               f"(the fixture's chapters are ~15 s: min_s=6 max_s=12)")
        for seg in segments:
            first, last = seg[0], seg[-1]
            sid = f"{first['id']}-{last['id'].rsplit('-', 1)[1]}"
            target = " ".join(u["text"] for u in seg)
            broken = next((u for u in seg if u.get("duration") is None), None)
            meta = {"source": split, "speaker": first["speaker"], "chapter": first["chapter"],
                    "utterances": [u["id"] for u in seg]}
            error = None
            path: Path = folder / f"{sid}.flac"
            if broken is not None:
                # the concatenation cannot be made: this segment fails, naming the unreadable part
                path, error = broken["path"], broken["read_error"]
                meta["seconds"] = None
            else:
                try:
                    path = self._materialise(path, seg)
                    meta["seconds"] = round(sum(u["duration"] for u in seg), 3)
                except DatasetError as e:            # one undecodable FLAC costs its segment, the run goes on
                    error, meta["seconds"] = str(e), None
            yield Doc(id=sid, media=[Media("audio", str(path))], question="", target=target, meta=meta,
                      origin=f"{first['origin']} .. {last['origin']}",
                      error=error and f"long-form segment {sid}: {error}")

    @staticmethod
    def _materialise(out: Path, seg: list[dict]) -> Path:
        import numpy as np
        import soundfile as sf

        parts = [str(u["path"]) for u in seg]
        side = out.with_suffix(".json")
        if out.is_file() and side.is_file():
            try:
                if json.loads(side.read_text()).get("parts") == parts:
                    return out
            except ValueError:
                pass
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot write the long-form LibriSpeech segments to {out.parent}: {e}; set "
                               f"dataset.long_dir to a writable folder") from e
        audio, sr = [], None
        for p in parts:
            try:
                a, r = sf.read(p, dtype="float32")
            except Exception as e:  # noqa: BLE001 - soundfile's errors do not name the file
                raise DatasetError(f"cannot decode {p}: {e}") from e
            if sr is not None and r != sr:
                raise DatasetError(f"{p}: sample rate {r} differs from {sr} in the same chapter")
            sr = r
            audio.append(a if a.ndim == 1 else a.mean(1))
        tmp = out.with_suffix(".tmp.flac")
        sf.write(str(tmp), np.concatenate(audio), sr, format="FLAC", subtype="PCM_16")
        tmp.replace(out)
        side_tmp = side.with_suffix(".json.tmp")
        side_tmp.write_text(json.dumps({"parts": parts}))
        side_tmp.replace(side)
        return out

    # ------------------------------------------------------------------------------------------- prompt / score
    def prompt(self, doc: Doc, family: str) -> Prompt:
        text = self.prompts.text(family)
        media = list(doc.media)
        secs = doc.meta.get("seconds")
        if self.chunk_s and secs and secs > self.chunk_s and len(media) == 1:
            # consecutive clips of at most chunk_s seconds (e.g. 30 s, Qwen2-Audio's encoder window), in order
            n = int(-(-secs // self.chunk_s))
            media = [Media("audio", media[0].path, start=k * self.chunk_s,
                           end=min((k + 1) * self.chunk_s, secs) if k < n - 1 else None) for k in range(n)]
        return Prompt(context=media, question=text, max_new_tokens=self.max_new_tokens, verbatim=(text,))

    def score(self, doc: Doc, prediction: str) -> dict:
        errors, n = edit_counts(doc.target, prediction or "", self.language)
        return {"score": 100.0 * errors / n if n else float(errors > 0) * 100.0, "parsed_ok": True,
                "parsed": prediction, "errors": errors, "ref_words": n, "source": doc.meta.get("source")}

    def aggregate(self, records: list[dict]) -> dict:
        return asr_aggregate(self, records, "wer", "source")

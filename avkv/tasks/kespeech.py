"""KeSpeech (Tang et al., NeurIPS 2021 Datasets): Mandarin and eight sub-dialects, AudioKV's ZH column.

Official layout (``root`` is the ``KeSpeech`` folder)::

    Audio/<speaker>/<phase1|phase2>/<utt>.wav               16 kHz mono WAV
    Metadata/...                                           speaker and city tables (not read)
    Tasks/ASR/<split>/wav.scp                              "<utt> <path relative to root>"
    Tasks/ASR/<split>/text                                 "<utt> <transcript>"
    Tasks/ASR/<split>/utt2subdialect                       "<utt> <Mandarin|Beijing|Southwestern|...>"
    Tasks/ASR/<split>/utt2spk                              "<utt> <speaker>"

(splits ``test``, ``dev_phase1/2``, ``train_phase1/2``; as lhotse ``recipes/kespeech.py`` reads it, which also drops
``<SPOKEN_NOISE>`` from the transcripts). Scoring: CER, the Chinese path of Qwen2-Audio's ``evaluate_asr.py``:
speechio's text normalisation (numbers read out, punctuation removed; :mod:`avkv.metrics.zh`), lower case,
spaces dropped, characters compared; corpus CER, per sub-dialect too, and AudioKV's ``max(100 - CER, 0)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from avkv.tasks.base import DatasetError, Doc, Media
from avkv.tasks.speech_common import ASRTask, inside, read_kv

NOISE_TAGS = ("<SPOKEN_NOISE>",)


class KeSpeech(ASRTask):
    name = "kespeech"
    breakdown = "subdialect"

    def __init__(self, root: str | Path, split: str = "test", limit: int | None = None, language: str = "zh",
                 **kwargs: Any) -> None:
        super().__init__(root, limit, language=language, **kwargs)
        self.split = split

    def docs(self) -> Iterator[Doc]:
        tdir = self.root / "Tasks" / "ASR" / self.split
        if not tdir.is_dir():
            raise DatasetError(f"KeSpeech split folder not found: {tdir} (root must be the KeSpeech folder)")
        wavs = read_kv(tdir / "wav.scp", "KeSpeech wav.scp")
        texts = read_kv(tdir / "text", "KeSpeech text")
        dialects = read_kv(tdir / "utt2subdialect", "KeSpeech utt2subdialect")
        spk = read_kv(tdir / "utt2spk", "KeSpeech utt2spk")
        n = 0
        for uid, rel in wavs.items():
            for table, what in ((texts, "text"), (dialects, "utt2subdialect")):
                if uid not in table:
                    raise DatasetError(f"{tdir / what}: item {uid} (listed in wav.scp) has no line")
            text = texts[uid]
            for tag in NOISE_TAGS:
                text = text.replace(tag, "")
            path = inside(self.root, rel, tdir / "wav.scp", uid, "path")
            yield self.remember(Doc(id=uid, media=[Media("audio", str(path))], question="", target=text.strip(),
                                    meta={"subdialect": dialects[uid], "speaker": spk.get(uid)}),
                                subdialect=dialects[uid])
            n += 1
            if self.limit is not None and n >= self.limit:
                return
        if not wavs:
            raise DatasetError(f"{tdir / 'wav.scp'} lists no utterance")

"""Spoken question answering, the four UltraEval-Audio sets of AudioKV Table 2: speech-chatbot-alpaca-eval
(S-Alpaca), llama-questions (Llama-Q), speech-triviaqa (S-Trivia) and speech-web-questions (S-Web).

Official layout: the Hugging Face dataset repository UltraEval-Audio loads (``TwinkStart/<name>``), as a snapshot
on disk (``root``)::

    data/<split>-00000-of-0000N.parquet     one row per question: ``audio`` {bytes, path} (the spoken question),
                                            the question text and the reference answer(s)

Columns per set (``question_field`` / ``answer_field`` in the configs; UltraEval-Audio's ``ref_col``):
llama-questions ``Questions`` / ``Answer``; speech-triviaqa ``question`` / ``answer``; speech-web-questions
``question`` / ``answers`` (a list); speech-chatbot-alpaca-eval ``instruction`` / ``output``. Rows are read in
file order (UltraEval numbers them the same way); each row's audio bytes are written once to ``extract_dir``
(``<split>_<row>.<ext>``) so the model adapter reads a file, as for every other dataset.

Prompt: the spoken question alone (UltraEval-Audio's ``direct-aqa``), or the config's per-family text. Scoring:
AudioKV reports binary correctness judged by Gemini-2.5-Flash against the reference answers; avkv asks the judge
of :mod:`avkv.judge` (endpoint from the environment, verdicts cached) with UltraEval-Audio's reference-answer judge
prompt. With no endpoint the prediction is kept, ``judge: pending`` and no score (``python -m avkv.judge RUN``
judges later). ``match: exist`` also records UltraEval-Audio's offline ``qa-exist-match`` (the official metric of
its ``*-s2t`` tasks) for every sample, available without a judge.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from avkv.judge import from_config, judge_aggregate, verdict_fields
from avkv.metrics.qa import exist_match
from avkv.tasks.base import DatasetError, Doc, Media, Prompt, Task, is_failed
from avkv.tasks.prompts import PromptSet
from avkv.tasks.speech_common import inside

AUDIO_EXTS = (".wav", ".mp3", ".flac", ".opus", ".ogg", ".m4a")


class SpeechQA(Task):
    name = "speech_qa"
    metric = "judge_accuracy"

    def __init__(self, root: str | Path, question_field: str = "question", answer_field: str = "answer",
                 split: str = "test", limit: int | None = None, files: str = "data/{split}-*.parquet",
                 extract_dir: str | Path | None = None, prompts: Any = "", match: str | None = None,
                 judge: dict | None = None, max_new_tokens: int | None = 64, name: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(root, limit)
        self.qf, self.af, self.split, self.files = question_field, answer_field, split, files
        self.extract_dir = Path(extract_dir) if extract_dir else self.root.parent / f"{self.root.name}-audio"
        self.prompts = PromptSet(prompts, "dataset.prompts")
        if match not in (None, "exist"):
            raise ValueError(f"dataset.match must be null or 'exist', got {match!r}")
        self.match = match
        self.judge = from_config(judge)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else 64
        if name:
            self.name = name

    def shards(self) -> list[Path]:
        pattern = self.files.format(split=self.split)
        found = sorted(self.root.glob(pattern))
        if not found:
            raise DatasetError(f"no parquet file {pattern} under {self.root} (root must be the dataset snapshot)")
        return found

    def docs(self) -> Iterator[Doc]:
        import pyarrow.parquet as pq

        row = 0
        for shard in self.shards():
            pf = pq.ParquetFile(shard)
            cols = set(pf.schema_arrow.names)
            for c in ("audio", self.qf, self.af):
                if c not in cols:
                    raise DatasetError(f"{shard}: no column '{c}' (columns: {', '.join(sorted(cols))}; set "
                                       f"dataset.question_field / answer_field)")
            for batch in pf.iter_batches(batch_size=64, columns=["audio", self.qf, self.af]):
                for item in batch.to_pylist():
                    where = f"row {row}"
                    q, a = item.get(self.qf), item.get(self.af)
                    if not isinstance(q, str) or not q.strip():
                        raise DatasetError(f"{shard}: {where} has no field '{self.qf}'")
                    if isinstance(a, list):
                        a = [str(x) for x in a if x is not None]
                    if a is None or a == [] or (isinstance(a, str) and not a.strip()):
                        raise DatasetError(f"{shard}: {where} has no field '{self.af}'")
                    sid = f"{self.split}_{row:05d}"
                    path = self._audio_file(item.get("audio"), shard, where, sid)
                    yield Doc(id=sid, media=[Media("audio", str(path))], question=q, target=a,
                              meta={"question_text": q})
                    row += 1
                    if self.limit is not None and row >= self.limit:
                        return

    def _audio_file(self, audio: Any, shard: Path, where: str, sid: str) -> Path:
        if not isinstance(audio, dict):
            raise DatasetError(f"{shard}: {where} field 'audio' is not an audio struct {{bytes, path}}")
        data, name = audio.get("bytes"), audio.get("path") or ""
        if not data:            # a reference to a file in the snapshot instead of embedded bytes
            return inside(self.root, name, shard, where, "audio.path")
        ext = Path(name).suffix.lower()
        out = self.extract_dir / f"{sid}{ext if ext in AUDIO_EXTS else '.wav'}"
        if not (out.is_file() and out.stat().st_size == len(data)):
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(out.suffix + ".tmp")
                tmp.write_bytes(data)
                tmp.replace(out)
            except OSError as e:
                raise DatasetError(f"cannot write the extracted audio to {out.parent}: {e}; set "
                                   f"dataset.extract_dir to a writable folder") from e
        return out

    def prompt(self, doc: Doc, family: str) -> Prompt:
        return Prompt(context=list(doc.media), question=self.prompts.text(family),
                      max_new_tokens=self.max_new_tokens)

    def score(self, doc: Doc, prediction: str) -> dict:
        out: dict = {"parsed_ok": True, "question_text": doc.question}
        if self.match == "exist":
            out["exist_match"] = float(exist_match(prediction or "", doc.target))
        out.update(verdict_fields(self.judge, doc.question, doc.target, prediction or ""))
        return out

    def aggregate(self, records: list[dict]) -> dict:
        agg = judge_aggregate(records)
        ok = [r for r in records if not is_failed(r) and r.get("exist_match") is not None]
        if self.match == "exist":
            agg["exist_match"] = (sum(r["exist_match"] for r in ok) / len(ok)) if ok else None
        agg["n_unparsed"] = 0
        return agg

"""Reading and writing a run directory's files safely: the sample records of a ``samples.jsonl`` (one per sample
id, the last line written for an id wins), atomic whole-file writes, tolerant JSON reads, the torn tail of an
append-only file.

Part of the results contract (:mod:`avkv.results`, which re-exports every name here and is where callers import
them from).
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("avkv")

#: a run directory's files (:mod:`avkv.results` re-exports them; ``run.lock`` is :mod:`avkv.run_lock`'s ``LOCK``)
SAMPLES = "samples.jsonl"
CONFIG = "config.yaml"
META = "meta.json"
SUMMARY = "summary.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def read_json_file(path: Path, what: str = "file") -> tuple[Any, str | None]:
    """(parsed JSON, None), or (None, a message naming the file) when it is missing, empty or unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"{what} {path} not found"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{what} {path} is unreadable: {e}"
    if not text.strip():
        return None, f"{what} {path} is empty"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"{what} {path} is not valid JSON ({e})"


@dataclass
class ReadReport:
    """What :func:`read_records` skipped, by kind, with line numbers (1-based)."""

    path: Path
    lines: int = 0
    torn_tail: bool = False
    not_json: list[int] = field(default_factory=list)
    no_id: list[int] = field(default_factory=list)
    superseded: int = 0

    def problems(self) -> str | None:
        parts = []
        if self.not_json:
            parts.append(f"{len(self.not_json)} line(s) not JSON records (line {_few(self.not_json)})")
        if self.no_id:
            parts.append(f"{len(self.no_id)} record(s) without 'sample_id' (line {_few(self.no_id)})")
        return f"{self.path}: skipped " + "; ".join(parts) if parts else None


def _few(xs: list[int]) -> str:
    return ", ".join(map(str, xs[:5])) + (", ..." if len(xs) > 5 else "")


def read_records(path: str | Path, report: ReadReport | None = None, warn: bool = True) -> list[dict]:
    """The records of a ``samples.jsonl``, one per sample id: the **last** line written for an id wins (a failed
    sample rerun with ``resume.retry_failed`` supersedes its old line), at the position of that last line.

    A torn last line (a kill in the middle of a write) is ignored; a line that is not a JSON object, or a record
    without ``sample_id``, is skipped and reported (a warning naming the file and the lines), never fatal.
    """
    path = Path(path)
    rep = report if report is not None else ReadReport(path)
    out: "OrderedDict[str, dict]" = OrderedDict()
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        rep.torn_tail = True
    for n, raw in enumerate(lines, 1):
        rep.lines += 1
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if not (rep.torn_tail and n == len(lines)):
                rep.not_json.append(n)
            continue
        if not isinstance(rec, dict):
            rep.not_json.append(n)
            continue
        if rec.get("sample_id") is None:
            rep.no_id.append(n)
            continue
        sid = str(rec["sample_id"])
        if sid in out:
            rep.superseded += 1
            del out[sid]
        out[sid] = rec
    msg = rep.problems()
    if msg and warn:
        log.warning(msg)
    return list(out.values())


def is_failed(record: Mapping) -> bool:
    return record.get("error") is not None


def tail_after_last_newline(path: Path, chunk: int = 1 << 16) -> tuple[int, bytes]:
    """(offset just after the last ``\\n``, the bytes after it), reading the file backwards in chunks."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = pos = f.tell()
        tail = b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                return pos + i + 1, block[i + 1:] + tail
            tail = block + tail
        return 0, tail if end else b""

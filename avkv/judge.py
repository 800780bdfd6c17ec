"""An LLM judge behind any OpenAI-compatible chat endpoint, for the speech-QA sets (AudioKV Table 2).

Where it points comes from the environment only, so nothing secret is ever in a config, a record or a log:

* ``AVKV_JUDGE_BASE_URL``  e.g. ``https://generativelanguage.googleapis.com/v1beta/openai`` (``/chat/completions``
  is appended);
* ``AVKV_JUDGE_MODEL``     e.g. ``gemini-2.5-flash`` (the paper's judge); recorded with every verdict;
* ``AVKV_JUDGE_API_KEY``   sent as ``Authorization: Bearer``; never stored, printed or put in an error.

The prompt is data (``configs/judge/<name>.yaml``: template, fields, parse rule, source). Verdicts are cached on
disk by (prompt, judge model, question, reference answer, model answer), so a rerun, a resumed run or a later
``judge_run`` costs no request for a pair already judged. Without an endpoint a task records its predictions with
``judge: pending`` and no score; :func:`judge_run` (for ``avkv report`` and ``python -m avkv.judge RUN_DIR``)
judges the pending records of a run directory later and rewrites its summary.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from avkv.config import CONFIG_DIR

ENV_BASE_URL, ENV_MODEL, ENV_KEY = "AVKV_JUDGE_BASE_URL", "AVKV_JUDGE_MODEL", "AVKV_JUDGE_API_KEY"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "judge"
PARSERS = ("last_line_yes_no",)


class JudgeError(RuntimeError):
    pass


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    template: str
    fields: tuple[str, ...]
    parse: str
    temperature: float = 0.0
    source: str = ""

    @classmethod
    def load(cls, name_or_path: str | Path) -> "JudgePrompt":
        p = Path(name_or_path)
        if not p.suffix:
            p = CONFIG_DIR / "judge" / f"{name_or_path}.yaml"
        if not p.is_file():
            raise FileNotFoundError(f"judge prompt not found: {p}")
        from omegaconf import OmegaConf
        d = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
        for k in ("name", "template", "fields", "parse"):
            if k not in d:
                raise ValueError(f"{p}: judge prompt has no field '{k}'")
        if d["parse"] not in PARSERS:
            raise ValueError(f"{p}: field 'parse' = {d['parse']!r}; known: {', '.join(PARSERS)}")
        return cls(str(d["name"]), str(d["template"]), tuple(d["fields"]), str(d["parse"]),
                   float(d.get("temperature", 0.0)), json.dumps(d.get("source", ""), sort_keys=True))

    def render(self, **values: str) -> str:
        text = self.template
        for k in self.fields:                       # in order, plain replacement (as the reference does)
            text = text.replace("{" + k + "}", str(values[k]))
        return text

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.template, self.fields, self.parse]).encode()).hexdigest()[:16]


def parse_verdict(reply: str, rule: str) -> int:
    """``last_line_yes_no``: the reply's last line holds "yes" → 1, else "no" → 0 (substrings, any case)."""
    if rule == "last_line_yes_no":
        last = reply.strip().split("\n")[-1].lower()
        if "yes" in last:
            return 1
        if "no" in last:
            return 0
        raise JudgeError(f"the judge's reply has no yes/no on its last line: {reply[-200:]!r}")
    raise ValueError(f"unknown parse rule {rule!r}")


def answer_text(answer: Any) -> str:
    """A reference answer as the judge sees it: a list of accepted answers joined by ' / '."""
    if isinstance(answer, (list, tuple)):
        return " / ".join(str(a) for a in answer)
    return str(answer)


class Judge:
    """One judge model behind one endpoint, with its verdict cache."""

    def __init__(self, prompt: JudgePrompt | str = "ultraeval_ref_qa", base_url: str | None = None,
                 model: str | None = None, api_key: str | None = None, cache_dir: str | Path | None = None,
                 timeout: float = 60.0, retries: int = 3, max_tokens: int | None = None) -> None:
        self.prompt = prompt if isinstance(prompt, JudgePrompt) else JudgePrompt.load(prompt)
        self.base_url = (base_url if base_url is not None else os.environ.get(ENV_BASE_URL, "")).rstrip("/")
        self.model = model if model is not None else os.environ.get(ENV_MODEL, "")
        self._key = api_key if api_key is not None else os.environ.get(ENV_KEY, "")
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.timeout, self.retries, self.max_tokens = float(timeout), int(retries), max_tokens
        self.requests = 0                           # HTTP requests sent (cache hits send none)

    @property
    def available(self) -> bool:
        return bool(self.base_url and self.model)

    def __repr__(self) -> str:                      # never shows the key
        return f"Judge(model={self.model!r}, prompt={self.prompt.name!r}, available={self.available})"

    # ------------------------------------------------------------------------------------------ cache
    def key(self, question: str, answer: str, prediction: str) -> str:
        blob = json.dumps([self.prompt.name, self.prompt.digest(), self.model, question, answer, prediction],
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def cached(self, question: str, answer: str, prediction: str) -> dict | None:
        p = self._cache_path(self.key(question, answer, prediction))
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _store(self, key: str, entry: dict) -> None:
        p = self._cache_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entry, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, p)

    # ------------------------------------------------------------------------------------------ judging
    def _ask(self, text: str) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": text}],
                                "temperature": self.prompt.temperature}
        if self.max_tokens:
            body["max_tokens"] = int(self.max_tokens)
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        last = ""
        for attempt in range(max(self.retries, 1)):
            self.requests += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return str(data["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in (408, 429, 500, 502, 503, 504):
                    break
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                last = type(e).__name__
            except (KeyError, IndexError, TypeError, ValueError):
                raise JudgeError(f"the judge endpoint's reply is not a chat completion (model {self.model})")
            if attempt + 1 < self.retries:
                time.sleep(min(2.0 ** attempt * 0.5, 8.0))
        raise JudgeError(f"the judge endpoint failed ({last}) for model {self.model}")

    def judge(self, question: str, answer: Any, prediction: str) -> dict:
        """``{verdict: 0|1, judge_model, judge_prompt, judge_reply, judge_cached}``; the cache is read first."""
        if not self.available:
            raise JudgeError(f"no judge endpoint: set {ENV_BASE_URL} and {ENV_MODEL} (and {ENV_KEY})")
        ans = answer_text(answer)
        key = self.key(question, ans, prediction)
        hit = self.cached(question, ans, prediction)
        if hit is not None:
            return {**{k: hit[k] for k in ("verdict", "judge_model", "judge_prompt", "judge_reply")},
                    "judge_cached": True}
        reply = self._ask(self.prompt.render(question=question, prediction=prediction, answer=ans))
        entry = {"verdict": parse_verdict(reply, self.prompt.parse), "judge_model": self.model,
                 "judge_prompt": self.prompt.name, "judge_reply": reply[-2000:]}
        self._store(key, {**entry, "question": question, "answer": ans, "prediction": prediction})
        return {**entry, "judge_cached": False}


def from_config(cfg: dict | None) -> Judge:
    """A judge from a dataset config's ``judge`` block (prompt, cache_dir, timeout; endpoint from the env)."""
    cfg = dict(cfg or {})
    allowed = {"prompt", "cache_dir", "timeout", "retries", "max_tokens"}
    bad = sorted(set(cfg) - allowed)
    if bad:
        raise ValueError(f"dataset.judge: unknown keys {bad} (the endpoint, model and key come from the "
                         f"environment: {ENV_BASE_URL}, {ENV_MODEL}, {ENV_KEY})")
    return Judge(prompt=cfg.get("prompt", "ultraeval_ref_qa"), cache_dir=cfg.get("cache_dir"),
                 timeout=float(cfg.get("timeout", 60.0)), retries=int(cfg.get("retries", 3)),
                 max_tokens=cfg.get("max_tokens"))


def verdict_fields(judge: Judge, question: str, answer: Any, prediction: str) -> dict:
    """The record fields of one judged sample (score = verdict), or the pending marker without an endpoint."""
    if not judge.available:
        return {"score": None, "judge": "pending", "judge_prompt": judge.prompt.name}
    v = judge.judge(question, answer, prediction)
    return {"score": float(v["verdict"]), "judge": "done", **v}


# ------------------------------------------------------------------------------------------ later judging
def judge_run(run_dir: str | Path, judge: Judge | None = None) -> dict:
    """Judge the pending records of one run directory (its ``samples.jsonl``), rewrite it atomically and update
    ``summary.json``'s judge accuracy. Returns ``{n_judged, n_pending, n_failed, judge_accuracy}``."""
    from avkv.records import SAMPLES, SUMMARY, atomic_write_text, read_records

    run_dir = Path(run_dir)
    samples = run_dir / SAMPLES
    records = read_records(samples)
    if judge is None:
        prompt = next((r.get("judge_prompt") for r in records if r.get("judge_prompt")), "ultraeval_ref_qa")
        judge = Judge(prompt=prompt)
    n_judged = 0
    for r in records:
        if r.get("judge") != "pending" or r.get("error"):
            continue
        if not judge.available:
            break
        try:
            r.update(verdict_fields(judge, str(r.get("question_text") or ""), r.get("target"),
                                    str(r.get("prediction") or "")))
            n_judged += 1
        except JudgeError as e:
            r["judge_error"] = str(e)
    atomic_write_text(samples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    agg = judge_aggregate(records)
    summ = run_dir / SUMMARY
    if summ.is_file():
        s = json.loads(summ.read_text())
        s.setdefault("task", {}).update(agg)
        if s.get("metric") == "judge_accuracy":
            s["score"] = agg["judge_accuracy"]
        atomic_write_text(summ, json.dumps(s, indent=2))
    return {"n_judged": n_judged, **{k: agg[k] for k in ("n_pending", "n_failed", "judge_accuracy")}}


def judge_aggregate(records: list[dict]) -> dict:
    """Judge accuracy over the judged records; pending ones are counted, never scored."""
    ok = [r for r in records if not r.get("error")]
    done = [r for r in ok if r.get("judge") == "done" and r.get("score") is not None]
    pending = [r for r in ok if r.get("judge") == "pending"]
    return {"judge_accuracy": (sum(float(r["score"]) for r in done) / len(done)) if done else None,
            "n_judged": len(done), "n_pending": len(pending), "n": len(records),
            "n_failed": len(records) - len(ok)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avkv.judge", description="Judge the pending speech-QA records "
                                 f"of run directories (endpoint from {ENV_BASE_URL}, {ENV_MODEL}, {ENV_KEY}).")
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--prompt", default=None, help="judge prompt (configs/judge/<name>.yaml)")
    a = ap.parse_args(argv)
    judge = Judge(prompt=a.prompt) if a.prompt else None
    if judge is not None and not judge.available:
        print(f"no judge endpoint: set {ENV_BASE_URL} and {ENV_MODEL}", file=sys.stderr)
        return 2
    for d in a.run_dirs:
        print(d, judge_run(d, judge))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The LLM judge (avkv/judge.py) against a local fake OpenAI-compatible endpoint (stdlib http.server on the
loopback only): verdicts, the cache (a rerun sends no request), the key kept out of records and cache, pending
records judged later, endpoint errors recorded per sample."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from avkv.judge import ENV_BASE_URL, ENV_KEY, ENV_MODEL, Judge, JudgeError, judge_run

KEY = "sk-test-do-not-store-0123456789"


class FakeJudge:
    """Answers "Result: yes" when the model answer contains the reference answer, else "Result: no"."""

    def __init__(self, fail_with: int | None = None):
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.fail_with = fail_with
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.auth.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                if outer.fail_with:
                    self.send_response(outer.fail_with)
                    self.end_headers()
                    return
                text = body["messages"][0]["content"]
                task = text.split("Task:")[-1]
                answer = task.split("Model Answer:")[1].split("Ground Truth Answer:")[0].strip().lower()
                truth = task.split("Ground Truth Answer:")[1].split("Output:")[0].strip().lower()
                ok = any(t.strip() and t.strip() in answer for t in truth.split(" / "))
                reply = {"choices": [{"message": {"role": "assistant",
                                                  "content": f"Explanation: compared.\nResult: {'yes' if ok else 'no'}"}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    with FakeJudge() as f:
        yield f


def test_verdicts_and_cache(fake, tmp_path):
    j = Judge(base_url=fake.url, model="fake-judge", api_key=KEY, cache_dir=tmp_path, retries=1)
    assert j.judge("Capital of France?", "Paris", "It is Paris.")["verdict"] == 1
    assert j.judge("Capital of France?", ["Lyon", "Marseille"], "It is Paris.")["verdict"] == 0
    assert len(fake.requests) == 2 and fake.auth == [f"Bearer {KEY}"] * 2
    assert fake.requests[0]["model"] == "fake-judge" and fake.requests[0]["temperature"] == 0
    again = Judge(base_url=fake.url, model="fake-judge", api_key=KEY, cache_dir=tmp_path)
    v = again.judge("Capital of France?", "Paris", "It is Paris.")
    assert v["verdict"] == 1 and v["judge_cached"] and len(fake.requests) == 2 and again.requests == 0
    other = Judge(base_url=fake.url, model="other-judge", api_key=KEY, cache_dir=tmp_path)
    other.judge("Capital of France?", "Paris", "It is Paris.")      # another judge model is not a cache hit
    assert len(fake.requests) == 3
    blob = "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    assert KEY not in blob and "Paris" in blob
    assert KEY not in repr(again)


def test_endpoint_errors_name_the_model_not_the_key(tmp_path):
    with FakeJudge(fail_with=401) as f:
        j = Judge(base_url=f.url, model="m", api_key=KEY, cache_dir=tmp_path, retries=3)
        with pytest.raises(JudgeError, match="HTTP 401") as e:
            j.judge("q", "a", "p")
        assert KEY not in str(e.value) and len(f.requests) == 1       # 401 is not retried
    with FakeJudge(fail_with=503) as f:
        j = Judge(base_url=f.url, model="m", api_key=KEY, cache_dir=tmp_path, retries=2)
        with pytest.raises(JudgeError, match="HTTP 503"):
            j.judge("q", "a", "p")
        assert len(f.requests) == 2
    with pytest.raises(JudgeError, match="no judge endpoint"):
        Judge(base_url="", model="", cache_dir=tmp_path).judge("q", "a", "p")


@pytest.mark.slow
def test_run_pending_then_judged_later_then_inline(fake, tmp_path, monkeypatch):
    from tests.tasks.test_speech_datasets import _run

    for var in (ENV_BASE_URL, ENV_MODEL, ENV_KEY):
        monkeypatch.delenv(var, raising=False)
    recs, s = _run(tmp_path / "a", "tiny_qwen2_5_omni", "speech_web_questions")
    assert s["score"] is None and all(r["judge"] == "pending" for r in recs)
    run_dir = Path(s["run_dir"])
    # an endpoint appears later: judge the pending records of the run directory
    monkeypatch.setenv(ENV_BASE_URL, fake.url)
    monkeypatch.setenv(ENV_MODEL, "fake-judge")
    monkeypatch.setenv(ENV_KEY, KEY)
    out = judge_run(run_dir, Judge(cache_dir=tmp_path / "jc"))
    assert out["n_judged"] == len(recs) and out["n_pending"] == 0 and len(fake.requests) == len(recs)
    later = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(r["judge"] == "done" and r["score"] in (0.0, 1.0) and r["judge_model"] == "fake-judge"
               for r in later)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["score"] == out["judge_accuracy"] == summary["task"]["judge_accuracy"]
    # a fresh run with the endpoint set judges inline; the same pairs come from the cache
    recs2, s2 = _run(tmp_path / "b", "tiny_qwen2_5_omni", "speech_web_questions",
                     f"dataset.judge.cache_dir={tmp_path / 'jc'}")
    assert len(fake.requests) == len(recs)                            # every verdict was cached
    assert all(r["judge"] == "done" and r["judge_cached"] for r in recs2)
    assert s2["score"] == summary["score"]
    for d in (run_dir, Path(s2["run_dir"])):
        for f in d.iterdir():
            assert KEY not in f.read_text(errors="replace"), f


@pytest.mark.slow
def test_judge_failure_is_that_samples_error(tmp_path, monkeypatch):
    from tests.tasks.test_speech_datasets import _run

    with FakeJudge(fail_with=500) as f:
        monkeypatch.setenv(ENV_BASE_URL, f.url)
        monkeypatch.setenv(ENV_MODEL, "fake-judge")
        monkeypatch.delenv(ENV_KEY, raising=False)
        recs, s = _run(tmp_path, "tiny_qwen2_audio", "llama_questions", "dataset.judge.retries=1")
    assert len(recs) == 3 and all("JudgeError" in r["error"] and r["prediction"] is not None for r in recs)
    assert s["task"]["n_failed"] == 3


def test_unknown_judge_keys_are_refused(fixture_root):
    from avkv.config import compose, instantiate

    cfg = compose(["dataset=llama_questions", f"paths.fixtures={fixture_root}", "+dataset.judge.api_key=x"])
    with pytest.raises(Exception, match="dataset.judge: unknown keys .'api_key'."):
        instantiate(cfg.dataset)

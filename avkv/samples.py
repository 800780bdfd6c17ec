"""The samples of a run: prompt → encode → generate → score → one record per sample, one at a time or in batches.

A sample's record is built by the same two steps whatever the batch size: :func:`begin` (the prompt the dataset
config renders for the model family, the encode, the sample's seed and answer length; a failure there is the
sample's error) and :func:`finish` (prediction, score, the generation's record, fidelity). Between them
:func:`run_sample` calls :meth:`Engine.generate <avkv.engine.Engine.generate>` (batch size 1) and
:func:`run_batches` calls :func:`avkv.batching.generate_batch` on up to ``batch_size`` consecutive pending samples.

Batches (``batch_size`` > 1):

* a sample whose prompt fails (the loader refused it, the media do not decode, the family is refused) is recorded
  with its error and the rest of its batch goes on without it;
* a batch whose generation raises (one sample's budget keeps fewer entries than its uncompressed suffix, ...) is
  run again one sample at a time (each a batch of one), so that sample gets its own error and the others their
  results;
* the records of a batch are appended once the batch is done, in dataset order: a killed run loses at most the
  batch in flight and resumes at its first sample, never duplicating one;
* a method or model that cannot decode as a batch (:func:`avkv.batching.check_batchable`) is refused before the
  run starts (:func:`batch_problem`: from the config, before anything loads; :func:`require_batchable`: on the
  loaded engine), naming the method and ``batch_size``.

Prompts are prefilled one sample at a time (not left-padded into one batched prefill): compression is per sample
(its own split point, positions, budget and kept entries), and a sample's record — prediction, score, what it kept
— is then what it is at batch size 1 (``tests/test_experiment.py``). Timing fields of a batched sample are the
batch's where they are shared (``decode_s``, ``decode_s_per_token``, ``peak_mem_bytes``; see
:mod:`avkv.batching`); ``wall_s`` is the sample's own prompt and encode time plus its 1/B share of the batch's
generation.
"""
from __future__ import annotations

import hashlib
import logging
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

from avkv.batching import check_batchable, generate_batch
from avkv.config import ConfigError, Problem
from avkv.engine import Engine
from avkv.measure import Stopwatch

log = logging.getLogger("avkv")
DEFAULT_MAX_NEW_TOKENS = 16


def sample_seed(seed: int, sample_id: str) -> int:
    return (int(seed) + int(hashlib.sha256(str(sample_id).encode()).hexdigest()[:8], 16)) % (2**31 - 1)


def build_prompt(task, adapter, doc):
    """The prompt of ``doc`` for ``adapter``'s model family: where a task meets a model. The dataset config may
    refuse the family (``prompts.<family>: null``, or no entry and no default); the task writes the prompt text
    of the family; the adapter fits the media to what the model takes (:meth:`ModelAdapter.fit_prompt`)."""
    why = task.prompts.refusal(adapter.family)
    if why:
        raise ValueError(f"{task.name}: {why}")
    return adapter.fit_prompt(task.prompt(doc, adapter.family))


# ------------------------------------------------------------------------------------------------ one sample
@dataclass
class Pending:
    """A sample between :func:`begin` and :func:`finish`: its record so far and, unless it failed, its encoding."""
    doc: Any
    rec: dict
    watch: Stopwatch                 # started when the sample begins: its ``wall_s``
    enc: Any = None
    max_new: int = 0
    seed: int = 0
    processor_s: float = 0.0

    @property
    def failed(self) -> bool:
        return self.rec["error"] is not None


def _fail(rec: dict, e: BaseException) -> None:
    rec["error"] = f"{type(e).__name__}: {e}"
    rec["traceback"] = traceback.format_exc(limit=6)
    log.warning("sample %s failed: %s", rec["sample_id"], rec["error"])


def begin(cfg: DictConfig, task, adapter, doc) -> Pending:
    """The sample's prompt and encoding (a failure is recorded in ``rec``, never raised)."""
    rec: dict = {"sample_id": str(doc.id), "target": doc.target, "prediction": None, "score": None, "error": None}
    p = Pending(doc, rec, Stopwatch())
    if getattr(doc, "error", None):                 # the loader refused it (a path outside the dataset, ...)
        rec["error"] = f"DatasetError: {doc.error}"
        rec["wall_s"] = 0.0
        log.warning("sample %s failed: %s", doc.id, rec["error"])
        return p
    try:
        prompt = build_prompt(task, adapter, doc)
        with Stopwatch() as encode:
            p.enc = adapter.encode(prompt)
        # the encode beyond the media decode (media_s): chat template, tokenizer, image/video/audio processors
        p.processor_s = max(0.0, encode.s - float(p.enc.media_s or 0.0))
        p.max_new = int(cfg.get("max_new_tokens") or prompt.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        p.seed = sample_seed(int(cfg.seed), str(doc.id))
    except Exception as e:  # a broken sample is data, not a crash
        _fail(rec, e)
    rec["wall_s"] = p.watch.s      # so far (run_sample: the whole sample)
    return p


def finish(cfg: DictConfig, task, engine: Engine, p: Pending, gen) -> dict:
    """The record of a generated sample: prediction, score, the generation's fields, fidelity when asked."""
    rec = p.rec
    try:
        rec["prediction"] = gen.text
        rec.update(task.score(p.doc, gen.text))
        rec.update(gen.record)
        rec["processor_s"] = p.processor_s
        if cfg.get("fidelity"):
            rec.update(engine.fidelity(p.enc, gen, seed=p.seed, max_new_tokens=p.max_new))
    except Exception as e:  # noqa: BLE001
        _fail(rec, e)
    return rec


def run_sample(cfg: DictConfig, task, adapter, engine: Engine, doc) -> dict:
    """One sample; any failure is recorded with its error and never stops the run."""
    p = begin(cfg, task, adapter, doc)
    if p.failed:
        return p.rec
    try:
        gen = engine.generate(p.enc, seed=p.seed, max_new_tokens=p.max_new)
    except Exception as e:  # a broken sample is data, not a crash
        _fail(p.rec, e)
    else:
        finish(cfg, task, engine, p, gen)
    p.rec["wall_s"] = p.watch.s
    return p.rec


# ------------------------------------------------------------------------------------------------ batches
def batch_size(cfg: DictConfig) -> int:
    return int(OmegaConf.select(cfg, "batch_size", default=1) or 1)


def batch_problem(cfg: DictConfig, method) -> Problem | None:
    """Why the config's method or model cannot run at its ``batch_size`` (None when it can, or at batch size 1);
    checked from the config alone, before anything loads."""
    bs = batch_size(cfg)
    if bs == 1:
        return None
    name = getattr(method, "name", type(method).__name__)
    if getattr(method, "decode_policy", "grow") == "fixed" and not method.is_noop():
        return Problem("batch_size", bs, f"method {name!r} evicts during decoding (decode_policy=fixed), which "
                                         "the batched decode does not implement; use batch_size=1")
    target = OmegaConf.select(cfg, "model._target_", default=None)
    if isinstance(target, str):
        from hydra.utils import get_class
        from avkv.models.native_adapter import NativeAdapter
        try:
            native = issubclass(get_class(target), NativeAdapter)
        except Exception:  # noqa: BLE001 - an unimportable model class is reported when it loads
            native = False
        if native:
            return Problem("batch_size", bs, f"model {OmegaConf.select(cfg, 'model.name', default=target)!r} is a "
                                             f"native port (its decoder does not use transformers' attention "
                                             f"interface), which the batched decode does not run (method {name!r}); "
                                             "use batch_size=1")
    return None


def require_batchable(engine: Engine, method, bs: int) -> None:
    """:func:`avkv.batching.check_batchable` on the loaded engine, as a :class:`ConfigError` naming the method and
    ``batch_size``."""
    if bs == 1:
        return
    try:
        check_batchable(engine, method)
    except Exception as e:  # noqa: BLE001 - CompressionError, with the reason
        raise ConfigError([Problem("batch_size", bs, f"method {getattr(method, 'name', method)!r}: {e}")]) from None


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for x in items:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _generate(cfg, task, engine: Engine, ready: list[Pending]) -> None:
    """Generate ``ready`` as one batch and finish their records; on a failure of the batch, one at a time."""
    watch = Stopwatch()
    try:
        gens = generate_batch(engine, [p.enc for p in ready], seeds=[p.seed for p in ready],
                              max_new_tokens=[p.max_new for p in ready])
    except Exception as e:  # noqa: BLE001 - find the sample(s) it was: each alone
        if len(ready) == 1:
            _fail(ready[0].rec, e)
            return
        log.warning("a batch of %d failed (%s: %s): running its samples one at a time", len(ready),
                    type(e).__name__, e)
        for p in ready:
            _generate(cfg, task, engine, [p])
        return
    share = watch.s / len(ready)
    for p, gen in zip(ready, gens):
        finish(cfg, task, engine, p, gen)
        p.rec["wall_s"] += share


def run_batches(cfg: DictConfig, task, adapter, engine: Engine, docs: Iterable, size: int) -> Iterator[dict]:
    """The records of ``docs`` (in order) run ``size`` at a time through :func:`avkv.batching.generate_batch`; a
    batch's records are yielded once it is done (see the module docstring)."""
    for chunk in _chunks(docs, size):
        pending = [begin(cfg, task, adapter, d) for d in chunk]
        ready = [p for p in pending if not p.failed]
        if ready:
            _generate(cfg, task, engine, ready)
        for p in pending:
            yield p.rec


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "Pending", "batch_problem", "batch_size", "begin", "build_prompt", "finish",
           "require_batchable", "run_batches", "run_sample", "sample_seed"]

"""The Python API: :func:`run` (one experiment, as ``avkv run`` does) and :class:`Harness` (a model loaded once,
any method and budget over a list of documents, records back as a DataFrame).

Both go through the code ``avkv run`` uses: the config is composed from ``configs/`` (the clone's, or the package
data of an installed avkv) and validated; a sample is run by :func:`avkv.experiment.run_sample` with the engine of
:func:`avkv.experiment.make_engine`. :func:`run` writes the results store like the command line (resume, one
writer); :class:`Harness` keeps its records in memory (write them with ``DataFrame.to_parquet`` if needed).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from avkv.config import compose, instantiate


def _as_overrides(overrides: Sequence[str] | Mapping[str, Any] | None, kw: Mapping[str, Any]) -> list[str]:
    """``["method=snapkv"]`` or ``{"method": "snapkv", "budget": 0.2}`` (and keyword arguments) → override strings."""
    out: list[str] = []
    if isinstance(overrides, Mapping):
        out += [f"{k}={_value(v)}" for k, v in overrides.items()]
    elif overrides is not None:
        if isinstance(overrides, str):
            raise TypeError("overrides: a list of 'key=value' strings or a dict, not one string")
        out += [str(o) for o in overrides]
    out += [f"{k}={_value(v)}" for k, v in kw.items()]
    return out


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def run(overrides: Sequence[str] | Mapping[str, Any] | None = None, **kw: Any) -> dict:
    """One experiment, exactly as ``avkv run <overrides>``: returns its summary (``run_dir`` holds the records).

    ``avkv.run(["method=snapkv", "budget=0.2"])``, ``avkv.run({"method": "snapkv"}, budget=0.2)``. An unknown key
    raises :class:`avkv.config.OverrideError`, a bad value :class:`avkv.config.ConfigError`, before anything loads.
    """
    from avkv.config import require_known_overrides
    from avkv.experiment import run as _run
    args = _as_overrides(overrides, kw)
    require_known_overrides(args)
    return _run(compose(args))


class Harness:
    """A model adapter loaded once; :meth:`run` evaluates any method and budget on documents.

    >>> h = Harness(model="proxy_av")
    >>> docs = h.docs(dataset="proxy_av", limit=4)
    >>> df = pd.concat([h.run(method=m, budget=0.2, docs=docs) for m in ("snapkv", "random")])
    >>> df.groupby("method")["score"].mean()
    """

    def __init__(self, model: str = "proxy_av", device: str = "cpu",
                 overrides: Sequence[str] | Mapping[str, Any] | None = None, **kw: Any):
        from avkv.config import require_known_overrides
        from avkv.experiment import check_environment, load_adapter, setup_torch
        self.base = [f"model={model}", f"device={device}", *_as_overrides(overrides, kw)]
        require_known_overrides(self.base)
        cfg = compose(self.base)
        check_environment(cfg)
        setup_torch(cfg)
        self.model_name = model
        self.adapter = load_adapter(cfg)

    def config(self, overrides: Sequence[str] = ()):
        """The composed, validated config of this harness plus ``overrides`` (the model keys are fixed)."""
        from avkv.config import require_known_overrides
        extra = list(overrides)
        if any(o.lstrip("+~").split("=")[0].split(".")[0] == "model" for o in extra):
            raise ValueError("the model is loaded once per Harness: make another Harness for another model")
        require_known_overrides([*self.base, *extra])
        return compose([*self.base, *extra])

    def _dataset_overrides(self, dataset: str | None, limit: int | None, overrides: Sequence[str]) -> list[str]:
        out = [f"dataset={dataset}"] if dataset else []
        if limit is not None:
            out.append(f"dataset.limit={limit}")
        return [*out, *overrides]

    def task(self, dataset: str | None = None, limit: int | None = None, overrides: Sequence[str] = ()):
        from avkv.experiment import ensure_fixture
        cfg = self.config(self._dataset_overrides(dataset, limit, overrides))
        ensure_fixture(cfg)
        return instantiate(cfg.dataset)

    def docs(self, dataset: str | None = None, limit: int | None = None, overrides: Sequence[str] = ()) -> list:
        """The dataset's documents (``dataset.limit`` and ``dataset.limit_per_task`` apply), to pass to
        :meth:`run` for several methods."""
        from avkv.experiment import ensure_fixture, load_task
        cfg = self.config(self._dataset_overrides(dataset, limit, overrides))
        ensure_fixture(cfg)
        return load_task(cfg)[1]

    def run(self, method: str = "snapkv", budget: float = 0.2, docs: Iterable | None = None,
            dataset: str | None = None, limit: int | None = None, compress_at: str = "question",
            overrides: Sequence[str] = (), progress: bool = False) -> pd.DataFrame:
        """Run ``method`` at ``budget`` on ``docs`` (default: the dataset's documents); one row per sample: the
        record ``avkv run`` would append to ``samples.jsonl``, plus ``model``, ``method``, ``budget``."""
        from avkv.experiment import make_engine, progress_bar, run_sample
        from avkv.tasks.base import DatasetError
        extra = [f"method={method}", f"budget={budget}", f"compress_at={compress_at}",
                 *self._dataset_overrides(dataset, limit, overrides)]
        cfg = self.config(extra)
        from avkv.experiment import ensure_fixture
        ensure_fixture(cfg)
        from avkv.experiment import load_task
        task, all_docs = load_task(cfg)
        docs = all_docs if docs is None else list(docs)
        if not docs:
            raise DatasetError("no documents to run (an empty list, or dataset.limit/filters leave nothing)")
        meth = instantiate(cfg.method)
        engine = make_engine(cfg, self.adapter, meth)
        from avkv.samples import batch_problem, batch_size, require_batchable, run_batches
        bs = batch_size(cfg)                        # overrides=["batch_size=4"]: as `avkv run` batches
        if batch_problem(cfg, meth) is not None:
            from avkv.config import ConfigError
            raise ConfigError([batch_problem(cfg, meth)])
        require_batchable(engine, meth, bs)
        items = progress_bar(docs, progress, method)
        rows = ([run_sample(cfg, task, self.adapter, engine, d) for d in items] if bs == 1
                else list(run_batches(cfg, task, self.adapter, engine, items, bs)))
        df = pd.DataFrame(rows)
        df.insert(0, "budget", float(cfg.budget))
        df.insert(0, "method", getattr(meth, "name", method))
        df.insert(0, "model", self.model_name)
        return df

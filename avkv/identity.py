"""A run's identity: which resolved config keys name its run directory (re-exported by :mod:`avkv.results`).

The identity is the resolved config less what does not change a sample's result: presentation and bookkeeping keys
(:data:`NOT_IDENTITY`: logger, paths, progress, where the run is written, how the grid was assembled —
``grid``/``experiment``/``smoke``/``experiment_name`` — and resume behaviour) and the descriptive keys of the
model/dataset/method groups (:data:`DESCRIPTIVE_KEYS`). ``batch_size`` enters only when it is not 1 (a batched run
has its own directory: its timing fields are the batch's; at 1 the identity is the one from before the key). A
method that keeps the whole cache (``uses_budget = False`` on its class: the full cache) has one identity whatever
``budget``/``budget_tokens`` say. Of ``dataset.prompts`` only the text the run's model family uses enters
(:func:`identity_prompts`), so adding a family's prompt entries to a dataset config moves no earlier run. Paths inside
the project (the checkout's ``.cache`` of tiny checkpoints and fixtures, the committed proxies) enter relative to the
project root, so two worktrees of the same code map a grid point to the same directory name; any other path enters
as given. The code version is not part of the identity (``meta.json`` records the commit of every start).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

#: top-level keys that never change a sample's result: presentation, where things are written, how the grid was
#: assembled, resume behaviour (excluded from the identity)
NOT_IDENTITY = ("hydra", "logger", "wandb", "paths", "progress", "run_dir", "notes", "experiment_name", "grid",
                "experiment", "smoke", "resume")
#: keys of the model/dataset/method groups that describe the entry and do not change what is computed
DESCRIPTIVE_KEYS = ("notes", "hub_id", "tiny_builder")
#: identity keys that split one grid point into run directories (``point_hash`` leaves them out)
SHARD_KEYS = ("shard", "num_shards")
BUDGET_KEYS = ("budget", "budget_tokens")
PROJECT = "<project>"            # how a path inside the project root enters the identity


# ------------------------------------------------------------------------------------------------ identity
def uses_budget(cfg: Mapping) -> bool:
    """False for a method that keeps every entry (its class says ``uses_budget = False``: the full cache)."""
    method = cfg.get("method")
    target = method.get("_target_") if isinstance(method, Mapping) else None
    if isinstance(target, str):
        try:
            from hydra.utils import get_class
            return bool(getattr(get_class(target), "uses_budget", True))
        except Exception:  # noqa: BLE001 - an old config naming a class that moved: fall back to the name
            pass
    return cfg.get("method_name") != "full"


def _roots(cfg: Mapping) -> list[str]:
    roots = []
    paths = cfg.get("paths")
    if isinstance(paths, Mapping) and isinstance(paths.get("root"), str) and os.path.isabs(paths["root"]):
        roots.append(os.path.normpath(paths["root"]))
    from avkv.config import ROOT
    roots.append(os.path.normpath(str(ROOT)))
    return list(dict.fromkeys(roots))


def _portable(value: Any, roots: list[str]) -> Any:
    """Strings that are absolute paths inside a project root → ``<project>/<relative path>``; the rest as is."""
    if isinstance(value, Mapping):
        return {k: _portable(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v, roots) for v in value]
    if isinstance(value, str) and value.startswith(os.sep):
        norm = os.path.normpath(value)
        from avkv.config import PACKAGE           # the package's own files (committed proxies), clone or installed
        if norm.startswith(str(PACKAGE) + os.sep):
            return PROJECT + "/avkv/" + os.path.relpath(norm, str(PACKAGE)).replace(os.sep, "/")
        for r in roots:
            if norm == r:
                return PROJECT
            if norm.startswith(r.rstrip(os.sep) + os.sep):
                return PROJECT + "/" + os.path.relpath(norm, r).replace(os.sep, "/")
    return value


#: the prompt table every committed dataset config had when identities became family-conditional (issue 17), by
#: dataset ``name``: ``prompts`` as resolved, ``hashed`` whether it entered the hash then (false for the datasets
#: whose text was code until then: AVQA and the proxies' sets, AVSD, MUSIC-AVQA, MVBench, MileBench, LibriSpeech)
BASELINES_FILE = Path(__file__).with_name("prompt_baselines.json")


@functools.lru_cache(maxsize=1)
def prompt_baselines() -> dict[str, dict]:
    return json.loads(BASELINES_FILE.read_text())


def _entry(prompts: Any, family: str) -> str | None:
    """The text ``family`` runs with, as the task picks it (:meth:`avkv.tasks.prompts.PromptSet.template`)."""
    from avkv.tasks.prompts import PromptSet
    return PromptSet(prompts).template(family)


def model_family(cfg: Mapping) -> str:
    """The model family of a resolved config: its adapter class's ``family`` (``model._target_``)."""
    target = cfg.get("model", {}).get("_target_") if isinstance(cfg.get("model"), Mapping) else None
    if not isinstance(target, str):
        raise ValueError("model._target_: a run's identity needs the model's adapter class (none in this config)")
    from hydra.utils import get_class
    try:
        return str(get_class(target).family)
    except Exception as e:  # noqa: BLE001 - named in the error
        raise ValueError(f"model._target_ {target!r}: not an importable adapter class ({e})") from None


def identity_prompts(cfg: Mapping) -> tuple[bool, Any]:
    """What of ``dataset.prompts`` enters the identity: ``(False, None)`` to leave it out, ``(True, x)`` to hash x.

    Only the text the run's family uses counts, so a family's entries added to (or edited in) a dataset config move
    no other family's runs. A run whose text is the one its family had in the baseline table
    (:func:`prompt_baselines`) hashes what it hashed then — nothing for the datasets whose text was code, the whole
    table for the others — so its identity is the one from before; any other text (an edited entry, a dataset or a
    family the baseline has not got) hashes as ``{family: text}``."""
    prompts = cfg["dataset"]["prompts"]
    base = prompt_baselines().get(str(cfg["dataset"].get("name")))
    if base is not None and _digest(base["prompts"]) == _digest(prompts):      # the committed table: no import
        return base["hashed"], base["prompts"]
    family = model_family(cfg)
    used = _entry(prompts, family)
    if base is not None and _digest(_entry(base["prompts"], family)) == _digest(used):
        return base["hashed"], base["prompts"]
    return True, {family: used}


def identity_core(cfg: Mapping) -> dict:
    """What a run's hash covers (see the module docstring): a plain dict, JSON-serialisable."""
    core = {k: v for k, v in cfg.items() if k not in NOT_IDENTITY}
    for group in ("model", "dataset", "method"):
        if isinstance(core.get(group), Mapping):
            core[group] = {k: v for k, v in core[group].items() if k not in DESCRIPTIVE_KEYS}
    if not uses_budget(cfg):
        for k in BUDGET_KEYS:
            core[k] = None
    if core.get("batch_size", 1) == 1:            # one sample at a time: the runs from before the key, as before
        core.pop("batch_size", None)
    if isinstance(core.get("dataset"), Mapping) and core["dataset"].get("limit_per_task", 0) is None:
        core["dataset"] = {k: v for k, v in core["dataset"].items() if k != "limit_per_task"}   # unset: as before
    if isinstance(core.get("dataset"), Mapping) and core["dataset"].get("prompts") is not None:
        hashed, prompts = identity_prompts(cfg)
        core["dataset"] = {k: v for k, v in core["dataset"].items() if k != "prompts"}
        if hashed:
            core["dataset"]["prompts"] = prompts
    return _portable(json.loads(json.dumps(core, sort_keys=True, default=str)), _roots(cfg))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def run_hash(cfg: Mapping) -> str:
    """The hash naming a run directory (one per shard of a grid point)."""
    return _digest(identity_core(cfg))


def point_hash(cfg: Mapping) -> str:
    """The hash of a grid point: :func:`run_hash` without the shard keys (the shards of a point share it)."""
    return _digest({k: v for k, v in identity_core(cfg).items() if k not in SHARD_KEYS})


#: the name ``config_hash`` earlier code and W&B run ids use
config_hash = run_hash


def entry_name(node: Any) -> str | None:
    """A config group entry's name (``model_name``, ``dataset_name``, ``method_name`` of a resolved config, which
    :func:`run_name` and the report read): its ``name`` key, else the class name of its ``_target_`` in lower case;
    a plain string names itself. None when it has neither."""
    if isinstance(node, str):
        return node
    if isinstance(node, Mapping):
        if node.get("name"):
            return str(node["name"])
        target = node.get("_target_")
        if isinstance(target, str):
            return target.rsplit(".", 1)[-1].lower()
    return None


def _slug(x: Any) -> str:
    s = str(x)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)[:40]


def run_name(cfg: Mapping, h: str | None = None) -> str:
    """``<model>__<dataset>__<method>__b<budget>__<hash10>``; the full cache is ``bfull`` whatever the budget."""
    h = h or run_hash(cfg)
    if uses_budget(cfg):
        budget = cfg.get("budget_tokens") or cfg.get("budget")
    else:
        budget = "full"
    return "__".join([_slug(cfg.get("model_name", "model")), _slug(cfg.get("dataset_name", "dataset")),
                      _slug(cfg.get("method_name", "method")), f"b{_slug(budget)}", h[:10]])


def run_dir(cfg: Mapping) -> Path:
    """Where a resolved config's run is written: ``run_dir`` if set, else ``<paths.runs>/<run_name>``."""
    if cfg.get("run_dir"):
        return Path(str(cfg["run_dir"]))
    return Path(str(cfg["paths"]["runs"])) / run_name(cfg)


def stored_config(cfg: Mapping) -> dict:
    """The config as ``config.yaml`` keeps it: the resolved config, with the budget keys blank for a method that
    does not use them (so the shared directory of the full cache does not claim one run's budget)."""
    out = dict(cfg)
    if not uses_budget(cfg):
        for k in BUDGET_KEYS:
            out[k] = None
    return out

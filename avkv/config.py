"""Hydra/OmegaConf helpers: the repo-root resolver, config → objects, and the one validation of config values.

:func:`validate` checks every value a run reads when the config is composed (``run`` calls it first, before any
dataset or model is loaded; :func:`compose` calls it too): each problem names its key, the value given and what
is allowed (:class:`Problem`; the ``choices`` of a closed set are kept for tools that suggest the nearest one).
Add a rule for a new top-level or model/dataset key to :data:`RULES`; a method's fields are checked from its
dataclass (type of each field, integers non-negative, :data:`POSITIVE_METHOD_FIELDS` at least 1) and then by
constructing it, so its own ``__post_init__`` checks run too.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

PACKAGE = Path(__file__).resolve().parent


def _project_root() -> tuple[Path, bool]:
    """(project root, is a clone). In a clone (``configs/config.yaml`` beside the package) the root is
    the clone; in an installed package it is ``$AVKV_HOME`` or the current directory (``.cache/``, ``runs/`` go
    there) and the configs are the ones shipped as package data (``avkv/configs``)."""
    clone = PACKAGE.parent
    if (clone / "configs" / "config.yaml").is_file():
        return clone, True
    import os
    return Path(os.environ.get("AVKV_HOME") or os.getcwd()).resolve(), False


ROOT, IN_CLONE = _project_root()
CONFIG_DIR = (ROOT / "configs") if IN_CLONE else PACKAGE / "configs"
PAPERS_DIR = (ROOT / "results" / "papers") if IN_CLONE else PACKAGE / "papers"   # the papers' published numbers

#: keys of a model/dataset config group that describe the entry or are the harness's (``dataset.limit_per_task``:
#: applied by the run to the loader's documents), not constructor arguments
META_KEYS = ("name", "tiny_builder", "hub_id", "notes", "preprocessing_source", "limit_per_task")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("avkv_root"):
        OmegaConf.register_new_resolver("avkv_root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("avkv_pkg"):        # the installed package (committed proxy checkpoints)
        OmegaConf.register_new_resolver("avkv_pkg", lambda: str(PACKAGE))
    from avkv.resolvers import register  # ${avkv.sweep:...} / ${avkv.available:...} in experiment presets
    register(lambda: CONFIG_DIR)


def constructor_args(node: DictConfig | dict) -> dict:
    """A group's config minus descriptive keys, resolved to plain Python."""
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: v for k, v in d.items() if k not in META_KEYS}


def instantiate(node: DictConfig | dict, **extra: Any) -> Any:
    from hydra.utils import instantiate as _inst
    return _inst(constructor_args(node), **extra)


def compose(overrides: list[str] | None = None, validate_values: bool = True) -> DictConfig:
    """Compose ``configs/config.yaml`` with overrides outside a Hydra app (tests, notebooks); the values are
    checked (:func:`validate`) unless ``validate_values`` is false."""
    from hydra import compose as _compose, initialize_config_dir
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = _compose(config_name="config", overrides=list(overrides or []))
    if validate_values:
        validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class Problem:
    """One bad config value: its dotted key, the value given, and what is allowed."""

    key: str
    value: Any
    allowed: str
    choices: tuple | None = None          # the allowed values when they are a closed set

    def __str__(self) -> str:
        hint = ""
        if self.choices and isinstance(self.value, str):
            near = close_match(self.value, [str(c) for c in self.choices])
            hint = f" (did you mean {near!r}?)" if near else ""
        return f"{self.key}={self.value!r}: {self.allowed}{hint}"


def close_match(word: str, options: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The option closest to ``word`` (difflib's ratio), None when none is close enough."""
    import difflib
    got = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=cutoff)
    return got[0] if got else None


class ConfigError(ValueError):
    """Bad config values, each named by key (``problems``); one problem reads as one line."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"invalid config value {self.problems[0]}"
        else:
            text = "invalid config values:\n  " + "\n  ".join(map(str, self.problems))
        super().__init__(text)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Rule:
    check: Check
    allowed: str
    choices: tuple | None = None


def one_of(*choices: Any) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(map(repr, choices)), tuple(choices))


def _int_at_least(lo: int, nullable: bool = False) -> Rule:
    text = f"an integer >= {lo}" + (" or null" if nullable else "")
    return Rule(lambda v: (nullable and v is None) or (_is_int(v) and v >= lo), text)


def _positive_number(nullable: bool = False) -> Rule:
    return Rule(lambda v: (nullable and v is None) or (_is_number(v) and v > 0),
                "a number > 0" + (" or null" if nullable else ""))


BOOL = Rule(lambda v: isinstance(v, bool), "true or false", (True, False))
NONEMPTY_STR = Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string (a path)")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")

#: dotted key → rule, for every key a run reads (a key absent from the config is not checked)
RULES: dict[str, Rule] = {
    "budget": Rule(lambda v: _is_number(v) and 0 < v <= 1,
                   "a number in (0, 1]: the kept fraction of the prompt KV (or set budget_tokens)"),
    "budget_tokens": _int_at_least(1, nullable=True),
    "compress_at": one_of("question", "context", "prompt"),
    "max_new_tokens": _int_at_least(1, nullable=True),
    "batch_size": Rule(lambda v: _is_int(v) and v >= 1,
                       "an integer >= 1: the samples decoded together (1: one at a time)"),
    "fidelity": BOOL,
    "seed": Rule(_is_int, "an integer"),
    "shard": _int_at_least(0),
    "num_shards": _int_at_least(1),
    "device": Rule(lambda v: isinstance(v, str) and bool(_DEVICE.match(v)), "cpu, cuda, cuda:<index> or mps"),
    "threads": _int_at_least(1, nullable=True),
    "progress": BOOL,
    "resume.retry_failed": BOOL,
    "model.path": NONEMPTY_STR,
    "model.dtype": one_of("float32", "bfloat16", "float16"),
    "model.attn_implementation": one_of("sdpa", "eager", "flash_attention_2"),
    "model.num_frames": _int_at_least(1, nullable=True),
    "model.fps": _positive_number(nullable=True),
    "model.max_audio_s": _positive_number(nullable=True),
    "model.trust_remote_code": BOOL,
    "model.allow_pickle_weights": BOOL,
    "dataset.root": NONEMPTY_STR,
    "dataset.limit": _int_at_least(1, nullable=True),
    "dataset.limit_per_task": _int_at_least(1, nullable=True),
}
#: method fields that are sizes (at least 1); every other integer field of a method must be >= 0
POSITIVE_METHOD_FIELDS = ("chunk", "kernel", "group_size", "proxy")
_MISSING = object()


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _type_ok(value: Any, annotation: str) -> tuple[bool, str] | None:
    """Check ``value`` against a simple field annotation (``int``, ``float | None``, ``str``, ``bool``); None when
    the annotation is not a simple one (not checked here)."""
    opts = [o.strip() for o in str(annotation).replace("Optional[", "").rstrip("]").split("|")]
    simple = {"int": _is_int, "float": _is_number, "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str)}
    if not all(o in simple or o == "None" for o in opts):
        return None
    names = [{"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(o, "null")
             for o in opts]
    ok = (value is None and "None" in opts) or any(simple[o](value) for o in opts if o in simple)
    return ok, " or ".join(names)


def _method_problems(node: Any, prefix: str = "method") -> list[Problem]:
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        return []
    from hydra.utils import get_class
    try:
        cls = get_class(node["_target_"])
    except Exception as e:  # noqa: BLE001
        return [Problem(f"{prefix}._target_", node["_target_"], f"an importable method class ({e})")]
    out: list[Problem] = []
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    for name, value in node.items():
        if name in META_KEYS or name == "_target_" or name not in fields:
            continue
        key = f"{prefix}.{name}"
        if isinstance(value, dict) and "_target_" in value:
            out += _method_problems(value, key)
            continue
        typed = _type_ok(value, fields[name].type)
        if typed is not None and not typed[0]:
            out.append(Problem(key, value, typed[1]))
        elif _is_int(value) and ("int" in str(fields[name].type)):
            lo = 1 if name in POSITIVE_METHOD_FIELDS else 0
            if value < lo:
                out.append(Problem(key, value, f"an integer >= {lo}"))
    return out


def check_config(cfg: DictConfig | dict) -> list[Problem]:
    """Every bad value of a composed config (an empty list when all are fine). Nothing is loaded."""
    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    d.pop("hydra", None)
    problems = []
    for key, rule in RULES.items():
        v = _get(d, key)
        if v is not _MISSING and not rule.check(v):
            problems.append(Problem(key, v, rule.allowed, rule.choices))
    shard, num = d.get("shard"), d.get("num_shards")
    if _is_int(shard) and _is_int(num) and num >= 1 and not shard < num:
        problems.append(Problem("shard", shard, f"an integer in 0..{num - 1} (num_shards={num})"))
    method_problems = _method_problems(d.get("method"))
    problems += method_problems
    if not method_problems and isinstance(d.get("method"), dict):
        try:                                 # the method's own checks (choices, ranges) in its __post_init__
            instantiate(d["method"])
        except Exception as e:  # noqa: BLE001 - hydra wraps the constructor's error
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            problems.append(Problem("method", d.get("method_name") or d["method"].get("_target_"),
                                    f"rejected by the method: {cause}"))
    return problems


def validate(cfg: DictConfig | dict) -> None:
    """Raise :class:`ConfigError` naming every bad value (key, value given, allowed values)."""
    problems = check_config(cfg)
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------------------------ overrides
class OverrideError(ValueError):
    """A command-line override that names no config key or group option (one line per problem)."""

    def __init__(self, messages: Sequence[str]):
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


#: Hydra flags that may stand beside the overrides without stopping the pre-check
_PLAIN_FLAGS = ("-m", "--multirun")


def _groups(config_dir: Path) -> dict[str, list[str]]:
    """Config group → its option names (``method`` → ``[adakv, ...]``), from the folder tree."""
    out: dict[str, list[str]] = {}
    for f in sorted(config_dir.rglob("*.yaml")):
        rel = f.relative_to(config_dir)
        if len(rel.parts) > 1:
            out.setdefault("/".join(rel.parts[:-1]), []).append(f.stem)
    return out


def _dotted_keys(d: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}{k}"
            keys.append(key)
            keys += _dotted_keys(v, key + ".")
    return keys


def _primary_keys(config_dir: Path) -> set[str]:
    """The dotted keys ``config.yaml`` itself sets (read without composing: a few ms where a composition takes
    ~0.4 s); every composition has them, since the primary config is merged last (``_self_``)."""
    raw = OmegaConf.to_container(OmegaConf.load(config_dir / "config.yaml"), resolve=False)
    raw.pop("defaults", None)
    return set(_dotted_keys(raw))


def check_overrides(args: Sequence[str], config_dir: str | Path | None = None) -> list[str]:
    """One line per override in ``args`` that names no key of the composed config and no option of a config group,
    each with the closest key or option (difflib). Keys added with ``+``, deleted with ``~`` and Hydra's own
    (``hydra.*``, ``hydra/...``) are left to Hydra. An empty list when every override is known."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    overrides = [a for a in args if a not in _PLAIN_FLAGS]
    if any(a.startswith("-") for a in overrides):
        return []                                    # other Hydra flags (--cfg, -cn, ...): Hydra checks those
    config_dir = Path(config_dir or CONFIG_DIR)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        return [f"cannot parse the overrides: {str(e).splitlines()[0]}"]
    groups = _groups(config_dir)
    problems, chosen = [], []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete() or o.package:
            continue
        if key in groups:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            for v in values:
                if v in ("null", "None") or v in groups[key]:
                    continue
                near = close_match(v, groups[key])
                opts = ", ".join(groups[key])          # every name: a user must see what exists (≈40 methods fit)
                problems.append(f"{key}={v}: no config {key}/{v}.yaml; one of {opts}"
                                + (f" (did you mean {key}={near}?)" if near else ""))
            if values and not problems:
                chosen.append(f"{key}={values[0]}")
    if problems:
        return problems
    plain = [o for o in parsed if o.key_or_group not in groups and not o.key_or_group.startswith("hydra")
             and not (o.is_add() or o.is_force_add() or o.is_delete() or o.package)]
    if not plain:
        return []
    if all(o.key_or_group in _primary_keys(config_dir) for o in plain):
        return []                                    # keys of config.yaml itself are in every composition
    try:
        base = OmegaConf.to_container(compose(chosen, validate_values=False), resolve=False)
    except Exception as e:  # noqa: BLE001 - composition errors are Hydra's to report
        return [f"cannot compose {' '.join(chosen) or 'the config'}: {str(e).splitlines()[0]}"]
    known = set(_dotted_keys(base))
    for o in plain:
        key = o.key_or_group
        if key in known:
            continue
        parent = key.rpartition(".")[0]
        siblings = [k for k in known if k.rpartition(".")[0] == parent]
        near = close_match(key, siblings) or close_match(key, sorted(known))
        problems.append(f"{key}: no such config key" + (f" (did you mean {near}?)" if near else "")
                        + f"; to add a new key write +{key}=...")
    return problems


def require_known_overrides(args: Sequence[str], config_dir: str | Path | None = None) -> None:
    """Raise :class:`OverrideError` when :func:`check_overrides` finds a problem."""
    problems = check_overrides(args, config_dir)
    if problems:
        raise OverrideError(problems)


# ------------------------------------------------------------------------------------------------ environment
GPU_INSTALL_HINT = ("install the GPU stack: `conda env create -f environment.yml` (CUDA torch, accelerate; flash-attn "
                    "optional), or a CUDA torch from https://download.pytorch.org/whl/ then `pip install 'avkv[gpu]'`; "
                    "or run with device=cpu")


def device_problem(device: str) -> Problem | None:
    """A device this torch cannot use (``device=cuda`` on a CPU build, an index past the last GPU), else None."""
    import torch
    dev = str(device)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            return Problem("device", dev, f"torch {torch.__version__} is {build}; {GPU_INSTALL_HINT}")
        idx = dev.partition(":")[2]
        if idx and int(idx) >= torch.cuda.device_count():
            return Problem("device", dev, f"only {torch.cuda.device_count()} GPU(s) visible (cuda:0..)")
    if dev == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return Problem("device", dev, f"MPS is not available in torch {torch.__version__}; use device=cpu")
    return None


register_resolvers()

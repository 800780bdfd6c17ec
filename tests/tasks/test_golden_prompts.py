"""Golden prompts: what every dataset config's task renders for every model family, byte for byte.

For the first samples of every ``configs/dataset/*.yaml`` (on its fixture) and every model family (its tiny
checkpoint, ``configs/model/tiny_<x>.yaml``), the prompt the task writes and the adapter encodes is recorded in
``golden/prompts.json``: the question and context text pieces, the media items, ``max_new_tokens``, the chat text
the adapter produced (runs of one media placeholder token collapsed to ``<tok>*n``), the sha256 of the input ids,
their count and the question / assistant split points — or the error a (dataset, family) pair raises. A refactor of
the task / model joint must leave every entry identical.

Regenerate (only when a prompt is meant to change, and say why in the commit)::

    .venv/bin/python -m tests.tasks.test_golden_prompts
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "prompts.json"
N_SAMPLES = 2


def one_per_family() -> tuple[str, ...]:
    """One tiny checkpoint per model family, read from ``configs/model/tiny_*.yaml`` (``tests/discover.py``): the
    first config of each adapter class (``tiny_qwen2_5_omni_deep`` is ``tiny_qwen2_5_omni``'s family again)."""
    from omegaconf import OmegaConf

    from avkv.config import CONFIG_DIR
    from tests import discover
    seen, out = set(), []
    for name in discover.tiny_models():
        target = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")["_target_"]
        if target not in seen:
            seen.add(target)
            out.append(name)
    return tuple(out)


TINY = one_per_family()


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return Path(path).name


def _collapse(ids: list[int], tok) -> str:
    """The token sequence as text, a run of one repeated token (a media placeholder) written ``<tok>*n``."""
    out, k = [], 0
    while k < len(ids):
        j = k
        while j < len(ids) and ids[j] == ids[k]:
            j += 1
        piece = f"<id {ids[k]}>" if ids[k] < 0 else tok.decode([ids[k]], skip_special_tokens=False)
        out.append(piece if j - k == 1 else f"[{piece}*{j - k}]")
        k = j
    return "".join(out)


def render(task, adapter, doc, root: Path) -> dict:
    """One (task, adapter, doc) rendering: what the model is given."""
    from avkv.experiment import build_prompt
    try:
        prompt = build_prompt(task, adapter, doc)
        enc = adapter.encode(prompt)
    except Exception as e:  # noqa: BLE001 - a pair that cannot run is recorded as such
        return {"error": type(e).__name__}
    ids = [int(i) for i in enc.input_ids.reshape(-1).tolist()]
    context = [c if isinstance(c, str) else {"kind": c.kind, "path": _rel(c.path, root), "start": c.start,
                                             "end": c.end, "with_audio": c.with_audio, "frame_rate": c.frame_rate}
               for c in prompt.context]
    return {"question": prompt.question, "context": context, "system": prompt.system,
            "max_new_tokens": prompt.max_new_tokens, "verbatim": list(prompt.verbatim),
            "text": _collapse(ids, adapter.tokenizer), "n_tokens": len(ids),
            "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
            "question_start": int(enc.question_start), "assistant_start": int(enc.assistant_start),
            "modalities": [int(m) for m in enc.modality.unique().tolist()]}


def datasets() -> list[str]:
    from avkv.config import CONFIG_DIR
    return sorted(p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml"))


def render_all() -> dict:
    from avkv.config import compose, instantiate
    from avkv.tasks.base import DatasetError
    from tests.conftest import fixtures_dir, tiny_model_dir
    root = fixtures_dir()
    adapters = {}
    for name in TINY:
        tiny_model_dir(name)
        adapters[name] = instantiate(compose([f"model={name}"]).model, device="cpu")
    out: dict = {}
    for ds in datasets():
        cfg = compose([f"dataset={ds}"])
        task = instantiate(cfg.dataset, limit=N_SAMPLES)
        try:
            docs = list(task.docs())[:N_SAMPLES]
        except DatasetError:            # a config for real data only (librispeech_long: 60-120 s chapters)
            continue
        for name, ad in adapters.items():
            out[f"{ds}|{name}"] = [dict(render(task, ad, d, root), sample_id=str(d.id)) for d in docs]
    return out


def test_prompts_are_byte_identical_to_golden():
    want = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(render_all()))
    assert sorted(got) == sorted(want), "the (dataset, family) pairs changed"
    diff = [k for k in want if got[k] != want[k]]
    assert not diff, f"{len(diff)} prompt(s) differ from {GOLDEN.name}, e.g. {diff[0]}: {got[diff[0]]} != {want[diff[0]]}"


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(render_all(), indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)

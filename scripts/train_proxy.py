"""Train one proxy checkpoint on CPU: ``python scripts/train_proxy.py --proxy {video,audio,av}``.

The model starts from its family's tiny builder at proxy sizes (``avkv/proxies/build.py``) and is trained on an
endless stream of synthetic clips from ``avkv.tasks.fixtures.proxy.make_item`` (seeded), rendered exactly as the
evaluation renders them: the AVQA task's prompt for the family, then the adapter's ``encode_decoded`` (chat
template, the real processor, placeholder expansion) and its position ids. The loss is cross-entropy on the
answer letter and the ``<|im_end|>`` after it. Each batch holds one question type (same length, no padding);
types take turns. With ``--media-only w`` the prompt is prefilled in two parts at the engine's split points and two
more losses (weight ``w``) teach the model to answer from the media entries of the cache only (``split_forward``):
a model trained on the plain loss alone may also copy the evidence into the text entries after the media (the
end-of-media markers, the question), which the leak control (every media entry dropped) then exposes.

``--init-from`` continues a checkpoint or warm-starts from another family's (``warm_start``); with ``--grow`` a
shallower checkpoint's decoder is first grown to the proxy's depth (``grow_layers``: each layer becomes a block of
copies). When the tokenizer changed (the generator's texts did), embedding and LM-head rows follow their token.

Training stops at the time budget, or earlier once every question type has been right on all of the last
``--converged-steps`` full-length batches of its type. The checkpoint is written with ``save_pretrained`` (weights, tokenizer,
processor) into ``avkv/models/proxy_checkpoints/proxy_<name>/``; then the held-out set (the dataset config
``proxy_<name>``, decoded from its mp4 files through ``avkv.experiment``) is scored with the full cache and
``TRAINING.json`` records steps, wall time, seeds and the held-out accuracy per question type.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avkv.proxies.build import PROXIES, build_init, proxy_task  # noqa: E402
from avkv.results import SAMPLES, read_records  # noqa: E402
from avkv.tasks.fixtures import proxy as tasks  # noqa: E402


def make_adapter(name: str, path: Path):
    from hydra.utils import get_class
    p = PROXIES[name]
    return get_class(p.adapter)(path, dtype="float32", num_frames=p.spec.frames or 8)


def encode_item(adapter, task, family: str, spec, item: dict) -> tuple[dict, torch.Tensor, torch.Tensor, dict]:
    """One generated item through the evaluation path: AVQA prompt → adapter → (inputs, input_ids, positions of
    the prompt and of the two answer tokens, layout: the engine's two split points and the media mask)."""
    from avkv.schema import TEXT, Doc, Media
    doc = Doc(id="train", media=[Media("video", "<generated>", with_audio=True)], question=item["question"],
              target=item["answer"], choices=item["choices"])
    from avkv.experiment import build_prompt
    prompt = build_prompt(task, adapter, doc)
    frames = item["frames"] if item["frames"] is not None else tasks.blank_frames(spec)
    enc = adapter.encode_decoded(prompt, [{"frames": frames, "fps": float(spec.fps), "audio": item["audio"]}])
    pos = adapter.prompt_position_ids(enc)
    n = enc.input_ids.shape[1]        # + the answer letter and <|im_end|>, positioned as decoding positions them
    layout = {"context": enc.question_start, "question": enc.assistant_start, "media": enc.modality != TEXT}
    return enc.inputs, enc.input_ids, torch.cat([pos, adapter.continue_position_ids(pos, n, 2)], -1), layout


def collate(parts: list[tuple]) -> tuple[dict, torch.Tensor, torch.Tensor, dict]:
    """One batch; its items share one token layout (one question type and clip geometry per batch)."""
    ids = torch.cat([p[1] for p in parts])
    pos = torch.cat([p[2] for p in parts], dim=-2)
    inputs = {}
    for k, v in parts[0][0].items():
        if k == "input_ids":
            continue
        inputs[k] = torch.cat([p[0][k] for p in parts]) if torch.is_tensor(v) else v
    layout = parts[0][3]
    assert all(p[3]["context"] == layout["context"] and p[3]["question"] == layout["question"]
               and torch.equal(p[3]["media"], layout["media"]) for p in parts), "a batch mixes token layouts"
    return inputs, ids, pos, layout


class Stream(torch.utils.data.IterableDataset):
    """Batches of one question type each, types in turn; seeded by (seed, proxy)."""

    def __init__(self, name: str, init_dir: Path, batch: int, seed: int, short_frac: float = 0.0,
                 weights: list[float] | None = None):
        self.name, self.init_dir, self.batch, self.seed = name, init_dir, batch, seed
        self.short_frac = short_frac
        self.p_types = None if not weights else np.asarray(weights, dtype=float) / sum(weights)

    def __iter__(self):
        torch.set_num_threads(1)
        p = PROXIES[self.name]
        adapter = make_adapter(self.name, self.init_dir)
        task = proxy_task(self.name, self.init_dir)          # only its prompt() is used
        tok = adapter.tokenizer
        letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        info = torch.utils.data.get_worker_info()          # each data worker draws its own items
        rng = np.random.default_rng([self.seed, list(tasks.SPECS).index(self.name), info.id if info else 0])
        k = 0
        while True:
            if self.p_types is not None:  # weighted draw (more batches for the type still being learned)
                qtype = p.spec.types[int(rng.choice(len(p.spec.types), p=self.p_types))]
            else:
                qtype = p.spec.types[k % len(p.spec.types)]
            short = bool(rng.random() < self.short_frac)
            spec = tasks.SHORT[self.name] if short else p.spec
            items = [tasks.make_item(rng, self.name, qtype, spec) for _ in range(self.batch)]
            inputs, ids, pos, layout = collate([encode_item(adapter, task, p.family, spec, it) for it in items])
            answer = torch.tensor([letters[it["answer"]] for it in items])
            tail = torch.stack([answer, torch.full_like(answer, eos)], 1)       # prompt + letter + <|im_end|>
            yield inputs, torch.cat([ids, tail], 1), pos, answer, eos, "/".join(qtype), short, layout
            k += 1


SLICE = 24       # tests/proxies checks the committed checkpoint reaches its accuracy on this held-out prefix


def held_out_accuracy(name: str, ckpt: Path, fixtures: Path, run_dir: Path, threads: int) -> dict:
    """Full-cache accuracy on the held-out set, through avkv.experiment (mp4 decoding included)."""
    from avkv.config import compose
    from avkv.experiment import run
    from avkv.tasks import fixtures as fx
    fx.build(fixtures, only=[f"proxy_{name}"])
    if run_dir.exists():               # never resume: the weights changed since the last evaluation
        shutil.rmtree(run_dir)
    cfg = compose([f"model=proxy_{name}", f"model.path={ckpt}", f"dataset=proxy_{name}",
                   f"paths.fixtures={fixtures}", "method=full", "budget=1.0", f"run_dir={run_dir}",
                   "progress=false", f"threads={threads}"])
    s = run(cfg)
    order = [str(d["id"]) for d in json.loads((fixtures / f"proxy_{name}" / "val_qa.json").read_text())]
    score = {r["sample_id"]: r["score"] for r in read_records(run_dir / SAMPLES)}
    head = [score[i] for i in order[:SLICE]]
    agg = s["task"]
    return {"accuracy": s["score"], "n": s["n"], "n_failed": s["n_failed"],
            "by_relation": agg.get("accuracy_by_question_relation"), "by_type": agg.get("accuracy_by_question_type"),
            "slice": {"first": SLICE, "accuracy": sum(head) / len(head)}}


def split_forward(model, text_config, inputs: dict, ids: torch.Tensor, pos: torch.Tensor, layout: dict, s: int,
                  perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's split prefill, differentiable: ``ids[:, :s]`` (with the media) fills a cache, then the rest of the
    prompt and the answer are read three times, from:

    - that cache (the ordinary loss; the same logits as one forward over the whole sequence);
    - the cache with its media entries (every layer) taken from item ``perm[i]``: only the shared system text
      precedes the media, so these entries are exactly what item ``perm[i]``'s own prefill computes, while the text
      entries after the media (end-of-media markers, and the question when ``s`` is the question split) still come
      from item ``i``;
    - the cache with every media entry removed (the leak control, ``method=drop_media``).

    Returns the last 3 logits of each read. Training the second read towards ``answer[perm]`` and the third towards
    a uniform answer teaches the model to answer from the media entries only, not from text entries that absorbed
    the evidence while they were prefilled."""
    from transformers import DynamicCache
    cache = DynamicCache(config=text_config)
    model(input_ids=ids[:, :s], position_ids=pos[..., :s], past_key_values=cache, use_cache=True, logits_to_keep=1,
          **inputs)
    media = layout["media"][:s].view(1, 1, s, 1)
    text = (~layout["media"][:s]).nonzero().flatten()
    swapped, dropped = DynamicCache(config=text_config), DynamicCache(config=text_config)
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        swapped.update(torch.where(media, k[perm], k), torch.where(media, v[perm], v), i)
        dropped.update(k[:, :, text], v[:, :, text], i)

    def read(c) -> torch.Tensor:      # appends the suffix to c: the prefix cache is read last
        return model(input_ids=ids[:, s:], position_ids=pos[..., s:], past_key_values=c, use_cache=True,
                     logits_to_keep=3).logits[:, -3:]

    out_swapped, out_dropped = read(swapped), read(dropped)
    return read(cache), out_swapped, out_dropped


#: names of a tensor in a sibling family's checkpoint (the Omni thinker's towers and decoder have the same shapes as
#: Qwen2.5-VL's and Qwen2-Audio's at proxy sizes; only the names differ, and Qwen2.5-VL fuses q/k/v)
SIBLING_NAMES = [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("audio_tower.layer_norm.", "audio_tower.ln_post."), ("multi_modal_projector.linear.", "audio_tower.proj.")]


def _from_sibling(name: str, old: dict) -> torch.Tensor | None:
    for new_prefix, old_prefix in SIBLING_NAMES:
        if name.startswith(new_prefix) and old_prefix + name[len(new_prefix):] in old:
            return old[old_prefix + name[len(new_prefix):]]
    if ".attn.qkv." in name:
        parts = [name.replace(".qkv.", f".{x}.") for x in "qkv"]
        if all(p in old for p in parts):
            return torch.cat([old[p] for p in parts])
    return None


#: a decoder layer's tensors (Qwen2.5-VL and the Omni thinker: ``model.layers.i.``; Qwen2-Audio:
#: ``language_model.model.layers.i.``); the towers' ``audio_tower.layers`` / ``visual.blocks`` do not match
DECODER_LAYER = re.compile(r"^((?:language_model\.)?model\.layers\.)(\d+)\.(.+)$")
#: the tensors through which a decoder layer writes into the residual stream
RESIDUAL_WRITES = ("self_attn.o_proj.", "mlp.down_proj.")
GROW_MODES = ("zero", "split", "copy")


def grow_layers(old: dict[str, torch.Tensor], depth: int, mode: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The decoder of a checkpoint grown to ``depth`` layers: target layer ``i`` starts as a copy of source layer
    ``i * n // depth`` (each source layer becomes a block of consecutive copies, in order). ``mode`` says what the
    copies write into the residual stream:

    - ``zero``: only the last copy of a block keeps the source layer's output projections (attention ``o_proj``,
      MLP ``down_proj``); the others start at zero, so the grown model computes exactly what the source did, and
      every extra copy starts with the attention pattern of its source layer (it reads the same residual stream);
    - ``split``: every copy writes 1/m of the source layer's output (m copies): all layers share the work at once,
      only approximately the source's function;
    - ``copy``: plain copies (each adds the source layer's whole output again).

    Returns the grown tensors and the source layer of each target layer."""
    layers: dict[int, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    rest = {}
    for k, v in old.items():
        m = DECODER_LAYER.match(k)
        if m:
            layers[int(m.group(2))][m.group(3)] = (m.group(1), v)
        else:
            rest[k] = v
    n = len(layers)
    if not n or depth < n:
        raise ValueError(f"--grow: the source has {n} decoder layers, cannot grow to {depth}")
    source_of = [i * n // depth for i in range(depth)]
    grown = dict(rest)
    for i, j in enumerate(source_of):
        block = source_of.count(j)
        last = i == len(source_of) - 1 - source_of[::-1].index(j)
        for name, (prefix, v) in layers[j].items():
            v = v.clone()
            if name.startswith(RESIDUAL_WRITES):
                if mode == "zero" and not last:
                    v.zero_()
                elif mode == "split":
                    v /= block
            grown[f"{prefix}{i}.{name}"] = v
    return grown, source_of


def warm_start(init_dir: Path, source: Path, grow: str | None = None) -> dict:
    """Overwrite the fresh weights in ``init_dir`` with the tensors of ``source`` that fit.

    A tensor is taken when ``source`` has it under the same name and shape (a continuation of the same builder),
    or under a sibling family's name (``SIBLING_NAMES``: the AV proxy's towers and decoder warm-start the video
    and audio proxies). After a change of tokenizer or of a tower's input size, the tensors that do not fit
    (embeddings, LM head, learned audio positions) keep their fresh initialisation. With ``grow`` (a
    ``grow_layers`` mode) a shallower source's decoder is first grown to the new depth."""
    from safetensors.torch import load_file, save_file
    files = sorted(init_dir.glob("model*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{init_dir}: expected one model.safetensors, found {[f.name for f in files]}")
    fresh = load_file(files[0])
    old: dict[str, torch.Tensor] = {}
    for f in sorted(source.glob("model*.safetensors")):
        old.update(load_file(f))
    if not old:
        raise FileNotFoundError(f"--init-from {source}: no model*.safetensors there")
    grown_from = None
    if grow:
        depth = len({int(m.group(2)) for m in map(DECODER_LAYER.match, fresh) if m})
        old, grown_from = grow_layers(old, depth, grow)
    rows = token_rows(source, init_dir)
    taken = {}
    for k, v in fresh.items():
        by_token = rows is not None and k.endswith(VOCAB_TENSORS)
        t = old.get(k)
        if t is None or (t.shape != v.shape and not by_token):
            t = _from_sibling(k, old)
        if by_token and t is not None:
            t = torch.where((rows >= 0)[:, None], t[rows.clamp(min=0)], v)      # rows follow their token
        if t is not None and t.shape == v.shape:
            taken[k] = t.contiguous()
    skipped = sorted(k for k in fresh if k not in taken)
    save_file({**fresh, **taken}, files[0], metadata={"format": "pt"})
    return {"source": str(source), "kept": len(taken), "skipped": skipped,
            **({"grow": grow, "source_layer_of": grown_from} if grow else {}),
            **({"new_tokens": int((rows < 0).sum())} if rows is not None else {})}


#: the tensors with one row per token id
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def _vocab(folder: Path) -> dict[str, int]:
    tok = json.loads((folder / "tokenizer.json").read_text())
    return {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}


def token_rows(source: Path, target: Path) -> torch.Tensor | None:
    """For each token id of ``target``'s tokenizer, the id of the same token string in ``source``'s (-1: a new
    token, its rows keep their fresh initialisation); None when the two vocabularies are identical. The proxies'
    tokenizer is trained on the generator's texts, so a new question type changes it."""
    if not ((source / "tokenizer.json").exists() and (target / "tokenizer.json").exists()):
        return None
    old, new = _vocab(source), _vocab(target)
    if old == new:
        return None
    rows = torch.full((max(new.values()) + 1,), -1, dtype=torch.long)
    for token, i in new.items():
        rows[i] = old.get(token, -1)
    return rows


def lineage(previous: dict | None, steps: int, train_s: float) -> dict:
    """A continuation's record keeps the earlier phases (oldest first) and totals over all of them."""
    if not previous:
        return {}
    return {"phases": previous.get("phases", []) + [{k: v for k, v in previous.items() if k != "phases"}],
            "steps_total": steps + previous.get("steps_total", previous["steps"]),
            "train_s_total": round(train_s + previous.get("train_s_total", previous["train_s"]), 1)}


def save(model, adapter, path: Path) -> None:
    """``save_pretrained`` of the weights, tokenizer and processor (the video processor's own file too)."""
    was_training = model.training
    model.eval()
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path)
    adapter.processor.save_pretrained(path)
    if hasattr(adapter.processor, "video_processor"):
        adapter.processor.video_processor.save_pretrained(path)
    model.train(was_training)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proxy", required=True, choices=sorted(PROXIES))
    ap.add_argument("--minutes", type=float, default=15.0, help="time budget (cosine schedule over it)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--short-frac", type=float, default=0.75,
                    help="share of batches made of shorter clips (avkv.tasks.fixtures.proxy.SHORT): cheaper steps")
    ap.add_argument("--type-weights", type=lambda x: [float(v) for v in x.split(",")], default=None,
                    help="comma-separated batch shares of the proxy's question types, in their order "
                         "(default: types take turns)")
    ap.add_argument("--media-only", type=float, default=0.0,
                    help="weight of the swapped-media and dropped-media losses (split_forward): > 0 trains the model "
                         "to answer from the media entries of the cache, not from text entries that absorbed the "
                         "evidence")
    ap.add_argument("--seed", type=int, default=0, help="weight init seed")
    ap.add_argument("--data-seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is fastest for these tiny models (and far faster on a loaded machine)")
    ap.add_argument("--workers", type=int, default=2, help="data worker processes (one thread each)")
    ap.add_argument("--converged-steps", type=int, default=8,
                    help="stop early when every type was 100%% right on its last N full-length batches (0: never)")
    ap.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: the committed one)")
    ap.add_argument("--work", type=Path, default=Path(".cache/proxy_train"))
    ap.add_argument("--fixtures", type=Path, default=Path(".cache/fixtures"))
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from this checkpoint's weights (a second phase; TRAINING.json keeps both)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the proxy's, avkv/proxies/build.py); make proxies trains its "
                         "first phases shallower and grows them (--grow)")
    ap.add_argument("--grow", choices=GROW_MODES, default=None,
                    help="with --init-from a shallower checkpoint: grow its decoder to the proxy's depth "
                         "(grow_layers: zero = exact function, extra copies write nothing at first; split = copies "
                         "share the source layer's output; copy = plain copies)")
    ap.add_argument("--save-every", type=float, default=180.0, help="seconds between checkpoints during training")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="score the existing checkpoint on the held-out set and update its TRAINING.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    p = PROXIES[args.proxy]
    if args.type_weights and len(args.type_weights) != len(p.spec.types):
        ap.error(f"--type-weights needs {len(p.spec.types)} values, one per type {p.spec.types}")
    out = args.out or p.checkpoint
    work = args.work / args.proxy
    if args.evaluate_only:
        record = json.loads((out / "TRAINING.json").read_text())
        cfg = json.loads((out / "config.json").read_text())
        record["decoder_layers"] = cfg.get("text_config", cfg)["num_hidden_layers"]
        record["held_out"].update(seed=tasks.HELD_OUT_SEED, generator=tasks.VERSION,
                                  **held_out_accuracy(args.proxy, out.resolve(), args.fixtures.resolve(),
                                                      (work / "held_out_committed").resolve(), args.threads))
        (out / "TRAINING.json").write_text(json.dumps(record, indent=1))
        print("held-out (full cache):", json.dumps(record["held_out"]), flush=True)
        return
    init_dir = work / "init"
    if init_dir.exists():
        shutil.rmtree(init_dir)
    build_init(args.proxy, init_dir, seed=args.seed, layers=args.layers)
    previous, warm = None, None
    if args.init_from:                 # continue training a checkpoint, or warm-start from one of another geometry
        found = [args.init_from / f for f in ("TRAINING.json", "PROGRESS.json") if (args.init_from / f).exists()]
        previous = json.loads(found[0].read_text()) if found else None
        warm = warm_start(init_dir, args.init_from, args.grow)
        print(f"init from {args.init_from}: {warm['kept']} tensors kept, skipped (new shape or name): "
              f"{warm['skipped']}", flush=True)
    adapter = make_adapter(args.proxy, init_dir)
    model = adapter.model
    n_params = sum(x.numel() for x in model.parameters())
    dl = torch.utils.data.DataLoader(Stream(args.proxy, init_dir, args.batch, args.data_seed, args.short_frac, args.type_weights), batch_size=None,
                                     num_workers=args.workers, prefetch_factor=4)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    budget = args.minutes * 60
    recent: dict[str, deque] = defaultdict(lambda: deque(maxlen=args.converged_steps))
    recent_drop: dict[str, deque] = defaultdict(lambda: deque(maxlen=args.converged_steps))
    window: dict[str, list] = defaultdict(list)
    extra_window: dict[str, list] = defaultdict(list)
    log, step, t0 = [], 0, time.time()
    last_save = t0
    stop = "time budget"
    print(f"proxy {args.proxy}: {type(model).__name__}, {n_params} params, batch {args.batch}", flush=True)
    stop_requested = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))   # kill <pid>: stop, save, evaluate
    text_config = adapter.text_config()
    letters = [adapter.tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    for inputs, ids, pos, answer, eos, qtype, short, layout in dl:
        el = time.time() - t0
        if el > budget:
            break
        if stop_requested:
            stop = "stopped by SIGTERM"
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, el / budget))))
        for g in opt.param_groups:
            g["lr"] = lr
        ce = torch.nn.functional.cross_entropy
        extra = {}                    # the --media-only reads: name -> (loss, accuracy)
        if args.media_only > 0:       # the engine's two split points, in turn
            s = layout["context"] if step % 2 == 0 else layout["question"]
            perm = torch.roll(torch.arange(len(answer)), 1)
            logits, swapped, dropped = split_forward(model, text_config, inputs, ids, pos, layout, s, perm)
            # swapped media → that item's answer; no media → every letter equally likely (its accuracy ~ chance)
            extra = {"swap": (ce(swapped[:, 0], answer[perm]),
                              float((swapped[:, 0].argmax(-1) == answer[perm]).float().mean())),
                     "drop": (-dropped[:, 0].log_softmax(-1)[:, letters].mean(-1).mean(),
                              float((dropped[:, 0].argmax(-1) == answer).float().mean()))}
        else:
            # Qwen2-Audio and the Omni thinker ignore logits_to_keep (all positions come back): index from the end
            logits = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=3, **inputs).logits[:, -3:]
        loss = ce(logits[:, 0], answer) + ce(logits[:, 1], torch.full_like(answer, eos))
        acc = float((logits[:, 0].argmax(-1) == answer).float().mean())
        total = loss + args.media_only * sum(l for l, _ in extra.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        key = qtype + ("" if short else "@full")
        if not short:                  # convergence is judged on full-length clips only (the held-out geometry)
            recent[qtype].append(min(acc, extra["swap"][1]) if extra else acc)
            if extra:
                recent_drop[qtype].append(extra["drop"][1])
        window[key].append((float(loss.detach()), acc))
        for name, (l, a) in extra.items():
            extra_window[f"{key}@{name}"].append((float(l.detach()), a))
        step += 1
        if step % 15 == 0:
            rec = {"step": step, "t": round(time.time() - t0, 1), "lr": round(lr, 6),
                   **{f"acc[{k}]": round(float(np.mean([a for _, a in v])), 3)
                      for k, v in sorted({**window, **extra_window}.items())},
                   "loss": round(float(np.mean([l for v in window.values() for l, _ in v])), 4)}
            log.append(rec)
            window.clear()
            extra_window.clear()
            print(json.dumps(rec), flush=True)
        if time.time() - last_save > args.save_every:
            save(model, adapter, work / "ckpt")
            (work / "ckpt" / "PROGRESS.json").write_text(json.dumps(     # lets --init-from continue the record
                {"proxy": args.proxy, "steps": step, "batch": args.batch, "train_s": round(time.time() - t0, 1),
                 "lr": args.lr, "short_frac": args.short_frac, "type_weights": args.type_weights,
                 "media_only": args.media_only, "data_seed": args.data_seed, "log": log,
                 **({"init_from": warm} if warm else {}),
                 **lineage(previous, step, time.time() - t0)}, indent=1))
            last_save = time.time()
        if (args.converged_steps and len(recent) == len(p.spec.types)
                and all(len(d) == d.maxlen and min(d) == 1.0 for d in recent.values())
                and all(np.mean(d) <= 0.375 for d in recent_drop.values())):   # media-only: no-media answers ~chance
            stop = f"converged (every type 100% on its last {args.converged_steps} full-length batches)"
            break
    train_s = time.time() - t0
    tmp = work / "ckpt"
    save(model, adapter, tmp)
    print(f"stopped: {stop}; {step} steps, {step * args.batch} samples, {train_s:.0f} s", flush=True)
    held = held_out_accuracy(args.proxy, tmp.resolve(), args.fixtures.resolve(), (work / "held_out").resolve(),
                             args.threads)
    print("held-out (full cache):", json.dumps(held), flush=True)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tmp, out)
    record = {"proxy": args.proxy, "class": type(model).__name__, "params": n_params,
              "decoder_layers": text_config.num_hidden_layers, "steps": step,
              "batch": args.batch, "samples": step * args.batch, "train_s": round(train_s, 1), "stopped": stop,
              "lr": args.lr, "warmup": args.warmup, "short_frac": args.short_frac, "type_weights": args.type_weights,
              "media_only": args.media_only, "converged_steps": args.converged_steps,
              "init_seed": args.seed, "data_seed": args.data_seed,
              "threads": args.threads, "held_out": {"dataset": f"proxy_{args.proxy}", "seed": tasks.HELD_OUT_SEED,
                                                    "generator": tasks.VERSION, **held},
              "command": f"python scripts/train_proxy.py --proxy {args.proxy} --minutes {args.minutes:g} "
                         f"--batch {args.batch} --lr {args.lr:g} --short-frac {args.short_frac:g} --seed {args.seed} "
                         f"--data-seed {args.data_seed} --workers {args.workers} --converged-steps {args.converged_steps}"
                         + (f" --type-weights {','.join(f'{w:g}' for w in args.type_weights)}" if args.type_weights else "")
                         + (f" --media-only {args.media_only:g}" if args.media_only else "")
                         + (f" --init-from {args.init_from}" if args.init_from else "")
                         + (f" --grow {args.grow}" if args.grow else "")
                         + (f" --layers {args.layers}" if args.layers else ""),
              "log": log}
    if warm:
        record["init_from"] = warm
    record.update(lineage(previous, step, train_s))
    (out / "TRAINING.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out}", flush=True)
    os._exit(0)          # the data worker never ends by itself


if __name__ == "__main__":
    main()

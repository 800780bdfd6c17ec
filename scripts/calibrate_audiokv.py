#!/usr/bin/env python
"""AudioKV offline calibration: audio-critical head scores from ASR samples, written as one JSON file per model.

    python scripts/calibrate_audiokv.py --model qwen2_audio_7b --librispeech /data/LibriSpeech/test-clean
    python scripts/calibrate_audiokv.py --model tiny_qwen2_audio --synthetic 4 --teacher-forcing   # tiny models

For every ASR utterance (``shared/design/methods.md`` §5, offline head identification):

1. the model (loaded with eager attention) gets the audio and a transcription instruction;
2. the transcript is decoded greedily (or, with ``--teacher-forcing``, the reference transcript is fed: random tiny
   models transcribe nothing, and this gives every step a known word) [ours];
3. generated tokens are aligned to reference words (difflib on normalised words) [paper: string alignment];
4. for every step whose token belongs to an aligned word (confidence ≥ ``--min-confidence`` when the manifest has
   confidences) and every (layer, head), a *hit* is counted when the argmax of the head's attention restricted to
   the audio tokens lies in the word's audio-token span ± ``--tolerance`` [ours: top-1 rule];
5. S_{l,h} = hits / steps, written with the model's shape to ``<paths.cache>/audiokv/<model folder name>.json``
   (default), where :class:`avkv.methods.audiokv.AudioKV` finds it.

Word timings: a manifest may carry aligner output (WhisperX / MFA: ``words: [[word, start_s, end_s, conf], ...]``);
without it the utterance is split in proportion to word lengths [ours, approximate; the file records
``timing: proportional``]. A word's span is [⌊t_s/Δ⌋, ⌈t_e/Δ⌉] audio tokens with Δ = 0.04 s (25 tokens/s for
Qwen2-Audio and Qwen2.5-Omni) [ours]. ``--synthetic N`` writes N tone-burst "utterances" with exact word timings
(plumbing only: for the tiny random models, whose scores mean nothing).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avkv.methods.audiokv import (HeadHitCounter, align_words, proportional_word_times,  # noqa
                                  step_word_index, word_audio_span)
from avkv.schema import AUDIO  # noqa: E402
from avkv.models.base import weights_digest  # noqa: E402

INSTRUCTION = "Transcribe the audio exactly."


# ------------------------------------------------------------------------------------------------ samples
def read_manifest(path: str | Path) -> list[dict]:
    """JSONL: {"audio": path, "text": transcript, "words": [[w, t_s, t_e, conf?], ...] (optional)}."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        d = json.loads(line)
        for key in ("audio", "text"):
            if key not in d:
                raise ValueError(f"{path}: line {i + 1} lacks {key!r}")
        out.append(d)
    return out


def read_librispeech(root: str | Path, limit: int) -> list[dict]:
    """The official LibriSpeech layout: <root>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt + .flac files."""
    root = Path(root)
    out = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            uid, _, text = line.partition(" ")
            audio = trans.parent / f"{uid}.flac"
            if audio.exists():
                out.append({"id": uid, "audio": str(audio), "text": text.strip()})
            if len(out) >= limit:
                return out
    if not out:
        raise FileNotFoundError(f"no LibriSpeech transcripts (*.trans.txt) under {root}")
    return out


SYNTH_TEXTS = ["the cat sat on the mat", "a red ball rolls away", "open the small green door",
               "birds sing in the morning", "we walk to the river", "she reads a long book"]


def write_synthetic(out_dir: Path, n: int, sr: int = 16000) -> list[dict]:
    """N tone-burst utterances (one burst per word, 60 ms gaps) with exact word timings."""
    import numpy as np
    import soundfile as sf
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        text = SYNTH_TEXTS[i % len(SYNTH_TEXTS)]
        t, words, chunks = 0.2, [], [np.zeros(int(0.2 * sr), np.float32)]
        for w in text.split():
            d = 0.08 * len(w) + 0.1
            f = 200 + 60 * (sum(map(ord, w)) % 12)
            x = np.arange(int(d * sr)) / sr
            chunks.append((0.3 * np.sin(2 * np.pi * f * x) + 0.02 * rng.standard_normal(x.size)).astype(np.float32))
            words.append([w, round(t, 4), round(t + d, 4), 1.0])
            t += d + 0.06
            chunks.append(np.zeros(int(0.06 * sr), np.float32))
        path = out_dir / f"synth_{i}.wav"
        sf.write(path, np.concatenate(chunks), sr)
        samples.append({"id": f"synth_{i}", "audio": str(path), "text": text, "words": words})
    return samples


# ------------------------------------------------------------------------------------------- calibration
def audio_duration(path: str) -> float:
    import soundfile as sf
    info = sf.info(path)
    return info.frames / info.samplerate


@torch.no_grad()
def score_sample(adapter, sample: dict, counter: HeadHitCounter, delta: float, tolerance: int,
                 teacher_forcing: bool, max_new_tokens: int, min_confidence: float) -> dict:
    """Run one utterance and add its hits to ``counter``; returns a small per-sample summary."""
    from transformers import DynamicCache
    from avkv.schema import Media, Prompt
    enc = adapter.encode(Prompt(context=[Media("audio", sample["audio"])], question=INSTRUCTION))
    dev = adapter.device
    ids = enc.input_ids.to(dev)
    n = ids.shape[1]
    audio_pos = (enc.modality == AUDIO).nonzero().flatten().to(dev)
    n_audio = audio_pos.numel()
    if n_audio == 0:
        raise ValueError(f"{sample['audio']}: the prompt has no audio token")
    words = sample["text"].split()
    if sample.get("words"):
        ref = [(w[0], float(w[1]), float(w[2]), float(w[3]) if len(w) > 3 else 1.0) for w in sample["words"]]
        timing = "manifest"
    else:
        times = proportional_word_times(words, 0.0, audio_duration(sample["audio"]))
        ref = [(w, a, b, 1.0) for w, (a, b) in zip(words, times)]
        timing = "proportional"
    ref_words = [r[0] for r in ref]
    spans = [word_audio_span(a, b, delta, n_audio) for _, a, b, _ in ref]

    mm = adapter.media_inputs(enc)
    pos = adapter.prompt_position_ids(enc).to(dev)
    cache = DynamicCache(config=adapter.text_config())
    model = adapter.model
    # prefill all but the last prompt token; the last one runs as a 1-row step whose attention picks token 0
    model(input_ids=ids[:, :n - 1], past_key_values=cache, position_ids=pos[..., :n - 1], use_cache=True, **mm)
    forced = adapter.tokenizer(" ".join(ref_words), add_special_tokens=False)["input_ids"] if teacher_forcing else None
    eos = set(adapter.eos_token_ids)
    tok_in, step_pos = ids[:, n - 1:], pos[..., n - 1:n]
    gen, rows = [], []
    limit = len(forced) if forced is not None else max_new_tokens
    for t in range(limit):
        out = model(input_ids=tok_in, past_key_values=cache, position_ids=step_pos, use_cache=True,
                    output_attentions=True)
        if out.attentions is None or out.attentions[0] is None:
            raise RuntimeError("the model returned no attention weights; load it with attn_implementation=eager")
        att = torch.stack([a[0, :, -1, :] for a in out.attentions])          # [L, H, S]
        rows.append(att[:, :, audio_pos].float().cpu())
        nxt = forced[t] if forced is not None else int(out.logits[0, -1].argmax())
        if forced is None and nxt in eos:
            rows.pop()
            break
        gen.append(nxt)
        tok_in = torch.tensor([[nxt]], device=dev)
        step_pos = adapter.continue_position_ids(pos, n + t, 1)
    prefixes = [adapter.tokenizer.decode(gen[: t + 1], skip_special_tokens=True) for t in range(len(gen))]
    word_of_step = step_word_index(prefixes)
    gen_words = prefixes[-1].split() if prefixes else []
    match = align_words(gen_words, ref_words)
    used = 0
    for t, wi in enumerate(word_of_step):
        r = match.get(wi) if wi >= 0 else None
        if r is None or ref[r][3] < min_confidence:
            continue
        counter.add(rows[t], spans[r])
        used += 1
    return {"id": sample.get("id", sample["audio"]), "steps": len(gen), "steps_used": used, "n_audio": n_audio,
            "timing": timing, "transcript": prefixes[-1] if prefixes else ""}


def calibrate(adapter, samples: list[dict], delta: float = 0.04, tolerance: int = 1, teacher_forcing: bool = False,
              max_new_tokens: int = 128, min_confidence: float = 0.95, log=print) -> dict:
    """Head scores of ``adapter``'s model over ``samples`` as the JSON-ready dict AudioKV reads."""
    tc = adapter.text_config()
    L, H, Hk = tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads
    counter = HeadHitCounter(L, H, tolerance)
    per_sample, t0 = [], time.perf_counter()
    for i, s in enumerate(samples):
        per_sample.append(score_sample(adapter, s, counter, delta, tolerance, teacher_forcing, max_new_tokens,
                                       min_confidence))
        log(f"[{i + 1}/{len(samples)}] {per_sample[-1]['id']}: {per_sample[-1]['steps_used']} aligned steps")
    if counter.steps == 0:
        raise RuntimeError("no generated token aligned to a reference word: nothing to score (a random model "
                           "transcribes nothing; use --teacher-forcing)")
    timings = sorted({p["timing"] for p in per_sample})
    return {"model": str(adapter.path), "family": adapter.family, "num_layers": L, "num_heads": H,
            "num_kv_heads": Hk, "scores": counter.scores().tolist(), "steps": counter.steps,
            "samples": len(samples), "delta_s": delta, "tolerance": tolerance,
            "decode": "teacher_forced" if teacher_forcing else "greedy", "timing": "+".join(timings),
            "min_confidence": min_confidence, "rule": "top1-argmax-in-word-span", "seconds": time.perf_counter() - t0}


def default_out(cfg) -> Path:
    return Path(cfg.paths.cache) / "audiokv" / f"{Path(cfg.model.path).name}.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model config name (configs/model/<name>.yaml)")
    ap.add_argument("--model-path", help="override the config's checkpoint folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="JSONL of {audio, text, words?}")
    src.add_argument("--librispeech", help="a LibriSpeech split folder (official layout)")
    src.add_argument("--synthetic", type=int, help="N synthetic tone-burst utterances (tiny models only)")
    ap.add_argument("--max-samples", type=int, default=200, help="calibration size (200, [ours])")
    ap.add_argument("--out", help="output JSON (default <paths.cache>/audiokv/<model folder name>.json)")
    ap.add_argument("--teacher-forcing", action="store_true", help="feed the reference transcript [ours]")
    ap.add_argument("--delta", type=float, default=0.04, help="seconds per audio token (0.04)")
    ap.add_argument("--tolerance", type=int, default=1, help="± audio tokens around the word span (1)")
    ap.add_argument("--min-confidence", type=float, default=0.95, help="word confidence threshold (0.95)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--skip-existing", action="store_true", help="do nothing when the output file exists")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    a = ap.parse_args(argv)

    from avkv.config import compose, instantiate
    over = [f"model={a.model}", "model.attn_implementation=eager"]
    if a.model_path:
        over.append(f"model.path={a.model_path}")
    if a.dtype:
        over.append(f"model.dtype={a.dtype}")
    cfg = compose(over)
    if a.skip_existing:
        target = Path(a.out) if a.out else default_out(cfg)
        if target.exists():
            try:
                recorded = json.loads(target.read_text()).get("weights_sha256")
            except (OSError, json.JSONDecodeError):
                recorded = None
            if recorded == weights_digest(cfg.model.path):
                print(f"head scores already there: {target}")
                return 0
            print(f"head scores in {target} belong to other weights (or record none): recalibrating")
    adapter = instantiate(cfg.model, device=a.device)
    if a.synthetic:
        samples = write_synthetic(Path(cfg.paths.cache) / "audiokv_synthetic", a.synthetic)
    elif a.manifest:
        samples = read_manifest(a.manifest)[: a.max_samples]
    else:
        samples = read_librispeech(a.librispeech, a.max_samples)
    result = calibrate(adapter, samples, a.delta, a.tolerance, a.teacher_forcing, a.max_new_tokens,
                       a.min_confidence)
    result["weights_sha256"] = weights_digest(cfg.model.path)
    out = Path(a.out) if a.out else default_out(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    s = torch.tensor(result["scores"])
    print(f"head scores ({result['steps']} steps, {result['samples']} samples) → {out}; "
          f"mean {s.mean():.3f}, max {s.max():.3f} at layer/head {divmod(int(s.argmax()), s.shape[1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

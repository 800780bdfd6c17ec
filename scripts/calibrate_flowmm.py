#!/usr/bin/env python
"""FlowMM offline calibration: the per-layer cross-modal ratio ρ^l averaged over samples, written as JSON.

    python scripts/calibrate_flowmm.py model=qwen2_5_vl_7b dataset=<milebench task> --samples 32
    python run.py method=flowmm method.rho_source=offline method.calibration_file=<that file>

The paper (``shared/design/methods.md`` §3) computes ρ^l from attention but does not say whether online or offline;
it reports that the per-layer pattern is consistent across tasks. This script runs FlowMM with the online, chunked
ρ (exact, all prompt query rows) on the first ``--samples`` documents of a dataset, reads each layer's ρ from the
per-sample records, and writes ``{"rho": [mean per layer], "rho_std": [...], ...}`` [ours: ~32 samples].
Arguments other than the options are Hydra overrides of ``configs/config.yaml``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FILENAME = "flowmm_rho.json"


def calibrate(cfg, samples: int, log=print) -> dict:
    from avkv.config import instantiate
    from avkv.engine import Engine
    from avkv.experiment import build_prompt, load_adapter, sample_seed
    from avkv.methods.flowmm import FlowMM
    task = instantiate(cfg.dataset)
    adapter = load_adapter(cfg)
    method = FlowMM(rho_source="online", proxy=int(cfg.method.get("proxy", 32)),
                    media=tuple(cfg.method.get("media", ("image", "video", "audio"))))
    engine = Engine(adapter, method, budget=float(cfg.budget), compress_at=cfg.compress_at)
    per_layer: dict[int, list[float]] = {}
    used, t0 = 0, time.perf_counter()
    for doc in list(task.docs())[:samples]:
        enc = adapter.encode(build_prompt(task, adapter, doc))
        gen = engine.generate(enc, seed=sample_seed(int(cfg.seed), str(doc.id)), max_new_tokens=1)
        info = gen.record.get("method_info")
        if not info:
            log(f"{doc.id}: not compressed (budget keeps everything?), skipped")
            continue
        for layer, d in info.items():
            per_layer.setdefault(int(layer), []).append(float(d["rho"]))
        used += 1
        log(f"[{used}] {doc.id}: rho = {[round(float(d['rho']), 3) for _, d in sorted(info.items(), key=lambda x: int(x[0]))]}")
    if not used:
        raise RuntimeError("no sample was compressed; nothing to calibrate")
    L = max(per_layer) + 1
    rho = [statistics.fmean(per_layer[i]) for i in range(L)]
    std = [statistics.pstdev(per_layer[i]) for i in range(L)]
    return {"model": str(adapter.path), "family": adapter.family, "dataset": str(cfg.dataset.get("name", "")),
            "samples": used, "num_layers": L, "rho": rho, "rho_std": std, "media": list(method.media),
            "proxy": method.proxy, "compress_at": cfg.compress_at, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny_qwen2_5_omni dataset=avqa")
    ap.add_argument("--samples", type=int, default=32, help="documents to average over (32, [ours])")
    ap.add_argument("--out", help=f"output JSON (default <model folder>/{FILENAME})")
    a = ap.parse_args(argv)
    from avkv.config import compose
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    cfg = compose(list(a.overrides) + ["method=flowmm", "logger=none"])
    result = calibrate(cfg, a.samples)
    out = Path(a.out) if a.out else Path(cfg.model.path) / FILENAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"rho per layer over {result['samples']} samples → {out}: {[round(r, 3) for r in result['rho']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

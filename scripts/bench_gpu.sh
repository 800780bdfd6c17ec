#!/usr/bin/env bash
# One command for the GPU benchmarks: Qwen2.5-7B-shaped random-weight layers (hidden 3584, 28 q / 4 kv heads,
# MLP 18944), prefill compression overhead, decode time per token at budgets 1.0/0.5/0.2/0.1 and peak CUDA memory
# (scripts/bench_overhead.py: CUDA-event wall times, bf16), then the capacity sweep and the decode bandwidth
# model where those scripts exist (scripts/bench_capacity.py: the largest batch under a KV cap and its tokens/s per
# budget; scripts/bench_decode.py; scripts/bench_batched_prefill.py: prefill tokens/s of one batched prefill vs
# per-sample ones). Writes results/bench/gpu/.
#
#   bash scripts/bench_gpu.sh                    # on a CUDA machine (environment.yml)
#   bash scripts/bench_gpu.sh --dry-run          # CPU, 1 layer, 256 tokens: checks the pipeline in a minute
#   bash scripts/bench_gpu.sh --out DIR --layers 4
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=results/bench/gpu
LAYERS=4
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --layers) LAYERS=$2; shift ;;
    *) echo "bench_gpu.sh: unknown argument $1 (--dry-run, --out DIR, --layers N)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"

if [ "$DRY" = 1 ]; then
  DEV=cpu
  OVERHEAD=(--device cpu --shape 0.5b --layers 1 --lengths 256 --repeats 1 --methods full snapkv h2o
            --decode-length 256 --decode-budgets 1.0 0.2 --new-tokens 2)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu.sh: no CUDA device visible to torch ' + torch.__version__ + ' (use --dry-run on CPU)')"
  DEV=cuda
  OVERHEAD=(--device cuda --shape 7b --layers "$LAYERS" --lengths 4096 16384 --repeats 5
            --decode-length 16384 --decode-budgets 1.0 0.5 0.2 0.1 --new-tokens 32)
fi

{ echo "date: $(date -u '+%Y-%m-%d %H:%M') UTC"; echo "dry_run: $DRY"; echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo -)"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
} > "$OUT/environment.txt"

echo "== prefill overhead, decode, memory ($DEV) -> $OUT/overhead"
"$PY" scripts/bench_overhead.py "${OVERHEAD[@]}" --out "$OUT/overhead"

# optional_step <script> <out subdir> <title> [args...]: run a benchmark script where this checkout has it (its
# --help on a dry run)
optional_step() {
  local script=$1 sub=$2 title=$3
  shift 3
  if [ -f "scripts/$script" ]; then
    echo "== $title -> $OUT/$sub"
    if [ "$DRY" = 1 ]; then "$PY" "scripts/$script" --help >/dev/null
    else "$PY" "scripts/$script" --device cuda --out "$OUT/$sub" "$@"; fi
  else
    echo "== $title: scripts/$script is not in this checkout (skipped)" | tee -a "$OUT/environment.txt"
  fi
}
# capacity: Qwen2.5-7B-shaped layers, 16k prompts; the cap on the KV bytes the batch allocates is an 80 GB GPU's
# memory after the 7B model's bf16 weights (15.23 GB), the share of the $LAYERS benchmarked of its 28 layers
# (CAP_GB=<GB> for another card)
CAP_KV=$("$PY" -c "print(int((${CAP_GB:-80} * 1e9 - 15.23e9) * $LAYERS / 28))")
optional_step bench_capacity.py capacity "capacity sweep (KV cap $CAP_KV bytes)" --shape 7b --layers "$LAYERS" \
  --length 16384 --new-tokens 32 --cap-kv-bytes "$CAP_KV"
optional_step bench_decode.py decode "decode vs the bandwidth model"
optional_step bench_batched_prefill.py batched_prefill "one batched prefill vs per-sample prefills" --shape 7b \
  --layers "$LAYERS" --length 8192 --batch 8
echo "wrote $OUT"

#!/usr/bin/env bash
# BUILD_NOTES "On a GPU" in one call: bash scripts/gpu_measure.sh [--dry-run] OUTDIR [NAME ...]
# Runs, in this order and under one budget of BUDGET_S seconds (default 480) for the whole call:
#   job_1b      the job (ours and the PyTorch reference), cell 4x40x1 at gpu_1b sizes, bf16
#   job_1b_300  the same, cell 4x300x1
#   mfu_1b      MFU of configs/gpu_1b.py's steps (attention through cuDNN) and of a block's parts
#   torch       our step against eager PyTorch's at configs/small.py
# each under its own time limit (their sum is the budget), cut to what is left of the budget, so one
# slow or failing benchmark leaves the others' results. Each writes OUTDIR/NAME.json and .md; the
# log says how each ended; the call exits 1 if any did not write its JSON. NAMEs run only those;
# mfu_small, memory_1b and job_1b_host run only when named. LIMIT_NAME=S sets NAME's limit.
# Needs a GPU jax and a CUDA torch. --dry-run: the same calls on the CPU at tiny sizes (no
# nvidia-smi, no GPU check, twice the limits), ~2.5 minutes on 2 cores: checks the call, not the
# numbers (tests/test_gpu_measure.py runs it).
set -u
dry=
if [[ "${1:-}" == "--dry-run" ]]; then
  dry=1
  shift
fi
out=${1:-bench_results/gpu}
shift
only=" $* "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
budget=${BUDGET_S:-480}
scale=1   # --dry-run: twice the limits, for 2 loaded cores (the budget too, unless BUDGET_S is set)
default=" job_1b job_1b_300 mfu_1b torch "
failed=()

bench() {   # bench NAME LIMIT_S ARGS...: $PYTHON scripts/bench.py ARGS --out OUTDIR/NAME.json
  local name=$1 limit=$2
  shift 2
  if [[ "$only" == "  " ]]; then
    [[ "$default" == *" $name "* ]] || return 0
  else
    [[ "$only" == *" $name "* ]] || return 0
  fi
  local own="LIMIT_$name"   # e.g. LIMIT_job_1b_300=400: that benchmark's limit, in seconds
  limit=$((${!own:-$limit} * scale))
  local left=$((budget - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "=== $name: skipped, the call's ${budget}s budget is spent"
    failed+=("$name")
    return 0
  fi
  echo "=== $name: start $(date +%T), limit ${limit}s"
  rm -f "$out/$name.json"
  timeout "$limit" "$PYTHON" scripts/bench.py "$@" --out "$out/$name.json"
  echo "=== $name: exit $? at $(date +%T)"
  [[ -f "$out/$name.json" ]] || failed+=("$name")
}

if [[ -n "$dry" ]]; then
  export JAX_PLATFORMS=cpu
  scale=2
  budget=${BUDGET_S:-960}
  echo "=== dry run: CPU, tiny sizes"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
DRY=$dry "$PYTHON" - <<'EOF' || exit 1
import os
import jax, flax, optax, orbax.checkpoint, torch
print(f"jax {jax.__version__} on {jax.devices()}, flax {flax.__version__}, optax {optax.__version__}, "
      f"orbax {orbax.checkpoint.__version__}, torch {torch.__version__} cuda={torch.cuda.is_available()}")
if not os.environ["DRY"]:
  assert jax.default_backend() == "gpu", "jax sees no GPU: the figures would be CPU ones"
EOF

if [[ -n "$dry" ]]; then   # every call below at tiny sizes: the same code paths, in seconds
  tiny=(--config configs/tiny.py model.d_model=32 model.n_heads=2 model.n_kv_heads=2
        model.d_ff=64 model.n_blocks_per_stack=1 training.batch_size=2 training.seq_len=16
        training.eval_batches=1)
  job=("${tiny[@]}" --quick)
  cells=(2x2x1 2x3x1)
  # the FLOP check against XLA needs matmuls to dominate: configs/tiny.py's d_model 128
  small=(--config configs/tiny.py training.batch_size=2 training.seq_len=64 training.eval_batches=1)
  mfu_1b=("${small[@]}" --depths 2 --steps 2)
  torch_small=("${small[@]}" --quick --depths 2 --steps 2)
  mfu_small=("${small[@]}" --quick --steps 2)
  memory_1b=("${tiny[@]}" --stages 2 --steps 2 --modes cached qlora)
else
  # issue 15's job with gpu_1b-sized stacks (overrides after the job's own sizes win)
  job=(model.d_ff=5632 training.batch_size=8 training.seq_len=2048 --config configs/gpu_1b.py
       --quick)
  cells=(4x40x1 4x300x1)
  mfu_1b=(--config configs/gpu_1b.py --depths 5 --steps 5)
  torch_small=(--quick)
  mfu_small=(--config configs/small.py)
  memory_1b=(--config configs/gpu_1b.py --stages 2 --steps 2 --modes cached qlora)
fi

# The limits sum to the budget less ~20 s for the checks above.
bench job_1b 130 job "${job[@]}" --cells "${cells[0]}"
bench job_1b_300 200 job "${job[@]}" --cells "${cells[1]}"
bench mfu_1b 75 mfu "${mfu_1b[@]}"
bench torch 55 torch "${torch_small[@]}"
# Only when named:
bench mfu_small 90 mfu "${mfu_small[@]}"
bench memory_1b 200 memory "${memory_1b[@]}"
# the job with the cache in host memory (spilling beyond 2 GiB), as before the device tier:
# 2026-11-27's 0.50x
bench job_1b_host 150 job "${job[@]}" training.progressive.cache_device_bytes=0 \
  --cells "${cells[0]}"

if ((${#failed[@]})); then
  echo "=== done in ${SECONDS}s; no JSON from: ${failed[*]}"
  exit 1
fi
echo "=== done in ${SECONDS}s"

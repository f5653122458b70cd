#!/usr/bin/env bash
# BUILD_NOTES "On a GPU" in one call: bash scripts/gpu_measure.sh OUTDIR [NAME ...]
# Runs the benchmarks in order of importance, each under its own time limit so one slow or failing
# benchmark leaves the others' results; each writes OUTDIR/NAME.json and .md, the log says how each
# ended. NAMEs (mfu_small, mfu_1b, torch, memory_1b, job_1b, job_1b_host) run only those.
# Needs a GPU jax and a CUDA torch; the job cells use configs/gpu_1b.py-sized stacks in bf16.
set -u
out=${1:-bench_results/gpu}
shift
only=" $* "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

bench() {   # bench NAME LIMIT_S ARGS...: $PYTHON scripts/bench.py ARGS --out OUTDIR/NAME.json
  local name=$1 limit=$2
  shift 2
  [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
  echo "=== $name: start $(date +%T), limit ${limit}s"
  timeout "$limit" "$PYTHON" scripts/bench.py "$@" --out "$out/$name.json"
  echo "=== $name: exit $? at $(date +%T)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'EOF' || exit 1
import jax, flax, optax, orbax.checkpoint, torch
print(f"jax {jax.__version__} on {jax.devices()}, flax {flax.__version__}, optax {optax.__version__}, "
      f"orbax {orbax.checkpoint.__version__}, torch {torch.__version__} cuda={torch.cuda.is_available()}")
assert jax.default_backend() == "gpu", "jax sees no GPU: the figures would be CPU ones"
EOF

bench mfu_small 90 mfu
bench mfu_1b 150 mfu --config configs/gpu_1b.py --depths 5
bench torch 150 torch
bench memory_1b 200 memory --config configs/gpu_1b.py --stages 2 --steps 2 --modes cached qlora
# issue 15's job with gpu_1b-sized stacks (overrides after the job's own sizes win)
bench job_1b 150 job model.d_ff=5632 training.batch_size=8 training.seq_len=2048 \
  --config configs/gpu_1b.py --quick --cells 4x40x1
# the same with the cache in host memory (spilling beyond 2 GiB), as before the device tier:
# 2026-11-27's 0.50x
bench job_1b_host 150 job model.d_ff=5632 training.batch_size=8 training.seq_len=2048 \
  training.progressive.cache_device_bytes=0 --config configs/gpu_1b.py --quick --cells 4x40x1

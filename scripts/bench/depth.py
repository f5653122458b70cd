"""depth: step time of stage k = 1..K, per trunk strategy."""
import sys

from stackwise_jax.config import load_config

from bench.common import MODES, check_positive, flag_noise
from bench.stage import build_stage, stage_row, time_stage

CONFIG = "configs/small.py"
SETTINGS = {"stages": 8, "steps": 6, "modes": ["cached", "streamed", "qlora", "end-to-end"]}
QUICK = {"stages": 3, "steps": 2, "modes": ["cached", "streamed", "end-to-end"]}


def run(args, s):
  rows = []
  for k in range(1, s["stages"] + 1):   # modes interleaved, so a slow spell hits them alike
    for mode in s["modes"]:
      stage = build_stage(load_config(args.config, [*args.overrides, *MODES[mode]]), k)
      rows.append({"mode": mode, "stage": k, **stage_row(stage, *time_stage(stage, s["steps"]))})
      print(f"  {mode} stage {k}: {rows[-1]['step_ms']:.1f} ms", file=sys.stderr)
  check_positive(rows, "step_ms", "cache_build_ms", "model_gflop")
  flag_noise(rows)
  for row in rows:
    row["step_plus_cache_ms"] = row["step_ms"] + (row["cache_build_ms"] or 0)
  by = lambda mode: [r for r in rows if r["mode"] == mode]
  summary = {"cached_stage_ratio": None}
  for mode in s["modes"]:
    first, last = by(mode)[0], by(mode)[-1]
    summary[f"{mode}_stage_ratio"] = last["step_ms"] / first["step_ms"]
  if "cached" in s["modes"]:
    first, last = by("cached")[0], by("cached")[-1]
    summary["cached_with_cache_build_ratio"] = last["step_plus_cache_ms"] / first["step_plus_cache_ms"]
    summary["goal"] = f"cached stage {s['stages']} step within 15% of stage 1"
    summary["goal_met"] = summary["cached_stage_ratio"] <= 1.15
  columns = [("trunk", "mode", "{}"), ("stage", "stage", "{}"), ("ms/step", "step_ms", "{:.1f}"),
             ("spread", "spread", "{:.0%}"), ("cache build ms/batch", "cache_build_ms", "{:.1f}"),
             ("tokens/s", "tokens_per_s", "{:,.0f}"), ("GFLOP/step", "model_gflop", "{:.1f}"),
             ("XLA GFLOP", "xla_gflop", "{:.1f}"), ("GFLOP/s", "gflop_per_s", "{:.1f}")]
  return columns, rows, summary

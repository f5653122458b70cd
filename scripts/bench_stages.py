"""Per-stage train-step time, cached vs streamed frozen trunk (issue: depth-flat cost).

  python scripts/bench_stages.py --config configs/small.py --stages 6 --steps 12 --out bench_stages.json

Runs the real trainer twice (cache_activations on/off) with a short stage length, takes each
stage's steady-state step time (compilation and evaluation excluded), prints a table and writes
JSON with a `summary` (`cached_stage_ratio` = cached step time of the last stage / the first).
"""
import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax

from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer


def bench_parser(doc: str, out: str) -> argparse.ArgumentParser:
  """The arguments every benchmark script takes: --config, --out and config overrides; a script
  adds its own."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--config", default="configs/small.py")
  parser.add_argument("--out", default=out)
  parser.add_argument("overrides", nargs="*", help="config overrides, e.g. training.batch_size=8")
  return parser


def run(config_path, stages, steps, cache, overrides):
  """Trains `stages` stages of `steps` steps quietly; returns the results. `cache` None keeps the
  config's cache_activations."""
  cache_override = [] if cache is None else [f"training.progressive.cache_activations={cache}"]
  config = load_config(config_path, [
      *overrides, f"training.steps_per_stack={steps}", "training.eval_every=0",
      "training.eval_batches=1", f"training.progressive.target_stacks={stages}", *cache_override])
  trainer = ProgressiveTrainer(config, progress=False, log=lambda msg: None)
  return trainer.train_progressively(ProgressiveRackBuilder(config), make_dataloader(config))


def main():
  parser = bench_parser(__doc__, "bench_stages.json")
  parser.add_argument("--stages", type=int, default=6)
  parser.add_argument("--steps", type=int, default=12, help="train steps per stage (timed: steps-1)")
  args = parser.parse_args()

  modes = {"cached": True, "streamed": False}
  stages = {mode: run(args.config, args.stages, args.steps, cache, args.overrides)["stages"]
            for mode, cache in modes.items()}
  rows = []
  for i in range(args.stages):
    row = {"stage": i + 1}
    for mode in modes:
      s = stages[mode][i]
      row[f"{mode}_step_ms"] = 1000 * s["step_seconds"]
      row[f"{mode}_tokens_per_s"] = s["tokens_per_s"]
      row[f"{mode}_activation_mode"] = s["activation_mode"]
    rows.append(row)
  for r in rows:
    if min(r["cached_step_ms"], r["streamed_step_ms"]) <= 0:
      raise SystemExit(f"non-positive step time in stage {r['stage']}: {r}")

  first = rows[0]["cached_step_ms"]
  print(f"$ python {' '.join(sys.argv)}")
  print(f"{'stage':>5}  {'cached ms':>9}  {'x stage 1':>9}  {'streamed ms':>11}  {'x stage 1':>9}")
  for r in rows:
    print(f"{r['stage']:>5}  {r['cached_step_ms']:>9.1f}  {r['cached_step_ms'] / first:>9.2f}  "
          f"{r['streamed_step_ms']:>11.1f}  {r['streamed_step_ms'] / rows[0]['streamed_step_ms']:>9.2f}")
  summary = {"cached_stage_ratio": rows[-1]["cached_step_ms"] / first,
             "streamed_stage_ratio": rows[-1]["streamed_step_ms"] / rows[0]["streamed_step_ms"]}
  print(f"cached stage {args.stages} / stage 1 step time: {summary['cached_stage_ratio']:.3f} "
        f"(goal <= 1.15)")
  save(args.out, {"summary": summary, "rows": rows, "config": args.config,
                  "steps_per_stage": args.steps})


def save(path, payload):
  """Writes `payload` as JSON with the command line, the date and the machine."""
  payload = {**payload, "command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
             "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"jax {jax.__version__} {jax.default_backend()} "
                        f"({jax.devices()[0].device_kind})"}
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()

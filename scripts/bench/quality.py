"""quality: progressive vs end-to-end at equal training FLOPs."""
import statistics
import sys
import time

from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer

from bench.common import MODES, check_positive
from bench.stage import build_stage

CONFIG = "configs/tiny.py"
SETTINGS = {"steps": 250, "seeds": [0, 1], "eval_batches": 16,
            "modes": ["cached", "qlora", "end-to-end"]}
QUICK = {"steps": 20, "seeds": [0], "eval_batches": 4}

METHODS = {"cached": "progressive, frozen trunk (cached)",
           "streamed": "progressive, frozen trunk (streamed)",
           "qlora": "progressive, int4 trunk + adapters (qlora)",
           "nvfp4": "progressive, nvfp4 stacks, frozen trunk",
           "end-to-end": "end-to-end: all stacks, one stage"}


def run(args, s):
  base = load_config(args.config, args.overrides)
  target = base.training.progressive.target_stacks
  # Model FLOPs of every stage each method runs (checked against XLA by build_stage).
  flops = {}
  for mode in s["modes"]:
    config = load_config(args.config, [*args.overrides, *MODES[mode]])
    stages = [target] if mode == "end-to-end" else range(1, target + 1)
    built = [build_stage(config, k) for k in stages]
    flops[mode] = sum(b.flops + (b.prefix_flops if b.plan.cached else 0) for b in built)
  # The budget: the first method with `steps` steps a stage; the others get as many steps a stage
  # as that budget buys them.
  budget = s["steps"] * flops[s["modes"][0]]
  rows = []
  for seed in s["seeds"]:
    for mode in s["modes"]:
      steps = max(round(budget / flops[mode]), 1)
      config = load_config(args.config, [
          *args.overrides, *MODES[mode], f"training.seed={seed}", f"training.steps_per_stack={steps}",
          "training.eval_every=0", f"training.eval_batches={s['eval_batches']}"])
      start = time.perf_counter()
      results = ProgressiveTrainer(config, progress=False, log=lambda _: None).train_progressively(
          ProgressiveRackBuilder(config), make_dataloader(config))
      rows.append({"mode": mode, "method": METHODS[mode], "seed": seed,
                   "stages": len(results["stages"]),
                   "steps_per_stage": steps, "train_tflop": steps * flops[mode] / 1e12,
                   "seconds": time.perf_counter() - start,
                   "eval_loss": results["final_eval_loss"]})
      print(f"  {mode} seed {seed}: eval loss {rows[-1]['eval_loss']:.4f}", file=sys.stderr)
  check_positive(rows, "seconds", "eval_loss", "train_tflop")
  mean = {mode: statistics.mean(r["eval_loss"] for r in rows if r["mode"] == mode)
          for mode in s["modes"]}
  summary = {f"{mode}_eval_loss": loss for mode, loss in mean.items()}
  summary["budget_tflop"] = budget / 1e12
  summary["best"] = min(mean, key=mean.get)
  columns = [("method", "method", "{}"), ("seed", "seed", "{}"), ("stages", "stages", "{}"),
             ("steps/stage", "steps_per_stage", "{}"), ("train TFLOP", "train_tflop", "{:.2f}"),
             ("seconds", "seconds", "{:.0f}"), ("eval loss", "eval_loss", "{:.4f}")]
  return columns, rows, summary

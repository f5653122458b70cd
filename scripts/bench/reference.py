"""reference: the original's way of training (scripts/torch_reference.py, as `job` runs it) for a
job too long to run whole, from two shorter runs of it.

Each stage's seconds are fixed + per_step * steps (the trunk forward and the new stack's step cost
the same at every step of a stage); two runs of `fit_steps` steps a stage, one epoch, fit both
terms per stage, and the estimate for `steps` steps a stage (steps x epochs of a `job` cell) is
the longer run's start-up plus the sum of fixed + per_step * steps. On 2 CPU cores the 8 x 300 x 3
cell takes ~80 minutes on this side alone; this takes ~9.
"""
import tempfile

from stackwise_jax.config import load_config

from bench.common import check_positive
from bench.job import JOB_SIZES, run_reference

CONFIG = "configs/small.py"
SETTINGS = {"stages": 8, "steps": 900, "fit_steps": [20, 60]}
QUICK = {"stages": 2, "steps": 20, "fit_steps": [2, 4]}


def run(args, s):
  runs = {}
  for steps in s["fit_steps"]:
    config = load_config(args.config, [
        *JOB_SIZES, *args.overrides, f"training.steps_per_stack={steps}",
        "training.epochs_per_stack=1", f"training.progressive.max_stacks={s['stages']}",
        f"training.progressive.target_stacks={s['stages']}"])
    with tempfile.TemporaryDirectory() as tmp:
      runs[steps] = run_reference(config, s["stages"], 1, tmp)
  short, long = s["fit_steps"]
  rows = []
  for a, b in zip(runs[short][1], runs[long][1]):
    per_step = (b["seconds"] - a["seconds"]) / (long - short)
    fixed = b["seconds"] - per_step * long
    rows.append({"stage": a["stage"], "short_s": a["seconds"], "long_s": b["seconds"],
                 "per_step_s": per_step, "fixed_s": fixed,
                 "estimated_s": fixed + per_step * s["steps"]})
  check_positive(rows, "short_s", "long_s", "per_step_s", "estimated_s")
  startup = runs[long][0] - sum(r["seconds"] for r in runs[long][1])
  summary = {"estimated_wall_s": startup + sum(r["estimated_s"] for r in rows),
             "startup_s": startup, "steps_a_stage": s["steps"],
             "fit_walls_s": {str(k): wall for k, (wall, _) in runs.items()}}
  columns = [("stage", "stage", "{}"), (f"{short} steps s", "short_s", "{:.1f}"),
             (f"{long} steps s", "long_s", "{:.1f}"), ("s/step", "per_step_s", "{:.3f}"),
             ("fixed s", "fixed_s", "{:.1f}"), (f"{s['steps']} steps s (est.)", "estimated_s",
                                                "{:.0f}")]
  return columns, rows, summary

"""quality: which way of growing a rack reaches end-to-end's eval loss with the fewest FLOPs.

Methods: end-to-end (all stacks, one stage), and progressive with a cached frozen trunk under
each `new_stack_init`, with and without a final end-to-end stage. Every method gets the FLOPs
end-to-end spends in `steps` steps (a final stage takes `final_fraction` of them). Each method's
eval curve is put on a training-FLOPs axis (model FLOPs of every train step, plus the cached
trunk's forward when its cache is built; evaluation not counted), averaged over seeds, and read
two ways: the eval loss at the common budget, and the FLOPs at which the mean curve first
reaches end-to-end's final mean eval loss (linear interpolation between eval points), G_stack's
measure.
"""
import math
import statistics
import sys
import time

from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer

from bench.common import MODES, check_positive
from bench.stage import build_stage

CONFIG = "configs/tiny.py"
# Sizes: small enough for 45 runs in < 40 min on 2 cores; 8 eval batches and 5 seeds keep the
# seed spread of the mean well under the gaps measured (see BUILD_NOTES).
SIZE = ["model.d_model=96", "model.n_heads=4", "model.n_kv_heads=4", "model.d_ff=256",
        "training.seq_len=64", "model.max_seq_len=64", "training.batch_size=16",
        "training.warmup_steps=10", "training.eval_batches=8", "training.lr=3e-3",
        # a third of the stages' peak (the default 1e-4 suits fine-tuning a large rack; here it
        # moves the loss by 0.02 in 75 steps)
        "training.final_stage_lr=1e-3"]
SETTINGS = {"steps": 300, "seeds": [0, 1, 2, 3, 4], "evals": 10, "final_fraction": 0.25,
            "methods": ["end-to-end", "random", "copy_last", "stack", "identity",
                        "random+final", "copy_last+final", "stack+final", "identity+final"]}
QUICK = {"steps": 24, "seeds": [0, 1], "evals": 3,
         "methods": ["end-to-end", "random", "identity+final"]}

INITS = ("random", "copy_last", "stack", "identity")


def method_overrides(method: str) -> list[str]:
  """Config overrides of a method: "end-to-end", an init, or an init + "+final"."""
  if method == "end-to-end":   # the baseline: random init, whatever the config's growth
    return [*MODES["end-to-end"], "training.progressive.new_stack_init=random"]
  init = method.removesuffix("+final")
  if init not in INITS:
    raise SystemExit(f"bench.py quality: method {method!r}: allowed: end-to-end, "
                     f"{', '.join(INITS)}, each init with +final")
  final = ["training.final_stage=True"] if method.endswith("+final") else []
  return [*MODES["cached"], f"training.progressive.new_stack_init={init}", *final]


def stage_flops(args, method: str) -> list[tuple[float, float]]:
  """(train-step FLOPs, cache-build FLOPs per batch) of each stage the method runs."""
  config = load_config(args.config, [*SIZE, *args.overrides, *method_overrides(method)])
  target = config.training.progressive.target_stacks
  if method == "end-to-end":
    return [(build_stage(config, target).flops, 0.0)]
  built = [build_stage(config, k) for k in range(1, target + 1)]
  return [(b.flops, b.prefix_flops if b.plan.cached else 0.0) for b in built]


def run(args, s):
  if "end-to-end" not in s["methods"]:   # every saving is measured against it
    s["methods"] = ["end-to-end", *s["methods"]]
  e2e_flops = stage_flops(args, "end-to-end")[0][0]
  # How a stack starts does not change what its steps compute: one count serves every init.
  grown_flops = stage_flops(args, "random")
  budget = s["steps"] * e2e_flops
  runs = {}
  rows = []
  for method in s["methods"]:
    flops = [(e2e_flops, 0.0)] if method == "end-to-end" else grown_flops
    final = method.endswith("+final")
    final_steps = round(s["final_fraction"] * s["steps"]) if final else 0
    if method == "end-to-end":
      steps = s["steps"]
    else:   # the progressive stages share what the final stage leaves of the budget
      per_stage_step = sum(f + p for f, p in flops)
      steps = max(round((budget - final_steps * e2e_flops) / per_stage_step), 1)
    costs = flops + ([(e2e_flops, 0.0)] if final else [])   # the final stage costs e2e's step
    for seed in s["seeds"]:
      overrides = [*SIZE, *args.overrides, *method_overrides(method), f"training.seed={seed}",
                   f"training.steps_per_stack={steps}",
                   f"training.eval_every={max(steps // s['evals'], 1)}"]
      if final:
        overrides.append(f"training.final_stage_steps={final_steps}")
      config = load_config(args.config, overrides)
      start = time.perf_counter()
      results = ProgressiveTrainer(config, progress=False, log=lambda _: None).train_progressively(
          ProgressiveRackBuilder(config), make_dataloader(config))
      curve = flops_curve(results["stages"], costs)
      runs[method, seed] = curve
      rows.append({"method": method, "seed": seed, "stages": len(results["stages"]),
                   "steps_per_stage": steps, "final_steps": final_steps,
                   "train_tflop": curve[-1][0] / 1e12, "seconds": time.perf_counter() - start,
                   "eval_loss": results["final_eval_loss"]})
      print(f"  {method} seed {seed}: eval loss {rows[-1]['eval_loss']:.4f}, "
            f"{rows[-1]['seconds']:.0f} s", file=sys.stderr)
  check_positive(rows, "seconds", "eval_loss", "train_tflop")
  summary_rows, summary = summarize(runs, s, budget)
  columns = [("method", "method", "{}"), ("seeds", "seeds", "{}"),
             ("steps/stage", "steps_per_stage", "{}"), ("final steps", "final_steps", "{}"),
             ("train TFLOP", "train_tflop", "{:.3f}"), ("eval loss (mean)", "eval_loss", "{:.4f}"),
             ("seed sd", "eval_loss_sd", "{:.4f}"), ("gap to e2e / sd", "sigmas", "{:+.1f}"),
             ("TFLOP to e2e's loss", "tflop_to_target", "{:.3f}"),
             ("FLOPs saved", "flops_saving", "{:+.1%}"), ("seconds / run", "seconds", "{:.0f}")]
  for row in summary_rows:
    row.update(next({"steps_per_stage": r["steps_per_stage"], "final_steps": r["final_steps"]}
                    for r in rows if r["method"] == row["method"]))
    row["seconds"] = statistics.mean(r["seconds"] for r in rows if r["method"] == row["method"])
  summary["runs"] = rows
  return columns, summary_rows, summary


def flops_curve(stages, costs) -> list[tuple[float, float]]:
  """[(training FLOPs so far, eval loss)] at every eval point of a run's stages. `costs`: each
  stage's (FLOPs per train step, cache-build FLOPs per batch); a cached stage builds its cache
  for all its batches before its first step."""
  curve, spent = [], 0.0
  for stage, (step, cache) in zip(stages, costs, strict=True):
    spent += cache * stage["steps"]
    curve += [(spent + i * step, loss) for i, loss in stage["eval_curve"] if loss is not None]
    spent += stage["steps"] * step
  return curve


def summarize(runs, s, budget):
  """Per method: mean and seed sd of the final eval loss; its gap to end-to-end in seed sds;
  the FLOPs its mean curve needs to reach end-to-end's final mean loss."""
  methods = s["methods"]
  finals = {m: [runs[m, seed][-1][1] for seed in s["seeds"]] for m in methods}
  sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
  target = statistics.mean(finals["end-to-end"])
  e2e_sd = sd(finals["end-to-end"])
  rows = []
  for m in methods:
    mean_curve = [(x, statistics.mean(runs[m, seed][i][1] for seed in s["seeds"]))
                  for i, (x, _) in enumerate(runs[m, s["seeds"][0]])]
    reach = flops_to_reach(mean_curve, target)
    pooled = math.sqrt((sd(finals[m]) ** 2 + e2e_sd ** 2) / 2)
    gap = target - statistics.mean(finals[m])   # > 0: better than end-to-end
    rows.append({"method": m, "seeds": len(s["seeds"]), "eval_loss": statistics.mean(finals[m]),
                 "eval_loss_sd": sd(finals[m]),
                 "sigmas": gap / pooled if pooled > 0 else None,
                 "train_tflop": mean_curve[-1][0] / 1e12,
                 "tflop_to_target": None if reach is None else reach / 1e12,
                 "flops_saving": None if reach is None else 1 - reach / budget})
  progressive = [r for r in rows if r["method"] != "end-to-end"]
  reaching = [r for r in progressive if r["flops_saving"] is not None]
  # With end-to-end alone, it is the best method and saves nothing against itself.
  best = (max(reaching, key=lambda r: r["flops_saving"]) if reaching
          else min(progressive or rows, key=lambda r: r["eval_loss"]))
  if best["method"] == "end-to-end":
    best = {**best, "flops_saving": 0.0, "sigmas": None}
  summary = {"best_method": best["method"],
             "flops_saving": best["flops_saving"] if best["flops_saving"] is not None else 0.0,
             "sigmas": best["sigmas"], "end_to_end_eval_loss": target,
             "end_to_end_sd": e2e_sd, "budget_tflop": budget / 1e12,
             "reached_by": [r["method"] for r in reaching]}
  return rows, summary


def flops_to_reach(curve, target) -> float | None:
  """The first FLOPs at which `curve` [(flops, loss)] is at or below `target`, interpolated
  linearly between eval points; None if it never is."""
  previous = None
  for x, loss in curve:
    if loss <= target:
      if previous is None or previous[1] == loss:
        return x
      (x0, l0) = previous
      return x0 + (x - x0) * (l0 - target) / (l0 - loss)
    previous = (x, loss)
  return None

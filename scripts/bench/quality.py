"""quality: which way of growing a rack reaches an lr-tuned end-to-end run's eval loss with the
fewest training FLOPs, and with the fewest training tokens.

Methods (`--methods`): "end-to-end" (all stacks, one stage); a `new_stack_init` on a cached frozen
trunk ("identity", "random", ...), with "+final" (a last end-to-end stage) or "+train" (the trunk
trains with the new stacks, `trunk_strategy="train"`); and the published recipes "G_stack" (`stack`
init, one stack then the rest at once, all of it trains) and "MIDAS" (`midas` init, a stack a
stage, all of it trains). Every method gets the training FLOPs end-to-end spends in `steps` steps
(model FLOPs of every train step, plus a cached trunk's forward when its cache is built; eval not
counted), its stages an equal number of steps (a final stage takes `final_fraction` of the budget).

Every method runs at every lr of `lrs` and seed of `seeds`; its lr is the one whose final eval loss,
averaged over the seeds, is lowest (`pick_lrs`), so end-to-end is never run at another method's lr.
At its picked lr, a method's seed-mean eval curve is read two ways: the FLOPs at which it first
reaches end-to-end's final mean eval loss (`flops_saving`, G_stack's measure on the FLOPs axis),
and the tokens at which it does (`tokens_saving`, G_stack's axis). Points are interpolated linearly.
"""
import json
import math
import os
import statistics
import sys
import time

from stackwise_jax.config import load_config, stage_sizes
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer

from bench import REPO
from bench.common import MODES, check_positive
from bench.stage import build_stage

CONFIG = "configs/tiny.py"
# Sizes as config overrides. tiny: small enough for ~100 runs an hour on 2 cores; 8 eval batches
# and 5 seeds keep the seed spread of the mean well under the gaps measured (see BUILD_NOTES).
# small: configs/small.py's width, 4 stacks of 2 blocks (a GPU, or hours of CPU).
COMMON = ["training.batch_size=16", "training.warmup_steps=10", "training.eval_batches=8"]
SIZES = {
    "tiny": [*COMMON, "model.d_model=96", "model.n_heads=4", "model.n_kv_heads=4",
             "model.d_ff=256", "training.seq_len=64", "model.max_seq_len=64"],
    "small": [*COMMON, "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4",
              "model.attention=gqa", "model.d_ff=768", "model.n_blocks_per_stack=2",
              "training.progressive.max_stacks=4", "training.progressive.target_stacks=4",
              "training.seq_len=128", "model.max_seq_len=128"],
}
SETTINGS = {"steps": 300, "seeds": [0, 1, 2, 3, 4], "evals": 10, "final_fraction": 0.25,
            "lrs": [1e-3, 3e-3, 1e-2], "corpus": "builtin", "size": "tiny",
            "methods": ["end-to-end", "random", "identity", "identity+final", "identity+train",
                        "G_stack", "MIDAS"]}
QUICK = {"steps": 24, "seeds": [0, 1], "evals": 3, "lrs": [3e-3, 1e-2],
         "methods": ["end-to-end", "identity", "G_stack"]}

INITS = ("random", "copy_last", "stack", "midas", "identity")
TRAIN_ALL = ["training.progressive.trunk_strategy=train",
             "training.progressive.cache_activations=False"]
RECIPES = {   # the published recipes (README, *Published recipes as config values*)
    "G_stack": lambda target: [*TRAIN_ALL, "training.progressive.new_stack_init=stack",
                               f"training.progressive.stacks_per_stage=(1, {max(target - 1, 1)})"],
    "MIDAS": lambda target: [*TRAIN_ALL, "training.progressive.new_stack_init=midas"],
}
FINAL_LR_RATIO = 1 / 3   # a final stage's peak lr: a third of the stages' (the default 1e-4 suits
                         # fine-tuning a large rack; here it moves the loss by 0.02 in 75 steps)


def method_overrides(method: str, target: int) -> list[str]:
  """Config overrides of a method: "end-to-end", a recipe, or an init with "+final"/"+train"."""
  if method == "end-to-end":   # the baseline: random init, whatever the config's growth
    return [*MODES["end-to-end"], "training.progressive.new_stack_init=random"]
  if method in RECIPES:
    return RECIPES[method](target)
  init, _, variant = method.partition("+")
  if init not in INITS or variant not in ("", "final", "train"):
    raise SystemExit(f"bench.py quality: method {method!r}: allowed: end-to-end, "
                     f"{', '.join(RECIPES)}, or one of {', '.join(INITS)}, alone or with "
                     "+final or +train")
  return [*(TRAIN_ALL if variant == "train" else MODES["cached"]),
          f"training.progressive.new_stack_init={init}",
          *(["training.final_stage=True"] if variant == "final" else [])]


def corpus_overrides(corpus: str) -> list[str]:
  """"builtin", or a glob of plain text files (data.source=text)."""
  if corpus == "builtin":
    return []
  return ["data.source=text", f"data.paths=({corpus!r},)"]


def base_overrides(args, s) -> list[str]:
  if s["size"] not in SIZES:
    raise SystemExit(f"bench.py quality: --size {s['size']}: allowed: {', '.join(SIZES)}")
  return [*SIZES[s["size"]], *corpus_overrides(s["corpus"]), *args.overrides]


def stage_costs(args, base: list[str], target: int, method: str) -> list[tuple[float, float]]:
  """(train-step FLOPs, cache-build FLOPs per batch) of each progressive stage the method runs
  (a final stage, which costs end-to-end's step, not included)."""
  # A final stage's cost is end-to-end's step (run adds it); the stages before it are the init's.
  overrides = [*base, *method_overrides(method.removesuffix("+final"), target)]
  config = load_config(args.config, overrides)
  if method == "end-to-end":
    return [(build_stage(config, target).flops, 0.0)]
  sizes = stage_sizes(config)
  built = [build_stage(config, sum(sizes[:n + 1])) for n in range(len(sizes))]
  return [(b.flops, b.prefix_flops if b.plan.cached else 0.0) for b in built]


def run(args, s):
  if "end-to-end" not in s["methods"]:   # every saving is measured against it
    s["methods"] = ["end-to-end", *s["methods"]]
  base = base_overrides(args, s)
  config = load_config(args.config, base)
  target = config.training.progressive.target_stacks
  tokens_per_step = config.training.batch_size * config.training.seq_len
  # Each method's stage costs, built once (end-to-end's step sets the budget).
  method_costs = {m: stage_costs(args, base, target, m) for m in s["methods"]}
  e2e_flops = method_costs["end-to-end"][0][0]
  budget = s["steps"] * e2e_flops
  runs, rows, plans = {}, [], {}
  # Every finished run is appended here, and read back instead of run again: an interrupted
  # benchmark goes on where it stopped (delete the file to start afresh).
  log_path = os.path.splitext(args.out)[0] + ".runs.jsonl"
  os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
  done = read_done(log_path)
  for method in s["methods"]:
    costs = list(method_costs[method])
    final = method.endswith("+final")
    final_steps = round(s["final_fraction"] * s["steps"]) if final else 0
    # The progressive stages share, in equal steps, what a final stage leaves of the budget.
    steps = max(round((budget - final_steps * e2e_flops) / sum(f + p for f, p in costs)), 1)
    costs += [(e2e_flops, 0.0)] if final else []   # a final stage costs end-to-end's step
    plans[method] = {"steps_per_stage": steps, "final_steps": final_steps,
                     "growth_at": growth_points(costs, steps, final_steps)}
    for lr in s["lrs"]:
      for seed in s["seeds"]:
        overrides = [*base, *method_overrides(method, target), f"training.seed={seed}",
                     f"training.lr={lr}", f"training.steps_per_stack={steps}",
                     f"training.eval_every={max(steps // s['evals'], 1)}"]
        if final:
          overrides += [f"training.final_stage_steps={final_steps}",
                        f"training.final_stage_lr={lr * FINAL_LR_RATIO}"]
        key = json.dumps([os.path.relpath(args.config, REPO), overrides])
        if key not in done:
          config = load_config(args.config, overrides)
          start = time.perf_counter()
          results = ProgressiveTrainer(config, progress=False, log=lambda _: None
                                       ).train_progressively(ProgressiveRackBuilder(config),
                                                             make_dataloader(config))
          curve = eval_curve(results["stages"], costs, tokens_per_step)
          done[key] = {"curve": curve, "row": {
              "method": method, "lr": lr, "seed": seed, "stages": len(results["stages"]),
              "train_tflop": curve[-1][0] / 1e12, "seconds": time.perf_counter() - start,
              "eval_loss": results["final_eval_loss"]}}
          with open(log_path, "a") as f:
            f.write(json.dumps({"key": key, **done[key]}) + "\n")
        runs[method, lr, seed] = [tuple(point) for point in done[key]["curve"]]
        rows.append(done[key]["row"])
        print(f"  {method} lr {lr:g} seed {seed}: eval loss {rows[-1]['eval_loss']:.4f}, "
              f"{rows[-1]['seconds']:.0f} s", file=sys.stderr)
  check_positive(rows, "seconds", "eval_loss", "train_tflop")
  tuned = pick_lrs(runs, s)
  summary_rows, summary = summarize(runs, s, tuned, budget, s["steps"] * tokens_per_step)
  for row in summary_rows:
    row.update(plans[row["method"]])
    row["seconds"] = statistics.mean(r["seconds"] for r in rows if r["method"] == row["method"])
  summary.update(corpus=s["corpus"], size=s["size"], runs=rows)
  plot(summary_rows, os.path.splitext(args.out)[0] + ".png",   # next to the JSON
       f"{s['size']}, corpus {s['corpus']}, {len(s['seeds'])} seeds")
  columns = [("method", "method", "{}"), ("lr (picked)", "lr", "{:g}"),
             ("steps/stage", "steps_per_stage", "{}"), ("final steps", "final_steps", "{}"),
             ("grows at (FLOPs)", "growth_at", "{}"), ("train TFLOP", "train_tflop", "{:.3f}"),
             ("eval loss (mean)", "eval_loss", "{:.4f}"), ("seed sd", "eval_loss_sd", "{:.4f}"),
             ("gap to e2e / sd", "sigmas", "{:+.1f}"),
             ("FLOPs saved", "flops_saving", "{:+.1%}"),
             ("loss at e2e's tokens", "loss_at_e2e_tokens", "{:.4f}"),
             ("tokens saved", "tokens_saving", "{:+.1%}"), ("seconds / run", "seconds", "{:.0f}")]
  return columns, summary_rows, summary


def read_done(path: str) -> dict:
  """The runs an earlier, interrupted call finished: key -> {"curve", "row"}."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    entries = [json.loads(line) for line in f if line.strip()]
  print(f"quality: {len(entries)} finished runs read back from {path}", file=sys.stderr)
  return {e["key"]: {"curve": e["curve"], "row": e["row"]} for e in entries}


def growth_points(costs, steps: int, final_steps: int) -> str:
  """Where each stage after the first starts, as a fraction of the run's training FLOPs."""
  spent = [steps * (f + p) for f, p in costs[:len(costs) - bool(final_steps)]]
  if final_steps:
    spent.append(final_steps * costs[-1][0])
  total = sum(spent)
  return ", ".join(f"{sum(spent[:k]) / total:.0%}" for k in range(1, len(spent))) or "-"


def eval_curve(stages, costs, tokens_per_step: int) -> list[tuple[float, float, float]]:
  """[(training FLOPs so far, training tokens so far, eval loss)] at every eval point of a run's
  stages. `costs`: each stage's (FLOPs per train step, cache-build FLOPs per batch); a cached
  stage builds its cache for all its batches before its first step."""
  curve, spent, steps = [], 0.0, 0
  for stage, (step, cache) in zip(stages, costs, strict=True):
    spent += cache * stage["steps"]
    curve += [(spent + i * step, (steps + i) * tokens_per_step, loss)
              for i, loss in stage["eval_curve"] if loss is not None]
    spent += stage["steps"] * step
    steps += stage["steps"]
  return curve


def pick_lrs(runs, s) -> dict[str, float]:
  """Each method's lr with the lowest final eval loss, averaged over the seeds."""
  mean_final = lambda m, lr: statistics.mean(runs[m, lr, seed][-1][2] for seed in s["seeds"])
  return {m: min(s["lrs"], key=lambda lr: mean_final(m, lr)) for m in s["methods"]}


def summarize(runs, s, tuned, budget: float, e2e_tokens: float):
  """Per method, at its picked lr: mean and seed sd of the final eval loss; its gap to end-to-end
  in pooled seed sds; the FLOPs and tokens at which its mean curve reaches end-to-end's final
  mean loss, and its mean loss at end-to-end's tokens. `runs`: (method, lr, seed) -> curve."""
  sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
  curves = {m: [runs[m, tuned[m], seed] for seed in s["seeds"]] for m in s["methods"]}
  finals = {m: [c[-1][2] for c in curves[m]] for m in s["methods"]}
  target, e2e_sd = statistics.mean(finals["end-to-end"]), sd(finals["end-to-end"])
  rows = []
  for m in s["methods"]:
    points = list(zip(*curves[m], strict=True))   # eval point -> that point of every seed
    mean_curve = [(p[0][0], p[0][1], statistics.mean(c[2] for c in p), sd([c[2] for c in p]))
                  for p in points]
    reach_flops = first_reach([(x, loss) for x, _, loss, _ in mean_curve], target)
    reach_tokens = first_reach([(n, loss) for _, n, loss, _ in mean_curve], target)
    pooled = math.sqrt((sd(finals[m]) ** 2 + e2e_sd ** 2) / 2)
    gap = target - statistics.mean(finals[m])   # > 0: better than end-to-end
    sweep = {f"{lr:g}": statistics.mean(runs[m, lr, seed][-1][2] for seed in s["seeds"])
             for lr in s["lrs"]}
    rows.append({"method": m, "lr": tuned[m], "seeds": len(s["seeds"]),
                 "eval_loss": statistics.mean(finals[m]), "eval_loss_sd": sd(finals[m]),
                 "sigmas": gap / pooled if pooled > 0 else None,
                 "train_tflop": mean_curve[-1][0] / 1e12,
                 "tflop_to_target": None if reach_flops is None else reach_flops / 1e12,
                 "flops_saving": None if reach_flops is None else 1 - reach_flops / budget,
                 "tokens_to_target": reach_tokens,
                 "tokens_saving": None if reach_tokens is None else 1 - reach_tokens / e2e_tokens,
                 "loss_at_e2e_tokens": value_at([(n, loss) for _, n, loss, _ in mean_curve],
                                                e2e_tokens),
                 "lr_sweep": sweep,
                 # [training FLOPs, training tokens, mean eval loss, seed sd] per eval point
                 "curve": [list(p) for p in mean_curve]})
  best = best_by(rows, "flops_saving")
  best_tokens = best_by(rows, "tokens_saving")
  summary = {"best_method": best["method"], "flops_saving": best["flops_saving"] or 0.0,
             "sigmas": best["sigmas"], "tuned_lrs": tuned,
             "best_tokens_method": best_tokens["method"],
             "tokens_saving": best_tokens["tokens_saving"] or 0.0,
             "end_to_end_eval_loss": target, "end_to_end_sd": e2e_sd,
             "budget_tflop": budget / 1e12, "end_to_end_tokens": e2e_tokens,
             "reached_by": [r["method"] for r in rows
                            if r["method"] != "end-to-end" and r["flops_saving"] is not None],
             # a picked lr at the sweep's edge: the best lr may lie beyond it
             "lr_at_sweep_edge": [m for m, lr in tuned.items()
                                  if len(s["lrs"]) > 1 and lr in (min(s["lrs"]), max(s["lrs"]))]}
  return rows, summary


def best_by(rows, saving: str) -> dict:
  """The growth method with the largest `saving`; if none reaches end-to-end's loss, the one with
  the lowest final loss; end-to-end alone saves nothing against itself."""
  growth = [r for r in rows if r["method"] != "end-to-end"]
  reaching = [r for r in growth if r[saving] is not None]
  best = (max(reaching, key=lambda r: r[saving]) if reaching
          else min(growth or rows, key=lambda r: r["eval_loss"]))
  return {**best, saving: 0.0, "sigmas": None} if best["method"] == "end-to-end" else best


def first_reach(curve, target) -> float | None:
  """The first x at which `curve` [(x, loss)] is at or below `target`, interpolated linearly
  between points; None if it never is."""
  previous = None
  for x, loss in curve:
    if loss <= target:
      if previous is None or previous[1] == loss:
        return x
      (x0, l0) = previous
      return x0 + (x - x0) * (l0 - target) / (l0 - loss)
    previous = (x, loss)
  return None


def value_at(curve, x) -> float | None:
  """`curve` [(x, loss)] at x, interpolated linearly; None outside its points."""
  for (x0, l0), (x1, l1) in zip(curve, curve[1:]):
    if x0 <= x <= x1:
      return l0 if x1 == x0 else l0 + (l1 - l0) * (x - x0) / (x1 - x0)
  return curve[-1][1] if curve and curve[-1][0] == x else None


def plot(rows, path: str, title: str) -> None:
  """Eval loss against training FLOPs, one line per method at its picked lr, a band of one seed
  sd around the seed mean."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row in rows:
    x = [p[0] / 1e12 for p in row["curve"]]
    mean, band = [p[2] for p in row["curve"]], [p[3] for p in row["curve"]]
    line, = ax.plot(x, mean, marker=".", label=f"{row['method']} (lr {row['lr']:g})")
    ax.fill_between(x, [m - b for m, b in zip(mean, band)], [m + b for m, b in zip(mean, band)],
                    color=line.get_color(), alpha=0.2)
  ax.set(xlabel="training TFLOPs", ylabel="eval loss", title=f"quality: {title}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)

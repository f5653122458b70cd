"""job: the whole job as a user runs it, timed as whole processes, against the original StackWise's
way of training (scripts/torch_reference.py)."""
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.report import PHASES

from bench import REPO
from bench.common import check_positive, fail

CONFIG = "configs/small.py"
# [stacks, steps a stage, epochs] cells
# repeats: warm runs of ours and reference runs, alternated; each side's median is reported (this
# shared machine moves one whole-job time by ~10%).
SETTINGS = {"grid": [[n, s, e] for n in (4, 8) for s in (40, 300) for e in (1, 3)], "warm": True,
            "repeats": 1}
QUICK = {"grid": [[4, 40, 1], [4, 40, 3]], "warm": False}

# The original StackWise's tiny_llama job (its examples/tiny_llama config): 4 stacks of 4 blocks,
# d_model 256, 8 heads / 4 KV heads, d_ff 1024, batch 8, 128-token sequences; configs/small.py
# gives the rest. Evaluation and a checkpoint at each stage's end, on both sides.
JOB_SIZES = ["model.n_blocks_per_stack=4", "model.d_ff=1024", "training.batch_size=8",
             "training.seq_len=128", "training.eval_every=0", "training.checkpoint_every=0",
             "training.data_reuse=pool"]


def run_ours(config_path, overrides, workdir, cache_dir) -> tuple[float, dict]:
  """The train command as a user runs it, in a fresh process -> (wall seconds, results)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["STACKWISE_COMPILATION_CACHE"] = cache_dir
  command = [sys.executable, "-m", "stackwise_jax", "train", "--config", config_path, "--workdir",
             workdir, "--no-progress", *[f"--config.{o}" for o in overrides]]
  start = time.perf_counter()
  proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
  wall = time.perf_counter() - start
  if proc.returncode:
    fail(f"{shlex.join(command)} exited {proc.returncode}: {proc.stderr[-2000:]}")
  with open(os.path.join(workdir, "results.json")) as f:
    return wall, json.load(f)


def run_reference(config, stacks, epochs, directory) -> tuple[float, list[dict]]:
  """scripts/torch_reference.py on the same pool and eval batches as ours, in a fresh process
  that imports only torch (the token arrays are handed to it ready: its data time is not
  counted) -> (wall seconds, its per-stage rows)."""
  loader = make_dataloader(config)
  train = loader.train_iter()
  np.save(os.path.join(directory, "pool.npy"),
          np.stack([next(train)["tokens"] for _ in range(config.training.steps_per_stack)]))
  np.save(os.path.join(directory, "eval.npy"), np.stack(
      [b["tokens"] for b in loader.eval_batches(config.training.eval_batches)]))
  job = {"model": config.model.to_dict(), "training": config.training.to_dict(), "stacks": stacks,
         "epochs": epochs, "pool": os.path.join(directory, "pool.npy"),
         "eval": os.path.join(directory, "eval.npy"), "workdir": directory,
         "out": os.path.join(directory, "reference.json")}
  with open(os.path.join(directory, "job.json"), "w") as f:
    json.dump(job, f)
  command = [sys.executable, os.path.join(REPO, "scripts", "torch_reference.py"),
             os.path.join(directory, "job.json")]
  start = time.perf_counter()
  proc = subprocess.run(command, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if proc.returncode:
    fail(f"{shlex.join(command)} exited {proc.returncode}: {proc.stderr[-2000:]}")
  with open(job["out"]) as f:
    return wall, json.load(f)


def run(args, s):
  """The whole job, every phase included, against the original's way of training."""
  rows = []
  for stacks, steps, epochs in s["grid"]:
    overrides = [*JOB_SIZES, *args.overrides, f"training.steps_per_stack={steps}",
                 f"training.epochs_per_stack={epochs}", f"training.progressive.max_stacks={stacks}",
                 f"training.progressive.target_stacks={stacks}"]
    config = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
      cache = os.path.join(tmp, "xla")   # empty: the first run compiles everything
      ours, results = run_ours(args.config, overrides, os.path.join(tmp, "cold"), cache)
      # in the log at once: a time limit that stops the reference still leaves ours
      print(f"job {stacks}x{steps}x{epochs}: ours {ours:.1f} s (stages "
            f"{sum(st['seconds'] for st in results['stages']):.1f} s)", file=sys.stderr)
      warm_runs, reference_runs = [], []
      for i in range(s["repeats"]):   # alternated, so a slow spell of the machine hits both
        if s["warm"]:
          warm_runs.append(run_ours(args.config, overrides, os.path.join(tmp, f"warm{i}"),
                                    cache)[0])
        theirs, reference = run_reference(config, stacks, epochs, tmp)
        reference_runs.append(theirs)
    warm = float(np.median(warm_runs)) if warm_runs else None
    theirs = float(np.median(reference_runs))
    stages = results["stages"]
    phases = {p: sum(st["seconds_by_phase"][p] for st in stages) for p in PHASES}
    rows.append({"cell": f"{stacks}x{steps}x{epochs}", "stacks": stacks, "steps": steps,
                 "epochs": epochs, "ours_s": ours, "ours_warm_s": warm, "reference_s": theirs,
                 "speedup": theirs / ours, "speedup_warm": theirs / warm if warm else None,
                 "ours_warm_runs": warm_runs, "reference_runs": reference_runs,
                 "outside_stages_s": ours - sum(st["seconds"] for st in stages),
                 **{f"{p}_s": v for p, v in phases.items()},
                 "stage1_s": stages[0]["seconds"], "last_stage_s": stages[-1]["seconds"],
                 "eval_loss": stages[-1]["eval_loss"], "reference_eval_loss": reference[-1]["eval_loss"]})
    print(f"job {rows[-1]['cell']}: ours {ours:.1f} s, reference {theirs:.1f} s", file=sys.stderr)
  check_positive(rows, "ours_s", "reference_s", "ours_warm_s")
  for r in rows:
    if not (np.isfinite(r["eval_loss"]) and np.isfinite(r["reference_eval_loss"])):
      fail(f"a non-finite eval loss in {r}")
  summary = {"job_speedup_min": min(r["speedup"] for r in rows)}
  by_cell = {r["cell"]: r for r in rows}
  if "8x300x3" in by_cell:
    summary["job_speedup_8x300x3"] = by_cell["8x300x3"]["speedup"]
  deepest = max((r for r in rows if r["epochs"] == 3), key=lambda r: (r["stacks"], r["steps"]),
                default=None)
  if deepest is not None:   # the last stage's wall time over the first's, everything included
    summary["depth_growth"] = deepest["last_stage_s"] / deepest["stage1_s"]
    summary["depth_growth_cell"] = deepest["cell"]
  columns = [("cell (stacks x steps x epochs)", "cell", "{}"), ("ours s", "ours_s", "{:.1f}"),
             ("ours, warm cache s (median)", "ours_warm_s", "{:.1f}"),
             ("reference s (median)", "reference_s", "{:.1f}"),
             ("speedup", "speedup", "{:.2f}"), ("speedup warm", "speedup_warm", "{:.2f}"),
             *[(f"{p} s", f"{p}_s", "{:.1f}") for p in PHASES],
             ("outside stages s", "outside_stages_s", "{:.1f}"), ("stage 1 s", "stage1_s", "{:.1f}"),
             ("last stage s", "last_stage_s", "{:.1f}"), ("eval loss", "eval_loss", "{:.3f}"),
             ("reference eval loss", "reference_eval_loss", "{:.3f}")]
  return columns, rows, summary

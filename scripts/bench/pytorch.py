"""torch: our stage step vs a plain eager PyTorch one (scripts/torch_reference.py)."""
import os

import jax
import numpy as np

from stackwise_jax.config import load_config

from bench.common import MODES, check_positive, fail, flag_noise, median_ms, spread, time_calls
from bench.stage import build_stage, time_stage

CONFIG = "configs/small.py"
SETTINGS = {"depths": [2, 8], "steps": 6}
QUICK = {"depths": [4], "steps": 3}


def run(args, s):
  # Imported here: torch is an optional extra, and every benchmark's process imports this module.
  import torch
  import torch_reference

  threads = len(os.sched_getaffinity(0))   # XLA:CPU uses every core it may run on
  torch.set_num_threads(threads)
  # Where we run on a GPU, so does the reference (a CUDA build of torch needed), in fp32 as ours.
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  rows, max_diff = [], 0.0
  for k in s["depths"]:
    stages = {mode: build_stage(load_config(args.config, [*args.overrides, *MODES[mode]]), k)
              for mode in ("cached", "streamed")}
    ours = stages["streamed"]
    # The reference computes our function: same params, same logits.
    model = torch_reference.Model(ours.config.model, k)
    torch_reference.load_jax_params(model, jax.device_get(ours.rack.params))
    model.to(device)
    tokens = np.asarray(ours.example["inputs"])
    torch_tokens = torch.tensor(tokens, dtype=torch.long, device=device)   # a copy: jax's is read-only
    expected = np.asarray(jax.jit(ours.rack)(ours.rack.params, tokens, ours.example["time_step"]))
    with torch.no_grad():
      got = model(torch_tokens).cpu().numpy()
    max_diff = max(max_diff, float(np.abs(got - expected).max() / np.abs(expected).max()))
    if not max_diff < 1e-3:
      fail(f"the PyTorch reference's logits differ from ours by {max_diff:.2g} (relative)")
    t = ours.config.training
    trainer = torch_reference.StageTrainer(model, t.lr, t.weight_decay, t.grad_clip)
    theirs = time_calls(lambda: trainer.step(torch_tokens), s["steps"])   # .item() syncs
    cached_steps, cache = time_stage(stages["cached"], s["steps"])
    streamed_steps, _ = time_stage(ours, s["steps"])
    torch_ms = median_ms(theirs)
    for name, ms, times in (
        ("ours, cached trunk: step", median_ms(cached_steps), cached_steps),
        ("ours, cached trunk: step + cache build", median_ms(cached_steps) + median_ms(cache),
         cached_steps),
        ("ours, streamed trunk", median_ms(streamed_steps), streamed_steps),
        ("PyTorch eager, trunk under no_grad", torch_ms, theirs)):
      rows.append({"stage": k, "implementation": name, "step_ms": ms, "spread": spread(times),
                   "tokens_per_s": 1000 * ours.tokens / ms, "vs_torch": torch_ms / ms})
  check_positive(rows, "step_ms")
  flag_noise(rows)
  last = [r for r in rows if r["stage"] == s["depths"][-1]]
  summary = {"speedup": last[1]["vs_torch"], "speedup_step_only": last[0]["vs_torch"],
             "speedup_streamed": last[2]["vs_torch"], "stage": s["depths"][-1],
             "torch": torch.__version__, "torch_device": device, "torch_threads": threads,
             "logits_max_relative_difference": max_diff,
             "goal": ">= 3x PyTorch's tokens/s (speedup: our stage, cache build included)",
             "goal_met": last[1]["vs_torch"] >= 3}
  columns = [("stage", "stage", "{}"), ("implementation", "implementation", "{}"),
             ("ms/step", "step_ms", "{:.1f}"), ("spread", "spread", "{:.0%}"),
             ("tokens/s", "tokens_per_s", "{:,.0f}"), ("x PyTorch", "vs_torch", "{:.2f}")]
  return columns, rows, summary

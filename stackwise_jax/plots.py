"""PNG views of a run (design §12) from its results (results.json or a checkpoint's): the loss
curve with stage boundaries, eval loss (and bits per byte) against depth, and each stage's memory
and speed. Written
by the train command at the end of a run and by `stackwise-jax plot --workdir DIR`."""
import os

import matplotlib
matplotlib.use("Agg")   # files only: no display on a cluster node
import matplotlib.pyplot as plt   # noqa: E402 (after choosing the backend)

from stackwise_jax.report import PHASES  # noqa: E402

PLOTS = ("loss.png", "eval_by_depth.png", "stage_cost.png")


def plot_run(results: dict, out_dir: str) -> list[str]:
  """Writes PLOTS into `out_dir`; returns their paths."""
  stages = results["stages"]
  if not stages:
    raise ValueError("plot: the run has no finished stage yet")
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, name) for name in PLOTS]
  for draw, path in zip((_loss, _eval_by_depth, _stage_cost), paths):
    fig = draw(stages)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
  return paths


def _first_step(stages, i):
  return sum(s["steps"] for s in stages[:i])


def stage_label(stage: dict) -> str:
  """A stage's name in the plots: its number, or "final" for the final stage."""
  return "final" if stage.get("final") else str(stage["stage"])


def _loss(stages):
  fig, ax = plt.subplots(figsize=(8, 4.5))
  colors = plt.get_cmap("tab10")
  for i, s in enumerate(stages):
    start, color = _first_step(stages, i), colors(i % 10)
    ax.plot([start + j + 1 for j in range(len(s["losses"]))], s["losses"], color=color, lw=1,
            alpha=0.7, label=f"stage {stage_label(s)} train")
    if s["eval_curve"]:
      steps, losses = zip(*s["eval_curve"])
      ax.plot([start + x for x in steps], losses, "o--", color=color, ms=4,
              label=f"stage {stage_label(s)} eval")
    if i:
      ax.axvline(start, color="grey", ls=":", lw=1)   # stage boundary
  ax.set(xlabel="step (whole run)", ylabel="loss (nats / token)", title="loss by stage")
  ax.legend(fontsize=7, ncol=2)
  return fig


def _eval_by_depth(stages):
  """Eval loss (nats / token, left axis) and, where results have it, eval bits per byte (right
  axis: comparable across tokenizers) at the end of each stage, against its number of stacks."""
  fig, ax = plt.subplots(figsize=(5, 4))
  grown = [s for s in stages if not s.get("final")]
  depth = [len(s["stack_order"]) for s in stages]
  ax.plot(depth[:len(grown)], [s["eval_loss"] for s in grown], "o-", label="eval loss")
  for s in stages[len(grown):]:   # the final stage: same depth, trained end to end
    ax.plot(len(s["stack_order"]), s["eval_loss"], "r*", ms=10, label="after the final stage")
  ax.set(xlabel="stacks in the rack", ylabel="eval loss (nats / token, end of stage)",
         title="eval loss by depth", xticks=depth)
  bpb = [(d, s["eval_bits_per_byte"]) for d, s in zip(depth, grown)
         if s.get("eval_bits_per_byte") is not None]   # results from before it have none
  handles = ax.get_lines()
  if bpb:
    right = ax.twinx()
    right.plot(*zip(*bpb), "s--", color="tab:orange", label="bits per byte")
    right.set_ylabel("eval bits per byte (end of stage)")
    handles += right.get_lines()
  if len(handles) > 1:
    ax.legend(handles=handles, fontsize=7)
  return fig


def _stage_cost(stages):
  fig, (mem, speed) = plt.subplots(1, 2, figsize=(9, 3.8))
  x = [s["stage"] for s in stages]
  parts = {"weights": "base_bytes", "adapters": "adapter_bytes", "optimizer": "optimizer_bytes"}
  bottom = [0.0] * len(stages)
  for label, key in parts.items():
    mib = [sum(m[key] for m in s["memory"].values()) / 2**20 for s in stages]
    mem.bar(x, mib, bottom=bottom, label=label)
    bottom = [b + v for b, v in zip(bottom, mib)]
  cache = [s["cache_bytes"] / 2**20 for s in stages]
  mem.bar(x, cache, bottom=bottom, label="activation cache")
  peak = [s.get("peak_memory_bytes") for s in stages]
  if all(p is not None for p in peak):   # accelerators report it; CPU does not
    mem.plot(x, [p / 2**20 for p in peak], "k*-", label="device peak")
  labels = [stage_label(s) for s in stages]
  mem.set(xlabel="stage", ylabel="MiB", title="memory per stage", xticks=x, xticklabels=labels)
  mem.legend(fontsize=7)
  # Every second of a stage, by phase: a flat train bar under growing compile or cache bars
  # would otherwise hide where the time went.
  bottom = [0.0] * len(stages)
  for phase in PHASES:
    seconds = [s.get("seconds_by_phase", {}).get(phase, 0.0) for s in stages]
    speed.bar(x, seconds, bottom=bottom, label=phase)
    bottom = [b + v for b, v in zip(bottom, seconds)]
  speed.set(xlabel="stage", ylabel="seconds", title="wall time per stage, by phase", xticks=x,
            xticklabels=labels)
  speed.legend(fontsize=7)
  return fig

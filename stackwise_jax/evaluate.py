"""Evaluation of a trained run (design §12): loss, perplexity and masked-token accuracy on the
held-out split, for the rack every stage produced (a prefix of the final rack in append mode, a
suffix in prepend mode) and for the rack of the latest checkpoint.

The examples are the trainer's own evaluation examples (same batches, same masks and time steps),
so a stage's loss here is the `eval_loss` its training reported.
"""
import math
import sys

import numpy as np
from tqdm.auto import tqdm

from stackwise_jax.checkpoint import RunCheckpoints
from stackwise_jax.config import stage_steps
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive.masking import TimeStepMasking
from stackwise_jax.progressive.stages import rack_from_checkpoint
from stackwise_jax.progressive.steps import make_eval_step

EVAL_SALT = 1 << 20   # time-step draws for evaluation are the same at every stage


def eval_example(masking, batch) -> dict:
  """A held-out batch as evaluation sees it: masks and time steps drawn per example,
  identically at every stage and in `evaluate_run`."""
  return masking.example(batch, masking.sample_time_steps(batch["example_id"], EVAL_SALT))


def evaluate(rack, examples, bar=None) -> dict:
  """Loss (nats per loss token), perplexity and accuracy (argmax = target) over the loss tokens
  of `examples` (dicts as `eval_example` makes them). `bar`: a tqdm bar to advance by one per
  example."""
  return evaluate_with(make_eval_step(rack), rack.params, examples, bar)


def evaluate_with(eval_step, params, examples, bar=None) -> dict:
  """`evaluate` with a compiled eval step (`steps.make_eval_step`) and its params: the trainer's
  evaluation during training (where a cached stage's step takes the trunk's activations) and
  this module's are this one function."""
  sums = []
  for ex in examples:
    sums.append(np.asarray(eval_step(params, ex)))
    if bar is not None:
      bar.update(1)
  loss_sum, tokens, correct = np.sum(sums, 0)
  tokens = max(tokens, 1.0)
  loss = float(loss_sum / tokens)
  return {"loss": loss, "perplexity": math.exp(loss), "accuracy": float(correct / tokens),
          "tokens": int(tokens)}


def evaluate_run(checkpoints: RunCheckpoints, n_batches: int | None = None, dataloader=None,
                 progress: bool = False) -> list[dict]:
  """One row per stage end kept in a run's checkpoints (`checkpoint.open_run`), plus the latest
  checkpoint if it was taken mid-stage: {"stage", "step", "stacks" (forward order), loss,
  perplexity, accuracy, tokens}. `dataloader`: the run's (default: made from its config);
  `progress`: a progress bar over racks x batches."""
  config, latest = checkpoints.config, checkpoints.latest
  # Stage ends of the stages before the final one (whose own steps may be any number).
  ends = stage_steps(config) * sum(not s.get("final") for s in latest.meta["results"]["stages"])
  steps = [s for s in checkpoints.steps() if s % stage_steps(config) == 0 and s <= ends]
  if latest.step not in steps:
    steps.append(latest.step)
  dataloader = dataloader or make_dataloader(config)
  batches = dataloader.eval_batches(n_batches or config.training.eval_batches)
  masking = TimeStepMasking(config)
  examples = [eval_example(masking, b) for b in batches]
  rows = []
  with tqdm(total=len(steps) * len(examples), desc="eval", disable=not progress,
            dynamic_ncols=True, file=sys.stderr) as bar:
    for step in steps:
      ckpt = latest if step == latest.step else checkpoints.read(step)
      rack = rack_from_checkpoint(config, ckpt)
      rows.append({"stage": ckpt.meta["stage"], "step": step, "stacks": list(rack.order),
                   **evaluate(rack, examples, bar)})
  return rows

"""Evaluation of a trained run (design §12): loss, perplexity, masked-token accuracy and bits per
byte on the held-out split, for the rack every stage produced (a prefix of the final rack in append
mode, a suffix in prepend mode) and for the rack of the latest checkpoint.

The examples are the trainer's own evaluation examples (same batches, same masks and time steps),
so a stage's loss and bits per byte here are the `eval_loss` and `eval_bits_per_byte` its training
reported. It lives in progressive/ because it is built from the stages' own pieces (masking, steps,
stages) and the trainer calls it: outside the package, the two would import each other.
"""
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from stackwise_jax.checkpoint import RunCheckpoints
from stackwise_jax.config import stage_steps
from stackwise_jax.data import make_dataloader
from stackwise_jax.data.tokenizer import BYTES, kind
from stackwise_jax.progressive.masking import TimeStepMasking
from stackwise_jax.progressive.stages import rack_from_checkpoint
from stackwise_jax.progressive.steps import make_eval_step
from stackwise_jax.trees import fetch_stacked

EVAL_SALT = 1 << 20   # time-step draws for evaluation are the same at every stage


def eval_example(masking, batch) -> dict:
  """A held-out batch as evaluation sees it: masks and time steps drawn per example,
  identically at every stage and in `evaluate_run`."""
  return masking.example(batch, masking.sample_time_steps(batch["example_id"], EVAL_SALT))


def evaluate(rack, examples, bar=None, token_bytes=None) -> dict:
  """Loss (nats per loss token), perplexity and accuracy (argmax = target) over the loss tokens
  of `examples` (dicts as `eval_example` makes them), and bits per byte where `token_bytes` is
  given (see `evaluate_with`). `bar`: a tqdm bar to advance by one per example."""
  return evaluate_with(make_eval_step(rack), rack.params, examples, bar,
                       loss_bytes(examples, token_bytes))


def evaluate_with(eval_step, params, examples, bar=None, n_bytes=None) -> dict:
  """`evaluate` with a compiled eval step (`steps.make_eval_step`) and its params: the trainer's
  evaluation during training (where a cached stage's step takes the trunk's activations) and
  this module's are this one function. The step's sums stay on the device until all examples
  ran, then come to the host in one transfer.

  Returns {"loss", "perplexity", "accuracy", "tokens", "bits_per_byte"}. `n_bytes`: the bytes
  the examples' loss tokens stand for (`loss_bytes`: counted once for examples evaluated again
  and again). bits_per_byte = (sum of loss-token losses, nats) / ln 2 / n_bytes, so runs with
  different tokenizers compare; None without `n_bytes` or when it is 0 (e.g. all EOS)."""
  sums = []
  for ex in examples:
    sums.append(eval_step(params, ex))
    if bar is not None:
      bar.update(1)
  # As one np.asarray per example read them: each example's three sums, then summed in order.
  sums = np.stack(fetch_stacked(sums), 1)
  loss_sum, tokens, correct = np.sum(sums, 0)
  n_bytes = n_bytes or 0.0
  tokens = max(tokens, 1.0)
  loss = float(loss_sum / tokens)
  return {"loss": loss, "perplexity": math.exp(loss), "accuracy": float(correct / tokens),
          "tokens": int(tokens),
          "bits_per_byte": float(loss_sum / math.log(2) / n_bytes) if n_bytes > 0 else None}


def loss_bytes(examples, token_bytes) -> float | None:
  """The UTF-8 bytes the loss tokens' targets of `examples` stand for, for bits per byte (see
  `evaluate_with`); None without `token_bytes`: int [tokenizer vocab] bytes per id
  (`Tokenizer.token_bytes`; ids past it count 0 bytes). One transfer for all examples."""
  if token_bytes is None or not examples:
    return None
  table = np.asarray(token_bytes, np.float32)
  counts = fetch_stacked([_loss_bytes(table, ex["targets"], ex["loss_mask"]) for ex in examples])
  return float(np.sum(np.asarray(counts, np.float64)))


@jax.jit
def _loss_bytes(table, targets, loss_mask):
  """Bytes the loss tokens stand for: sum over [B, T] of table[targets] * loss_mask (ids outside
  the table count 0). Jitted, so it takes a run's global (sharded) examples as they are."""
  return jnp.sum(jnp.take(table, targets, mode="fill", fill_value=0) * loss_mask)


def evaluate_by_source(rack, masking, dataloader, n_batches: int, token_bytes=None,
                       place=lambda batch: batch) -> dict:
  """A mixture's evaluation by source (data/mixture.py): {name: `evaluate_with`'s dict} of
  `rack` on the first `n_batches` batches of each source's own val split
  (`dataloader.eval_batches_by_source`), masked as `eval_example` masks. `place`: a host batch
  -> what the step takes (the trainer's: global arrays on its mesh)."""
  step = make_eval_step(rack)
  results = {}
  for name, batches in dataloader.eval_batches_by_source(n_batches).items():
    examples = [eval_example(masking, place(b)) for b in batches]
    results[name] = evaluate_with(step, rack.params, examples,
                                  n_bytes=loss_bytes(examples, token_bytes))
  return results


def token_bytes_of(dataloader, config) -> np.ndarray | None:
  """int32 [vocab]: UTF-8 bytes per token id of the run's tokenizer: the dataloader's `tokenizer`
  where it has one, else the byte tokenizer's when `data.tokenizer` is "bytes"; else None (no
  bits per byte: the ids' bytes are unknown)."""
  tokenizer = getattr(dataloader, "tokenizer", None)
  if tokenizer is None and kind(config.data.tokenizer) == "bytes":
    tokenizer = BYTES
  return None if tokenizer is None else tokenizer.token_bytes


def evaluate_run(checkpoints: RunCheckpoints, n_batches: int | None = None, dataloader=None,
                 progress: bool = False) -> list[dict]:
  """One row per stage end kept in a run's checkpoints (`checkpoint.open_run`), plus the latest
  checkpoint if it was taken mid-stage: {"stage", "step", "stacks" (forward order), loss,
  perplexity, accuracy, tokens, bits_per_byte}; for a mixture also "by_source" (each source's
  own val split, `evaluate_by_source`; the row's own numbers are on the mixed eval batches).
  `dataloader`: the run's (default: made from its config; its tokenizer gives the bytes per
  token, `token_bytes_of`); `progress`: a progress bar over racks x batches."""
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
  token_bytes = token_bytes_of(dataloader, config)
  n_bytes = loss_bytes(examples, token_bytes)   # the same examples for every rack
  rows = []
  with tqdm(total=len(steps) * len(examples), desc="eval", disable=not progress,
            dynamic_ncols=True, file=sys.stderr) as bar:
    for step in steps:
      ckpt = latest if step == latest.step else checkpoints.read_checked(step)
      rack = rack_from_checkpoint(config, ckpt)
      rows.append({"stage": ckpt.meta["stage"], "step": step, "stacks": list(rack.order),
                   **evaluate_with(make_eval_step(rack), rack.params, examples, bar, n_bytes)})
      if hasattr(dataloader, "eval_batches_by_source"):
        rows[-1]["by_source"] = evaluate_by_source(rack, masking, dataloader, len(batches),
                                                   token_bytes)
  return rows

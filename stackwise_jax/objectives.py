"""Training objectives (design §7): one row of `OBJECTIVES` per `training_objective` name.

A row says how a token batch becomes a training example, which batch keys that needs, whether
attention is causal, whether inputs are masked at the time step's ratio, and how a trained rack
samples. Config validation, the rack's attention, `progressive.masking.make_training_example`, the
trainer and `sample.py` read the row: a new objective is its example function, one row, and tests.

Time steps are ints 0..N-1 (N = `num_time_steps`): 0 is the lowest noise (BERT-like masking at
`mlm_min_ratio`), N-1 the highest (everything masked). Masks are a pure function of (seed,
example id, time step), so a cached activation and a recomputed one see the same corrupted input,
whatever batch or row the example lands in.

This module imports jax only: config.py imports it for the names, so it must not import config.
"""
from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp


def mask_ratio(time_step, num_time_steps: int, min_ratio: float):
  """Fraction of positions masked at `time_step`: min_ratio at t=0, rising linearly to 1 at t=N-1.

  Args:
    time_step: a Python int, or an int array of any shape (e.g. [B]).
    num_time_steps: N.
    min_ratio: the ratio at t=0.

  Returns:
    A Python float for an int input, else a float array of `time_step`'s shape. N == 1 gives
    min_ratio.
  """
  if num_time_steps == 1:
    return min_ratio + 0.0 * time_step   # the only step is the lowest noise; keeps the input's type
  # Written from the top so that t = N-1 gives exactly 1.0 in float32 (u < 1.0 masks every position);
  # algebraically min_ratio + (1 - min_ratio) * t / (N - 1).
  return 1.0 - (1.0 - min_ratio) * ((num_time_steps - 1) - time_step) / (num_time_steps - 1)


def clm_mask(batch_size: int, seq_len: int, segment_ids=None) -> jax.Array:
  """float32 [B, T]: 1 everywhere except 0 at the last position, which has no next token to predict,
  and, given segment_ids int [B, T] (data.packing="documents"), 0 where the next token starts
  another segment (an EOS: the next document's first token is not its target)."""
  mask = jnp.ones((batch_size, seq_len), jnp.float32).at[:, -1].set(0.0)
  if segment_ids is None:
    return mask
  same = (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)   # [B, T - 1]
  return mask.at[:, :-1].multiply(same)


def mlm_mask(example_ids, time_steps, seq_len: int, *, seed: int, num_time_steps: int,
             min_ratio: float) -> jax.Array:
  """Deterministic MLM mask: bool [B, T], True where the input token is replaced by the mask token.

  Row b depends only on (example_ids[b], time_steps[b], seed): position i is masked iff
  `uniform(key)[i] < mask_ratio(t)` with key = fold_in(fold_in(key(seed), example_id), t). The
  position with the smallest draw is always masked, so every example has at least one masked token
  (it is already masked whenever anything is, so this only adds a position to otherwise empty rows).

  Args:
    example_ids: int [B] global example ids.
    time_steps: int [B] time steps in [0, num_time_steps - 1].
    seq_len: T.
    seed: the run's seed (`training.seed`).
    num_time_steps: N.
    min_ratio: mask ratio at t=0.
  """
  base = jax.random.key(seed)

  def one(example_id, t):
    key = jax.random.fold_in(jax.random.fold_in(base, example_id), t)
    u = jax.random.uniform(key, (seq_len,))
    forced = jnp.arange(seq_len) == jnp.argmin(u)
    return (u < mask_ratio(t, num_time_steps, min_ratio)) | forced

  return jax.vmap(one)(jnp.asarray(example_ids, jnp.int32), jnp.asarray(time_steps, jnp.int32))


# Example functions: (tokens int32 [B, T], batch, time_steps int32 [B], *, seed, num_time_steps,
# min_ratio, mask_token_id) -> (inputs [B, T], targets int32 [B, T], loss rule [B, T]). The
# keywords are Python values (static under jit); a function ignores those it does not use. With
# data.packing="documents" the batch holds "segment_ids" [B, T]: no target may cross a segment.

def _mlm_example(tokens, batch, time_steps, *, seed, num_time_steps, min_ratio, mask_token_id):
  masked = mlm_mask(batch["example_id"], time_steps, tokens.shape[1], seed=seed,
                    num_time_steps=num_time_steps, min_ratio=min_ratio)
  return jnp.where(masked, mask_token_id, tokens), tokens, masked


def _clm_example(tokens, batch, time_steps, **_):
  b, t = tokens.shape
  # The last target is a placeholder (0, a valid id for any vocab); clm_mask drops it from the loss.
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
  return tokens, targets, clm_mask(b, t, batch.get("segment_ids"))


def _custom_example(tokens, batch, time_steps, **_):
  return (tokens, jnp.asarray(batch["targets"], jnp.int32),
          batch.get("loss_mask", jnp.ones(tokens.shape, jnp.float32)))


@dataclasses.dataclass(frozen=True)
class Objective:
  """What one `training_objective` does (see the module docstring)."""
  example: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]   # see the functions above
  causal: bool                  # causal attention; else bidirectional
  masks: bool                   # inputs masked with mask_token_id at the time step's mask ratio
  sampling: str | None          # "generate" (left to right), "unmask" (fills the masks) or None
  needs: tuple[str, ...] = ()   # batch keys beyond "tokens" and "example_id"


OBJECTIVES = {
    "mlm": Objective(_mlm_example, causal=False, masks=True, sampling="unmask"),
    "clm": Objective(_clm_example, causal=True, masks=False, sampling="generate"),
    # Targets ([B, T] like "tokens") and optionally a "loss_mask" come in the batch.
    "custom": Objective(_custom_example, causal=False, masks=False, sampling=None,
                        needs=("targets",)),
}

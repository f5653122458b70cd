"""Any re-iterable of batch dicts as the trainer's dataloader: a list, a torch `DataLoader`, a
generator function. Batch keys may be ours or the original StackWise's.

A batch becomes {"tokens": int32 [B, T], "example_id": int32 [B]} (plus "targets" for a custom
objective): `tokens` from "tokens" or "input_ids"; positions where "attention_mask" is 0 hold
the tokenizer's pad id, which the loss leaves out; `targets` from "targets" or "target_ids";
`example_id` as given, else the batch's running position in the stream (so masks stay a pure function of it).
With data.packing="documents" a row's documents are told apart by the config tokenizer's EOS, as in
our own records (`packing.document_segments`, applied where a batch becomes an example).
Such a source has no held-out split: `eval_batches(n)` are its first n batches unless an eval
source is given. The iterator's state is the number of batches it has given; a resumed run skips
that many, so a source must yield the same batches in the same order each time it is iterated.
"""
from collections.abc import Callable

import numpy as np

from stackwise_jax.data.tokenizer import PAD_ID, special_ids
from stackwise_jax.errors import ConfigError

_TOKENS, _TARGETS = ("tokens", "input_ids"), ("targets", "target_ids")


def as_dataloader(dataloader, config):
  """`dataloader` itself when it has the trainer's interface (`train_iter`, `eval_batches`),
  else an `IterableLoader` over it."""
  if hasattr(dataloader, "train_iter") and hasattr(dataloader, "eval_batches"):
    return dataloader
  return IterableLoader(dataloader, config)


class IterableLoader:
  """The trainer's dataloader interface over a re-iterable of batch dicts (module docstring)."""

  def __init__(self, batches, config, eval_batches=None):
    self._batches = restartable(batches, "dataloader")
    self._eval = None if eval_batches is None else restartable(eval_batches, "eval_batches")
    t = config.training
    self.shape, self.pad_id = (t.batch_size, t.seq_len), special_ids(config).pad

  def train_iter(self) -> "BatchIterator":
    return BatchIterator(self._batches, self.shape, self.pad_id)

  def eval_batches(self, n: int) -> list[dict]:
    it = BatchIterator(self._eval or self._batches, self.shape, self.pad_id)
    return [next(it) for _ in range(max(n, 0))]


class BatchIterator:
  """Endless: the source again from its start when it ends. `get_state()` / `set_state()` as
  grain's iterators, so checkpoints save and restore it the same way."""

  def __init__(self, source: Callable, shape: tuple[int, int], pad_id: int = PAD_ID):
    self._source, self._shape, self._pad_id = source, shape, pad_id
    self._given, self._it = 0, iter(source())

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    try:
      raw = next(self._it)
    except StopIteration:
      self._it = iter(self._source())
      try:
        raw = next(self._it)
      except StopIteration:
        raise ConfigError("dataloader: yields no batches (a generator object runs only once: "
                          "pass a list, a DataLoader or the generator function)") from None
    batch = as_batch(raw, first_example=self._given * self._shape[0], shape=self._shape,
                     pad_id=self._pad_id)
    self._given += 1
    return batch

  def get_state(self) -> dict:
    return {"batches_given": self._given}

  def set_state(self, state: dict) -> None:
    """Continues after the first `state["batches_given"]` batches of the source."""
    self._given, self._it = 0, iter(self._source())
    for _ in range(state["batches_given"]):
      next(self)


def as_batch(raw: dict, first_example: int, shape: tuple[int, int] | None = None,
             pad_id: int = PAD_ID) -> dict:
  """One batch dict, our keys or the original's, as the trainer reads it (module docstring);
  `shape`: the [batch, seq] it must have (None: its own)."""
  keys = [k for k in _TOKENS if k in raw]
  if not keys:
    raise ConfigError(f"dataloader batch with keys {sorted(raw)}: allowed: a dict with 'tokens' "
                      "or 'input_ids' [batch, seq] (and 'attention_mask', 'targets' / "
                      "'target_ids', 'example_id' if it has them)")
  tokens = np.asarray(raw[keys[0]], np.int32)
  shape = tokens.shape if shape is None else shape
  if tokens.shape != shape:
    raise ConfigError(f"dataloader batch {keys[0]!r} of shape {tokens.shape}: allowed: "
                      f"(training.batch_size, training.seq_len) = {shape}")
  kept = np.asarray(raw.get("attention_mask", np.ones(shape))) != 0
  pad = lambda x: np.where(kept, x, pad_id).astype(np.int32)   # the loss leaves the pad id out
  example_id = (np.asarray(raw["example_id"], np.int32) if "example_id" in raw
                else np.arange(first_example, first_example + shape[0], dtype=np.int32))
  batch = {"tokens": pad(tokens), "example_id": example_id}
  targets = [k for k in _TARGETS if k in raw]
  if targets:
    batch["targets"] = pad(np.asarray(raw[targets[0]], np.int32))
  if "loss_mask" in raw:
    batch["loss_mask"] = np.asarray(raw["loss_mask"], np.float32)
  return batch


def restartable(batches, name: str) -> Callable:
  """A function giving a fresh iterator over `batches` each call."""
  if callable(batches):
    return batches   # a generator function
  if iter(batches) is batches:   # an iterator: it could not start again
    raise ConfigError(f"{name}: a one-shot iterator cannot be read again each epoch or on "
                      "resume; allowed: a list, a torch DataLoader, any re-iterable, or a "
                      "function returning a fresh iterator (a generator function)")
  return lambda: iter(batches)

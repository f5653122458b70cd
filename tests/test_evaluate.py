"""Bits per byte (issue 18): the eval loss in bits per UTF-8 byte of the text its loss tokens stand
for, so runs with different tokenizers compare. Checked against a hand computation and against the
trainer's own eval examples."""
import math
import types

import numpy as np
import pytest

from conftest import micro_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.data.tokenizer import BYTES
from stackwise_jax.progressive.evaluate import eval_example, evaluate
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer, TimeStepMasking


def _log_softmax(logits):
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _hand_bits_per_byte(rack, examples, token_bytes):
  """(bits per byte, loss tokens, bytes) by a loop over the loss tokens, in float64."""
  nats = tokens = n_bytes = 0.0
  for ex in examples:
    logp = _log_softmax(np.asarray(rack(rack.params, ex["inputs"], ex["time_step"]), np.float64))
    for b, t in zip(*np.nonzero(ex["loss_mask"])):
      target = int(ex["targets"][b, t])
      nats -= logp[b, t, target]
      tokens += 1
      n_bytes += int(token_bytes[target]) if target < len(token_bytes) else 0
  return nats / math.log(2) / n_bytes, tokens, n_bytes


def test_bits_per_byte_equals_a_hand_computation():
  builder = ProgressiveRackBuilder(micro_config())
  builder.add_stack()
  rack = builder.build_rack()
  # A tokenizer of 6 ids: pieces of 1 to 4 bytes and a special id (0 bytes); the model's ids 6..9
  # lie past its table and count 0 bytes.
  token_bytes = np.array([1, 3, 0, 2, 4, 1], np.int32)
  rng = np.random.default_rng(0)
  examples = [{"inputs": rng.integers(0, 10, (4, 16)).astype(np.int32),
               "targets": rng.integers(0, 10, (4, 16)).astype(np.int32),
               "loss_mask": (rng.random((4, 16)) < 0.6).astype(np.float32),
               "time_step": np.zeros(4, np.int32)} for _ in range(2)]
  expected, tokens, n_bytes = _hand_bits_per_byte(rack, examples, token_bytes)
  assert n_bytes not in (0, tokens)   # bytes differ from tokens: the table matters
  got = evaluate(rack, examples, token_bytes=token_bytes)
  assert got["tokens"] == tokens
  assert got["bits_per_byte"] == pytest.approx(expected, rel=1e-5)
  assert got["loss"] / math.log(2) * tokens / n_bytes == pytest.approx(expected, rel=1e-5)
  # Without a table, or when the loss tokens stand for no bytes: None, never inf or nan.
  assert evaluate(rack, examples)["bits_per_byte"] is None
  assert evaluate(rack, examples, token_bytes=np.zeros(6, np.int32))["bits_per_byte"] is None


class _NamedTokenizerLoader:
  """A dataloader that names its tokenizer (as `DataLoader.tokenizer` does)."""

  def __init__(self, loader, token_bytes):
    self._loader = loader
    self.tokenizer = types.SimpleNamespace(token_bytes=token_bytes)

  def train_iter(self):
    return self._loader.train_iter()

  def eval_batches(self, n):
    return self._loader.eval_batches(n)


def _recomputed(config, token_bytes, eval_loss):
  """A stage's bits per byte from its eval loss and the bytes of the trainer's eval examples."""
  masking = TimeStepMasking(config)
  tokens = n_bytes = 0.0
  for batch in make_dataloader(config).eval_batches(config.training.eval_batches):
    ex = eval_example(masking, batch)
    mask, targets = np.asarray(ex["loss_mask"]), np.asarray(ex["targets"])
    tokens += mask.sum()
    n_bytes += (np.asarray(token_bytes)[np.minimum(targets, len(token_bytes) - 1)]
                * (targets < len(token_bytes)) * mask).sum()
  return eval_loss / math.log(2) * tokens / n_bytes


def test_trainer_reports_bits_per_byte_of_the_dataloaders_tokenizer(text_corpus):
  config = micro_config(target_stacks=2)
  config.data.source, config.data.paths = "text", (text_corpus,)
  config.training.steps_per_stack = 4
  # Byte ids standing for 1 to 3 bytes each, specials for none.
  token_bytes = BYTES.token_bytes * (1 + np.arange(len(BYTES.token_bytes)) % 3)
  results = ProgressiveTrainer(config, progress=False, log=lambda _: None).train_progressively(
      ProgressiveRackBuilder(config), _NamedTokenizerLoader(make_dataloader(config), token_bytes))
  stages = results["stages"]
  for stage in stages:
    assert stage["eval_bits_per_byte"] == pytest.approx(
        _recomputed(config, token_bytes, stage["eval_loss"]), rel=1e-5)
  assert results["final_eval_bits_per_byte"] == stages[-1]["eval_bits_per_byte"]

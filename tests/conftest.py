"""Shared fixtures: small configs that build in milliseconds."""
import os
import pathlib
import tempfile

# The tests, and the CLI subprocesses they start (which inherit this environment), compile the
# same small steps again and again: XLA's persistent compilation cache serves the repeats (~13%
# off test_checkpoint.py). Set before jax is imported; a user's own cache settings win.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "stackwise-jax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from stackwise_jax.config import default_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def micro_config(**progressive):
  """A 2-head, d_model 32 config over a tiny text corpus; override progressive fields by name."""
  c = default_config()
  c.model.d_model, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 32, 2, 2, 64
  c.model.max_seq_len = 32
  c.training.batch_size, c.training.seq_len = 4, 16
  c.training.steps_per_stack, c.training.warmup_steps = 8, 2
  c.training.eval_every, c.training.eval_batches, c.training.log_every = 0, 2, 4
  c.training.progressive.max_stacks, c.training.progressive.target_stacks = 4, 3
  for key, value in progressive.items():
    c.training.progressive[key] = value
  return c


def write_corpus(directory) -> str:
  """Writes a few small text files into `directory`; returns their glob pattern."""
  words = "the quick brown fox jumps over the lazy dog while stacks grow one at a time".split()
  for i in range(6):
    (directory / f"doc{i}.txt").write_text(" ".join(words[i:] + words[:i]) * 40)
  return str(directory / "*.txt")


@pytest.fixture
def text_corpus(tmp_path):
  return write_corpus(tmp_path)

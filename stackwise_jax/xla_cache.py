"""XLA's persistent compilation cache, on by default: a repeated or resumed run loads its compiled
steps from disk instead of compiling them again."""
import os

import jax

ENV = "STACKWISE_COMPILATION_CACHE"   # a directory, or "off"
DEFAULT_DIR = "~/.cache/stackwise-jax/xla"


def cache_dir(config) -> str | None:
  """Where compiled programs are kept: $STACKWISE_COMPILATION_CACHE, else
  `training.compilation_cache_dir`; None when either says "off" or "" (switched off)."""
  where = os.environ.get(ENV, config.training.compilation_cache_dir)
  return None if where.strip() in ("", "off") else os.path.expanduser(where)


def enable(config) -> str | None:
  """Turns the cache on for this process (once; a directory JAX was already given, e.g. through
  JAX_COMPILATION_CACHE_DIR, wins). Returns the directory in use, or None."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  where = cache_dir(config)
  if where is None:
    return None
  os.makedirs(where, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", where)
  # Small steps compile in well under JAX's default 1 s threshold; they are worth keeping too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return where

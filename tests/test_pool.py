"""Data reuse the original's way (training.data_reuse="pool"), cache extension, one compiled step
per stack shape, and where a stage's time goes."""
import logging

import jax
import numpy as np
import pytest

from conftest import assert_same_run, checkpoint_steps, cut_copy, micro_args, micro_config
from stackwise_jax.checkpoint import RunCheckpoints
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.progressive import caching


def pool_config(text_corpus, epochs=2, **progressive):
  config = micro_config(**progressive)
  config.data.source, config.data.paths = "text", (text_corpus,)
  config.training.data_reuse, config.training.epochs_per_stack = "pool", epochs
  return config


def _run(config, workdir=None, log=None):
  checkpoints = None if workdir is None else RunCheckpoints(str(workdir), config,
                                                            log=lambda _: None)
  builder = ProgressiveRackBuilder(config)
  trainer = ProgressiveTrainer(config, progress=False, log=log or (lambda _: None),
                               checkpoints=checkpoints)
  results = trainer.train_progressively(builder, make_dataloader(config))
  if checkpoints is not None:
    checkpoints.close()
  return results, builder.params


@pytest.mark.parametrize("objective,time", [("clm", "depth"), ("mlm", "input")])
def test_cached_pool_stages_equal_a_streamed_recompute(text_corpus, objective, time):
  """Same pool, same order, same masks: reading the trunk from an (extended) cache changes
  nothing but rounding."""
  losses = {}
  for cache in (True, False):
    config = pool_config(text_corpus, training_objective=objective, time_interpretation=time,
                         cache_activations=cache)
    results, _ = _run(config)
    assert [s["activation_mode"] for s in results["stages"]] == (
        ["streamed", "cached", "cached"] if cache else ["streamed"] * 3)
    assert all(s["steps"] == 16 and s["epochs"] == 2 for s in results["stages"])
    losses[cache] = [s["losses"] for s in results["stages"]]
    evals = [s["eval_loss"] for s in results["stages"]]
    losses[cache, "eval"] = evals
  np.testing.assert_allclose(losses[True], losses[False], rtol=2e-5)
  np.testing.assert_allclose(losses[True, "eval"], losses[False, "eval"], rtol=2e-5)


def test_every_epoch_goes_over_the_whole_pool_in_a_new_order(text_corpus):
  from stackwise_jax.progressive.trainer import pool_order
  config = pool_config(text_corpus, epochs=3)
  order = pool_order(config.training, stage=2)
  n = config.training.steps_per_stack
  epochs = order.reshape(3, n)
  assert all(sorted(e) == list(range(n)) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3
  np.testing.assert_array_equal(order, pool_order(config.training, stage=2))   # from the seed


@pytest.mark.parametrize("schedule", [(1,), (1, 2, 1)])
def test_extended_cache_entries_equal_a_from_scratch_trunk_forward(text_corpus, monkeypatch,
                                                                   schedule):
  """One stack a stage, and (1, 2, 1): stage 3's cache is stage 2's extended by two stacks."""
  config = pool_config(text_corpus, target_stacks={(1,): 3, (1, 2, 1): 4}[schedule],
                       stacks_per_stage=schedule)
  caches, builds, messages = [], [], []
  close = caching.ActivationCache.close
  monkeypatch.setattr(caching.ActivationCache, "close", lambda self: caches.append(self))
  build = caching.PrefixRunner.build
  monkeypatch.setattr(caching.PrefixRunner, "build",
                      lambda self, params, names, ex: builds.append(names) or build(
                          self, params, names, ex))
  _, params = _run(config, log=messages.append)
  # Stage 2 built the cache (pool and eval batches) through stack_0; stage 3 only extended it.
  assert set(builds) == {("stack_0",)}
  assert len(builds) == config.training.steps_per_stack + config.training.eval_batches
  assert any("extended by the stacks a stage adds" in m for m in messages)
  (cache,) = caches
  full = ProgressiveRackBuilder(config)
  full.add_stacks(config.training.progressive.target_stacks)
  full.update_params(params)
  rack = full.build_rack()
  trunk = tuple(rack.order[:-schedule[-1]])   # the last stage's trunk
  forward = jax.jit(lambda p, ex: rack.apply_stacks(
      p, trunk, *rack.embed(p, ex["inputs"], ex["time_step"])))
  for j in (0, len(cache) - 1):
    h, example = cache.get(j)
    np.testing.assert_allclose(h, forward(params, example), rtol=1e-5, atol=1e-5)
  close(cache)


def test_a_pool_run_resumes_mid_stage_to_identical_losses(text_corpus, tmp_path):
  """Cut in stage 3, whose cache the whole run extended: the resumed run rebuilds it from the
  checkpointed trunk, stack by stack, to the same bits."""
  config = pool_config(text_corpus, target_stacks=3)
  config.training.checkpoint_every, config.training.keep_checkpoints = 5, 100
  whole = _run(config, tmp_path / "whole")
  steps = checkpoint_steps(tmp_path / "whole")
  # Every 5 steps within a stage and each stage's end (2 epochs x 8 steps = 16 steps a stage).
  assert steps == [5, 10, 15, 16, 21, 26, 31, 32, 37, 42, 47, 48]
  cut_copy(tmp_path / "whole", tmp_path / "cut", 37)   # cut at stage 3, step 5
  assert_same_run(whole, _run(config, tmp_path / "cut"))


def test_equal_cached_stages_share_one_compiled_train_step(text_corpus, caplog):
  """7 stacks: stage 1 streams, stages 2-7 are cached with stacks of one shape."""
  config = pool_config(text_corpus, epochs=1, max_stacks=7, target_stacks=7)
  config.training.steps_per_stack = 2
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    results, _ = _run(config)
  assert [s["activation_mode"] for s in results["stages"]].count("cached") == 6
  compiles = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Compiling jit(train_step)")]
  assert len(compiles) == 2, compiles   # one streamed, one for all six cached stages


def test_phase_seconds_add_up_to_the_stage_seconds(text_corpus, tmp_path):
  config = pool_config(text_corpus, epochs=3)
  config.training.checkpoint_every, config.training.eval_every = 4, 8
  results, _ = _run(config, tmp_path)
  for stage in results["stages"]:
    phases = stage["seconds_by_phase"]
    assert set(phases) == {"compile", "cache", "train", "eval", "checkpoint"}
    assert all(v > 0 for v in phases.values()), phases
    assert sum(phases.values()) == pytest.approx(stage["seconds"], rel=0.05)
  assert results["stages"][1]["seconds_by_phase"]["cache"] > 0


def test_a_bf16_trunk_is_cached_in_bf16(text_corpus, monkeypatch):
  config = pool_config(text_corpus, target_stacks=2, new_stack_precision="bfloat16")
  caches = []
  close = caching.ActivationCache.close
  monkeypatch.setattr(caching.ActivationCache, "close", lambda self: caches.append(self))
  _, params = _run(config)
  (cache,) = caches
  h, example = cache.get(0)
  assert h.dtype == jax.numpy.bfloat16
  full = ProgressiveRackBuilder(config)
  for _ in range(2):
    full.add_stack()
  full.update_params(params)
  rack = full.build_rack()
  reference = np.asarray(jax.jit(lambda p, ex: rack.apply_stacks(
      p, ("stack_0",), *rack.embed(p, ex["inputs"], ex["time_step"])))(params, example))
  # Within bf16's rounding (8 bits of mantissa) of a plain forward of the trunk.
  np.testing.assert_allclose(np.asarray(h, np.float32), reference, rtol=1e-2, atol=1e-2)
  close(cache)


@pytest.mark.parametrize("precision", ["full", "bfloat16"])
def test_a_cache_partly_on_the_device_gives_the_same_losses(text_corpus, precision):
  """Entries kept on the device (built, extended and read there) train exactly as entries kept
  in host memory or spilled to disk: same rounding to the trunk's dtype, same bits."""
  runs = {}
  for device_entries in (0, 3):
    config = pool_config(text_corpus, target_stacks=3, new_stack_precision=precision)
    t = config.training
    entry_bytes = t.batch_size * t.seq_len * config.model.d_model * (
        2 if precision == "bfloat16" else 4)
    t.progressive.cache_device_bytes = device_entries * entry_bytes
    t.progressive.cache_max_bytes = 2 * entry_bytes   # the rest of the 8 spill to disk
    results, _ = _run(config)
    cached = results["stages"][1:]
    assert [s["cache_bytes_on_device"] for s in cached] == [device_entries * entry_bytes] * 2
    assert all(s["cache_bytes_on_disk"] == (6 - device_entries) * entry_bytes for s in cached)
    runs[device_entries] = [s["losses"] + [s["eval_loss"]] for s in results["stages"]]
  assert runs[3] == runs[0]


def test_prefetcher_keeps_order_and_raises_where_the_item_would_be():
  from stackwise_jax.progressive.feed import Prefetcher

  def make(i):
    if i == 5:
      raise ValueError("item 5")
    return i * i

  with Prefetcher(make, range(5)) as items:
    assert list(items) == [i * i for i in range(5)]
  got = []
  with pytest.raises(ValueError, match="item 5"), Prefetcher(make, range(8)) as items:
    for x in items:
      got.append(x)
  assert got == [i * i for i in range(5)]


def test_compilation_cache_directory_from_env_config_or_off(monkeypatch, tmp_path):
  from stackwise_jax import xla_cache
  config = micro_config()
  monkeypatch.delenv(xla_cache.ENV, raising=False)
  assert xla_cache.cache_dir(config).endswith(".cache/stackwise-jax/xla")
  config.training.compilation_cache_dir = str(tmp_path / "mine")
  assert xla_cache.cache_dir(config) == str(tmp_path / "mine")
  monkeypatch.setenv(xla_cache.ENV, str(tmp_path / "env"))
  assert xla_cache.cache_dir(config) == str(tmp_path / "env")
  monkeypatch.setenv(xla_cache.ENV, "off")
  assert xla_cache.cache_dir(config) is None


def test_a_run_fills_the_compilation_cache_and_a_rerun_compiles_nothing_new(text_corpus,
                                                                             tmp_path):
  import os
  import subprocess
  import sys
  from conftest import REPO
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(STACKWISE_COMPILATION_CACHE=str(tmp_path / "xla"), PYTHONPATH=str(REPO))
  entries = []
  for run in ("a", "b"):
    proc = subprocess.run([sys.executable, "-m", "stackwise_jax",
                           *micro_args(text_corpus, tmp_path / run)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    entries.append(set(os.listdir(tmp_path / "xla")))
  assert entries[0] and entries[1] == entries[0]

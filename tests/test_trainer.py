"""Stages end to end: frozen trunk untouched, cache == recompute, objectives' loss masks, orders."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_config, reference_logits
from stackwise_jax.data.tokenizer import special_ids
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.progressive.stages import set_labels
from stackwise_jax.progressive.steps import (init_train_state, make_optimizer, make_train_step,
                                             plan_stage, prefix_activations)


def text_config(text_corpus, **progressive):
  config = micro_config(**progressive)
  config.data.source, config.data.paths = "text", (text_corpus,)
  return config


def snapshot(tree):
  return jax.tree.map(np.array, tree)


def changed(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)   # zip would stop at the shorter
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("cache", [True, False])
def test_frozen_trunk_params_do_not_change_and_new_stack_does(text_corpus, cache):
  config = text_config(text_corpus, cache_activations=cache)
  builder, trainer = ProgressiveRackBuilder(config), ProgressiveTrainer(config, progress=False)
  loader = make_dataloader(config)
  trainer.train_progressively(builder, loader, target_stacks=1)
  builder.add_stack()
  before = snapshot(builder.params)
  results = trainer.train_progressively(builder, loader, target_stacks=2)
  after = builder.params
  jax.tree.map(np.testing.assert_array_equal, before["stacks"]["stack_0"], after["stacks"]["stack_0"])
  assert all(changed(before["stacks"]["stack_1"]["blocks"][0][part], after["stacks"]["stack_1"]
                     ["blocks"][0][part]) for part in ("attn", "ffn", "attn_norm", "ffn_norm"))
  stage2 = results["stages"][1]
  assert stage2["activation_mode"] == ("cached" if cache else "streamed")
  assert stage2["stack_order"] == ["stack_0", "stack_1"]
  assert stage2["cache_bytes"] == (8 * 4 * 16 * 32 * 4 if cache else 0)   # steps*B*T*D*fp32
  n_stack0 = sum(x.size for x in jax.tree.leaves(before["stacks"]["stack_0"]))
  n_embedding = before["embed_head"]["embed"]["embedding"].size   # the input side, frozen too
  assert stage2["frozen_params"] == n_stack0 + n_embedding


def stage_two_setup(config):
  """A builder after one trained stage with a fresh second stack, plus stage-2 ingredients."""
  builder, trainer = ProgressiveRackBuilder(config), ProgressiveTrainer(config, progress=False)
  loader = make_dataloader(config)
  trainer.train_progressively(builder, loader, target_stacks=1)
  builder.add_stack()
  frozen = set_labels(builder)
  rack, labels = builder.build_rack(), builder.labels()
  prepare = jax.jit(functools.partial(builder.masking.generate_masks_for_stack, stack_idx=1, salt=2))
  example = prepare(next(loader.train_iter()))
  return rack, labels, frozen, example


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_cached_step_equals_streamed_step(text_corpus, objective):
  config = text_config(text_corpus, training_objective=objective)
  rack, labels, frozen, example = stage_two_setup(config)
  cached_plan = plan_stage(rack, frozen, cache_activations=True)
  streamed_plan = plan_stage(rack, frozen, cache_activations=False)
  assert cached_plan.cached and cached_plan.prefix == ("stack_0",) and not streamed_plan.cached

  # What the cache stores (the prefix's output), run through the rest of the rack, gives the
  # logits of an independent plain-JAX forward of the whole rack (tests/test_model.py).
  h = np.asarray(jax.jit(functools.partial(prefix_activations, rack, cached_plan.prefix))(
      rack.params, example))
  logits = rack.logits(rack.params, rack.apply_stacks(rack.params, cached_plan.body, h))
  want = reference_logits(rack.params, config, rack.order, example["inputs"],
                          causal=objective == "clm")
  np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-4)

  tx = make_optimizer(config.training, labels, config.training.steps_per_stack)
  results = {}
  for plan in (cached_plan, streamed_plan):
    state = init_train_state(snapshot(rack.params), tx, plan)
    batch = {**example, "h": h} if plan.cached else example
    state, metrics = make_train_step(rack, plan, tx, labels)(state, batch)
    results[plan.activation_mode] = (float(metrics["loss"]), state["params"])
  assert results["cached"][0] == pytest.approx(results["streamed"][0], rel=1e-5, abs=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               results["cached"][1], results["streamed"][1])


def test_trainer_cache_entries_equal_recomputed_activations(text_corpus, monkeypatch):
  """The cache the trainer builds holds exactly the prefix outputs of the stage's examples."""
  from stackwise_jax.progressive import caching
  config = text_config(text_corpus)
  caches = []
  original_close = caching.ActivationCache.close
  monkeypatch.setattr(caching.ActivationCache, "close", lambda self: caches.append(self))
  builder, trainer = ProgressiveRackBuilder(config), ProgressiveTrainer(config, progress=False)
  loader = make_dataloader(config)
  trainer.train_progressively(builder, loader, target_stacks=1)
  trunk = snapshot(builder.params)
  trainer.train_progressively(builder, loader, target_stacks=2)
  (cache,) = caches
  rack = builder.build_rack()
  for i in (0, len(cache) - 1):
    h, example = cache.get(i)
    x, time_emb = rack.embed(trunk, example["inputs"], example["time_step"])
    np.testing.assert_allclose(h, rack.apply_stacks(trunk, ("stack_0",), x, time_emb), rtol=1e-5,
                               atol=1e-5)
  original_close(cache)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_loss_ignores_positions_outside_the_loss_mask(text_corpus, objective):
  """CLM: the last position never contributes; MLM: unmasked positions never do."""
  config = text_config(text_corpus, training_objective=objective)
  rack, labels, frozen, example = stage_two_setup(config)
  plan = plan_stage(rack, frozen, cache_activations=False)
  tx = make_optimizer(config.training, labels, 10)
  ignored = np.asarray(example["loss_mask"]) == 0
  if objective == "clm":
    assert ignored[:, -1].all()
  else:
    assert (ignored == (np.asarray(example["inputs"]) != special_ids(config).mask)).all()
  scrambled = dict(example)
  scrambled["targets"] = jnp.where(ignored, (example["targets"] + 7) % 256, example["targets"])
  losses = []
  for ex in (example, scrambled):
    state = init_train_state(snapshot(rack.params), tx, plan)
    losses.append(float(make_train_step(rack, plan, tx, labels)(state, ex)[1]["loss"]))
  assert losses[0] == losses[1]
  # and the scrambling did touch targets, while in-mask targets matter:
  assert not np.array_equal(scrambled["targets"], example["targets"])


@pytest.mark.parametrize("mode,order", [("append", ["stack_0", "stack_1", "stack_2"]),
                                        ("prepend", ["stack_2", "stack_1", "stack_0"])])
def test_three_stage_run_in_each_building_mode(text_corpus, mode, order):
  config = text_config(text_corpus, building_mode=mode)
  builder, trainer = ProgressiveRackBuilder(config), ProgressiveTrainer(config, progress=False)
  results = trainer.train_progressively(builder, make_dataloader(config), target_stacks=3)
  stages = results["stages"]
  assert [s["stack_index"] for s in stages] == [0, 1, 2]
  assert stages[-1]["stack_order"] == order
  # append caches the frozen trunk; prepend must stream (the trunk follows the new stack)
  assert [s["activation_mode"] for s in stages[1:]] == (["cached"] * 2 if mode == "append"
                                                        else ["streamed"] * 2)
  # once a trunk exists the (tied) embedding is frozen; append mode still trains the final norm
  norm_size = builder.params["embed_head"]["final_norm"]["scale"].size
  stack_size = sum(x.size for x in jax.tree.leaves(builder.params["stacks"]["stack_0"]))
  expected = stack_size + (norm_size if mode == "append" else 0)
  assert stages[2]["trainable_params"] == expected
  assert all(np.isfinite(s["eval_loss"]) for s in stages)


def test_time_as_input_run_and_half_precision_stack(text_corpus):
  config = text_config(text_corpus, training_objective="mlm", time_interpretation="input",
                       new_stack_precision="half")
  builder, trainer = ProgressiveRackBuilder(config), ProgressiveTrainer(config, progress=False)
  results = trainer.train_progressively(builder, make_dataloader(config), target_stacks=2)
  assert all(np.isfinite(s["loss_end"]) for s in results["stages"])
  assert results["stages"][1]["time_step"] is None
  assert {str(x.dtype) for x in jax.tree.leaves(builder.params["stacks"]["stack_0"])} == {"float16"}


def test_cached_stage_equals_streamed_stage(text_corpus):
  """With the trunk and its input embedding frozen, caching is exact over a whole stage."""
  losses = {}
  for cache in (True, False):
    config = text_config(text_corpus, cache_activations=cache)
    trainer = ProgressiveTrainer(config, progress=False)
    results = trainer.train_progressively(ProgressiveRackBuilder(config), make_dataloader(config), 2)
    losses[cache] = results["stages"][1]["losses"]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)

"""How a new stack starts (training.progressive.new_stack_init, design §10b): its own random
init, a copy of the trained stack next to it (copy_last), progressive stacking (stack), or the
identity (zeroed residual writes): the rack's logits do not move when it is added."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import mark_trained, micro_config
from stackwise_jax import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.config import validate
from stackwise_jax.errors import ConfigError


def _builder(init, mode="append", **progressive):
  config = micro_config(new_stack_init=init, building_mode=mode, max_stacks=6, target_stacks=6,
                        **progressive)
  return ProgressiveRackBuilder(validate(config))


def _trained_stack(builder):
  """Adds a stack and marks it trained, with params unlike any fresh init."""
  return mark_trained(builder, builder.add_stack())


def _leaves(builder, name):
  return [np.asarray(x) for x in jax.tree.leaves(builder.params["stacks"][name])]


def _logits(builder, tokens, time_step):
  rack = builder.build_rack()
  return np.asarray(rack(rack.params, tokens, time_step))


@pytest.mark.parametrize("mode", ["append", "prepend"])
@pytest.mark.parametrize("time", ["depth", "input"])
def test_identity_leaves_the_racks_logits_unchanged(mode, time):
  builder = _builder("identity", mode, time_interpretation=time)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  steps = jnp.array([3, 9])
  for _ in range(2):
    _trained_stack(builder)
  before = _logits(builder, tokens, steps)
  new = builder.add_stack()
  np.testing.assert_array_equal(_logits(builder, tokens, steps), before)
  # the new stack is not a no-op by construction: its other kernels are random, and a random
  # stack in its place moves the logits
  assert np.abs(np.asarray(builder.params["stacks"][new.name]["blocks"][0]["attn"]["q"]["kernel"])).sum() > 0
  assert builder.init_sources[new.name] is None
  random = _builder("random", mode, time_interpretation=time)
  for _ in range(2):
    _trained_stack(random)
  random.add_stack()
  assert np.abs(_logits(random, tokens, steps) - before).max() > 1e-3


@pytest.mark.parametrize("mode, source", [("append", "stack_1"), ("prepend", "stack_1")])
def test_copy_last_copies_the_trained_stack_next_to_the_new_one(mode, source):
  builder = _builder("copy_last", mode)
  _trained_stack(builder)
  _trained_stack(builder)   # built last: nearest the head (append) or the embedding (prepend)
  new = builder.add_stack()
  assert builder.init_sources[new.name] == source
  position = [s.name for s in builder.specs].index(new.name)
  assert builder.specs[position + (-1 if mode == "append" else 1)].name == source
  for a, b in zip(_leaves(builder, new.name), _leaves(builder, source), strict=True):
    np.testing.assert_array_equal(a, b)
  # independent copies: changing the new stack leaves its source as it was
  kept = _leaves(builder, source)
  params = builder.params
  stacks = dict(params["stacks"])
  stacks[new.name] = jax.tree.map(lambda x: x * 2 + 1, stacks[new.name])
  builder.update_params({**params, "stacks": stacks})
  for a, b in zip(_leaves(builder, source), kept, strict=True):
    np.testing.assert_array_equal(a, b)


def test_stack_copies_by_progressive_stacking():
  """Stack j starts as stack j - 2^floor(log2 j): at 2 and 4 stacks the later half began as a
  copy of the earlier half."""
  builder = _builder("stack")
  first = _trained_stack(builder)
  assert builder.init_sources[first.name] is None   # nothing trained to copy yet
  want = {1: 0, 2: 0, 3: 1, 4: 0, 5: 1}
  for j, source in want.items():
    new = builder.add_stack()
    assert (new.index, builder.init_sources[new.name]) == (j, f"stack_{source}")
    for a, b in zip(_leaves(builder, new.name), _leaves(builder, f"stack_{source}"),
                    strict=True):
      np.testing.assert_array_equal(a, b)
    mark_trained(builder, new)


def test_a_copied_stack_trains_apart_from_its_frozen_source(text_corpus):
  """Two stages with copy_last: stack_1 starts as stack_0 as stage 1 left it, then trains while
  the frozen stack_0 stays as it was; results record the init."""
  config = micro_config(new_stack_init="copy_last", target_stacks=2)
  config.data.source, config.data.paths = "text", (text_corpus,)
  from stackwise_jax.data import make_dataloader
  one = ProgressiveRackBuilder(config)
  ProgressiveTrainer(config, progress=False).train_progressively(one, make_dataloader(config),
                                                                   target_stacks=1)
  two = ProgressiveRackBuilder(config)
  results = ProgressiveTrainer(config, progress=False).train_progressively(
      two, make_dataloader(config), target_stacks=2)
  assert [s["init_from"] for s in results["stages"]] == [{"stack_0": None},
                                                         {"stack_1": "stack_0"}]
  assert {s["new_stack_init"] for s in results["stages"]} == {"copy_last"}
  after_stage_1 = _leaves(one, "stack_0")
  # frozen: as stage 1 left it
  for a, b in zip(_leaves(two, "stack_0"), after_stage_1, strict=True):
    np.testing.assert_allclose(a, b.astype(a.dtype), rtol=0, atol=0)
  moved = [np.abs(a - b).max()
           for a, b in zip(_leaves(two, "stack_1"), after_stage_1, strict=True)]
  assert min(moved) > 0   # every leaf of the copy trained away from its source


@pytest.mark.parametrize("init, field, needle", [
    ("copy_last", "new_stack_precision", "qlora"),
    ("stack", "new_stack_precision", "nvfp4"),
])
def test_copies_of_quantized_stacks_are_refused_before_training(init, field, needle):
  config = micro_config(new_stack_init=init)
  config.training.progressive[field] = needle
  config.model.d_model, config.model.d_ff = 64, 128   # block sizes of the stored formats
  with pytest.raises(ConfigError, match=f"new_stack_init='{init}': allowed: 'random' or "
                                        "'identity'"):
    validate(config)


def test_a_copy_of_another_shape_is_refused_by_name():
  builder = _builder("copy_last")
  _trained_stack(builder)
  with pytest.raises(ConfigError, match=r"stack_1 would start as a copy of stack_0 \(1 blocks"):
    builder.append_stack(n_blocks=3)


def test_growth_with_a_qlora_trunk():
  """copy_last copies the stack trained last before it is quantized into the trunk; identity
  starts an int4 (qlora) stack whose residual writes are exactly zero."""
  builder = _builder("copy_last", trunk_strategy="qlora", qlora_enabled=True, quant_block_size=32)
  _trained_stack(builder)
  new = builder.add_stack()
  for a, b in zip(_leaves(builder, new.name), _leaves(builder, "stack_0"), strict=True):
    np.testing.assert_array_equal(a, b)
  builder.freeze_all_but_qlora()   # the source becomes int4 trunk; the copy stays float
  assert builder.specs[0].quantized and not builder.specs[1].quantized

  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)), jnp.int32)
  config = micro_config(new_stack_init="identity", new_stack_precision="qlora",
                        qlora_enabled=True, max_stacks=6, target_stacks=6)
  config.model.d_model, config.model.d_ff = 64, 128
  identity = ProgressiveRackBuilder(validate(config))
  _trained_stack(identity)
  before = _logits(identity, tokens, None)
  new = identity.add_stack()
  assert new.quantized
  # bf16 compute rounds the residual stream once on the way through; nothing is added to it
  np.testing.assert_allclose(_logits(identity, tokens, None), before, atol=0.05, rtol=0.02)

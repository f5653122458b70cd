"""The original StackWise's API words work here: keyword `stack_idx`, a builder from field names."""
import jax.numpy as jnp
import numpy as np
import pytest

from stackwise_jax import ConfigError, ProgressiveRackBuilder, TimeStepMasking
from stackwise_jax.config import default_config


def test_stack_idx_keyword_gives_the_time_step_of_the_stacks_level():
  config = default_config()   # append mode, 3 target stacks, linear mapping, 4 steps a level
  p = config.training.progressive
  masking = TimeStepMasking(config)
  # append: stack k sits at level target_stacks - 1 - k; time step = level * time_per_stack
  for stack_idx, level in ((0, 2), (1, 1), (2, 0)):
    assert masking.level_of_stack(stack_idx=stack_idx) == level
    assert masking.get_time_step_for_stack(stack_idx=stack_idx) == level * p.time_per_stack
  batch = {"tokens": jnp.arange(2 * 16).reshape(2, 16) % 200, "example_id": jnp.array([3, 9])}
  by_keyword = masking.generate_masks_for_stack(batch, stack_idx=1, salt=5)
  by_position = masking.generate_masks_for_stack(batch, 1, 5)
  for key in by_position:
    np.testing.assert_array_equal(by_keyword[key], by_position[key])
  assert np.all(np.asarray(by_keyword["time_step"]) == p.time_per_stack)


def test_builder_from_field_names_builds_those_sizes():
  builder = ProgressiveRackBuilder(vocab_size=300, d_model=64, d_ff=96, n_heads=2, n_kv_heads=2,
                                   max_stacks=5)
  m = builder.config.model
  assert (m.vocab_size, m.d_model, m.d_ff, m.n_heads) == (300, 64, 96, 2)
  assert builder.config.training.progressive.max_stacks == 5
  builder.add_stack()
  params = builder.params
  assert params["embed_head"]["embed"]["embedding"].shape == (300, 64)
  block = params["stacks"]["stack_0"]["blocks"][0]
  assert block["attn"]["q"]["kernel"].shape == (64, 64)
  assert block["ffn"]["gate"]["kernel"].shape == (64, 96)
  # the fields go on top of a given config too, which is left as it was
  base = default_config()
  assert ProgressiveRackBuilder(base, d_model=32).config.model.d_model == 32
  assert base.model.d_model == 128


@pytest.mark.parametrize("fields, fragment", [
    ({"d_modle": 64}, "d_modle=64: not a config field"),
    ({"d_model": "wide"}, "model.d_model='wide': expected an int"),
    ({"d_model": 66}, "model.d_model=66"),   # validated: not a multiple of n_heads=4
])
def test_builder_field_names_are_checked(fields, fragment):
  with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
    ProgressiveRackBuilder(**fields)

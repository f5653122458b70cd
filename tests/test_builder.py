"""Growing the rack: order by building mode, untouched existing stacks, max_stacks, labels."""
import jax
import numpy as np
import pytest

from conftest import micro_config
from stackwise_jax.config import validate
from stackwise_jax.errors import ConfigError
from stackwise_jax.progressive import FROZEN, TRAINABLE, ProgressiveRackBuilder
from stackwise_jax.progressive.steps import make_optimizer


def test_adding_a_stack_never_changes_existing_params():
  builder = ProgressiveRackBuilder(micro_config())
  builder.add_stack()
  before = jax.tree.map(np.array, builder.params)
  builder.add_stack()
  builder.prepend_stack()
  for name in before["stacks"]:
    jax.tree.map(np.testing.assert_array_equal, before["stacks"][name], builder.params["stacks"][name])
  jax.tree.map(np.testing.assert_array_equal, before["embed_head"], builder.params["embed_head"])
  # and a new stack is a fresh init, not a copy of an old one
  assert not np.array_equal(builder.params["stacks"]["stack_0"]["blocks"][0]["attn"]["q"]["kernel"],
                            builder.params["stacks"]["stack_1"]["blocks"][0]["attn"]["q"]["kernel"])


@pytest.mark.parametrize("mode,order", [("append", ["stack_0", "stack_1", "stack_2"]),
                                        ("prepend", ["stack_2", "stack_1", "stack_0"])])
def test_building_mode_sets_stack_order(mode, order):
  builder = ProgressiveRackBuilder(micro_config(), building_mode=mode)
  for _ in range(3):
    builder.add_stack()
  assert list(builder.build_rack().order) == order


def test_explicit_append_and_prepend_on_one_builder():
  builder = ProgressiveRackBuilder(micro_config())
  builder.append_stack(n_blocks=2)
  builder.prepend_stack(n_blocks=1, precision="bfloat16")
  specs = builder.build_rack().specs
  assert [(s.index, s.n_blocks, s.precision) for s in specs] == [(1, 1, "bfloat16"), (0, 2, "full")]
  assert len(builder.params["stacks"]["stack_0"]["blocks"]) == 2


def test_max_stacks_is_enforced_with_a_clear_error():
  builder = ProgressiveRackBuilder(micro_config())
  for _ in range(4):
    builder.add_stack()
  with pytest.raises(ValueError, match=r"training.progressive.max_stacks=4"):
    builder.add_stack()


def test_bad_precision_and_mode_are_rejected():
  with pytest.raises(ValueError, match="building_mode='sideways'"):
    ProgressiveRackBuilder(micro_config(), building_mode="sideways")
  with pytest.raises(ValueError, match="precision='fp8'"):
    ProgressiveRackBuilder(micro_config()).add_stack(precision="fp8")


@pytest.mark.parametrize("call,fields", [
    (lambda c: ProgressiveRackBuilder(c, building_mode="sideways"), {"building_mode": "sideways"}),
    (lambda c: ProgressiveRackBuilder(c, default_precision="fp8"), {"new_stack_precision": "fp8"}),
    (lambda c: ProgressiveRackBuilder(c).add_stack(precision="fp8"), {"new_stack_precision": "fp8"}),
    (lambda c: ProgressiveRackBuilder(c).add_stack(precision="nvfp4"),   # nvfp4 without stack LoRA
     {"new_stack_precision": "nvfp4"})])
def test_builder_arguments_fail_as_the_config_fields_they_stand_for(call, fields):
  """building_mode, default_precision and precision are checked by config validation, with the
  message of a config that holds the value."""
  with pytest.raises(ConfigError) as from_builder:
    call(micro_config(qlora_enabled=True))
  with pytest.raises(ConfigError) as from_config:
    validate(micro_config(qlora_enabled=True, **fields))
  assert str(from_builder.value) == str(from_config.value)


def test_freeze_trunk_labels_leaves_and_frozen_leaves_get_no_optimizer_state():
  builder = ProgressiveRackBuilder(micro_config())
  builder.add_stack(), builder.add_stack()
  labels = builder.freeze_trunk([0])
  assert set(jax.tree.leaves(labels["stacks"]["stack_0"])) == {FROZEN}
  assert set(jax.tree.leaves(labels["stacks"]["stack_1"])) == {TRAINABLE}
  tx = make_optimizer(micro_config().training, labels, total_steps=10)
  state = tx.init(builder.params)
  # AdamW keeps mu and nu per trainable leaf; frozen leaves contribute no arrays at all.
  trainable = sum(l == TRAINABLE for l in jax.tree.leaves(labels))
  arrays = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
  assert len(arrays) == 2 * trainable


def test_frozen_bfloat16_stack_is_stored_in_bfloat16():
  builder = ProgressiveRackBuilder(micro_config(), default_precision="bfloat16")
  builder.add_stack()
  assert {x.dtype for x in jax.tree.leaves(builder.params["stacks"]["stack_0"])} == {np.dtype("float32")}
  builder.freeze_trunk([0])
  assert {str(x.dtype) for x in jax.tree.leaves(builder.params["stacks"]["stack_0"])} == {"bfloat16"}

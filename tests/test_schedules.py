"""Growth schedules (training.progressive.stacks_per_stage, design §10b): a stage may add several
stacks; `stack` then repeats the trained rack (G_stack) and `midas` copies its middle (MIDAS)."""
import math

import jax
import numpy as np
import pytest

from conftest import (assert_same_run, checkpoint_steps, cut_copy, mark_trained, micro_args,
                      micro_config, text_config, train_run)
from stackwise_jax import ProgressiveRackBuilder
from stackwise_jax.cli import main
from stackwise_jax.config import from_yaml, load_config, stage_sizes, to_yaml, validate
from stackwise_jax.progressive.stages import grow, stage_specs


def _builder(init, mode="append", **progressive):
  config = micro_config(**{"new_stack_init": init, "building_mode": mode, "max_stacks": 6,
                           "target_stacks": 6, **progressive})
  return ProgressiveRackBuilder(validate(config))


def _assert_same_params(builder, name, source):
  """Stack `name`'s params equal `source`'s bit for bit: same tree, dtypes and values."""
  a, b = builder.params["stacks"][name], builder.params["stacks"][source]
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _differ(builder, name, other) -> bool:
  return any(np.any(np.asarray(x) != np.asarray(y)) for x, y in zip(
      jax.tree.leaves(builder.params["stacks"][name]),
      jax.tree.leaves(builder.params["stacks"][other]), strict=True))


@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_one_then_three_stacks_with_stack_init_makes_four_copies_of_the_trained_one(mode):
  """G_stack with growth factor 4: [1, 3] trains one stack, then stacks 1-3 start as it is."""
  config = validate(micro_config(new_stack_init="stack", building_mode=mode,
                                 stacks_per_stage=(1, 3), target_stacks=4, max_stacks=4))
  grown = ProgressiveRackBuilder(config)
  grow(grown, 4)   # as a run grows it: stage 1's stack is trained when stage 2 adds its copies
  for name in ("stack_1", "stack_2", "stack_3"):
    assert grown.init_sources[name] == "stack_0"
    _assert_same_params(grown, name, "stack_0")
  builder = ProgressiveRackBuilder(config)
  stages = stage_specs(builder, 4)
  first, _, number = grow(builder, 4, n_stages=1, stages=stages)
  assert ([s.name for s in first], number) == (["stack_0"], 1)
  mark_trained(builder, first[0])   # as if stage 1 trained it: unlike any fresh init
  second, frozen, _ = grow(builder, 4, stages=stages)   # the generator's next stage
  assert ([s.name for s in second], frozen) == (["stack_1", "stack_2", "stack_3"], {"stack_0"})
  assert len(builder.specs) == 4
  for name in ("stack_1", "stack_2", "stack_3"):
    assert builder.init_sources[name] == "stack_0"
    _assert_same_params(builder, name, "stack_0")


@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_several_new_stacks_repeat_the_trained_rack_in_order(mode):
  """stacks_per_stage=3 with stack init: stage 2's stacks 3, 4, 5 copy stacks 0, 1, 2, so the rack
  (forward order) is the trained block twice (G_stack, growth factor 2)."""
  builder = _builder("stack", mode)
  for spec in builder.add_stacks(3):
    mark_trained(builder, spec)
  trained = ["stack_0", "stack_1", "stack_2"]
  new = builder.add_stacks(3)
  assert [builder.init_sources[s.name] for s in new] == trained
  for spec, source in zip(new, trained):
    _assert_same_params(builder, spec.name, source)
  order = [s.name for s in builder.specs]
  copies = order[:3] if mode == "prepend" else order[3:]
  assert [builder.init_sources[n] for n in copies] == [n for n in order if n not in copies]


def test_one_stack_a_stage_keeps_progressive_stacking():
  """A stage adding one stack keeps stack j - 2^floor(log2 j) (stack 3 copies stack 1), where a
  stage adding several would repeat the rack from its first stack."""
  builder = _builder("stack")
  for _ in range(3):
    spec = builder.add_stack()
    mark_trained(builder, spec)
  assert builder.init_sources["stack_2"] == "stack_0"
  assert builder.add_stack().name == "stack_3" and builder.init_sources["stack_3"] == "stack_1"
  _assert_same_params(builder, "stack_3", "stack_1")


@pytest.mark.parametrize("trained, count, mode, sources", [
    (3, 1, "append", ["stack_1"]),                 # t_0 t_1 t_2: the middle one
    (4, 1, "append", ["stack_1"]),                 # even: the lower of the two middle ones
    (4, 2, "append", ["stack_1", "stack_2"]),      # the centred block, in order
    (5, 2, "append", ["stack_1", "stack_2"]),      # odd surplus: one nearer the embedding
    (1, 3, "append", ["stack_0"] * 3),             # more new than trained: the rack repeated
    (3, 1, "prepend", ["stack_1"]),                # forward order stack_2 stack_1 stack_0
    (4, 1, "prepend", ["stack_2"]),                # forward stack_3 stack_2 stack_1 stack_0
    (4, 2, "prepend", ["stack_1", "stack_2"]),     # built stack_4, stack_5: forward 5, 4 = 2, 1
])
def test_midas_copies_the_middle_of_the_trained_rack(trained, count, mode, sources):
  builder = _builder("midas", mode, max_stacks=8, target_stacks=8)
  for _ in range(trained):
    mark_trained(builder, builder.add_stack())
  new = builder.add_stacks(count)
  assert [builder.init_sources[s.name] for s in new] == sources
  for spec, source in zip(new, sources):
    _assert_same_params(builder, spec.name, source)
    assert all(_differ(builder, spec.name, other) for other in builder.trained if other != source)
  # the copies sit where the building mode adds stacks, in the block's forward order
  forward = [s.name for s in builder.specs]
  copies = forward[:count] if mode == "prepend" else forward[-count:]
  block = [builder.init_sources[n] for n in copies]
  trunk = [n for n in forward if n in builder.trained]
  start = trunk.index(block[0])
  assert block == [trunk[(start + i) % len(trunk)] for i in range(count)]


def test_an_int_adds_that_many_stacks_a_stage(tmp_path):
  """stacks_per_stage=2 (YAML, command line, or with_fields) is (2,): two stacks a stage, the
  last stage only what target_stacks needs; the value saves and loads back equal."""
  path = tmp_path / "c.yaml"
  path.write_text("training:\n  progressive:\n    stacks_per_stage: 2\n    max_stacks: 6\n"
                  "    target_stacks: 5\n")
  from_file = load_config(str(path))
  on_command_line = load_config(str(path), ["training.progressive.stacks_per_stage=2"])
  assert from_file.training.progressive.stacks_per_stage == (2,)
  assert on_command_line.training.progressive.stacks_per_stage == (2,)
  builder = ProgressiveRackBuilder(micro_config(max_stacks=6, target_stacks=5),
                                   stacks_per_stage=2)
  assert [len(new) for new in stage_specs(builder, 5)] == [2, 2, 1]
  saved = from_yaml(to_yaml(from_file))
  assert saved.training.progressive.stacks_per_stage == (2,)
  assert saved.to_dict() == from_file.to_dict()   # what a resume compares
  listed = load_config(str(path), ["training.progressive.stacks_per_stage=(1, 3)"])
  assert from_yaml(to_yaml(listed)).training.progressive.stacks_per_stage == (1, 3)
  assert stage_sizes(listed) == [1, 3, 1]   # the last entry holds for later stages


def test_one_then_three_trains_and_resumes_mid_stage_bit_identically(text_corpus, tmp_path):
  config = text_config(text_corpus, new_stack_init="stack", stacks_per_stage=(1, 3),
                       target_stacks=4, max_stacks=4)
  whole = train_run(config, tmp_path / "whole")
  stages = whole[0]["stages"]
  assert [s["new_stacks"] for s in stages] == [["stack_0"], ["stack_1", "stack_2", "stack_3"]]
  assert stages[1]["init_from"] == dict.fromkeys(("stack_1", "stack_2", "stack_3"), "stack_0")
  assert all(math.isfinite(x) for s in stages for x in s["losses"])
  assert stages[1]["activation_mode"] == "cached"   # the frozen stack_0 is the cached trunk
  steps = checkpoint_steps(tmp_path / "whole")
  assert steps == [3, 6, 8, 11, 14, 16]
  # Cut off after step 11 = stage 2, step 3: its three new stacks' optimizer state comes back.
  cut_copy(tmp_path / "whole", tmp_path / "cut", 11)
  assert_same_run(whole, train_run(config, tmp_path / "cut"))


SCHEDULE = "--config.training.progressive.stacks_per_stage="


@pytest.mark.parametrize("flags, needle", [
    ([SCHEDULE + "(1, 9)"], "stacks_per_stage=(1, 9): allowed: entries summing to at most "
                            "training.progressive.max_stacks (4)"),
    ([SCHEDULE + "(1, 1, 1)"], "stacks_per_stage=(1, 1, 1): allowed: no more entries than the "
                               "stages that grow the rack to training.progressive.target_stacks "
                               "(2)"),
    ([SCHEDULE + "0"], "stacks_per_stage=(0,): allowed: a positive int, or a non-empty list"),
    ([SCHEDULE + "(1, -1)"], "stacks_per_stage=(1, -1): allowed: a positive int"),
    ([SCHEDULE + "two"], "stacks_per_stage=('two',): allowed: a positive int"),
    ([SCHEDULE + ""], "stacks_per_stage=(): allowed: a positive int, or a non-empty list"),
    (["--config.training.progressive.new_stack_init=midas",
      "--config.training.progressive.trunk_strategy=qlora",
      "--config.training.progressive.qlora_enabled=True",
      "--config.training.progressive.quant_block_size=16"],
     "new_stack_init='midas': allowed: 'random' or 'identity'"),
    (["--config.training.progressive.new_stack_init=midas",
      "--config.training.progressive.new_stack_precision=qlora",
      "--config.training.progressive.quant_block_size=16"],
     "new_stack_init='midas': allowed: 'random' or 'identity'"),
])
def test_bad_schedules_exit_2_with_one_line(text_corpus, tmp_path, capsys, flags, needle):
  workdir = tmp_path / "run"
  assert main([*micro_args(text_corpus, workdir), *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith("stackwise-jax: error: training.progressive.") and err.count("\n") == 1, err
  assert needle in err, err
  assert not (workdir / "checkpoints").exists()


def test_a_schedule_of_the_wrong_type_in_yaml_names_the_field(tmp_path, capsys):
  path = tmp_path / "c.yaml"
  path.write_text("training:\n  progressive:\n    stacks_per_stage: 1.5\n")
  assert main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert ("training.progressive.stacks_per_stage=1.5: expected an int or a list of ints, "
          "e.g. [1, 3]") in err

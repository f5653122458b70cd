"""Train-all growth (`training.progressive.trunk_strategy="train"`, issue 29): once a trunk exists
it trains with the new stack, labelled TRUNK, at `trunk_lr_scale` times the new stack's lr
schedule; nothing is cached. A stage is then one end-to-end training of its rack; it checkpoints
and resumes like any stage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_same_run, checkpoint_steps, cut_copy, micro_args, micro_config,
                      text_config, train_run, write_corpus)
from stackwise_jax import load_rack
from stackwise_jax.checkpoint import open_run
from stackwise_jax.cli import main
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import FROZEN, TRAINABLE, TRUNK, ProgressiveRackBuilder
from stackwise_jax.progressive.stages import grow, restore_checkpoint, set_labels, stage_specs
from stackwise_jax.progressive.steps import (init_train_state, make_optimizer, make_train_step,
                                             plan_stage)

STEPS = 8   # text_config's steps_per_stack


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-stage train-all run, checkpoints every 3 steps -> (config, workdir, (results, params))."""
  directory = tmp_path_factory.mktemp("train_all")
  config = text_config(write_corpus(directory), target_stacks=2, trunk_strategy="train")
  return config, directory / "run", train_run(config, directory / "run")


def _stage_two(config, workdir):
  """A builder holding the rack as stage 2 of the run in `workdir` started (its labels set by
  `config`), and the stage's examples, drawn and masked as the trainer draws them."""
  checkpoints = open_run(str(workdir))
  ckpt = checkpoints.read(STEPS)   # the end of stage 1
  checkpoints.close()
  builder = ProgressiveRackBuilder(config)
  stages = stage_specs(builder, 2)
  restore_checkpoint(builder, ckpt, stages)
  new = next(stages)   # adds stack_1
  set_labels(builder)
  batches = make_dataloader(config).train_iter()
  for _ in range(STEPS):   # stage 1's
    next(batches)
  examples = [builder.masking.stage_example(jax.tree.map(jnp.asarray, next(batches)), new,
                                            builder.specs, 2) for _ in range(STEPS)]
  return builder, examples


def _train(builder, config, examples):
  """Plain steps on `builder`'s whole rack by its labels (nothing cached, no prefix) ->
  (losses, params)."""
  rack, labels = builder.build_rack(), builder.labels()
  plan = plan_stage(rack, set(), cache_activations=False)
  tx = make_optimizer(config.training, labels, STEPS)
  params = jax.tree.map(jnp.copy, rack.params)   # the step donates its state
  state = init_train_state(params, tx, plan, dropout_seed=config.training.seed * 1000 + 2)
  step = make_train_step(rack, plan, tx, labels)
  losses = []
  for example in examples:
    state, metrics = step(state, example)
    losses.append(float(metrics["loss"]))
  return losses, state["params"]


def test_the_trunk_trains_with_the_new_stack_and_nothing_is_cached(run):
  config, workdir, (results, params) = run
  before = load_rack(str(workdir), step=STEPS).params   # the rack stage 2 started from
  stage = results["stages"][1]
  assert stage["activation_mode"] == "streamed" and stage["cache_bytes"] == 0
  assert stage["frozen_params"] == 0
  assert stage["trainable_params"] == sum(x.size for x in jax.tree.leaves(params))
  for path, x in jax.tree_util.tree_leaves_with_path(before["stacks"]["stack_0"]):
    old = x
    new = params["stacks"]["stack_0"]
    for key in path:
      new = new[key.key]
    assert not np.array_equal(new, old), f"trunk leaf {jax.tree_util.keystr(path)} did not change"
  # "auto" under train: both sides of the embedding/head train (nothing is cached).
  assert not np.array_equal(params["embed_head"]["embed"]["embedding"],
                            before["embed_head"]["embed"]["embedding"])
  # The trunk's optimizer state: Adam's two moments of each of its fp32 leaves.
  memory = stage["memory"]["stack_0"]
  assert memory["optimizer_bytes"] == 2 * memory["base_bytes"] > 0
  builder = ProgressiveRackBuilder(config)
  grow(builder, 2, last_done=False)
  labels = builder.labels()
  assert set(jax.tree.leaves(labels["stacks"]["stack_0"])) == {TRUNK}
  assert set(jax.tree.leaves((labels["stacks"]["stack_1"], labels["embed_head"]))) == {TRAINABLE}


def test_a_train_all_stage_equals_plain_end_to_end_training_of_its_rack(run):
  config, workdir, (results, params) = run
  builder, examples = _stage_two(config, workdir)
  # The reference: the same rack, every leaf TRAINABLE (one lr, one clip), by the builder's own
  # methods.
  builder.unfreeze_all()
  builder.set_embedding_trainable(input_side=True, head_side=True)
  assert set(jax.tree.leaves(builder.labels())) == {TRAINABLE}
  losses, trained = _train(builder, config, examples)
  np.testing.assert_allclose(results["stages"][1]["losses"], losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, trained)


def test_trunk_lr_scale_scales_the_trunks_updates_only(run, tmp_path):
  config, workdir, (results, _) = run
  half = config.copy_and_resolve_references()
  half.training.progressive.trunk_lr_scale = 0.5
  half_results, _ = train_run(half, tmp_path / "half")
  assert half_results["stages"][0]["losses"] == results["stages"][0]["losses"]   # no trunk yet
  assert half_results["stages"][1]["losses"] != results["stages"][1]["losses"]

  # One step at the peak lr (no warm-up): Adam's update is proportional to the lr, so the trunk
  # moves half as far; the new stack and the embedding/head exactly as far.
  builder, examples = _stage_two(config, workdir)
  deltas = {}
  for scale in (1.0, 0.5):
    c = config.copy_and_resolve_references()
    c.training.warmup_steps, c.training.progressive.trunk_lr_scale = 0, scale
    _, after = _train(builder, c, examples[:1])
    deltas[scale] = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                 after, builder.params)
  trunk = lambda d: d["stacks"]["stack_0"]
  rest = lambda d: (d["embed_head"], d["stacks"]["stack_1"])
  assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(trunk(deltas[1.0])))
  jax.tree.map(lambda h, f: np.testing.assert_allclose(h, 0.5 * f, rtol=1e-3, atol=1e-9),
               trunk(deltas[0.5]), trunk(deltas[1.0]))
  jax.tree.map(np.testing.assert_array_equal, rest(deltas[0.5]), rest(deltas[1.0]))


def test_resume_mid_stage_equals_the_uninterrupted_run(run, tmp_path):
  config, workdir, whole = run
  steps = checkpoint_steps(workdir)
  assert steps == [3, 6, 8, 11, 14, 16]
  # Cut the run off after step 11 = stage 2, step 3: the trunk's optimizer state comes back too.
  cut_copy(workdir, tmp_path / "cut", 11)
  resumed = train_run(config, tmp_path / "cut")
  assert resumed[0]["stages"][1]["activation_mode"] == "streamed"
  assert_same_run(whole, resumed)


def test_an_nvfp4_trunk_trains_its_fp32_masters_fake_quantized():
  config = micro_config(trunk_strategy="train", new_stack_precision="nvfp4")
  builder = ProgressiveRackBuilder(config)
  grow(builder, 2, last_done=False)
  trunk = builder.specs[0]
  assert not trunk.packed   # never packed: it keeps training
  leaves = jax.tree.leaves(builder.params["stacks"]["stack_0"])
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
  assert set(jax.tree.leaves(builder.labels()["stacks"]["stack_0"])) == {TRUNK}


def test_train_trunk_refuses_int4_kernels():
  builder = ProgressiveRackBuilder(micro_config(quant_block_size=16))
  builder.append_stack(precision="qlora")
  builder.trained.add("stack_0")
  with pytest.raises(ValueError, match=r"^stack_0: int4 \(qlora\) kernels cannot train"):
    builder.train_trunk()
  assert FROZEN in jax.tree.leaves(builder.labels())   # unchanged: adapters only


@pytest.mark.parametrize("overrides, fragment", [
    (["trunk_lr_scale=0"], "training.progressive.trunk_lr_scale=0.0: allowed: a finite float > 0"),
    (["trunk_lr_scale=-0.5"], "training.progressive.trunk_lr_scale=-0.5: allowed"),
    (["trunk_lr_scale=nan"], "training.progressive.trunk_lr_scale=nan: allowed"),
    (["trunk_lr_scale=inf"], "training.progressive.trunk_lr_scale=inf: allowed"),
    (["trunk_strategy=train", "new_stack_precision=qlora", "quant_block_size=16"],
     "training.progressive.trunk_strategy='train': allowed: 'frozen' or 'qlora' when "
     "training.progressive.new_stack_precision='qlora'"),
])
def test_bad_train_all_settings_exit_2_with_one_line(text_corpus, tmp_path, capsys, overrides,
                                                     fragment):
  args = [*micro_args(text_corpus, tmp_path / "run"),
          *(f"--config.training.progressive.{o}" for o in overrides)]
  assert main(args) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and fragment in err, err
  assert not (tmp_path / "run" / "checkpoints").exists()

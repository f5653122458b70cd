"""The final stage (design §10b, `training.final_stage`): after the progressive stages, the whole
rack trains end to end at its own learning rate; int4 kernels never train; it checkpoints, resumes,
and shows in results.json, the summary table and the plots like any stage."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, micro_args, micro_config, write_corpus
from stackwise_jax import ConfigError, load_rack
from stackwise_jax.checkpoint import RunCheckpoints, open_run
from stackwise_jax.cli import main
from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive.evaluate import evaluate_run
from stackwise_jax.plots import _eval_by_depth, _loss, _stage_cost
from stackwise_jax.progressive import FROZEN, TRAINABLE, ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.progressive.stages import grow

TINY = str(REPO / "configs/tiny.py")
TRUNKS = {"frozen": {},
          "qlora": dict(trunk_strategy="qlora", qlora_enabled=True, progressive_qlora=True,
                        quant_block_size=16)}


def _config(text_corpus, **progressive):
  config = micro_config(**{"target_stacks": 2, **progressive})
  config.data.source, config.data.paths = "text", (text_corpus,)
  config.training.steps_per_stack, config.training.eval_batches = 4, 1
  config.training.final_stage, config.training.final_stage_steps = True, 4
  config.training.final_stage_lr = 2e-3
  return config


def _train(config, workdir=None):
  checkpoints = workdir and RunCheckpoints(str(workdir), config, log=lambda _: None)
  builder = ProgressiveRackBuilder(config)
  trainer = ProgressiveTrainer(config, progress=False, log=lambda _: None, checkpoints=checkpoints)
  results = trainer.train_progressively(builder, make_dataloader(config))
  if checkpoints:
    checkpoints.close()
  return results, builder


def _by_key(params) -> dict:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_final_stage_trains_every_trainable_leaf_and_no_int4_base(text_corpus, tmp_path, trunk):
  config = _config(text_corpus, **TRUNKS[trunk])
  results, builder = _train(config, tmp_path)
  before = load_rack(str(tmp_path), step=8)   # the end of stage 2: where the final stage started
  stages = results["stages"]
  assert [s["final"] for s in stages] == [False, False, True]
  final = stages[-1]
  assert final["new_stacks"] == [] and final["stack_index"] is None and final["steps"] == 4
  assert final["activation_mode"] == "streamed" and final["stack_order"] == ["stack_0", "stack_1"]

  old, labels = _by_key(before.params), _by_key(builder.labels())
  int4_stacks = {key.split("']")[1] for key, x in old.items() if x.dtype == jnp.int4}
  assert bool(int4_stacks) == (trunk == "qlora")
  trainable = 0
  for key, x in _by_key(builder.params).items():
    # qwix's int4 kernels (values and scales) never train; nor does the rest of their stacks'
    # base weights: only adapters. Every other leaf trains, as an fp32 master.
    stored = "['array']" in key
    adapters_only = key.split("']")[1] in int4_stacks
    want = FROZEN if stored or (adapters_only and "lora" not in key) else TRAINABLE
    assert labels[key] == want, key
    assert x.shape == old[key].shape
    if want == TRAINABLE:
      assert x.dtype == jnp.float32, key
      assert not jnp.array_equal(x, old[key]), f"{key} did not change in the final stage"
      trainable += x.size
    else:
      assert x.dtype == old[key].dtype and jnp.array_equal(x, old[key]), key
  assert final["trainable_params"] == trainable


def test_final_stage_restores_fp32_masters_from_packed_nvfp4_and_bf16(text_corpus):
  """A frozen nvfp4 trunk stack is packed with bf16 norms; the final stage trains it again from
  fp32 masters holding exactly what the packed stack computed with."""
  config = _config(text_corpus, new_stack_precision="nvfp4")
  builder = ProgressiveRackBuilder(config)
  grow(builder, 2, n_stages=2)   # the progressive stages: stack_0 frozen
  frozen = builder.build_rack()
  assert frozen.specs[0].packed
  assert frozen.params["stacks"]["stack_0"]["blocks"][0]["attn_norm"]["scale"].dtype == jnp.bfloat16
  grow(builder := ProgressiveRackBuilder(config), 2, n_stages=3)   # and the final stage
  rack = builder.build_rack()
  assert not any(s.packed for s in rack.specs)
  for key, x in _by_key(rack.params["stacks"]).items():
    assert x.dtype == jnp.float32, key
  assert set(jax.tree.leaves(builder.labels())) == {TRAINABLE}
  inputs = jnp.arange(2 * 16).reshape(2, 16) % 250
  time_step = jnp.zeros((2,), jnp.int32)
  np.testing.assert_allclose(rack(rack.params, inputs, time_step),
                             frozen(frozen.params, inputs, time_step), rtol=1e-5, atol=1e-5)


def test_final_stage_trains_at_final_stage_lr(text_corpus, tmp_path):
  """One stack: the final stage has the labels and shapes of stage 1, but its own learning rate
  and steps (a tiny rate barely moves the params; stage 1's would move them by ~1e-3)."""
  config = _config(text_corpus, target_stacks=1)
  config.training.final_stage_lr, config.training.final_stage_steps = 1e-9, 5
  results, builder = _train(config, tmp_path)
  assert [s["steps"] for s in results["stages"]] == [4, 5]
  before = load_rack(str(tmp_path), step=4).params
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), builder.params, before)
  assert 0 < max(jax.tree.leaves(moved)) < 1e-6, moved


def test_resume_mid_final_stage_gives_identical_losses(text_corpus, tmp_path):
  # Pool mode, 6 final steps over a pool of 4 batches (one and a half epochs); a bf16 trunk,
  # stored bf16 once frozen, whose replay must bring back the fp32 masters the checkpoint holds.
  config = _config(text_corpus, new_stack_precision="bfloat16")
  config.training.data_reuse, config.training.final_stage_steps = "pool", 6
  config.training.checkpoint_every, config.training.keep_checkpoints = 4, 100
  config.training.eval_every = 3
  whole = _train(config, tmp_path / "whole")
  steps = sorted(int(p.name) for p in (tmp_path / "whole" / "checkpoints").iterdir())
  assert steps == [4, 8, 12, 14]   # stage ends 4, 8; the final stage's step 4 and its end
  shutil.copytree(tmp_path / "whole", tmp_path / "cut")
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "14")   # cut after the final stage's step 4
  resumed = _train(config, tmp_path / "cut")
  (results_a, builder_a), (results_b, builder_b) = whole, resumed
  assert [s["losses"] for s in results_b["stages"]] == [s["losses"] for s in results_a["stages"]]
  assert [s["eval_curve"] for s in results_b["stages"]] == [
      s["eval_curve"] for s in results_a["stages"]]
  assert len(results_b["stages"][-1]["losses"]) == 6 and results_b["stages"][-1]["final"]
  jax.tree.map(np.testing.assert_array_equal, builder_a.params, builder_b.params)
  # Evaluation reads the stage ends, not the final stage's mid-way step 12.
  rows = evaluate_run(open_run(str(tmp_path / "whole")))
  assert [(r["stage"], r["step"]) for r in rows] == [(1, 4), (2, 8), (3, 14)]
  assert rows[-1]["loss"] == pytest.approx(results_a["final_eval_loss"], rel=1e-5)


def test_cli_final_stage_in_results_summary_and_plots_and_run_after_its_trunk(tmp_path, capsys):
  corpus, workdir = write_corpus(tmp_path), tmp_path / "run"
  args = [*micro_args(corpus, workdir), "--config.training.final_stage=True",
          "--config.training.final_stage_steps=3"]
  assert main(args) == 0
  out = capsys.readouterr().out
  results = json.loads((workdir / "results.json").read_text())
  stages = results["stages"]
  assert [(s["stage"], s["final"], s["new_stacks"], s["steps"]) for s in stages] == [
      (1, False, ["stack_0"], 6), (2, False, ["stack_1"], 6), (3, True, [], 3)]
  assert results["final_eval_loss"] == stages[-1]["eval_loss"]
  rows = [line.split() for line in out.splitlines() if line.split()[:2] == ["3", "final"]]
  assert len(rows) == 1 and rows[0][2] == "all"   # stage "3 final", stack "all"
  curves = {line.get_label() for line in _loss(stages).axes[0].get_lines()}
  assert {"stage final train", "stage final eval", "stage 1 train"} <= curves
  depth = _eval_by_depth(stages).axes[0].get_lines()
  assert [list(line.get_xdata()) for line in depth] == [[1, 2], [2]]
  np.testing.assert_allclose(depth[1].get_ydata(), [stages[-1]["eval_loss"]])
  memory, _ = _stage_cost(stages).axes
  assert [t.get_text() for t in memory.get_xticklabels()] == ["1", "2", "final"]
  # A run whose last progressive stage ended, but not its final stage, is not finished.
  shutil.rmtree(workdir / "checkpoints" / "15")
  (workdir / "results.json").unlink()
  assert main(args) == 0
  again = json.loads((workdir / "results.json").read_text())
  assert [s["losses"] for s in again["stages"]] == [s["losses"] for s in stages]
  assert main(args) == 0
  assert "already holds this finished run" in capsys.readouterr().err
  # A final stage ends a run: growing it further is refused.
  assert main([*args, "--config.training.progressive.target_stacks=3"]) == 2
  assert "final stage ends a run" in capsys.readouterr().err


@pytest.mark.parametrize("override", [
    "final_stage_steps=0", "final_stage_steps=-3", "final_stage_steps=2.5", "final_stage_lr=0",
    "final_stage_lr=-1e-4", "final_stage_lr=nan", "final_stage_lr=inf", "final_stage=maybe"])
def test_a_bad_final_stage_field_is_a_config_error_naming_it(override):
  field = override.split("=")[0]
  load_config(TINY, [f"training.{field}=" + ("True" if field == "final_stage" else "1")])
  with pytest.raises(ConfigError, match=rf"^training\.{field}="):
    load_config(TINY, [f"training.{override}"])

"""Runs that survive (design §9): resume equals an uninterrupted run, kills and signals lose nothing,
other configs are refused, unreadable checkpoints fall back, a workdir alone gives the rack."""
import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import (REPO, TRUNKS, assert_same_run, checkpoint_steps, cut_copy, micro_args,
                      text_config, train_run)
from stackwise_jax import ConfigError, load_rack
from stackwise_jax.checkpoint import RunCheckpoints
from stackwise_jax.data import make_dataloader
from stackwise_jax.export import export_rack, load_export
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer

@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_resume_mid_stage_equals_the_uninterrupted_run(text_corpus, tmp_path, trunk):
  config = text_config(text_corpus, target_stacks=2, **TRUNKS[trunk])
  whole = train_run(config, tmp_path / "whole")
  if trunk == "frozen":   # checkpointing itself changes nothing
    plain = ProgressiveTrainer(config, progress=False, log=lambda _: None).train_progressively(
        ProgressiveRackBuilder(config), make_dataloader(config))
    assert [s["losses"] for s in whole[0]["stages"]] == [s["losses"] for s in plain["stages"]]
  steps = checkpoint_steps(tmp_path / "whole")
  assert steps == [3, 6, 8, 11, 14, 16]   # every 3 steps and each stage's end (8 steps a stage)
  # Cut the run off after step 11 = stage 2, step 3: a cached stage for the frozen trunk (its
  # cache is rebuilt), streamed through the qlora trunk.
  cut_copy(tmp_path / "whole", tmp_path / "cut", 11)
  resumed = train_run(config, tmp_path / "cut")
  assert resumed[0]["stages"][1]["activation_mode"] == (
      "cached" if trunk == "frozen" else "streamed")
  assert_same_run(whole, resumed)


def test_checkpoints_written_in_the_background_equal_blocking_ones(text_corpus, tmp_path):
  # Each save is written while the next steps already reuse (donate) the buffers it was taken
  # from: every checkpoint must still hold its own step's state, as a blocking save does.
  runs = {}
  for background in (True, False):
    config = text_config(text_corpus, target_stacks=2)
    config.training.checkpoint_every, config.training.async_checkpointing = 1, background
    train_run(config, tmp_path / str(background))
    runs[background] = RunCheckpoints(str(tmp_path / str(background)), config, log=print)
  assert runs[True].steps() == runs[False].steps() == list(range(1, 17))
  for step in runs[True].steps():
    a, b = runs[True].read(step), runs[False].read(step)
    assert a.meta["step"] == b.meta["step"]
    jax.tree.map(np.testing.assert_array_equal, (a.params, a.opt), (b.params, b.opt))
  for checkpoints in runs.values():
    checkpoints.close()


@pytest.mark.slow
def test_resume_at_a_stage_end_grows_past_the_old_target(text_corpus, tmp_path):
  # Time as input: a stack's time step does not depend on how many stacks the run grows to.
  config = text_config(text_corpus, time_interpretation="input")
  whole = train_run(config, tmp_path / "whole")
  short = config.copy_and_resolve_references()
  short.training.progressive.target_stacks = 2
  train_run(short, tmp_path / "grown")
  assert_same_run(whole, train_run(config, tmp_path / "grown"))


def test_growing_a_time_as_depth_run_is_refused_naming_the_fields(text_corpus, tmp_path):
  # Time as depth spreads the time steps over target_stacks: more stacks re-time the old ones.
  config = text_config(text_corpus, target_stacks=1)
  train_run(config, tmp_path)
  grown = config.copy_and_resolve_references()
  grown.training.progressive.target_stacks = 2
  with pytest.raises(ValueError, match=r"target_stacks=2: .* time steps \[0\]; with "
                                       r"time_interpretation='depth' .* allowed: target_stacks=1"):
    train_run(grown, tmp_path)


def test_checkpoint_from_another_config_is_refused_naming_the_field(text_corpus, tmp_path):
  config = text_config(text_corpus, target_stacks=2)
  train_run(config, tmp_path)
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*")}
  for field, value, needle in [("model.d_model", 64, "model.d_model: 32 there, 64 now"),
                               ("model.vocab_size", 300, "model.vocab_size"),
                               ("training.weight_decay", 0.5, "training.weight_decay")]:
    other = config.copy_and_resolve_references()
    other.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
      RunCheckpoints(str(tmp_path), other)
  fewer = config.copy_and_resolve_references()
  fewer.training.progressive.target_stacks = 1
  with pytest.raises(ConfigError, match=r"target_stacks=1.*rack of 2 stacks"):
    RunCheckpoints(str(tmp_path), fewer)
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*")} == before


def test_a_run_saved_with_the_old_explicit_mask_id_is_the_same_config():
  """Runs saved while mask_token_id defaulted to the byte tokenizer's 257 resume under today's
  None (the tokenizer's); another mask id is still another config."""
  from stackwise_jax.checkpoint import check_compatible
  from stackwise_jax.config import default_config, to_yaml
  saved = default_config()
  saved.training.progressive.mask_token_id = 257
  check_compatible({"config": to_yaml(saved), "specs": []}, default_config(), "old")
  saved.training.progressive.mask_token_id = 258
  with pytest.raises(ConfigError, match="mask_token_id: 258 there, 257 now"):
    check_compatible({"config": to_yaml(saved), "specs": []}, default_config(), "old")


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(text_corpus, tmp_path):
  config = text_config(text_corpus, target_stacks=2)
  train_run(config, tmp_path)
  latest = tmp_path / "checkpoints" / "16"
  for f in (latest / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])   # truncated
  messages = []
  checkpoints = RunCheckpoints(str(tmp_path), config, log=messages.append)
  assert checkpoints.latest.step == 14
  assert any("unreadable" in m and "16" in m for m in messages)
  kept = [p.name for p in (tmp_path / "checkpoints").iterdir()]
  assert any(name.startswith("16.unreadable") for name in kept)   # moved aside, not deleted
  assert {"3", "6", "8", "11", "14"} <= set(kept)
  checkpoints.close()


def test_a_workdir_alone_gives_the_final_rack(text_corpus, tmp_path):
  config = text_config(text_corpus, target_stacks=2, new_stack_precision="nvfp4")
  config.training.checkpoint_every = 0   # stage ends only
  _, params = train_run(config, tmp_path)
  rack = load_rack(str(tmp_path))
  assert rack.order == ("stack_0", "stack_1") and rack.specs[0].packed
  jax.tree.map(np.testing.assert_array_equal, rack.params, params)
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % 200
  builder = ProgressiveRackBuilder(config)
  builder.add_stack(), builder.add_stack()
  builder.trained.add("stack_0")
  builder.freeze_trunk()
  builder.update_params(params)
  np.testing.assert_array_equal(rack(rack.params, tokens), builder.build_rack()(params, tokens))
  # ... and so does its npz export (packed NVFP4 leaves: uint8 and float8 kept as bits).
  export_rack(rack, 2, str(tmp_path / "export"), "npz")
  exported = load_export(str(tmp_path / "export"))
  jax.tree.map(np.testing.assert_array_equal, exported.params, params)
  np.testing.assert_array_equal(exported(exported.params, tokens), rack(rack.params, tokens))


# --- The command line, killed and signalled. ---


def _cli(args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "stackwise_jax", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _cli_args(text_corpus, workdir):
  return [*micro_args(text_corpus, workdir), "--config.training.checkpoint_every=2",
          "--config.training.steps_per_stack=12"]


def _wait_for_step(workdir, step, process, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (workdir / "checkpoints").is_dir() and any(s >= step for s in checkpoint_steps(workdir)):
      return
    assert process.poll() is None, process.communicate()
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint at step >= {step} after {timeout} s")


def _losses(workdir):
  results = json.loads((workdir / "results.json").read_text())
  return [s["losses"] for s in results["stages"]], results["final_eval_loss"]


def test_signalled_then_killed_run_resumes_to_the_same_losses(text_corpus, tmp_path):
  whole = tmp_path / "whole"
  assert _cli(_cli_args(text_corpus, whole)).wait() == 0
  cut = tmp_path / "cut"
  # SIGTERM in stage 1: the run saves after its current step, says so and exits 128 + 15.
  process = _cli(_cli_args(text_corpus, cut))
  _wait_for_step(cut, 4, process)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM, err
  assert "checkpoint saved" in err
  # The resumed run is killed outright in stage 2, wherever it is (maybe mid-save).
  process = _cli(_cli_args(text_corpus, cut))
  _wait_for_step(cut, 16, process)
  process.kill()
  process.communicate(timeout=120)
  assert process.returncode == -signal.SIGKILL and not (cut / "results.json").exists()
  resumed = _cli(_cli_args(text_corpus, cut))
  _, err = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, err
  assert "resuming from" in err
  assert _losses(cut) == _losses(whole)

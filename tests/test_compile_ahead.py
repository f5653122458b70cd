"""Compile ahead (training.compile_ahead): while a stage trains, the next stage's programs compile
on a background thread into the functions the stage calls; results never change."""
import logging

import jax
import pytest
from jax._src import compilation_cache   # to drop the persistent cache JAX already opened

from conftest import assert_same_run, text_config, train_run
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer, ahead
from stackwise_jax.progressive import trainer as trainer_module


def _three_stages(text_corpus, on: bool):
  config = text_config(text_corpus)   # 3 stages: streamed, then two cached
  config.training.compile_ahead = on
  return config


def test_losses_evals_and_params_are_the_same_with_compile_ahead_on_and_off(text_corpus,
                                                                             tmp_path):
  on = train_run(_three_stages(text_corpus, True), tmp_path / "on")
  off = train_run(_three_stages(text_corpus, False), tmp_path / "off")
  assert_same_run(on, off)


def test_next_stages_train_steps_compile_before_those_stages_start(text_corpus, tmp_path,
                                                                   monkeypatch):
  events = []   # in order: a stage's set-up, a program compiled ahead
  compile_ahead, setup = ahead.compile, ProgressiveTrainer._setup

  def logged_compile(jitted, *args):
    out = compile_ahead(jitted, *args)
    events.append(f"compiled {jitted.__name__}")
    return out

  def logged_setup(self, context, *args):
    events.append(f"stage {context.number}")
    return setup(self, context, *args)

  monkeypatch.setattr(ahead, "compile", logged_compile)
  monkeypatch.setattr(ProgressiveTrainer, "_setup", logged_setup)
  train_run(_three_stages(text_corpus, True), tmp_path / "run")
  stage = {n: events.index(f"stage {n}") for n in (1, 2, 3)}
  # Each later stage's train step was compiled while the stage before it trained; none after
  # the last stage (there is no next one).
  assert "compiled train_step" in events[stage[1]:stage[2]]
  assert "compiled train_step" in events[stage[2]:stage[3]]
  assert "compiled train_step" not in events[stage[3]:]


@pytest.mark.parametrize("reuse", ["fresh", "pool"])
def test_each_stages_example_preparer_compiles_once_ahead_or_in_place(text_corpus, tmp_path,
                                                                     caplog, reuse):
  config = _three_stages(text_corpus, True)
  config.training.data_reuse = reuse
  logging_was = jax.config.jax_log_compiles
  jax.config.update("jax_log_compiles", True)   # in every thread (the prefetcher compiles too)
  try:
    with caplog.at_level(logging.WARNING):
      train_run(config, tmp_path / "run")
  finally:
    jax.config.update("jax_log_compiles", logging_was)
  compiles = [r for r in caplog.records
              if r.getMessage().startswith("Compiling jit(prepare_example)")]
  # Stage 1's in place, stages 2's and 3's ahead: the stage calls the function the thread compiled
  # (it compiled each of them again in place before).
  assert len(compiles) == 3, [r.getMessage()[:120] for r in compiles]


def test_a_stage_whose_programs_compiled_ahead_compiles_under_a_tenth_as_long(
    text_corpus, tmp_path, monkeypatch):
  # Every compile is a real one (no program from disk), and each stage's loop ends only once the
  # next stage's programs are compiled: the time compile-ahead hides is all it can hide.
  cache_was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  loop = ProgressiveTrainer._train_loop

  def loop_then_wait(self, *args):
    outcome = loop(self, *args)
    self._ahead.wait()
    return outcome

  monkeypatch.setattr(ProgressiveTrainer, "_train_loop", loop_then_wait)
  try:
    on, _ = train_run(_three_stages(text_corpus, True), tmp_path / "on")
    off, _ = train_run(_three_stages(text_corpus, False), tmp_path / "off")
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_was)
    compilation_cache.reset_cache()
  compile_s = lambda results: results["stages"][1]["seconds_by_phase"]["compile"]
  # Stage 2 (the first cached one) compiles a new train and eval step; stage 3 shares them.
  assert compile_s(on) < 0.1 * compile_s(off), (compile_s(on), compile_s(off))


def test_a_failure_to_compile_ahead_is_one_log_line_and_the_run_goes_on(text_corpus, tmp_path,
                                                                        monkeypatch):
  def fails(*args):
    raise RuntimeError("no shapes today")

  monkeypatch.setattr(trainer_module, "next_stage_shapes", fails)
  config = _three_stages(text_corpus, True)
  lines = []
  trainer = ProgressiveTrainer(config, progress=False, log=lines.append)
  results = trainer.train_progressively(ProgressiveRackBuilder(config), make_dataloader(config))
  failed = [line for line in lines if line.startswith("compile ahead:")]
  assert len(failed) == 1 and "no shapes today" in failed[0]   # told once, not every stage
  assert len(results["stages"]) == 3


@pytest.mark.parametrize("setting, platform, on", [
    (None, "gpu", True), (None, "tpu", True), (None, "cpu", False),
    (True, "cpu", True), (False, "gpu", False)])
def test_compile_ahead_by_default_only_where_the_steps_run_on_an_accelerator(setting, platform,
                                                                             on):
  assert ahead.wanted(setting, platform) is on


def test_a_default_run_on_a_cpu_compiles_nothing_ahead(text_corpus, tmp_path, monkeypatch):
  started = []
  monkeypatch.setattr(ahead.CompileAhead, "start", lambda self, *args: started.append(args))
  config = text_config(text_corpus)
  assert config.training.compile_ahead is None and jax.default_backend() == "cpu"
  train_run(config, tmp_path / "run")
  assert started == []
  config.training.compile_ahead = True   # the same spy sees a run that compiles ahead
  train_run(config, tmp_path / "on")
  assert len(started) == 3   # once a stage (the last finds no next stage)


def test_a_qlora_trunk_compiles_ahead_into_the_steps_its_stages_call(text_corpus, tmp_path,
                                                                     monkeypatch):
  # qwix gives every quantized stack a class of its own; the rack predicted for the next stage
  # must still key the very train step that stage calls, or its compile ahead is wasted.
  made = []
  make = trainer_module.make_train_step
  monkeypatch.setattr(trainer_module, "make_train_step",
                      lambda *args, **kwargs: made.append(1) or make(*args, **kwargs))
  runs, steps_made = {}, {}
  for on in (False, True):
    config = text_config(text_corpus, trunk_strategy="qlora", qlora_enabled=True,
                         progressive_qlora=True, quant_block_size=32)
    config.training.compile_ahead = on
    made.clear()
    runs[on] = train_run(config, tmp_path / str(on))
    steps_made[on] = len(made)
  assert steps_made[True] == steps_made[False] == 3   # one step a stage, none wasted
  assert_same_run(runs[True], runs[False])

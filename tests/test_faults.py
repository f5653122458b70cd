"""Runs that fail loudly and lose nothing: divergence, one writer per workdir, file errors as one
line, every checkpoint item checked, bad input refused before the workdir is touched.

Where the behaviour is the command line's own (exit codes, nothing printed past one line), the
test runs it as a subprocess; elsewhere `cli.main` in-process, which returns the exit code.
"""
import contextlib
import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import REPO, micro_args, micro_config
from stackwise_jax.checkpoint import RunCheckpoints, open_run
from stackwise_jax.cli import main
from stackwise_jax.data import make_dataloader
from stackwise_jax.export import load_export
from stackwise_jax.files import WorkdirLock
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer, TrainingDiverged
from stackwise_jax.progressive.steps import (init_train_state, make_optimizer, make_train_step,
                                             plan_stage)

BAD_TOKEN = 10**6   # outside the vocabulary: its embedding lookup gives NaN, so the step diverges


def _run_cli(args, env_extra=None, timeout=240):
  env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", "stackwise_jax", *args], capture_output=True,
                        text=True, env=env, timeout=timeout, cwd=REPO)


def _one_line_error(proc_or_err, code=None):
  err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr
  if code is not None:
    assert proc_or_err.returncode == code, err
  assert "Traceback" not in err, err
  errors = [line for line in err.splitlines() if line.startswith("stackwise-jax:")]
  assert len(errors) == 1, err
  return errors[0]


def _finite_latest(workdir, config=None):
  """The latest readable checkpoint of `workdir`: its step, after checking every params leaf is
  finite."""
  checkpoints = open_run(str(workdir)) if config is None else RunCheckpoints(
      str(workdir), config, log=lambda _: None)
  latest = checkpoints.latest
  checkpoints.close()
  floats = [np.asarray(leaf, np.float32) for leaf in jax.tree.leaves(latest.params)
            if np.issubdtype(np.asarray(leaf).dtype, np.floating)]
  assert floats and all(np.isfinite(leaf).all() for leaf in floats)
  return latest.step


def _losses(workdir):
  results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  return [s["losses"] for s in results["stages"]]


# --- 1. Non-finite guard ---------------------------------------------------------------------


class _Poisoned:
  """A train iterator whose `bad` draws (0-based) hold a token outside the vocabulary."""

  def __init__(self, iterator, bad):
    self._it, self._bad, self._drawn = iterator, bad, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self._it))
    if self._drawn in self._bad:
      batch["tokens"] = batch["tokens"].copy()
      batch["tokens"][0, 0] = BAD_TOKEN
    self._drawn += 1
    return batch

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


class _PoisonedLoader:
  def __init__(self, loader, bad):
    self._loader, self._bad = loader, set(bad)

  def train_iter(self):
    return _Poisoned(self._loader.train_iter(), self._bad)

  def eval_batches(self, n):
    return self._loader.eval_batches(n)


def _guard_config(text_corpus, **training):
  config = micro_config(target_stacks=1)
  config.data.source, config.data.paths = "text", (text_corpus,)
  config.training.checkpoint_every = 1
  for key, value in training.items():
    config.training[key] = value
  return config


def _train_poisoned(config, workdir, bad):
  checkpoints = RunCheckpoints(str(workdir), config, log=lambda _: None)
  trainer = ProgressiveTrainer(config, progress=False, log=lambda _: None, checkpoints=checkpoints)
  try:
    return trainer.train_progressively(ProgressiveRackBuilder(config),
                                       _PoisonedLoader(make_dataloader(config), bad))
  finally:
    checkpoints.close()


def test_a_diverged_step_is_not_applied_and_is_reported(text_corpus):
  config = _guard_config(text_corpus)
  builder = ProgressiveRackBuilder(config)
  builder.append_stack()
  rack, labels = builder.build_rack(), builder.labels()
  plan = plan_stage(rack, set(), False)
  tx = make_optimizer(config.training, labels, 8)
  step = make_train_step(rack, plan, tx, labels)
  batch = next(make_dataloader(config).train_iter())
  good = builder.masking.generate_masks_for_stack(batch, 0, salt=1)
  bad = dict(good, inputs=good["inputs"].at[0, 0].set(BAD_TOKEN))
  before = jax.tree.map(np.array, rack.params)

  fresh = lambda: init_train_state(jax.tree.map(jax.numpy.array, before), tx, plan)

  state, metrics = step(fresh(), bad)
  assert not bool(metrics["finite"]) and not math.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state["params"]), before)
  for _ in range(2):   # the first applied update has lr 0 (warm-up)
    state, metrics = step(state, good)
    assert bool(metrics["finite"])
  reference = fresh()
  for _ in range(2):
    reference, _ = step(reference, good)
  # The skipped step left no trace: the same params as if it never ran, and they moved.
  jax.tree.map(np.testing.assert_array_equal, state["params"], reference["params"])
  changed = jax.tree.map(lambda a, b: not np.array_equal(np.array(a), b), state["params"], before)
  assert any(jax.tree.leaves(changed))


def test_stop_mode_stops_at_the_first_nonfinite_step_and_saves_nothing_after_it(text_corpus,
                                                                              tmp_path):
  config = _guard_config(text_corpus)
  with pytest.raises(TrainingDiverged, match=r"stage 1 diverged at step 5: loss nan not finite; "
                                             r"last finite loss [\d.]+ at step 4"):
    _train_poisoned(config, tmp_path, bad={4})
  assert _finite_latest(tmp_path, config) == 4


def test_skip_mode_drops_the_update_counts_it_and_writes_strict_json(text_corpus, tmp_path):
  config = _guard_config(text_corpus, nonfinite="skip")
  results = _train_poisoned(config, tmp_path / "run", bad={2, 5})
  stage = results["stages"][0]
  assert stage["skipped_steps"] == 2
  assert [i for i, x in enumerate(stage["losses"]) if not math.isfinite(x)] == [2, 5]
  from stackwise_jax.report import write_json
  write_json(str(tmp_path / "results.json"), results)
  strict = json.loads((tmp_path / "results.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
  assert strict["stages"][0]["losses"][2] is None and strict["stages"][0]["losses"][5] is None
  assert _finite_latest(tmp_path / "run", config) == 8


def test_skip_mode_stops_after_max_skipped_steps_in_a_row(text_corpus, tmp_path):
  config = _guard_config(text_corpus, nonfinite="skip", max_skipped_steps=2)
  # Draws 1, 3 and 4 are steps 2, 4 and 5: step 2 alone is skipped, 4 and 5 in a row stop it.
  with pytest.raises(TrainingDiverged, match=r"step 5: .*2 steps in a row skipped.*at step 3"):
    _train_poisoned(config, tmp_path, bad={1, 3, 4})
  assert _finite_latest(tmp_path, config) == 4


def test_a_diverging_cli_run_exits_3_and_resumes_to_the_same_divergence(text_corpus, tmp_path):
  args = [*micro_args(text_corpus, tmp_path), "--config.training.lr=1e4",
          "--config.training.checkpoint_every=1"]
  first = _run_cli(args)
  line = _one_line_error(first, code=3)
  assert "diverged at step" in line and "training.lr" in line
  assert not (tmp_path / "results.json").exists()
  latest = _finite_latest(tmp_path)
  again = _run_cli(args)   # resumes from the last finite checkpoint: same steps, same verdict
  assert f"resuming from {tmp_path}/checkpoints/{latest}" in again.stderr
  assert _one_line_error(again, code=3) == line


def _latest_state(workdir, config):
  """(step, params, optimizer state, meta's progress) of `workdir`'s latest checkpoint, as numpy."""
  checkpoints = RunCheckpoints(str(workdir), config, log=lambda _: None)
  latest = checkpoints.latest
  checkpoints.close()
  return (latest.step, jax.tree.map(np.asarray, latest.params),
          jax.tree.map(np.asarray, latest.opt), latest.meta["progress"])


def _diverged_at(config, workdir, bad) -> str:
  with pytest.raises(TrainingDiverged) as e:
    _train_poisoned(config, workdir, bad)
  return str(e.value)


def test_stop_mode_reading_every_5_steps_names_the_same_step_and_keeps_the_same_state(
    text_corpus, tmp_path):
  # Step 7 diverges; read every step, the guard stops at step 8's dispatch. Read every 5 steps,
  # steps 7..11 are read together at step 12's: steps 8..11 ran, but nothing after step 6's
  # checkpoint is saved, and the verdict names step 7 as before.
  runs = {}
  for log_every in (1, 5):
    config = _guard_config(text_corpus, steps_per_stack=14, checkpoint_every=6,
                           log_every=log_every)
    message = _diverged_at(config, tmp_path / str(log_every), bad={6})
    runs[log_every] = (message, _latest_state(tmp_path / str(log_every), config))
  assert "diverged at step 7: loss nan not finite; last finite loss" in runs[1][0]
  assert runs[5][0] == runs[1][0]
  (step_1, *state_1), (step_5, *state_5) = runs[1][1], runs[5][1]
  assert step_1 == step_5 == 6
  jax.tree.map(np.testing.assert_array_equal, state_5, state_1)


def test_skip_mode_reading_every_5_steps_skips_records_and_evaluates_the_same(text_corpus,
                                                                             tmp_path):
  results, states = {}, {}
  for log_every in (1, 5):
    config = _guard_config(text_corpus, nonfinite="skip", steps_per_stack=12, checkpoint_every=7,
                           eval_every=4, log_every=log_every)
    results[log_every] = _train_poisoned(config, tmp_path / str(log_every), bad={2, 5, 8})
    states[log_every] = _latest_state(tmp_path / str(log_every), config)
  one, five = results[1]["stages"][0], results[5]["stages"][0]
  assert one["skipped_steps"] == five["skipped_steps"] == 3
  np.testing.assert_array_equal(np.array(five["losses"]), np.array(one["losses"]))   # NaN = NaN
  assert five["eval_curve"] == one["eval_curve"] and len(one["eval_curve"]) == 3
  assert five["eval_bits_per_byte"] == one["eval_bits_per_byte"]
  jax.tree.map(np.testing.assert_array_equal, states[5][:3], states[1][:3])


def test_skip_mode_reading_every_5_steps_stops_after_the_same_steps_in_a_row(text_corpus,
                                                                            tmp_path):
  messages = {log_every: _diverged_at(
      _guard_config(text_corpus, nonfinite="skip", max_skipped_steps=2, log_every=log_every),
      tmp_path / str(log_every), bad={1, 3, 4}) for log_every in (1, 5)}
  assert messages[5] == messages[1]
  assert "step 5: loss nan not finite (2 steps in a row skipped" in messages[1]


def test_losses_and_verdicts_are_read_every_log_every_steps_in_one_transfer(text_corpus,
                                                                            monkeypatch):
  from stackwise_jax.progressive import evaluate, guard
  calls = {"read_steps": [], "fetch_stacked": [], "_loss_bytes": []}   # first argument's length

  def counted(module, name):
    function = getattr(module, name)

    def call(first, *rest):
      calls[name].append(len(first) if isinstance(first, list) else 1)
      return function(first, *rest)

    monkeypatch.setattr(module, name, call)

  counted(guard, "read_steps")
  counted(evaluate, "fetch_stacked")
  counted(evaluate, "_loss_bytes")
  config = micro_config(target_stacks=2)
  config.data.source, config.data.paths = "text", (text_corpus,)
  config.training.steps_per_stack, config.training.log_every = 12, 5
  results = ProgressiveTrainer(config, progress=False, log=lambda _: None).train_progressively(
      ProgressiveRackBuilder(config), make_dataloader(config))
  # Per stage: steps 1-5 read at step 6's dispatch, 6-10 at step 11's, 11-12 before the eval,
  # where every step used to be read on its own.
  assert calls["read_steps"] == [5, 5, 2] * 2
  assert [len(s["losses"]) for s in results["stages"]] == [12, 12]
  # One transfer per eval (one eval a stage) and one for the eval bytes, counted once a run.
  assert calls["fetch_stacked"] == [2, 2, 2]
  assert len(calls["_loss_bytes"]) == config.training.eval_batches == 2


# --- 2. One writer per workdir --------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 2-stage micro run (its workdir), shared by the read-only commands' tests."""
  base = tmp_path_factory.mktemp("finished")
  from conftest import write_corpus
  corpus = write_corpus(base)
  workdir = base / "run"
  assert main([*micro_args(corpus, workdir), "--config.training.checkpoint_every=2"]) == 0
  return workdir, corpus


def test_a_second_train_on_a_locked_workdir_exits_2_naming_the_holder(finished_run, tmp_path,
                                                                      capsys):
  workdir, corpus = finished_run
  lock = WorkdirLock(str(workdir)).acquire()
  try:
    assert main(micro_args(corpus, workdir)) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in line
    # Readers keep working while the run holds the lock.
    assert main(["eval", "--workdir", str(workdir)]) == 0
    assert main(["plot", "--workdir", str(workdir), "--out", str(tmp_path / "plots")]) == 0
    assert main(["export", "--workdir", str(workdir), "--format", "npz",
                 "--out", str(tmp_path / "export")]) == 0
    assert main(["sample", "--workdir", str(workdir), "--prompt", "the",
                 "--max-new-tokens", "4"]) == 0
  finally:
    lock.release()


def test_the_lock_dies_with_its_holder_even_on_sigkill(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from stackwise_jax.files import WorkdirLock; "
       "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
       str(tmp_path)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(Exception, match=f"pid {holder.pid}"):
    WorkdirLock(str(tmp_path)).acquire()
  holder.kill()
  holder.wait()
  WorkdirLock(str(tmp_path)).acquire().release()


# --- 3. File errors are one line -------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path, size):
  """A small tmpfs at `path` (root on Linux), or a skip where mounting is not allowed."""
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# Where no tmpfs can be mounted: the same run with a file system that reports no free space
# once two checkpoints exist.
_FULL_DISK_SHIM = textwrap.dedent("""
    import os, shutil
    _usage = shutil.disk_usage
    def disk_usage(path):
      u = _usage(path)
      steps = [n for n in os.listdir(path) if n.isdigit()] if path.endswith("checkpoints") else []
      return u._replace(free=0) if len(steps) >= 2 and not os.path.exists(os.environ["FREED"]) else u
    shutil.disk_usage = disk_usage
""")


def test_a_full_disk_during_checkpoints_is_one_line_and_resumes_to_the_same_losses(text_corpus,
                                                                                   tmp_path):
  args = lambda workdir: [*micro_args(text_corpus, workdir), "--config.training.checkpoint_every=1",
                          "--config.training.steps_per_stack=12"]
  whole = tmp_path / "whole"
  assert _run_cli(args(whole)).returncode == 0
  disk = tmp_path / "disk"
  disk.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                         capture_output=True).returncode == 0 if os.geteuid() == 0 else False
  if mount:
    workdir, env, free = disk / "run", {}, lambda: subprocess.run(
        ["mount", "-o", "remount,size=32m", str(disk)], check=True)
  else:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_FULL_DISK_SHIM)
    workdir = tmp_path / "run"
    env = {"PYTHONPATH": f"{shim}{os.pathsep}{REPO}", "FREED": str(tmp_path / "freed")}
    free = lambda: (tmp_path / "freed").touch()
  try:
    full = _run_cli(args(workdir), env)
    line = _one_line_error(full, code=1)
    assert "No space left on device" in line and str(workdir / "checkpoints") in line
    kept = _finite_latest(workdir)
    assert kept >= 1
    free()
    resumed = _run_cli(args(workdir), env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoints/{kept}:" in resumed.stderr
    assert _losses(workdir) == _losses(whole)
  finally:
    if mount:
      subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_background_write_that_fails_on_the_disk_is_raised_not_logged(caplog):
  # orbax logs a failed background save with its traceback before raising it at the next wait:
  # a file error is then reported in one line (above), so only other errors keep their log.
  from absl import logging as absl_logging   # orbax's logger (the filter comes with checkpoint.py)
  for error in (OSError(28, "No space left on device"), RuntimeError("a bug")):
    try:
      raise error
    except Exception:
      absl_logging.error("Failed to run Handler Commit operations", exc_info=True)
  logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
  assert [type(e) for e in logged] == [RuntimeError]


def test_read_only_workdir_gives_one_line_in_every_command(finished_run, tmp_path):
  workdir, corpus = finished_run
  with _tmpfs(tmp_path / "ro", "8m") as ro:
    subprocess.run(["cp", "-a", str(workdir), str(ro / "run")], check=True)
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    commands = [
        [*micro_args(corpus, ro / "run"), "--fresh"],   # moves the checkpoints aside
        ["eval", "--workdir", str(ro / "run")],
        ["plot", "--workdir", str(ro / "run")],
        ["export", "--workdir", str(ro / "run"), "--format", "npz"],
    ]
    for command in commands:
      line = _one_line_error(_run_cli(command), code=1)
      assert "Read-only file system" in line and str(ro / "run") in line


def test_unwritable_outputs_are_one_line(finished_run, capsys):
  workdir, _ = finished_run
  for command in (["export", "--format", "npz", "--out", "/proc/x"], ["plot", "--out", "/proc/x"]):
    assert main([command[0], "--workdir", str(workdir), *command[1:]]) == 1
    assert "/proc/x" in _one_line_error(capsys.readouterr().err)


# --- 4. Every checkpoint item is checked -----------------------------------------------------


@pytest.mark.parametrize("item,garble", [
    ("data", lambda d: (d / "process_0-of-1.json").write_text("{not json")),
    ("meta", lambda d: next(f for f in d.iterdir() if f.is_file()).write_text('{"stage": 1}')),
])
def test_a_garbled_item_moves_its_step_aside_and_the_run_resumes_to_the_same_losses(
    finished_run, tmp_path, item, garble, capsys):
  whole, corpus = finished_run
  run = tmp_path / "run"
  subprocess.run(["cp", "-a", str(whole), str(run)], check=True)
  (run / "results.json").unlink()
  latest = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  garble(run / "checkpoints" / str(latest) / item)
  capsys.readouterr()
  assert main([*micro_args(corpus, run), "--config.training.checkpoint_every=2"]) == 0
  err = capsys.readouterr().err
  assert f"checkpoint {run}/checkpoints/{latest} is unreadable" in err
  assert any(p.name.startswith(f"{latest}.unreadable") for p in (run / "checkpoints").iterdir())
  assert f"resuming from {run}/checkpoints/{latest - 2}" in err
  assert _losses(run) == _losses(whole)


# --- 5. Validation before the workdir is touched ---------------------------------------------


REGISTER_NOTHING = ["--config.training.progressive.stack_time_mapping=custom",
                    "--config.training.progressive.custom_time_mapping=not_registered"]


@pytest.mark.parametrize("extra,needle", [
    (REGISTER_NOTHING, "custom_time_mapping='not_registered'"),
    (["--config.training.progressive.training_objective=custom"], "needs batches with 'targets'"),
    (["--config.training.seq_len=1"], "training.seq_len=1"),
])
def test_bad_runs_are_refused_before_the_workdir_exists(text_corpus, tmp_path, extra, needle,
                                                        capsys):
  assert main([*micro_args(text_corpus, tmp_path / "run"), *extra]) == 2
  assert needle in _one_line_error(capsys.readouterr().err)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workdir", ["", "  "])
def test_a_blank_workdir_is_refused(text_corpus, tmp_path, monkeypatch, workdir, capsys):
  monkeypatch.chdir(tmp_path)
  before = sorted(os.listdir(tmp_path))
  args = micro_args(text_corpus, "x")
  args[args.index("x")] = workdir
  assert main(args) == 2
  assert "--workdir" in _one_line_error(capsys.readouterr().err)
  assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("option,needle", [
    (["--temperature", "nan"], "--temperature=nan"),
    (["--temperature", "inf"], "--temperature=inf"),
    (["--top-k", "-1"], "--top-k=-1"),
])
def test_sample_options_are_checked(finished_run, option, needle, capsys):
  workdir, _ = finished_run
  assert main(["sample", "--workdir", str(workdir), "--prompt", "the", *option]) == 2
  assert needle in _one_line_error(capsys.readouterr().err)


def test_eval_batches_are_capped_at_those_that_exist(finished_run, tmp_path, capsys):
  workdir, _ = finished_run
  copy = tmp_path / "run"
  subprocess.run(["cp", "-a", str(workdir), str(copy)], check=True)
  assert main(["eval", "--workdir", str(copy), "--batches", "100000"]) == 0
  err = capsys.readouterr().err
  available = int(err.split("held-out split has ")[1].split()[0])
  rows = json.loads((copy / "eval.json").read_text())["racks"]
  config = open_run(str(copy)).config
  # Every batch has loss tokens at each of its positions but the last (clm).
  assert rows[0]["tokens"] == available * config.training.batch_size * (config.training.seq_len - 1)


def test_plot_names_a_truncated_results_file_and_plots_the_checkpoints(finished_run, tmp_path,
                                                                       capsys):
  workdir, _ = finished_run
  copy = tmp_path / "run"
  subprocess.run(["cp", "-a", str(workdir), str(copy)], check=True)
  text = (copy / "results.json").read_text()
  (copy / "results.json").write_text(text[: len(text) // 2])
  assert main(["plot", "--workdir", str(copy)]) == 0
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"warning: {copy / 'results.json'} is damaged" in err
  assert (copy / "results.json").read_text() == text[: len(text) // 2]   # a reader never writes


@pytest.mark.parametrize("field,value", [("format", "../../etc/passwd"), ("stages", 0),
                                         ("params", {"../x": {"dtype": "float32"}})])
def test_an_export_manifest_is_checked_before_use(finished_run, tmp_path, field, value):
  workdir, _ = finished_run
  out = tmp_path / "export"
  assert main(["export", "--workdir", str(workdir), "--format", "npz", "--out", str(out)]) == 0
  load_export(str(out))   # as written, it loads
  manifest = json.loads((out / "manifest.json").read_text())
  manifest[field] = value
  (out / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=f"manifest.json: .*{field}"):
    load_export(str(out))


def test_a_linked_checkpoint_step_is_neither_followed_nor_deleted(finished_run, tmp_path, capsys):
  workdir, corpus = finished_run
  copy = tmp_path / "run"
  subprocess.run(["cp", "-a", str(workdir), str(copy)], check=True)
  target = tmp_path / "elsewhere"
  target.mkdir()
  (target / "keep.txt").write_text("mine")
  (copy / "checkpoints" / "999").symlink_to(target)
  for args in ([*micro_args(corpus, copy), "--config.training.progressive.target_stacks=3"],
               ["eval", "--workdir", str(copy)]):
    assert main(args) == 2
    assert "checkpoints/999 is a symbolic link" in _one_line_error(capsys.readouterr().err)
  assert (copy / "checkpoints" / "999").is_symlink() and (target / "keep.txt").read_text() == "mine"


# --- 6. SIGKILL while a checkpoint is written ------------------------------------------------

# Kills the process from inside orbax's commit of its third checkpoint: every file of that step
# is written, its rename to the final name is not done.
_KILL_AT_COMMIT = textwrap.dedent("""
    import os, signal
    _rename, _count = os.rename, [0]
    def rename(src, dst, *a, **k):
      if "orbax-checkpoint-tmp" in str(src) and "/checkpoints/" in str(dst) and os.path.basename(
          str(dst)).isdigit():
        _count[0] += 1
        if _count[0] == 3:
          os.kill(os.getpid(), signal.SIGKILL)
      return _rename(src, dst, *a, **k)
    os.rename = rename
""")


def test_sigkill_while_a_checkpoint_is_written_resumes_to_the_same_losses(text_corpus, tmp_path):
  args = lambda workdir: [*micro_args(text_corpus, workdir), "--config.training.checkpoint_every=2"]
  whole = tmp_path / "whole"
  assert _run_cli(args(whole)).returncode == 0
  shim = tmp_path / "shim"
  shim.mkdir()
  (shim / "sitecustomize.py").write_text(_KILL_AT_COMMIT)
  cut = tmp_path / "cut"
  killed = _run_cli(args(cut), {"PYTHONPATH": f"{shim}{os.pathsep}{REPO}"})
  assert killed.returncode == -signal.SIGKILL
  assert any("orbax-checkpoint-tmp" in p.name for p in (cut / "checkpoints").iterdir())
  assert _finite_latest(cut) == 4   # steps 2 and 4 committed; 6 was cut mid-commit
  resumed = _run_cli(args(cut))
  assert resumed.returncode == 0, resumed.stderr
  assert "checkpoints/4:" in resumed.stderr
  assert _losses(cut) == _losses(whole)


def test_a_checkpoint_of_another_structure_is_refused_naming_the_leaf():
  """E.g. one written by an older version with another optimizer state: exit 2, not a crash."""
  from stackwise_jax.checkpoint import restore_into
  from stackwise_jax.errors import ConfigError
  target = {"a": {"b": np.zeros(2, np.float32)}}
  with pytest.raises(ConfigError, match=r"optimizer state at a/b: float32\[3\], expected "
                                        r"float32\[2\].*--fresh"):
    restore_into(target, {"a": {"b": np.zeros(3, np.float32)}}, "optimizer state")
  with pytest.raises(ConfigError, match=r"optimizer state: 2 arrays there, 1 expected"):
    restore_into(target, {"a": {"b": np.zeros(2, np.float32), "c": np.zeros(1)}},
                 "optimizer state")

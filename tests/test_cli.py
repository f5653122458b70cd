"""The command line: a run writes results.json and a summary; bad input exits 2 with one message."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import MICRO, REPO, micro_args
from stackwise_jax.cli import main

RESULT_KEYS = {"stage", "stack_index", "building_mode", "time_step", "mask_ratio", "steps",
               "loss_start", "loss_end", "eval_loss", "eval_bits_per_byte", "tokens_per_s",
               "seconds", "trainable_params", "frozen_params", "lora_params", "cache_bytes",
               "activation_mode"}



def test_train_writes_results_json_and_prints_summary(text_corpus, tmp_path, capsys):
  assert main(micro_args(text_corpus, tmp_path / "run")) == 0
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert [s["stage"] for s in results["stages"]] == [1, 2]
  assert all(RESULT_KEYS <= s.keys() for s in results["stages"])
  assert results["final_eval_loss"] == results["stages"][-1]["eval_loss"]
  final_bpb = results["final_eval_bits_per_byte"]
  assert final_bpb == results["stages"][-1]["eval_bits_per_byte"] and final_bpb > 0
  out = capsys.readouterr().out
  assert "loss start" in out and "final eval loss" in out and "bits/byte" in out
  assert f"final eval bits per byte: {final_bpb:.4f}" in out
  assert (tmp_path / "run" / "config.yaml").exists()


def test_stages_and_seconds_outside_them_add_up_to_the_process_wall_time(text_corpus, tmp_path):
  """seconds_outside_stages counts from the interpreter's start to results.json's last write, so
  with the stages' seconds it is the wall time, timed here from outside, up to the last line the
  command prints (5%). After that line the interpreter tears down (the XLA client, modules: ~1-2 s,
  which no process can time of itself); the whole process takes longer by that only."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
  command = [sys.executable, "-m", "stackwise_jax", *micro_args(text_corpus, tmp_path)]
  start = time.perf_counter()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env)
  lines = [(line, time.perf_counter() - start) for line in proc.stdout]
  assert proc.wait(timeout=600) == 0
  process = time.perf_counter() - start
  results = json.loads((tmp_path / "results.json").read_text())
  counted = results["seconds_outside_stages"] + sum(s["seconds"] for s in results["stages"])
  last = lines[-1][1]   # "plots: ...", printed after results.json's last write
  assert results["seconds_outside_stages"] > 0
  assert abs(counted - last) <= 0.05 * last, (counted, last, process)
  assert counted <= process
  footer = f"seconds outside stages: {results['seconds_outside_stages']:.1f}"
  assert any(line.startswith(footer) for line, _ in lines)


def test_qlora_trunk_config_reports_memory_per_stack(text_corpus, tmp_path, capsys):
  args = micro_args(text_corpus, tmp_path / "run")
  args[2] = str(REPO / "configs/qlora_trunk.py")
  assert main([*args, "--config.training.progressive.quant_block_size=16"]) == 0
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  memory = results["stages"][-1]["memory"]
  assert memory["stack_0"]["quantized"] and not memory["stack_1"]["quantized"]
  assert results["stages"][-1]["lora_params"] > 0
  out = capsys.readouterr().out
  assert "memory per stack" in out and "full (int4)" in out


def test_finished_workdir_is_never_overwritten(text_corpus, tmp_path, capsys):
  args = micro_args(text_corpus, tmp_path / "run")
  assert main(args) == 0
  before = (tmp_path / "run" / "results.json").read_bytes()
  assert main(args) == 0                                   # same config: shows the summary
  assert main(args + ["--config.training.weight_decay=0.5"]) == 2   # another config: refused
  assert "training.weight_decay" in capsys.readouterr().err
  assert (tmp_path / "run" / "results.json").read_bytes() == before


@pytest.mark.parametrize("extra,needle", [
    (["--config.model.d_model=30"], "model.d_model=30"),
    (["--config.training.progressive.building_mode=sideways"], "building_mode='sideways'"),
    (["--config.training.nope=1"], "training.nope"),
    (["--config.data.paths=('/nonexistent/*.txt',)"], "data.paths"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_exits_2_with_one_message_and_no_traceback(text_corpus, tmp_path, extra, needle):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-m", "stackwise_jax", *micro_args(text_corpus, tmp_path),
                         *extra], capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 2
  assert needle in proc.stderr
  assert "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "results.json")


def test_tiny_run_lowers_eval_loss_at_every_stage(tmp_path):
  """configs/tiny.py on the built-in corpus, as the README runs it but with 120-step stages."""
  assert main(["train", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(tmp_path),
               "--no-progress", "--config.training.steps_per_stack=120",
               "--config.training.eval_every=0"]) == 0
  stages = json.loads((tmp_path / "results.json").read_text())["stages"]
  assert len(stages) == 3
  evals = [s["eval_loss"] for s in stages]
  assert all(later < earlier for earlier, later in zip(evals, evals[1:])), evals
  assert [s["activation_mode"] for s in stages] == ["streamed", "cached", "cached"]


# --- Mistakes a user can make: exit 2 and one line naming the file and line, or the fields. ---


@pytest.mark.parametrize("name, text, where", [
    ("mine.py", "def get_config(:\n  pass\n", "mine.py:1: SyntaxError"),
    ("mine.py", "def helper():\n  return {}['k']\n\ndef get_config():\n  return helper()\n",
     "mine.py:2: KeyError: 'k'"),
    ("mine.yaml", "model:\n\td_model: 64\n", "mine.yaml:2:1: found character"),
    ("mine.yaml", "model:\n  d_model: 64\n  d_model: 32\n", "mine.yaml:3: duplicate key"),
])
def test_a_mistake_in_the_config_file_exits_2_with_one_line(tmp_path, capsys, name, text, where):
  path = tmp_path / name
  path.write_text(text)
  assert main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"stackwise-jax: error: {tmp_path / where}") and err.count("\n") == 1, err
  assert not (tmp_path / "run").exists()


def _files(directory) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
          for p in sorted(directory.rglob("*"))}


def test_growing_a_finished_time_as_depth_run_is_refused_before_anything_is_written(
    text_corpus, tmp_path, capsys):
  workdir = tmp_path / "run"
  bpe = ["--config.data.tokenizer=bpe:300", "--config.model.vocab_size=300"]
  assert main([*micro_args(text_corpus, workdir), *bpe]) == 0
  (workdir / "tokenizer.json").unlink()   # were it read again, it would be trained and written
  before = _files(workdir)
  capsys.readouterr()
  grow = "--config.training.progressive.target_stacks=3"
  assert main([*micro_args(text_corpus, workdir), *bpe, grow]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert err.startswith("stackwise-jax: error: training.progressive.target_stacks=3: ")
  assert "time_interpretation='depth'" in err and "allowed: target_stacks=2" in err
  assert "--fresh" in err and len(err) < 500
  assert _files(workdir) == before


def test_settings_that_train_otherwise_than_they_read_warn_once(tmp_path, capsys):
  """An empty config file, a warm-up longer than a stage, an eval split smaller than a batch."""
  for i in range(6):   # one of six documents is held out: 5 records of 16 tokens
    (tmp_path / f"doc{i}.txt").write_text(("stacks grow one at a time while the fox sleeps " * 2)[i:])
  (tmp_path / "empty.yaml").write_text("# nothing here yet\n")
  args = ["train", "--config", str(tmp_path / "empty.yaml"), "--workdir", str(tmp_path / "run"),
          "--no-progress", "--config.data.source=text", f"--config.data.paths=('{tmp_path}/*.txt',)",
          *MICRO, "--config.training.batch_size=8", "--config.training.warmup_steps=7"]
  assert main(args) == 0
  err = capsys.readouterr().err.splitlines()
  for needle in ["empty.yaml: empty config: every field keeps its default",
                 "training.warmup_steps=7 is larger than a stage's 6 steps (training.steps_per_stack)",
                 "the held-out split has 5 records of training.seq_len=16 tokens, fewer than one eval "
                 "reads (training.eval_batches=1 × batch_size=8 = 8)"]:
    assert sum(needle in line for line in err) == 1, (needle, err)


def test_settings_that_fit_give_no_warning(text_corpus):
  from stackwise_jax.data import make_dataloader
  from stackwise_jax.progressive.trainer import setting_warnings
  from conftest import micro_config
  config = micro_config()
  config.data.source, config.data.paths = "text", (text_corpus,)
  config.training.warmup_steps = config.training.steps_per_stack   # as long as a stage: fits
  config.training.final_stage, config.training.final_stage_steps = True, 100
  assert setting_warnings(config, make_dataloader(config, log=lambda _: None)) == []
  config.training.final_stage_steps = config.training.warmup_steps - 1
  assert [reason for reason, _ in setting_warnings(config, [])] == ["warmup"]

"""The command line: a run writes results.json and a summary; bad input exits 2 with one message."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from stackwise_jax.cli import main

RESULT_KEYS = {"stage", "stack_index", "building_mode", "time_step", "mask_ratio", "steps",
               "loss_start", "loss_end", "eval_loss", "eval_bits_per_byte", "tokens_per_s",
               "seconds", "trainable_params", "frozen_params", "lora_params", "cache_bytes",
               "activation_mode"}
MICRO = ["--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
         "--config.model.d_ff=64", "--config.training.batch_size=4", "--config.training.seq_len=16",
         "--config.training.steps_per_stack=6", "--config.training.eval_batches=1",
         "--config.training.progressive.target_stacks=2"]


def micro_args(text_corpus, workdir):
  return ["train", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(workdir),
          "--no-progress", "--config.data.source=text", f"--config.data.paths=('{text_corpus}',)",
          *MICRO]


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

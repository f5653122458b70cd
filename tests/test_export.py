"""Export and evaluation (design §12): params written as safetensors / npz with a manifest load
back into a rack with identical params and logits; every stage's rack is evaluated as its training
did. (The npz export of a packed NVFP4 trunk is in test_checkpoint.py.)"""
import json
import math

import jax
import numpy as np
import pytest

from stackwise_jax import load_rack
from stackwise_jax.cli import main
from stackwise_jax.data import make_dataloader
from stackwise_jax.data.tokenizer import BYTES
from stackwise_jax.progressive.evaluate import eval_example
from stackwise_jax.export import export_rack, load_export
from stackwise_jax.progressive import ProgressiveRackBuilder, TimeStepMasking
from conftest import micro_config, train_two_stacks


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-stage run (frozen cached trunk) in a workdir."""
  return train_two_stacks(tmp_path_factory.mktemp("trained"))


def assert_same_rack(a, b):
  assert a.specs == b.specs
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % 250
  np.testing.assert_array_equal(a(a.params, tokens), b(b.params, tokens))


def test_exported_workdir_loads_back_into_an_identical_rack(trained):
  workdir, _, _ = trained
  assert main(["export", "--workdir", str(workdir), "--format", "safetensors"]) == 0
  manifest = json.loads((workdir / "export" / "manifest.json").read_text())
  assert manifest["stack_order"] == ["stack_0", "stack_1"] and manifest["stages"] == 2
  assert_same_rack(load_export(str(workdir / "export")), load_rack(str(workdir)))


def test_int4_trunk_with_adapters_and_bf16_stack_round_trips(tmp_path):
  # The structure a 2-stage qlora run builds (load_export replays it and checks the specs).
  config = micro_config(trunk_strategy="qlora", qlora_enabled=True, progressive_qlora=True,
                        quant_block_size=16, new_stack_precision="bfloat16", target_stacks=2)
  builder = ProgressiveRackBuilder(config)
  builder.add_stack(), builder.add_stack()
  builder.trained.add("stack_0")
  builder.freeze_all_but_qlora()
  keys = iter(jax.random.split(jax.random.key(0), 1000))   # adapters that matter: B != 0
  builder.params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.random.normal(next(keys), x.shape, x.dtype)
                       if "lora_b" in str(path[-1]) else x), builder.params)
  rack = builder.build_rack()
  export_rack(rack, 2, str(tmp_path), "safetensors")
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert {"int4", "bfloat16"} <= {entry["dtype"] for entry in manifest["params"].values()}
  assert_same_rack(load_export(str(tmp_path)), rack)


def test_export_refuses_a_workdir_without_checkpoints(tmp_path, capsys):
  assert main(["export", "--workdir", str(tmp_path), "--format", "npz"]) == 2
  assert "no readable checkpoint" in capsys.readouterr().err


def test_eval_reports_each_stage_rack_as_its_training_did(trained, capsys):
  workdir, config, results = trained
  assert main(["eval", "--workdir", str(workdir)]) == 0
  rows = json.loads((workdir / "eval.json").read_text())["racks"]
  assert [(r["stage"], r["stacks"]) for r in rows] == [(1, ["stack_0"]), (2, ["stack_0", "stack_1"])]
  # The trainer evaluated the same examples.
  for row, stage in zip(rows, results["stages"], strict=True):
    np.testing.assert_allclose(row["loss"], stage["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(row["perplexity"], np.exp(row["loss"]), rtol=1e-6)
    np.testing.assert_allclose(row["bits_per_byte"], stage["eval_bits_per_byte"], rtol=1e-5)
  # Accuracy and bytes (the byte tokenizer: one per byte id, none for EOS) counted by hand.
  rack, masking = load_rack(str(workdir)), TimeStepMasking(config)
  hits = total = n_bytes = 0
  for batch in make_dataloader(config).eval_batches(config.training.eval_batches):
    ex = eval_example(masking, batch)
    predicted = np.argmax(np.asarray(rack(rack.params, ex["inputs"], ex["time_step"])), -1)
    mask, targets = np.asarray(ex["loss_mask"]) > 0, np.asarray(ex["targets"])
    hits += int(np.sum((predicted == targets) & mask))
    total += int(mask.sum())
    n_bytes += int(np.sum((targets < 256) & mask))
  assert rows[-1]["tokens"] == total and rows[-1]["accuracy"] == pytest.approx(hits / total)
  # Every loss token of the byte tokenizer stands for one byte, or none (EOS).
  assert 0 < n_bytes <= total and np.all(BYTES.token_bytes == (np.arange(260) < 256))
  for stage in results["stages"]:
    assert stage["eval_bits_per_byte"] == pytest.approx(
        stage["eval_loss"] / math.log(2) * total / n_bytes, rel=1e-5)
  assert results["final_eval_bits_per_byte"] == results["stages"][-1]["eval_bits_per_byte"]
  out = capsys.readouterr().out
  assert "perplexity" in out and "bits/byte" in out
  assert f"{rows[-1]['bits_per_byte']:.4f}" in out

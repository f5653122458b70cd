"""Runs progressive training on a forced 8-device CPU mesh for tests/test_sharding.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_run.py CORPUS OUT.json WORKDIR

Writes per-step losses of 2-stage runs on one device and on a 2×4 (data × fsdp) mesh, for a frozen,
a qlora and a training trunk; the shardings of the 2×4 run's params and optimizer state; the
losses of a run checkpointed on a 1×8 mesh, cut off mid-stage and resumed on a 4×2 mesh; and the
bytes a device holds for a compiled step where params dominate, data-parallel (8×1) and FSDP (1×8).
"""
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from conftest import micro_config
from stackwise_jax.checkpoint import RunCheckpoints
from stackwise_jax.data import make_dataloader
from stackwise_jax.trees import key_path
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.progressive.steps import (init_train_state, make_optimizer, make_train_step,
                                             plan_stage)
from stackwise_jax.sharding import batch_spec, make_mesh, replicated, tree_shardings

TRUNKS = {"frozen": {},
          "qlora": dict(trunk_strategy="qlora", qlora_enabled=True, progressive_qlora=True,
                        quant_block_size=16),
          "train": dict(trunk_strategy="train")}


def config_for(corpus, data, fsdp, **progressive):
  config = micro_config(target_stacks=2, **progressive)
  config.data.source, config.data.paths = "text", (corpus,)
  config.training.batch_size = 8
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config


def train(config, devices=None, workdir=None):
  checkpoints = RunCheckpoints(workdir, config, log=lambda _: None) if workdir else None
  trainer = ProgressiveTrainer(config, progress=False, log=lambda _: None,
                               checkpoints=checkpoints, devices=devices)
  results = trainer.train_progressively(ProgressiveRackBuilder(config), make_dataloader(config))
  if checkpoints:
    checkpoints.close()
  return [s["losses"] for s in results["stages"]], trainer.state


def specs(tree):
  return {key_path(path): str(x.sharding.spec)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(x, "sharding") and x.ndim > 0}


def device_bytes(data, fsdp):
  """Argument + temporary bytes per device of the compiled step that trains 3 stacks of a d_model
  256 model at once (params dominate: 8 examples of 16 tokens), lowered from shapes only."""
  config = micro_config(target_stacks=3, enabled=False)
  config.model.d_model, config.model.d_ff = 256, 512
  config.training.batch_size = 8
  config.mesh.data, config.mesh.fsdp = data, fsdp
  builder = ProgressiveRackBuilder(config)
  for _ in range(3):
    builder.add_stack()
  rack, labels = builder.build_rack(), builder.labels()
  plan = plan_stage(rack, set(), cache_activations=False)
  tx = make_optimizer(config.training, labels, total_steps=8)
  mesh = make_mesh(config)
  state = init_train_state(rack.params, tx, plan)
  shardings = tree_shardings(mesh, state, rack.axes())
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                       shardings)
  batch = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype,
                                                     sharding=NamedSharding(mesh, batch_spec()))
  tokens = batch(jnp.int32, 8, config.training.seq_len)
  example = {"inputs": tokens, "targets": tokens, "time_step": batch(jnp.int32, 8),
             "loss_mask": batch(jnp.float32, 8, config.training.seq_len)}
  step = make_train_step(rack, plan, tx, labels, shardings=(shardings, replicated(mesh)))
  memory = step.lower(state, example).compile().memory_analysis()
  return memory.argument_size_in_bytes + memory.temp_size_in_bytes


def main(corpus, out, workdir):
  report = {"devices": jax.device_count(),
            "device_bytes": {"data-parallel": device_bytes(8, 1), "fsdp": device_bytes(1, 8)}}
  for trunk, fields in TRUNKS.items():
    single, _ = train(config_for(corpus, 1, 1, **fields), devices=jax.devices()[:1])
    sharded, state = train(config_for(corpus, 2, 4, **fields))
    report[trunk] = {"single": single, "sharded": sharded,
                     "param_specs": specs(state["params"]),
                     "opt_specs": specs(state["opt_state"]),
                     "mesh": dict(state["params"]["embed_head"]["embed"]["embedding"]
                                  .sharding.mesh.shape)}
  # Checkpointed on 1×8 (every 3 steps), cut after step 11 (stage 2, step 3), resumed on 4×2.
  config = config_for(corpus, 1, 8)
  config.training.checkpoint_every, config.training.keep_checkpoints = 3, 100
  whole, _ = train(config, workdir=f"{workdir}/whole")
  shutil.copytree(f"{workdir}/whole", f"{workdir}/cut")
  for step in os.listdir(f"{workdir}/cut/checkpoints"):
    if step.isdigit() and int(step) > 11:
      shutil.rmtree(f"{workdir}/cut/checkpoints/{step}")
  on_4x2 = config.copy_and_resolve_references()
  on_4x2.mesh.data, on_4x2.mesh.fsdp = 4, 2
  resumed, state = train(on_4x2, workdir=f"{workdir}/cut")
  report["restore"] = {"whole": whole, "resumed": resumed,
                       "mesh": dict(state["params"]["embed_head"]["embed"]["embedding"]
                                    .sharding.mesh.shape)}
  with open(out, "w") as f:
    json.dump(report, f)


if __name__ == "__main__":
  main(*sys.argv[1:])

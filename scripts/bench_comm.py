"""Bytes moved by collectives per train step, data-parallel vs FSDP (design §11), from the HLO.

  python scripts/bench_comm.py --config configs/small.py --devices 8 --out bench_results/bench_comm.json

Forces `--devices` CPU devices, builds the stage-1 step (embedding + first stack, all trainable)
and the stage-2 step (a frozen cached trunk, the new stack trains) of the config on a `devices×1`
(data-parallel) and a `1×devices` (FSDP) mesh, compiles them, and sums the result sizes of every
collective in the optimized HLO (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute) by kind. That is the data each collective produces per device; what crosses
the wire depends on the algorithm (a ring all-reduce sends about 2× its size).
"""
import os
import re
import sys

if __name__ == "__main__":   # before jax starts: the device count is fixed then
  _count = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "8"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_count}"

from bench_stages import bench_parser, save
import jax
from jax.sharding import NamedSharding
import numpy as np

from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.progressive.steps import (init_train_state, make_optimizer, make_train_step,
                                             plan_stage, prefix_activations)
from stackwise_jax.sharding import batch_spec, global_batch, replicated, tree_shardings

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s4": 0.5,
          "f8e4m3fn": 1}
# `%x = f32[16,256]{1,0} all-reduce(...)`, a tuple `(f32[..], /*index=1*/f32[..]) all-reduce(...)`,
# or an async pair `...-start(` / `...-done(` whose `-done` carries the result.
_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-done)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collective_bytes(hlo: str) -> dict[str, float]:
  totals = dict.fromkeys(COLLECTIVES, 0.0)
  for line in hlo.splitlines():
    match = _OP.search(line)
    if match is None or " = " not in line:
      continue
    result = line[line.index(" = ") + 3:match.start()]
    for dtype, dims in _SHAPE.findall(result):
      if dtype in _BYTES:
        totals[match.group(1)] += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return totals


def compiled_steps(config):
  """Stage 1 and stage 2 train steps of `config`, compiled on its mesh -> {stage: (HLO text,
  bytes of the trainable params)}."""
  trainer = ProgressiveTrainer(config, progress=False, log=lambda _: None)
  builder, loader = ProgressiveRackBuilder(config), make_dataloader(config)
  data, hlo = loader.train_iter(), {}
  for stage in (1, 2):
    new = builder.add_stack()
    frozen = trainer._set_labels(builder)
    rack, labels = builder.build_rack(), builder.labels()
    plan = plan_stage(rack, stage, (new.name,), frozen, cache_activations=True)
    tx = make_optimizer(config.training, labels, config.training.steps_per_stack)
    state = init_train_state(rack.params, tx, plan)
    shardings = tree_shardings(trainer.mesh, state)
    state = jax.device_put(state, shardings)
    example = builder.masking.generate_masks_for_stack(
        global_batch(trainer.mesh, next(data)), k=new.index, salt=stage)
    if plan.cached:   # as the trainer feeds it: from the host cache, split over the batch
      h = prefix_activations(rack, plan.prefix, state["params"], example)
      example = {**example, "h": jax.device_put(h, NamedSharding(trainer.mesh, batch_spec()))}
    step = make_train_step(rack, plan, tx, labels, dropout_seed=0,
                           shardings=(shardings, replicated(trainer.mesh)))
    trainable = sum(x.nbytes for x, label in zip(jax.tree.leaves(state["params"]),
                                                 jax.tree.leaves(labels)) if label == "trainable")
    hlo[stage] = (step.lower(state, example).compile().as_text(), trainable)
    builder.trained.add(new.name)
  return hlo


def main():
  parser = bench_parser(__doc__, "bench_comm.json")
  parser.add_argument("--devices", type=int, default=8)
  args = parser.parse_args()

  rows = []
  for name, (data, fsdp) in {"data-parallel": (args.devices, 1), "fsdp": (1, args.devices)}.items():
    config = load_config(args.config, [*args.overrides, f"mesh.data={data}", f"mesh.fsdp={fsdp}"])
    for stage, (hlo, trainable) in compiled_steps(config).items():
      totals = collective_bytes(hlo)
      rows.append({"mesh": name, "shape": [data, fsdp], "stage": stage, "trainable_bytes": trainable,
                   "total_bytes": sum(totals.values()), **totals})
  # Independent check: data parallelism must all-reduce every trainable gradient once.
  for r in rows:
    if r["mesh"] == "data-parallel" and not r["all-reduce"] >= r["trainable_bytes"]:
      raise SystemExit(f"implausible: all-reduce {r['all-reduce']} B < gradients "
                       f"{r['trainable_bytes']} B in {r}")

  mib = lambda b: b / 2**20
  print(f"$ python {' '.join(sys.argv)}")
  print(f"{'mesh':>14}  {'stage':>5}  {'grads MiB':>9}  {'total MiB':>9}  "
        + "  ".join(f"{c:>18}" for c in COLLECTIVES))
  for r in rows:
    print(f"{r['mesh']:>14}  {r['stage']:>5}  {mib(r['trainable_bytes']):>9.2f}  "
          f"{mib(r['total_bytes']):>9.2f}  "
          + "  ".join(f"{mib(r[c]):>18.2f}" for c in COLLECTIVES))
  save(args.out, {"summary": {f"{r['mesh']}/stage{r['stage']}": r["total_bytes"] for r in rows},
                  "rows": rows, "config": args.config, "devices": args.devices})


if __name__ == "__main__":
  main()

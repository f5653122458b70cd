"""Quantization error of the trunk formats on trained stacks: nvfp4 vs int4 (qwix) vs bf16.

  python scripts/bench_quant.py --config configs/small.py --stacks 3 --steps 100 --out bench_results/bench_quant.json

Trains a full-precision rack progressively with the real trainer (frozen, cached trunk), then
stores every trained stack in each format the way a frozen trunk is stored (`freeze_trunk`;
`freeze_all_but_qlora` for int4) and reports, per format: the relative RMS error
||W - Q(W)|| / ||W|| of the attention/FFN kernels (per stack and over all of them), and the
held-out eval loss of the whole rack with every stack in that format.
"""
import sys

from flax import traverse_util
import jax
import numpy as np

from bench_stages import bench_parser, save
from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.model import nvfp4
from stackwise_jax.model.lora import tree_bytes
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.progressive.steps import make_eval_step

# format -> (precision the stacks are built with, how they are frozen)
FORMATS = {"full": ("full", "freeze_trunk"), "bfloat16": ("bfloat16", "freeze_trunk"),
           "int4 (qwix)": ("full", "freeze_all_but_qlora"), "nvfp4": ("nvfp4", "freeze_trunk")}


def kernels(stack_params) -> dict[str, np.ndarray]:
  """Every attention/FFN kernel of a stack as fp32 [in, out], dequantized from however it is
  stored: a float `kernel`, qwix's int4 `qvalue` × block `scale`, or the packed nvfp4 leaves."""
  flat = traverse_util.flatten_dict(stack_params)
  out = {}
  for path, x in flat.items():
    layer = "/".join(map(str, path[:-1]))
    if path[-1] == "kernel" and "time_proj" not in path:
      out[layer] = np.asarray(x, np.float32)
    elif path[-1] == "qvalue":          # qwix: .../kernel/array/{qvalue, scale}
      scale = np.asarray(flat[path[:-1] + ("scale",)], np.float32)
      q = np.asarray(x, np.float32)
      out["/".join(map(str, path[:-3]))] = q * np.repeat(scale, q.shape[0] // scale.shape[0], 0)
    elif path[-1] == nvfp4.PACKED_LEAVES[0]:
      parts = [flat[path[:-1] + (leaf,)] for leaf in nvfp4.PACKED_LEAVES]
      encoded = dict(zip(("packed", "scales", "tensor_scale"), parts))
      out[layer] = np.asarray(nvfp4.dequantize(encoded), np.float32).T
  return out


def relative_rms(reference: dict, quantized: dict) -> float:
  num = sum(np.sum((reference[k] - quantized[k]) ** 2) for k in reference)
  return float(np.sqrt(num / sum(np.sum(reference[k] ** 2) for k in reference)))


def stored_as(config, trained, n_stacks, precision, freeze):
  """A builder whose stacks hold `trained`'s params in one format, frozen like a trunk."""
  builder = ProgressiveRackBuilder(config, default_precision=precision)
  for _ in range(n_stacks):
    builder.add_stack()
  builder.params = jax.tree.map(lambda x: x, trained)   # same structure: no adapters anywhere
  builder.trained.update(s.name for s in builder.specs)
  getattr(builder, freeze)()
  return builder


def main():
  parser = bench_parser(__doc__, "bench_quant.json")
  parser.add_argument("--stacks", type=int, default=3)
  parser.add_argument("--steps", type=int, default=100, help="train steps per stage")
  args = parser.parse_args()

  config = load_config(args.config, [
      *args.overrides, f"training.steps_per_stack={args.steps}", "training.eval_every=0",
      f"training.progressive.target_stacks={args.stacks}", "training.progressive.new_stack_precision=full",
      "training.progressive.trunk_strategy=frozen", "training.progressive.qlora_enabled=False",
      "training.progressive.progressive_qlora=False"])
  loader = make_dataloader(config)
  builder = ProgressiveRackBuilder(config)
  results = ProgressiveTrainer(config, progress=True, log=print).train_progressively(builder, loader)
  trained = builder.params
  masking = builder.masking
  eval_examples = [ProgressiveTrainer.eval_example(masking, b)
                   for b in loader.eval_batches(config.training.eval_batches)]
  reference = {s.name: kernels(trained["stacks"][s.name]) for s in builder.specs}

  rows = []
  for name, (precision, freeze) in FORMATS.items():
    stored = stored_as(config, trained, args.stacks, precision, freeze)
    rack = stored.build_rack()
    per_stack = {s: relative_rms(reference[s], kernels(rack.params["stacks"][s]))
                 for s in reference}
    everything = relative_rms(
        {(s, k): w for s in reference for k, w in reference[s].items()},
        {(s, k): w for s in reference for k, w in kernels(rack.params["stacks"][s]).items()})
    eval_loss = ProgressiveTrainer._evaluate(make_eval_step(rack), rack.params, eval_examples)
    base_bytes = tree_bytes(rack.params["stacks"])
    rows.append({"format": name, "relative_rms": everything, "relative_rms_per_stack": per_stack,
                 "eval_loss": eval_loss, "stack_bytes": base_bytes})
  if rows[0]["relative_rms"] != 0.0 or any(r["relative_rms"] <= 0 for r in rows[1:]):
    raise SystemExit(f"implausible errors: {[r['relative_rms'] for r in rows]}")

  print(f"$ python {' '.join(sys.argv)}")
  print(f"{'format':>12}  {'rel. RMS':>9}  {'per stack':>24}  {'eval loss':>9}  {'Δ eval':>8}  "
        f"{'stacks MiB':>10}")
  for r in rows:
    per = " ".join(f"{v:.4f}" for v in r["relative_rms_per_stack"].values())
    print(f"{r['format']:>12}  {r['relative_rms']:>9.4f}  {per:>24}  {r['eval_loss']:>9.4f}  "
          f"{r['eval_loss'] - rows[0]['eval_loss']:>+8.4f}  {r['stack_bytes'] / 2**20:>10.2f}")
  save(args.out, {"summary": {r["format"]: {"relative_rms": r["relative_rms"],
                                            "eval_loss_delta": r["eval_loss"] - rows[0]["eval_loss"]}
                              for r in rows},
                  "rows": rows, "config": args.config, "stacks": args.stacks,
                  "steps_per_stage": args.steps,
                  "trained_eval_loss": results["final_eval_loss"]})


if __name__ == "__main__":
  main()

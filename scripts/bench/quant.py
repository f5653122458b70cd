"""quant: quantization error of the trunk formats on trained stacks."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from stackwise_jax import quant
from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive.evaluate import eval_example, evaluate
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.trees import tree_bytes

from bench.common import MODES, fail

CONFIG = "configs/small.py"
SETTINGS = {"stages": 3, "steps": 150}
QUICK = {"stages": 2, "steps": 20}

# format -> (precision the stacks are built with, how they are frozen): float, then every stored
# format (quant.FORMATS): int4 as a qlora trunk of float stacks, the others as frozen stacks.
FORMATS = {"full": ("full", "freeze_trunk"), "bfloat16": ("bfloat16", "freeze_trunk"),
           **{f"{f.name} (qwix)" if f.qwix_rule else f.name:
              ("full", "freeze_all_but_qlora") if f is quant.QLORA_TRUNK
              else (f.precision, "freeze_trunk") for f in quant.FORMATS.values()}}


def kernels(stack_params) -> dict[str, np.ndarray]:
  """Every attention/FFN kernel of a stack as fp32 [in, out], dequantized from however it is
  stored: a float `kernel`, or a stored format's leaves (quant.FORMATS)."""
  flat = {"/".join(map(str, path)): x for path, x in traverse_util.flatten_dict(stack_params).items()}
  out = {}
  for path, x in flat.items():
    if path.endswith("/kernel") and "time_proj" not in path:
      out[path.removesuffix("/kernel")] = np.asarray(x, np.float32)
    for fmt in quant.FORMATS.values():
      first = next(iter(fmt.leaves))
      if path.endswith("/" + first):
        layer = path.removesuffix("/" + first)
        leaves = {leaf: flat[f"{layer}/{leaf}"] for leaf in fmt.leaves}
        out[layer] = np.asarray(fmt.dequantize(leaves, jnp.float32), np.float32)
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


def run(args, s):
  """Trains a full-precision rack progressively (frozen, cached trunk), then stores every stack in
  each format the way a frozen trunk is stored, and reports the kernels' relative RMS error
  ||W - Q(W)|| / ||W|| and the held-out eval loss of the whole rack in that format."""
  config = load_config(args.config, [
      *args.overrides, *MODES["cached"], f"training.steps_per_stack={s['steps']}",
      "training.eval_every=0", f"training.progressive.target_stacks={s['stages']}",
      "training.progressive.new_stack_precision=full", "training.progressive.qlora_enabled=False",
      "training.progressive.progressive_qlora=False"])
  loader = make_dataloader(config)
  builder = ProgressiveRackBuilder(config)
  results = ProgressiveTrainer(config, progress=False, log=print).train_progressively(builder, loader)
  trained = builder.params
  eval_examples = [eval_example(builder.masking, b)
                   for b in loader.eval_batches(config.training.eval_batches)]
  reference = {spec.name: kernels(trained["stacks"][spec.name]) for spec in builder.specs}
  rows = []
  for name, (precision, freeze) in FORMATS.items():
    rack = stored_as(config, trained, s["stages"], precision, freeze).build_rack()
    quantized = {stack: kernels(rack.params["stacks"][stack]) for stack in reference}
    everything = relative_rms(
        {(st, k): w for st in reference for k, w in reference[st].items()},
        {(st, k): w for st in reference for k, w in quantized[st].items()})
    rows.append({"format": name, "relative_rms": everything,
                 "per_stack": ", ".join(f"{relative_rms(reference[st], quantized[st]):.4f}"
                                        for st in reference),
                 "eval_loss": evaluate(rack, eval_examples)["loss"],
                 "stack_mib": tree_bytes(rack.params["stacks"]) / 2**20})
  if rows[0]["relative_rms"] != 0.0 or any(r["relative_rms"] <= 0 for r in rows[1:]):
    fail(f"relative errors {[r['relative_rms'] for r in rows]}")
  for r in rows:
    r["eval_loss_delta"] = r["eval_loss"] - rows[0]["eval_loss"]
  summary = {f"{r['format']} {key}": r[key] for r in rows for key in ("relative_rms", "eval_loss_delta")}
  summary["trained_eval_loss"] = results["final_eval_loss"]
  columns = [("format", "format", "{}"), ("relative RMS", "relative_rms", "{:.4f}"),
             ("per stack", "per_stack", "{}"), ("eval loss", "eval_loss", "{:.4f}"),
             ("Δ eval loss", "eval_loss_delta", "{:+.4f}"), ("stacks MiB", "stack_mib", "{:.2f}")]
  return columns, rows, summary

"""mfu: model FLOPs / step time / measured matmul peak."""
import statistics

import jax
import jax.numpy as jnp

from stackwise_jax.config import load_config
from stackwise_jax.model import COMPUTE_DTYPES
from stackwise_jax.model.layers import attend, attention_scores

from bench.common import MODES, check_positive, flag_noise, median_ms, spread, time_calls
from bench.flops import block_matmul_params, check_flops, xla_flops
from bench.stage import build_stage, stage_row, time_stage

CONFIG = "configs/small.py"
SETTINGS = {"steps": 10, "depths": [6]}
QUICK = {"steps": 4, "depths": [2]}


def matmul_times(dtype, n: int, repeats: int = 5) -> list[float]:
  """Seconds of `repeats` jitted [n, n] @ [n, n] products in `dtype` (2n³ FLOPs each)."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype) for i in (0, 1))
  dot = jax.jit(jnp.dot)
  return time_calls(lambda: dot(a, b).block_until_ready(), repeats)


def components(config, steps) -> list[dict]:
  """The two kinds of work in a block, timed alone at the step's shapes and dtype, forward and
  backward: the attention core (`attend`, as the model calls it) and the seven kernels' matmuls,
  on [batch * seq, d] inputs as our `Linear` flattens them and, for comparison, on the [batch,
  seq, d] ones a plain nnx.Linear would multiply."""
  m, t = config.model, config.training
  dtype = COMPUTE_DTYPES[t.progressive.new_stack_precision]
  b, n, head_dim = t.batch_size, t.seq_len, m.d_model // m.n_heads
  normal = lambda i, *shape: jax.random.normal(jax.random.key(i), shape).astype(dtype)
  squares = lambda *ys: sum(jnp.sum(jnp.square(y.astype(jnp.float32))) for y in ys)
  attention = lambda q, k, v: squares(attend(q, k, v, causal=True))
  kv = m.n_kv_heads * head_dim
  kernels = [normal(i, *shape) for i, shape in enumerate(
      [(m.d_model, m.d_model), (m.d_model, kv), (m.d_model, kv), (m.d_model, m.d_model),
       (m.d_model, m.d_ff), (m.d_model, m.d_ff), (m.d_ff, m.d_model)])]
  matmuls = lambda ws, x, h: squares(*[x @ w for w in ws[:-1]], h @ ws[-1])   # h: the FFN's inner
  x, h = normal(7, b, n, m.d_model), normal(8, b, n, m.d_ff)
  dense = 6 * b * n * block_matmul_params(m)
  cases = [
      ("attention core of a block", attention,
       (normal(9, b, n, m.n_heads, head_dim), normal(10, b, n, m.n_kv_heads, head_dim),
        normal(11, b, n, m.n_kv_heads, head_dim)), 12 * b * attention_scores(n, True) * m.d_model),
      ("matmuls of a block, [batch * seq, d] inputs", matmuls,
       (kernels, x.reshape(b * n, -1), h.reshape(b * n, -1)), dense),
      ("matmuls of a block, [batch, seq, d] inputs", matmuls, (kernels, x, h), dense)]
  if jax.default_backend() == "gpu":   # `attend` picks cuDNN there: against XLA's, jax's default
    xla_attention = lambda q, k, v: squares(jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"))
    cases.append(("attention core, XLA's", xla_attention, *cases[0][2:]))
  rows = []
  for name, fn, inputs, flops in cases:
    grad = jax.jit(jax.grad(fn, argnums=tuple(range(len(inputs)))))
    xla = xla_flops(grad.lower(*inputs))
    check_flops(name, flops, xla)
    times = time_calls(lambda: jax.block_until_ready(grad(*inputs)), steps)
    rows.append({"step": f"{name} (fwd + bwd)", "stacks": None, "step_ms": median_ms(times),
                 "spread": spread(times), "model_gflop": flops / 1e9,
                 "xla_gflop": xla and xla / 1e9,
                 "gflop_per_s": flops / statistics.median(times) / 1e9})
  return rows


def run(args, s):
  config = load_config(args.config, [*args.overrides, *MODES["cached"]])
  dtype = COMPUTE_DTYPES[config.training.progressive.new_stack_precision]
  n = 2048 if jax.default_backend() == "cpu" else 8192
  # The peak is timed between the steps and, like them, taken as a median: a noisy spell on a
  # shared machine then slows both alike instead of only the steps.
  peak_times = matmul_times(dtype, n)
  cases = [("new stack, cached trunk", MODES["cached"], 2), ("first stage", MODES["cached"], 1),
           *[(f"end-to-end, {k} stacks", MODES["end-to-end"], k) for k in s["depths"]]]
  rows = []
  for name, modes, k in cases:
    stage = build_stage(load_config(args.config, [*args.overrides, *modes]), k)
    rows.append({"step": name, "stacks": k, **stage_row(stage, *time_stage(stage, s["steps"]))})
    peak_times += matmul_times(dtype, n)
  rows += components(config, s["steps"])
  peak_times += matmul_times(dtype, n)
  check_positive(rows, "step_ms", "model_gflop")
  flag_noise(rows)
  peak = 2 * n**3 / statistics.median(peak_times)
  for row in rows:
    row["mfu"] = row["gflop_per_s"] * 1e9 / peak
  goal = 0.40 if jax.default_backend() == "cpu" else 0.45
  summary = {"mfu": rows[0]["mfu"], "peak_gflop_per_s": peak / 1e9,
             "peak_best_gflop_per_s": 2 * n**3 / min(peak_times) / 1e9,
             "mfu_vs_best_peak": rows[0]["gflop_per_s"] * min(peak_times) / (2 * n**3 / 1e9),
             "peak_spread": spread(peak_times),
             "peak_matmul": f"jnp.dot [{n}, {n}] {jnp.dtype(dtype).name}, median of "
                            f"{len(peak_times)} timed between the steps",
             "goal": f">= {goal:.0%} of the measured peak for the new-stack step",
             "goal_met": rows[0]["mfu"] >= goal}
  columns = [("step", "step", "{}"), ("stacks", "stacks", "{}"), ("ms/step", "step_ms", "{:.1f}"),
             ("spread", "spread", "{:.0%}"), ("GFLOP/step", "model_gflop", "{:.2f}"),
             ("XLA GFLOP", "xla_gflop", "{:.2f}"), ("GFLOP/s", "gflop_per_s", "{:.1f}"),
             ("MFU", "mfu", "{:.1%}")]
  return columns, rows, summary

"""Benchmarks: step time per stage, MFU, memory, progressive vs end-to-end, against PyTorch (issue 8),
plus the quantization error of the trunk formats and the bytes moved by collectives.

  python scripts/bench.py {depth,mfu,memory,quality,torch,quant,comm,job} [--quick] [--out FILE.json]
      [--config FILE] [--stages N] [--steps N] [--seeds S ...] [--depths K ...] [config overrides]

Each sub-benchmark writes FILE.json ({"benchmark", "date", "machine", "command", "config",
"settings", "rows", "summary"}; default bench_results/NAME.json) and FILE.md (the same table in
Markdown), prints the table under its command line, and exits non-zero when its own numbers are
not sane: a time <= 0, or a model FLOP count more than FLOP_TOLERANCE away from XLA's count of
the step (`jax.jit(step).lower(...).cost_analysis()`). `--quick` runs each in under two minutes on 2 CPU cores
with fewer stages, steps and seeds (`settings` in the JSON says which). Benchmarks are scripts,
never timed tests.

Step times come from the train step the trainer builds (`plan_stage`, `make_train_step`) for
stage k of a rack grown the trainer's way (`progressive.stages.grow`), timed on a real batch: the
median of `steps` steps after one warm-up (compiling) step. Params are freshly
initialised; the time of a step does not depend on their values.
"""
import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)   # the package of this tree, installed or not

from flax import traverse_util
import jax
from jax.sharding import NamedSharding
import jax.numpy as jnp
import numpy as np

from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.evaluate import evaluate
from stackwise_jax.model import COMPUTE_DTYPES, nvfp4
from stackwise_jax.model.layers import attend, attention_scores
from stackwise_jax.model.lora import is_adapter_path
from stackwise_jax.trees import tree_bytes
from stackwise_jax.model.rack import is_causal
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.progressive.builder import TRAINABLE
from stackwise_jax.progressive.steps import (init_train_state, make_optimizer,
                                             make_train_step, plan_stage, prefix_activations)
from stackwise_jax.progressive.stages import grow
from stackwise_jax.report import PHASES
from stackwise_jax.sharding import batch_spec, global_batch, make_mesh, replicated, tree_shardings

FLOP_TOLERANCE = 0.10   # |model FLOPs - XLA's| / XLA's; XLA also counts norms, softmax, Adam
NOISY_SPREAD = 0.25     # (slowest - fastest) / median step time above which a row is flagged

# How each trunk strategy is set up, as config overrides (used by the stage steps and the trainer).
MODES = {
    "cached": ["training.progressive.trunk_strategy=frozen",
               "training.progressive.cache_activations=True"],
    "streamed": ["training.progressive.trunk_strategy=frozen",
                 "training.progressive.cache_activations=False"],
    "qlora": ["training.progressive.trunk_strategy=qlora", "training.progressive.qlora_enabled=True",
              "training.progressive.progressive_qlora=True"],
    "nvfp4": ["training.progressive.trunk_strategy=frozen",
              "training.progressive.new_stack_precision=nvfp4"],
    "end-to-end": ["training.progressive.enabled=False"],   # all stacks, one stage
}

# Per sub-benchmark: (default config, full settings, what --quick changes).
PRESETS = {
    "depth": ("configs/small.py",
              {"stages": 8, "steps": 6, "modes": ["cached", "streamed", "qlora", "end-to-end"]},
              {"stages": 3, "steps": 2, "modes": ["cached", "streamed", "end-to-end"]}),
    "mfu": ("configs/small.py", {"steps": 10, "depths": [6]}, {"steps": 4, "depths": [2]}),
    "memory": ("configs/small.py", {"stages": 8, "steps": 6, "modes": ["cached", "qlora", "nvfp4"]},
               {"stages": 2, "steps": 3}),
    "quality": ("configs/tiny.py",
                {"steps": 250, "seeds": [0, 1], "eval_batches": 16,
                 "modes": ["cached", "qlora", "end-to-end"]},
                {"steps": 20, "seeds": [0], "eval_batches": 4}),
    "torch": ("configs/small.py", {"depths": [2, 8], "steps": 6}, {"depths": [4], "steps": 3}),
    "quant": ("configs/small.py", {"stages": 3, "steps": 150}, {"stages": 2, "steps": 20}),
    "comm": ("configs/small.py", {"devices": 8}, {}),
    # [stacks, steps a stage, epochs] cells
    "job": ("configs/small.py",
            {"grid": [[n, s, e] for n in (4, 8) for s in (40, 300) for e in (1, 3)], "warm": True},
            {"grid": [[4, 40, 1], [4, 40, 3]], "warm": False}),
}

# The original StackWise's tiny_llama job (its examples/tiny_llama config): 4 stacks of 4 blocks,
# d_model 256, 8 heads / 4 KV heads, d_ff 1024, batch 8, 128-token sequences; configs/small.py
# gives the rest. Evaluation and a checkpoint at each stage's end, on both sides.
JOB_SIZES = ["model.n_blocks_per_stack=4", "model.d_ff=1024", "training.batch_size=8",
             "training.seq_len=128", "training.eval_every=0", "training.checkpoint_every=0",
             "training.data_reuse=pool"]


# --- Output: JSON, Markdown, sanity. ---------------------------------------------------------------


def fail(message: str):
  raise SystemExit(f"bench.py: implausible result: {message}")


def check_positive(rows, *keys) -> None:
  for row in rows:
    for key in keys:
      if row.get(key) is not None and not row[key] > 0:
        fail(f"{key}={row[key]} in {row}")


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  device = jax.devices()[0]
  return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "cores_used": len(os.sched_getaffinity(0)), "jax": jax.__version__,
          "backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count()}


def markdown(columns, rows) -> str:
  """columns: (header, key, format) triples; a None value shows as '-'."""
  cell = lambda row, key, fmt: "-" if row.get(key) is None else fmt.format(row[key])
  lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |" for r in rows]
  return "\n".join(lines)


def write(args, settings, columns, rows, summary, load_start) -> None:
  """Writes args.out (JSON) and its .md twin, and prints the table under the command line."""
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  payload = {"benchmark": args.benchmark, "date": datetime.date.today().isoformat(),
             "machine": machine(), "command": command, "config": os.path.relpath(args.config, REPO),
             "overrides": args.overrides, "settings": settings,
             "load_average": [load_start, os.getloadavg()[0]], "rows": rows, "summary": summary}
  shown = lambda v: f"{v:.4g}" if isinstance(v, float) else json.dumps(v)
  m = payload["machine"]
  text = (f"`{command}`\n\n{payload['date']}, {m['cpu']} ({m['cores_used']} cores used), "
          f"jax {m['jax']} {m['backend']} ({m['device_kind']})\n\n{markdown(columns, rows)}\n\n"
          + "\n".join(f"- {k}: {shown(v)}" for k, v in summary.items()) + "\n")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(payload, f, indent=2)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(text)
  print(f"$ {command}\n\n{text}\nwrote {args.out} and its .md")


def median_ms(times) -> float:
  return 1000 * statistics.median(times)


def spread(times) -> float:
  return (max(times) - min(times)) / statistics.median(times)


# --- FLOPs: counted from the model config, checked against XLA. ---------------------------------


def block_matmul_params(m) -> int:
  """Weights of one block's attention and FFN kernels = multiply-adds per token of its matmuls."""
  kv = m.n_kv_heads * (m.d_model // m.n_heads)
  return 2 * m.d_model * m.d_model + 2 * m.d_model * kv + 3 * m.d_model * m.d_ff


def block_lora_params(m, rank: int) -> int:
  """Weights of rank-`rank` adapters (A: [in, r], B: [r, out]) on one block's seven kernels."""
  kv, d, ff = m.n_kv_heads * (m.d_model // m.n_heads), m.d_model, m.d_ff
  return rank * sum(i + o for i, o in ((d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)))


def model_flops(config, rack, labels, plan, fsdp: bool) -> tuple[float, float]:
  """Model FLOPs of one train step of a stage and of one batch through its frozen prefix.

  2 FLOPs per multiply-add. A matmul whose weights train costs 3x its forward (forward, input
  gradient, weight gradient): 6·N·T. One the gradient only passes through (a qlora trunk's int4
  base) costs 2x; a frozen prefix costs its forward (1x) when streamed and nothing in the step
  when cached (the cache build pays it once per batch: the second number). Attention adds
  2·2·d_model per scored (query, key) pair per block forward (QK^T and PV; `attention_scores`:
  seq² or, chunked causal attention on CPU, about half), 3x with its backward. The tied LM head
  is one more matmul. Under FSDP (`fsdp`: the mesh splits params) the backward recomputes each
  differentiated block's and the head's forward (sharding.gathered_call): one more forward.
  Norms, softmax, RoPE and the optimizer are left out (XLA counts them: FLOP_TOLERANCE).
  """
  m, t = config.model, config.training
  tokens = t.batch_size * t.seq_len
  dense = 2 * tokens * block_matmul_params(m)
  attention = 4 * t.batch_size * attention_scores(t.seq_len, is_causal(config)) * m.d_model
  lora = lambda spec: 2 * tokens * block_lora_params(
      m, sum(s.rank for s in (spec.lora, spec.progressive_lora) if s is not None))
  step = 0.0
  prefix = sum(s.n_blocks * (dense + attention + lora(s)) for s in rack.specs if s.name in plan.prefix)
  for spec in rack.specs:
    if spec.name not in plan.body:
      continue
    base_trains = any(label == TRAINABLE and not is_adapter_path(path) for path, label in
                      jax.tree_util.tree_leaves_with_path(labels["stacks"][spec.name]))
    step += spec.n_blocks * ((3 if base_trains else 2) * dense + 3 * attention + 3 * lora(spec)
                             + fsdp * (dense + attention + lora(spec)))
  e = labels["embed_head"]
  head_trains = (e["embed"]["embedding"] if m.tie_embeddings else e["head"]["kernel"]) == TRAINABLE
  step += ((3 if head_trains else 2) + fsdp) * 2 * tokens * m.d_model * m.vocab_size
  return step + (0 if plan.cached else prefix), prefix


def check_flops(what: str, flops: float, xla: float) -> None:
  if not abs(flops - xla) <= FLOP_TOLERANCE * xla:
    fail(f"{what}: model FLOPs {flops:.4g} vs XLA's {xla:.4g} (tolerance {FLOP_TOLERANCE:.0%})")


def xla_flops(lowered) -> float:
  analysis = lowered.cost_analysis()
  return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]


# --- One stage's train step. -------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
  """Stage k's jitted train step on a real batch, with its FLOP counts."""
  config: Any
  rack: Any
  labels: Any
  plan: Any
  step: Callable          # jitted (state, example) -> (state, loss); donates `state`
  lowered: Any            # step.lower(state, example)
  state: dict
  example: dict
  flops: float            # model FLOPs per step
  xla_flops: float        # XLA's count (`lowered.cost_analysis()`)
  prefix: Callable | None   # jitted cache build (params, example) -> h; cached stages only
  prefix_flops: float     # forward FLOPs of one batch through the frozen prefix

  @property
  def tokens(self) -> int:
    return self.config.training.batch_size * self.config.training.seq_len


def build_stage(config, k: int) -> Stage:
  """Grows a rack to k stacks the way the trainer does (one stack a stage, or all k in one stage
  with progressive training off) and builds the train step of its last stage."""
  builder = ProgressiveRackBuilder(config)
  new_specs, frozen, stage = grow(builder, k, last_done=False)
  t, mesh = config.training, make_mesh(config)
  rack, labels = builder.build_rack(), builder.labels()
  plan = plan_stage(rack, stage, tuple(s.name for s in new_specs), frozen,
                    t.progressive.cache_activations)
  tx = make_optimizer(t, labels, t.steps_per_stack)
  state = init_train_state(rack.params, tx, plan)
  shardings = tree_shardings(mesh, state, rack.axes())
  state = jax.device_put(state, shardings)
  batch = global_batch(mesh, next(make_dataloader(config).train_iter()))
  example = builder.masking.generate_masks_for_stack(batch, k=new_specs[-1].index, salt=stage)
  prefix = None
  if plan.cached:   # as the trainer feeds it: from the cache, split over the batch
    prefix = jax.jit(functools.partial(prefix_activations, rack, plan.prefix))
    h = prefix(state["params"], example)
    example = {**example, "h": jax.device_put(h, NamedSharding(mesh, batch_spec()))}
  step = make_train_step(rack, plan, tx, labels,
                         shardings=(shardings, replicated(mesh)))
  # XLA's count of the step as traced (before optimization: compiling here would compile twice,
  # and an AOT-compiled step refuses the int4 layouts its own outputs have).
  lowered = step.lower(state, example)
  flops, prefix_flops = model_flops(config, rack, labels, plan, mesh.shape["fsdp"] > 1)
  xla = xla_flops(lowered)
  check_flops(f"stage {stage} ({k} stacks, {plan.activation_mode})", flops, xla)
  return Stage(config, rack, labels, plan, step, lowered, state, example, flops, xla, prefix,
               prefix_flops)


def time_calls(fn, n: int) -> list[float]:
  """Calls fn() once to warm up, then n times; returns those n wall times in seconds."""
  fn()
  times = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def time_stage(stage: Stage, steps: int) -> tuple[list[float], list[float]]:
  """-> (train step times, cache build times per batch: [] unless cached), in seconds. The cache
  build runs first: the steps donate the params it reads."""
  cache = []
  if stage.prefix is not None:
    cache = time_calls(lambda: stage.prefix(stage.rack.params, stage.example).block_until_ready(),
                       steps)
  state = stage.state

  def one_step():
    nonlocal state
    state, metrics = stage.step(state, stage.example)
    jax.block_until_ready((state, metrics))

  return time_calls(one_step, steps), cache


def stage_row(stage: Stage, steps, cache) -> dict:
  step_s = statistics.median(steps)
  return {"activation_mode": stage.plan.activation_mode, "step_ms": 1000 * step_s,
          "spread": spread(steps), "cache_build_ms": median_ms(cache) if cache else None,
          "tokens_per_s": stage.tokens / step_s, "model_gflop": stage.flops / 1e9,
          "xla_gflop": stage.xla_flops / 1e9, "gflop_per_s": stage.flops / step_s / 1e9}


def flag_noise(rows) -> None:
  for row in rows:
    row["noisy"] = row["spread"] > NOISY_SPREAD
    if row["noisy"]:
      print(f"warning: step times spread {row['spread']:.0%} in {row}", file=sys.stderr)


# --- depth: step time of stage k = 1..K --------------------------------------------------------------


def bench_depth(args, s):
  rows = []
  for k in range(1, s["stages"] + 1):   # modes interleaved, so a slow spell hits them alike
    for mode in s["modes"]:
      stage = build_stage(load_config(args.config, [*args.overrides, *MODES[mode]]), k)
      rows.append({"mode": mode, "stage": k, **stage_row(stage, *time_stage(stage, s["steps"]))})
      print(f"  {mode} stage {k}: {rows[-1]['step_ms']:.1f} ms", file=sys.stderr)
  check_positive(rows, "step_ms", "cache_build_ms", "model_gflop")
  flag_noise(rows)
  for row in rows:
    row["step_plus_cache_ms"] = row["step_ms"] + (row["cache_build_ms"] or 0)
  by = lambda mode: [r for r in rows if r["mode"] == mode]
  summary = {"cached_stage_ratio": None}
  for mode in s["modes"]:
    first, last = by(mode)[0], by(mode)[-1]
    summary[f"{mode}_stage_ratio"] = last["step_ms"] / first["step_ms"]
  if "cached" in s["modes"]:
    first, last = by("cached")[0], by("cached")[-1]
    summary["cached_with_cache_build_ratio"] = last["step_plus_cache_ms"] / first["step_plus_cache_ms"]
    summary["goal"] = f"cached stage {s['stages']} step within 15% of stage 1"
    summary["goal_met"] = summary["cached_stage_ratio"] <= 1.15
  columns = [("trunk", "mode", "{}"), ("stage", "stage", "{}"), ("ms/step", "step_ms", "{:.1f}"),
             ("spread", "spread", "{:.0%}"), ("cache build ms/batch", "cache_build_ms", "{:.1f}"),
             ("tokens/s", "tokens_per_s", "{:,.0f}"), ("GFLOP/step", "model_gflop", "{:.1f}"),
             ("XLA GFLOP", "xla_gflop", "{:.1f}"), ("GFLOP/s", "gflop_per_s", "{:.1f}")]
  return columns, rows, summary


# --- mfu: model FLOPs / step time / measured matmul peak -------------------------------------------


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
  rows = []
  for name, fn, inputs, flops in cases:
    grad = jax.jit(jax.grad(fn, argnums=tuple(range(len(inputs)))))
    xla = xla_flops(grad.lower(*inputs))
    check_flops(name, flops, xla)
    times = time_calls(lambda: jax.block_until_ready(grad(*inputs)), steps)
    rows.append({"step": f"{name} (fwd + bwd)", "stacks": None, "step_ms": median_ms(times),
                 "spread": spread(times), "model_gflop": flops / 1e9,
                 "xla_gflop": xla / 1e9,
                 "gflop_per_s": flops / statistics.median(times) / 1e9})
  return rows


def bench_mfu(args, s):
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


# --- memory: peak host RSS (and device memory) per stage, one process per trunk strategy ------------


def rss_mib() -> float | None:
  """Resident set size now, MiB (Linux)."""
  if not os.path.exists("/proc/self/statm"):
    return None
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_worker(config_path, overrides, stages, steps) -> list[dict]:
  """Grows one rack stage by stage with the real trainer; after each stage reads this process's
  peak RSS (ru_maxrss: the peak so far, so the process must be fresh) and the device's peak."""
  config = load_config(config_path, [*overrides, f"training.steps_per_stack={steps}",
                                     "training.eval_every=0", "training.eval_batches=1"])
  trainer = ProgressiveTrainer(config, progress=False, log=lambda _: None)
  builder, loader = ProgressiveRackBuilder(config), make_dataloader(config)
  rows = [{"stage": 0, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_mib": rss_mib()}]   # before training: jax, the corpus, the data pipeline
  for k in range(1, stages + 1):   # a call per stage, so we can measure between stages
    r = trainer.train_progressively(builder, loader, target_stacks=k)["stages"][-1]
    mib = lambda stacks, key: sum(m[key] for name, m in r["memory"].items() if stacks(name)) / 2**20
    trunk = lambda name: name not in r["new_stacks"]
    device = r["peak_memory_bytes"]
    rows.append({
        "stage": k, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_mib": rss_mib(), "device_peak_mib": None if device is None else device / 2**20,
        "step_ms": 1000 * r["step_seconds"], "activation_mode": r["activation_mode"],
        "cache_mib": r["cache_bytes"] / 2**20, "trunk_base_mib": mib(trunk, "base_bytes"),
        "trunk_adapter_mib": mib(trunk, "adapter_bytes"),
        "trunk_optimizer_mib": mib(trunk, "optimizer_bytes"),
        "new_optimizer_mib": mib(lambda name: not trunk(name), "optimizer_bytes")})
  return rows


def in_subprocess(kind: str, params: dict, env: dict | None = None):
  """Runs `python bench.py --worker KIND OUT PARAMS` in a fresh process (its own peak RSS, its
  own XLA flags); returns the rows it wrote to OUT."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "rows.json")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, out,
                    json.dumps(params)], check=True, env={**os.environ, **(env or {})})
    with open(out) as f:
      return json.load(f)


def bench_memory(args, s):
  rows = []
  for mode in s["modes"]:
    for row in in_subprocess("memory", {"config": args.config, "stages": s["stages"],
                                        "steps": s["steps"],
                                        "overrides": [*args.overrides, *MODES[mode]]}):
      rows.append({"trunk": mode, **row})
  check_positive([r for r in rows if r["stage"]], "step_ms", "peak_rss_mib")
  last = {mode: [r for r in rows if r["trunk"] == mode][-1] for mode in s["modes"]}
  summary = {f"{mode}_peak_rss_mib": r["peak_rss_mib"] for mode, r in last.items()}
  summary.update({f"{mode}_trunk_base_mib": r["trunk_base_mib"] for mode, r in last.items()})
  columns = [("trunk", "trunk", "{}"), ("stage", "stage", "{}"),
             ("peak RSS so far MiB", "peak_rss_mib", "{:.0f}"), ("RSS after MiB", "rss_mib", "{:.0f}"),
             ("device peak MiB", "device_peak_mib", "{:.0f}"), ("ms/step", "step_ms", "{:.1f}"),
             ("activations", "activation_mode", "{}"), ("cache MiB", "cache_mib", "{:.1f}"),
             ("trunk base MiB", "trunk_base_mib", "{:.2f}"),
             ("trunk adapters MiB", "trunk_adapter_mib", "{:.2f}"),
             ("trunk optimizer MiB", "trunk_optimizer_mib", "{:.2f}"),
             ("new stack optimizer MiB", "new_optimizer_mib", "{:.2f}")]
  return columns, rows, summary


# --- quality: progressive vs end-to-end at equal training FLOPs ------------------------------------


METHODS = {"cached": "progressive, frozen trunk (cached)",
           "streamed": "progressive, frozen trunk (streamed)",
           "qlora": "progressive, int4 trunk + adapters (qlora)",
           "nvfp4": "progressive, nvfp4 stacks, frozen trunk",
           "end-to-end": "end-to-end: all stacks, one stage"}


def bench_quality(args, s):
  base = load_config(args.config, args.overrides)
  target = base.training.progressive.target_stacks
  # Model FLOPs of every stage each method runs (checked against XLA by build_stage).
  flops = {}
  for mode in s["modes"]:
    config = load_config(args.config, [*args.overrides, *MODES[mode]])
    stages = [target] if mode == "end-to-end" else range(1, target + 1)
    built = [build_stage(config, k) for k in stages]
    flops[mode] = sum(b.flops + (b.prefix_flops if b.plan.cached else 0) for b in built)
  # The budget: the first method with `steps` steps a stage; the others get as many steps a stage
  # as that budget buys them.
  budget = s["steps"] * flops[s["modes"][0]]
  rows = []
  for seed in s["seeds"]:
    for mode in s["modes"]:
      steps = max(round(budget / flops[mode]), 1)
      config = load_config(args.config, [
          *args.overrides, *MODES[mode], f"training.seed={seed}", f"training.steps_per_stack={steps}",
          "training.eval_every=0", f"training.eval_batches={s['eval_batches']}"])
      start = time.perf_counter()
      results = ProgressiveTrainer(config, progress=False, log=lambda _: None).train_progressively(
          ProgressiveRackBuilder(config), make_dataloader(config))
      rows.append({"mode": mode, "method": METHODS[mode], "seed": seed,
                   "stages": len(results["stages"]),
                   "steps_per_stage": steps, "train_tflop": steps * flops[mode] / 1e12,
                   "seconds": time.perf_counter() - start,
                   "eval_loss": results["final_eval_loss"]})
      print(f"  {mode} seed {seed}: eval loss {rows[-1]['eval_loss']:.4f}", file=sys.stderr)
  check_positive(rows, "seconds", "eval_loss", "train_tflop")
  mean = {mode: statistics.mean(r["eval_loss"] for r in rows if r["mode"] == mode)
          for mode in s["modes"]}
  summary = {f"{mode}_eval_loss": loss for mode, loss in mean.items()}
  summary["budget_tflop"] = budget / 1e12
  summary["best"] = min(mean, key=mean.get)
  columns = [("method", "method", "{}"), ("seed", "seed", "{}"), ("stages", "stages", "{}"),
             ("steps/stage", "steps_per_stage", "{}"), ("train TFLOP", "train_tflop", "{:.2f}"),
             ("seconds", "seconds", "{:.0f}"), ("eval loss", "eval_loss", "{:.4f}")]
  return columns, rows, summary


# --- torch: our stage step vs a plain eager PyTorch one -----------------------------------------------


def bench_torch(args, s):
  import torch
  import torch_reference

  threads = len(os.sched_getaffinity(0))   # XLA:CPU uses every core it may run on
  torch.set_num_threads(threads)
  # Where we run on a GPU, so does the reference (a CUDA build of torch needed), in fp32 as ours.
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  rows, max_diff = [], 0.0
  for k in s["depths"]:
    stages = {mode: build_stage(load_config(args.config, [*args.overrides, *MODES[mode]]), k)
              for mode in ("cached", "streamed")}
    ours = stages["streamed"]
    # The reference computes our function: same params, same logits.
    model = torch_reference.Model(ours.config.model, k)
    torch_reference.load_jax_params(model, jax.device_get(ours.rack.params))
    model.to(device)
    tokens = np.asarray(ours.example["inputs"])
    torch_tokens = torch.tensor(tokens, dtype=torch.long, device=device)   # a copy: jax's is read-only
    expected = np.asarray(jax.jit(ours.rack)(ours.rack.params, tokens, ours.example["time_step"]))
    with torch.no_grad():
      got = model(torch_tokens).cpu().numpy()
    max_diff = max(max_diff, float(np.abs(got - expected).max() / np.abs(expected).max()))
    if not max_diff < 1e-3:
      fail(f"the PyTorch reference's logits differ from ours by {max_diff:.2g} (relative)")
    t = ours.config.training
    trainer = torch_reference.StageTrainer(model, t.lr, t.weight_decay, t.grad_clip)
    theirs = time_calls(lambda: trainer.step(torch_tokens), s["steps"])   # .item() syncs
    cached_steps, cache = time_stage(stages["cached"], s["steps"])
    streamed_steps, _ = time_stage(ours, s["steps"])
    torch_ms = median_ms(theirs)
    for name, ms, times in (
        ("ours, cached trunk: step", median_ms(cached_steps), cached_steps),
        ("ours, cached trunk: step + cache build", median_ms(cached_steps) + median_ms(cache),
         cached_steps),
        ("ours, streamed trunk", median_ms(streamed_steps), streamed_steps),
        ("PyTorch eager, trunk under no_grad", torch_ms, theirs)):
      rows.append({"stage": k, "implementation": name, "step_ms": ms, "spread": spread(times),
                   "tokens_per_s": 1000 * ours.tokens / ms, "vs_torch": torch_ms / ms})
  check_positive(rows, "step_ms")
  flag_noise(rows)
  last = [r for r in rows if r["stage"] == s["depths"][-1]]
  summary = {"speedup": last[1]["vs_torch"], "speedup_step_only": last[0]["vs_torch"],
             "speedup_streamed": last[2]["vs_torch"], "stage": s["depths"][-1],
             "torch": torch.__version__, "torch_device": device, "torch_threads": threads,
             "logits_max_relative_difference": max_diff,
             "goal": ">= 3x PyTorch's tokens/s (speedup: our stage, cache build included)",
             "goal_met": last[1]["vs_torch"] >= 3}
  columns = [("stage", "stage", "{}"), ("implementation", "implementation", "{}"),
             ("ms/step", "step_ms", "{:.1f}"), ("spread", "spread", "{:.0%}"),
             ("tokens/s", "tokens_per_s", "{:,.0f}"), ("x PyTorch", "vs_torch", "{:.2f}")]
  return columns, rows, summary


# --- quant: quantization error of the trunk formats on trained stacks --------------------------------

# format -> (precision the stacks are built with, how they are frozen)
FORMATS = {"full": ("full", "freeze_trunk"), "bfloat16": ("bfloat16", "freeze_trunk"),
           "int4 (qwix)": ("full", "freeze_all_but_qlora"), "nvfp4": ("nvfp4", "freeze_trunk")}


def kernels(stack_params) -> dict[str, np.ndarray]:
  """Every attention/FFN kernel of a stack as fp32 [in, out], dequantized from however it is
  stored: a float `kernel`, qwix's int4 `qvalue` x block `scale`, or the packed nvfp4 leaves."""
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


def bench_quant(args, s):
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
  eval_examples = [ProgressiveTrainer.eval_example(builder.masking, b)
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


# --- comm: bytes of collectives per step, data-parallel vs FSDP, from the optimized HLO -------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s4": 0.5,
          "f8e4m3fn": 1}


def collective_bytes(hlo: str) -> dict[str, float]:
  """Sum of the result sizes of each kind of collective in an HLO module: `%x = f32[16,256]{1,0}
  all-reduce(...)`, a tuple `(f32[..], /*index=1*/f32[..]) all-reduce(...)`, or an async pair
  `...-start(` / `...-done(` whose `-done` carries the result."""
  op = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-done)?\(")
  shape = re.compile(r"(\w+)\[([\d,]*)\]")
  totals = dict.fromkeys(COLLECTIVES, 0.0)
  for line in hlo.splitlines():
    match = op.search(line)
    if match is None or " = " not in line:
      continue
    for dtype, dims in shape.findall(line[line.index(" = ") + 3:match.start()]):
      if dtype in _BYTES:
        totals[match.group(1)] += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return totals


# Where params dominate a device's memory: all 8 stacks of a d_model-1024 model train at once, on
# a small batch (FSDP's per-device bytes against data parallelism's).
PARAMS_HEAVY = [*MODES["end-to-end"], "model.d_model=1024", "model.n_blocks_per_stack=1",
                "training.batch_size=8", "training.seq_len=32"]
# FSDP's bytes per device at most this fraction of data parallelism's (PARAMS_HEAVY). Not 1/8:
# XLA:CPU all-reduces every block's gradient whole (no reduce-scatter) and combines those
# all-reduces into one, so a device holds the whole gradient twice at the end of the backward.
FSDP_MAX_DEVICE_FRACTION = 0.5


def comm_worker(config_path, overrides, devices) -> list[dict]:
  """Stage 1 (embedding + first stack train) and stage 2 (cached frozen trunk, the new stack
  trains), and PARAMS_HEAVY's 8 stacks, compiled on a devices x 1 (data-parallel) and a
  1 x devices (FSDP) mesh. Per device: the compiled step's argument and temporary bytes."""
  rows = []
  for name, (data, fsdp) in {"data-parallel": (devices, 1), "fsdp": (1, devices)}.items():
    mesh = [f"mesh.data={data}", f"mesh.fsdp={fsdp}"]
    for case, k, fields in [("stage 1", 1, MODES["cached"]), ("stage 2", 2, MODES["cached"]),
                            ("8 stacks, d_model 1024", 8, PARAMS_HEAVY)]:
      stage = build_stage(load_config(config_path, [*overrides, *fields, *mesh]), k)
      trainable = sum(x.nbytes for x, label in zip(jax.tree.leaves(stage.state["params"]),
                                                   jax.tree.leaves(stage.labels))
                      if label == TRAINABLE)
      compiled = stage.lowered.compile()
      totals = collective_bytes(compiled.as_text())
      memory = compiled.memory_analysis()
      rows.append({"mesh": name, "shape": [data, fsdp], "case": case, "stage": stage.plan.stage,
                   "trainable_bytes": trainable, "total_bytes": sum(totals.values()), **totals,
                   "argument_bytes": memory.argument_size_in_bytes,
                   "temp_bytes": memory.temp_size_in_bytes,
                   "device_bytes": memory.argument_size_in_bytes + memory.temp_size_in_bytes})
      del stage, compiled   # the data-parallel 8 stacks hold ~4 GiB on the forced devices
  return rows


def bench_comm(args, s):
  # The device count is fixed when jax starts: a fresh process gets it.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={s['devices']}"
  rows = in_subprocess("comm", {"config": args.config, "overrides": args.overrides,
                                "devices": s["devices"]}, env={"XLA_FLAGS": flags.strip()})
  # Independent check: data parallelism must all-reduce every trainable gradient once.
  for r in rows:
    if r["mesh"] == "data-parallel" and not r["all-reduce"] >= r["trainable_bytes"]:
      fail(f"all-reduce {r['all-reduce']} B < gradients {r['trainable_bytes']} B in {r}")
  heavy = {r["mesh"]: r["device_bytes"] for r in rows if r["case"] == "8 stacks, d_model 1024"}
  if heavy["fsdp"] > FSDP_MAX_DEVICE_FRACTION * heavy["data-parallel"]:
    fail(f"FSDP holds {heavy['fsdp']} B a device, over {FSDP_MAX_DEVICE_FRACTION} of data "
         f"parallelism's {heavy['data-parallel']} B")
  for r in rows:
    r.update({f"{key}_mib": r[key] / 2**20
              for key in ("trainable_bytes", "total_bytes", *COLLECTIVES, "argument_bytes",
                          "temp_bytes", "device_bytes")})
  summary = {f"{r['mesh']}/{r['case']}": r["total_bytes"] for r in rows}
  summary.update({f"{mesh}/device_bytes": b for mesh, b in heavy.items()})
  summary["fsdp/data-parallel device bytes"] = heavy["fsdp"] / heavy["data-parallel"]
  columns = [("mesh", "mesh", "{}"), ("step", "case", "{}"),
             ("trainable grads MiB", "trainable_bytes_mib", "{:.2f}"),
             ("total MiB", "total_bytes_mib", "{:.2f}"),
             *[(c, f"{c}_mib", "{:.2f}") for c in COLLECTIVES],
             ("args MiB/device", "argument_bytes_mib", "{:.1f}"),
             ("temp MiB/device", "temp_bytes_mib", "{:.1f}"),
             ("args + temp MiB/device", "device_bytes_mib", "{:.1f}")]
  return columns, rows, summary


def run_ours(config_path, overrides, workdir, cache_dir) -> tuple[float, dict]:
  """The train command as a user runs it, in a fresh process -> (wall seconds, results)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["STACKWISE_COMPILATION_CACHE"] = cache_dir
  command = [sys.executable, "-m", "stackwise_jax", "train", "--config", config_path, "--workdir",
             workdir, "--no-progress", *[f"--config.{o}" for o in overrides]]
  start = time.perf_counter()
  proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
  wall = time.perf_counter() - start
  if proc.returncode:
    fail(f"{shlex.join(command)} exited {proc.returncode}: {proc.stderr[-2000:]}")
  with open(os.path.join(workdir, "results.json")) as f:
    return wall, json.load(f)


def run_reference(config, stacks, epochs, directory) -> tuple[float, list[dict]]:
  """scripts/torch_reference.py on the same pool and eval batches as ours, in a fresh process
  that imports only torch (the token arrays are handed to it ready: its data time is not
  counted) -> (wall seconds, its per-stage rows)."""
  loader = make_dataloader(config)
  train = loader.train_iter()
  np.save(os.path.join(directory, "pool.npy"),
          np.stack([next(train)["tokens"] for _ in range(config.training.steps_per_stack)]))
  np.save(os.path.join(directory, "eval.npy"), np.stack(
      [b["tokens"] for b in loader.eval_batches(config.training.eval_batches)]))
  job = {"model": config.model.to_dict(), "training": config.training.to_dict(), "stacks": stacks,
         "epochs": epochs, "pool": os.path.join(directory, "pool.npy"),
         "eval": os.path.join(directory, "eval.npy"), "workdir": directory,
         "out": os.path.join(directory, "reference.json")}
  with open(os.path.join(directory, "job.json"), "w") as f:
    json.dump(job, f)
  command = [sys.executable, os.path.join(REPO, "scripts", "torch_reference.py"),
             os.path.join(directory, "job.json")]
  start = time.perf_counter()
  proc = subprocess.run(command, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if proc.returncode:
    fail(f"{shlex.join(command)} exited {proc.returncode}: {proc.stderr[-2000:]}")
  with open(job["out"]) as f:
    return wall, json.load(f)


def bench_job(args, s):
  """The whole job, every phase included, against the original's way of training."""
  rows = []
  for stacks, steps, epochs in s["grid"]:
    overrides = [*JOB_SIZES, *args.overrides, f"training.steps_per_stack={steps}",
                 f"training.epochs_per_stack={epochs}", f"training.progressive.max_stacks={stacks}",
                 f"training.progressive.target_stacks={stacks}"]
    config = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
      cache = os.path.join(tmp, "xla")   # empty: the first run compiles everything
      ours, results = run_ours(args.config, overrides, os.path.join(tmp, "cold"), cache)
      warm = (run_ours(args.config, overrides, os.path.join(tmp, "warm"), cache)[0]
              if s["warm"] else None)
      theirs, reference = run_reference(config, stacks, epochs, tmp)
    stages = results["stages"]
    phases = {p: sum(st["seconds_by_phase"][p] for st in stages) for p in PHASES}
    rows.append({"cell": f"{stacks}x{steps}x{epochs}", "stacks": stacks, "steps": steps,
                 "epochs": epochs, "ours_s": ours, "ours_warm_s": warm, "reference_s": theirs,
                 "speedup": theirs / ours, "speedup_warm": theirs / warm if warm else None,
                 "outside_stages_s": ours - sum(st["seconds"] for st in stages),
                 **{f"{p}_s": v for p, v in phases.items()},
                 "stage1_s": stages[0]["seconds"], "last_stage_s": stages[-1]["seconds"],
                 "eval_loss": stages[-1]["eval_loss"], "reference_eval_loss": reference[-1]["eval_loss"]})
    print(f"job {rows[-1]['cell']}: ours {ours:.1f} s, reference {theirs:.1f} s", file=sys.stderr)
  check_positive(rows, "ours_s", "reference_s", "ours_warm_s")
  for r in rows:
    if not (np.isfinite(r["eval_loss"]) and np.isfinite(r["reference_eval_loss"])):
      fail(f"a non-finite eval loss in {r}")
  summary = {"job_speedup_min": min(r["speedup"] for r in rows)}
  by_cell = {r["cell"]: r for r in rows}
  if "8x300x3" in by_cell:
    summary["job_speedup_8x300x3"] = by_cell["8x300x3"]["speedup"]
  deepest = max((r for r in rows if r["epochs"] == 3), key=lambda r: (r["stacks"], r["steps"]),
                default=None)
  if deepest is not None:   # the last stage's wall time over the first's, everything included
    summary["depth_growth"] = deepest["last_stage_s"] / deepest["stage1_s"]
    summary["depth_growth_cell"] = deepest["cell"]
  columns = [("cell (stacks x steps x epochs)", "cell", "{}"), ("ours s", "ours_s", "{:.1f}"),
             ("ours, warm cache s", "ours_warm_s", "{:.1f}"), ("reference s", "reference_s", "{:.1f}"),
             ("speedup", "speedup", "{:.2f}"), ("speedup warm", "speedup_warm", "{:.2f}"),
             *[(f"{p} s", f"{p}_s", "{:.1f}") for p in PHASES],
             ("outside stages s", "outside_stages_s", "{:.1f}"), ("stage 1 s", "stage1_s", "{:.1f}"),
             ("last stage s", "last_stage_s", "{:.1f}"), ("eval loss", "eval_loss", "{:.3f}"),
             ("reference eval loss", "reference_eval_loss", "{:.3f}")]
  return columns, rows, summary


BENCHMARKS = {"depth": bench_depth, "mfu": bench_mfu, "memory": bench_memory,
              "quality": bench_quality, "torch": bench_torch, "quant": bench_quant,
              "comm": bench_comm, "job": bench_job}
WORKERS = {"memory": lambda p: memory_worker(p["config"], p["overrides"], p["stages"], p["steps"]),
           "comm": lambda p: comm_worker(p["config"], p["overrides"], p["devices"])}


def main():
  if sys.argv[1:2] == ["--worker"]:   # --worker KIND OUT PARAMS (see in_subprocess)
    kind, out, params = sys.argv[2:5]
    with open(out, "w") as f:
      json.dump(WORKERS[kind](json.loads(params)), f)
    return
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("benchmark", choices=list(BENCHMARKS))
  parser.add_argument("--quick", action="store_true", help="under two minutes on 2 CPU cores")
  parser.add_argument("--out", help="JSON file (default bench_results/BENCHMARK.json); "
                                    "the Markdown table goes next to it as .md")
  parser.add_argument("--config", help="default: the sub-benchmark's (see PRESETS)")
  for name in ("stages", "steps", "devices"):
    parser.add_argument(f"--{name}", type=int)
  for name in ("seeds", "depths"):
    parser.add_argument(f"--{name}", type=int, nargs="+")
  parser.add_argument("--modes", nargs="+", choices=list(MODES))
  parser.add_argument("--cells", nargs="+", metavar="NxSxE",
                      help="job: only these cells, e.g. 4x40x1 8x300x3 (stacks x steps x epochs)")
  parser.add_argument("overrides", nargs="*", help="config overrides, e.g. training.batch_size=8")
  args = parser.parse_args()

  default_config, full, quick = PRESETS[args.benchmark]
  settings = {**full, **(quick if args.quick else {}), "quick": args.quick}
  if args.cells is not None:
    if args.benchmark != "job":
      parser.error(f"--cells applies to job only, not {args.benchmark}")
    try:
      args.grid = [[int(x) for x in cell.split("x")] for cell in args.cells]
    except ValueError:
      parser.error(f"--cells {' '.join(args.cells)}: allowed: cells like 4x40x1")
    if any(len(cell) != 3 or min(cell) < 1 for cell in args.grid):
      parser.error(f"--cells {' '.join(args.cells)}: allowed: three positive ints per cell")
  for name in ("stages", "steps", "devices", "seeds", "depths", "modes", "grid"):
    value = getattr(args, name, None)
    if value is not None:
      if name not in full:
        parser.error(f"--{name} does not apply to {args.benchmark}; it takes {', '.join(full)}")
      settings[name] = value
  args.config = os.path.abspath(args.config or os.path.join(REPO, default_config))
  args.out = args.out or os.path.join(REPO, "bench_results", f"{args.benchmark}.json")
  load_start = os.getloadavg()[0]
  columns, rows, summary = BENCHMARKS[args.benchmark](args, settings)
  write(args, settings, columns, rows, summary, load_start)


if __name__ == "__main__":
  main()

"""FLOPs of a train step: counted from the model config (`model_flops`), checked against XLA's
count of the step (`xla_flops`, `check_flops`)."""
import jax

from stackwise_jax.model.layers import attention_scores
from stackwise_jax.model.lora import is_adapter_path
from stackwise_jax.model.rack import is_causal
from stackwise_jax.progressive.builder import FROZEN

from bench.common import fail

FLOP_TOLERANCE = 0.10   # |model FLOPs - XLA's| / XLA's; XLA also counts norms, softmax, Adam


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
    base_trains = any(label != FROZEN and not is_adapter_path(path) for path, label in
                      jax.tree_util.tree_leaves_with_path(labels["stacks"][spec.name]))
    step += spec.n_blocks * ((3 if base_trains else 2) * dense + 3 * attention + 3 * lora(spec)
                             + fsdp * (dense + attention + lora(spec)))
  e = labels["embed_head"]
  head_trains = (e["embed"]["embedding"] if m.tie_embeddings else e["head"]["kernel"]) != FROZEN
  step += ((3 if head_trains else 2) + fsdp) * 2 * tokens * m.d_model * m.vocab_size
  return step + (0 if plan.cached else prefix), prefix


def check_flops(what: str, flops: float, xla: float | None) -> None:
  if xla is not None and not abs(flops - xla) <= FLOP_TOLERANCE * xla:
    fail(f"{what}: model FLOPs {flops:.4g} vs XLA's {xla:.4g} (tolerance {FLOP_TOLERANCE:.0%})")


def xla_flops(lowered) -> float | None:
  """XLA's FLOP count of a lowered step, or None where the backend gives none before compiling
  (XLA:GPU in jax 0.11: compiling a second time only to count would double a 1B step's compile)."""
  analysis = lowered.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return None if analysis is None else analysis["flops"]

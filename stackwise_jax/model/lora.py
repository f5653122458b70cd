"""Dual LoRA (design §6), on qwix.

The *stack LoRA* is qwix's: a `qwix.LoraProvider` intercepts the `dot_general` of every
attention/FFN `nnx.Linear` and adds `kernel_lora_a`/`kernel_lora_b` next to the kernel, over the
same interception that stores a kernel in a qwix format (int4, `quant/int4.py`). qwix keeps one
adapter per kernel, so the second, *progressive* adapter is a flax `nnx.LoRA` attached to the layer
(`layers.Linear.adapter`).
"""
import dataclasses

from flax import nnx
import jax.numpy as jnp
import qwix

from stackwise_jax.trees import plain_keys

# Kernels that get adapters (and int4): attention and FFN. The time projection keeps its kernel.
ADAPTED_KERNELS = r".*/(attn/(q|k|v|o)|ffn/(gate|up|down))"
# Leaf names of adapter params: qwix's stack LoRA, and nnx.LoRA's inside `adapter`.
_ADAPTER_LEAVES = ("kernel_lora_a", "kernel_lora_b")
_PROGRESSIVE_KEY = "adapter"
RANK_PATTERNS = ("constant", "increasing", "decreasing", "linear")


@dataclasses.dataclass(frozen=True)
class LoraSetting:
  rank: int
  alpha: float

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def by_pattern(base: float, pattern: str, index: int) -> float:
  """Design §6: `increasing` doubles per stack, `decreasing` halves, `linear` adds the base."""
  if pattern == "constant":
    return base
  if pattern == "increasing":
    return base * 2**index
  if pattern == "decreasing":
    return base / 2**index
  if pattern == "linear":
    return base * (index + 1)
  raise ValueError(f"pattern={pattern!r}: allowed: {', '.join(RANK_PATTERNS)}")


def stack_lora_setting(progressive_config, index: int) -> LoraSetting:
  """Rank and alpha of stack `index`'s stack LoRA under `qlora_strategy` (design §6).

  `decreasing` ranks are floored at 1. Raises ValueError naming `qlora_configs` for a stack index
  that `variable` does not list.
  """
  p = progressive_config
  if p.qlora_strategy == "simplified":
    return LoraSetting(p.qlora_rank, float(p.qlora_alpha))
  if p.qlora_strategy == "progressive":
    rank = max(1, int(by_pattern(p.qlora_rank, p.qlora_rank_pattern, index)))
    return LoraSetting(rank, float(by_pattern(p.qlora_alpha, p.qlora_alpha_pattern, index)))
  if index not in p.qlora_configs:
    raise ValueError(
        f"training.progressive.qlora_configs: no entry for stack {index} "
        f"(qlora_strategy='variable' needs one per stack; it has {sorted(p.qlora_configs)})")
  entry = p.qlora_configs[index]
  return LoraSetting(int(entry["rank"]), float(entry["alpha"]))


def is_adapter_path(path) -> bool:
  """Whether a params leaf (its key path) belongs to a stack or progressive adapter."""
  keys = tuple(map(str, plain_keys(path)))
  return keys[-1] in _ADAPTER_LEAVES or _PROGRESSIVE_KEY in keys


# qwix gives every model it quantizes a class of its own (a subclass whose `__call__` its provider
# intercepts), so two stacks quantized alike would have graphdefs that compare unequal: a rack
# rebuilt for compile-ahead (progressive/ahead.py) would key other compiled steps than the run's,
# and stages could not share one. Stacks of one class quantized by one rule share the first such
# class; each still gets its params from its own quantize_model run.
_QUANTIZED_CLASSES = {}


def apply_qwix(stack: nnx.Module, lora: LoraSetting | None, weights: dict, sample_inputs,
               rngs: nnx.Rngs) -> nnx.Module:
  """Returns `stack` with its adapted kernels intercepted by qwix: stored in a qwix format
  (`weights`: `quant.Format.qwix_rule`'s fields, {} for float kernels) and/or given the stack LoRA
  (`lora`). Existing adapter params are kept; new ones start with B = 0. qwix creates adapters in
  the compute dtype; they are kept fp32 (master weights while they train)."""
  rule = dict(module_path=ADAPTED_KERNELS, **weights)
  if lora is not None:
    provider = qwix.LoraProvider(rank=lora.rank, alpha=lora.alpha, **rule)
  else:
    provider = qwix.PtqProvider([qwix.QuantizationRule(**rule)])
  unquantized = getattr(type(stack), "_unquantized_type", type(stack))
  stack = qwix.quantize_model(stack, provider, *sample_inputs, rngs=rngs)
  key = (unquantized, lora, repr(sorted(rule.items())))
  stack.__class__ = _QUANTIZED_CLASSES.setdefault(key, type(stack))
  for _, module in nnx.iter_modules(stack):
    for name in _ADAPTER_LEAVES:
      param = getattr(module, name, None)
      if isinstance(param, nnx.Variable):
        param.set_value(param.get_value().astype(jnp.float32))
  return stack

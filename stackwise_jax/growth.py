"""How a new stack starts (`training.progressive.new_stack_init`, design §10b): one row per method in
`NEW_STACK_INITS`, which `ProgressiveRackBuilder` follows when it adds a stack and config
validation reads for the allowed names and for which methods copy. Its own module, as objectives.py
is, so that config.py reads the table without importing the builder (which imports config).
"""
from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp

from stackwise_jax.model.rack import StackSpec, init_stack, zero_residual_writes


@dataclasses.dataclass(frozen=True)
class NewStackInit:
  """One way a new stack starts.

  Attributes:
    start: (config, the new stack's spec, the float params of the stack it copies or None) -> the
      float params it starts from (plain dicts; the builder's `init_stack` takes them as its
      previous params, so a quantized stack stores them as it would its own), or None: its own
      random init (a function of the seed and its index).
    source: (the trained stacks in forward order, none empty; the new stack's building index;
      where it is added, "append" | "prepend") -> the stack it copies, or None. None: it copies
      no stack.
    copies_trunk: the stack it copies may be trunk already (frozen, perhaps stored quantized),
      not only the one trained last (which is still float when it is copied).
  """
  start: Callable
  source: Callable | None = None
  copies_trunk: bool = False


def _own_init(config, spec: StackSpec, copied):
  return None


def _copy(config, spec: StackSpec, copied):
  """Fresh fp32 buffers of the copied float params (a train step donates the new stack's buffers,
  never its source's); None when there is nothing to copy yet (its own init)."""
  if copied is None:
    return None
  return jax.tree.map(lambda x: jnp.array(x, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating)
                                          else x.dtype), copied)


def _identity(config, spec: StackSpec, copied):
  """Its own init with the residual writes zeroed: the rack's function does not change."""
  _, params = init_stack(config, dataclasses.replace(spec, quantized=False))
  return zero_residual_writes(params)


def _next_to_it(trained: list, index: int, where: str):
  """The trained stack next to where the new one is added."""
  return trained[-1] if where == "append" else trained[0]


def _stacking(trained: list, index: int, where: str):
  """The stack built 2^k places before it, k as large as possible (stack j copies stack
  j - 2^floor(log2 j)), so whenever the rack reaches a power of two stacks its later half began as
  a copy of its earlier half: progressive stacking (Gong et al. 2019), G_stack with growth factor 2
  (Du et al. 2024), one stack a stage."""
  wanted = index - 2 ** (index.bit_length() - 1)
  return next((s for s in trained if s.index == wanted), None)


# In README's order ("How a new stack starts").
NEW_STACK_INITS = {
    "random": NewStackInit(_own_init),
    "copy_last": NewStackInit(_copy, source=_next_to_it),
    "stack": NewStackInit(_copy, source=_stacking, copies_trunk=True),
    "identity": NewStackInit(_identity),
}
# The methods that copy no stack: what a config whose stacks cannot be copied may use.
NOT_COPYING = tuple(name for name, init in NEW_STACK_INITS.items() if init.source is None)

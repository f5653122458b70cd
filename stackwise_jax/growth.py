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
      where it is added, "append" | "prepend"; how many stacks its stage adds, its own included:
      they have consecutive building indices after the trained ones) -> the stack it copies, or
      None. None: it copies no stack.
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


def _next_to_it(trained: list, index: int, where: str, count: int):
  """The trained stack next to where the new ones are added."""
  return trained[-1] if where == "append" else trained[0]


def _in_stage(trained: list, index: int) -> int:
  """The new stack's place among its stage's new stacks (0: the first built)."""
  return index - 1 - max(s.index for s in trained)


def _stacking(trained: list, index: int, where: str, count: int):
  """One new stack a stage: the stack built 2^k places before it, k as large as possible (stack j
  copies stack j - 2^floor(log2 j)), so whenever the rack reaches a power of two stacks its later
  half began as a copy of its earlier half: progressive stacking (Gong et al. 2019), G_stack with
  growth factor 2 (Du et al. 2024). Several new stacks a stage: the trained rack repeated, G_stack's
  stacking operator: the i-th new stack built copies the trained stack built i-th (mod their
  number n), so a stage adding (g - 1) n stacks makes g copies of the trained rack (growth factor
  g: `stacks_per_stage=[1, 3]` grows one trained stack to four equal ones)."""
  if count == 1:
    wanted = index - 2 ** (index.bit_length() - 1)
    return next((s for s in trained if s.index == wanted), None)
  by_index = sorted(trained, key=lambda s: s.index)
  return by_index[_in_stage(trained, index) % len(by_index)]


def _middle(trained: list, index: int, where: str, count: int):
  """The middle of the trained rack (MIDAS's gradual middle stacking, Saunshi et al. 2024), the
  copies placed where the building mode adds stacks. With n trained stacks t_0..t_{n-1} in forward
  order and k new ones: the centred block t_s..t_{s+k-1}, s = (n - k) // 2 (one stack nearer the
  embedding when n - k is odd: one new stack of an even rack copies the lower of its two middle
  stacks); k > n: the trained rack repeated, t_{i mod n}. The copies keep the block's forward
  order: appended, the i-th new stack built copies block[i]; prepended, block[k - 1 - i]."""
  n, i = len(trained), _in_stage(trained, index)
  block = [trained[(max(n - count, 0) // 2 + b) % n] for b in range(count)]
  return block[i if where == "append" else count - 1 - i]


# In README's order ("How a new stack starts").
NEW_STACK_INITS = {
    "random": NewStackInit(_own_init),
    "copy_last": NewStackInit(_copy, source=_next_to_it),
    "stack": NewStackInit(_copy, source=_stacking, copies_trunk=True),
    "midas": NewStackInit(_copy, source=_middle, copies_trunk=True),
    "identity": NewStackInit(_identity),
}
# The methods that copy no stack: what a config whose stacks cannot be copied may use.
NOT_COPYING = tuple(name for name, init in NEW_STACK_INITS.items() if init.source is None)

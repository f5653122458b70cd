"""Stored precisions of a stack's attention/FFN kernels (design §5): one row of `FORMATS` each.

A row is all the rest of the code knows of a format. It enters a stack one of two ways:
- `quantize` (nvfp4): `layers.Linear` computes with `fake_quantize(kernel)` while the stack trains
  and, once it is frozen (`StackSpec.packed`), holds `quantize(kernel)`'s leaves instead of
  `kernel`, computing with `dequantize` of them.
- `qwix_rule` (int4): qwix stores the kernel from the stack's creation (`StackSpec.quantized`) and
  intercepts its matmul; only adapters train.
Sharding (`leaves`' dims), the export (`export_as`), labels and casts (`leaves`' names), the
block checks and the reports read the same row.

To add a stored precision: a module here (its quantize / dequantize), a row below, its tests.
"""
import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from stackwise_jax.quant import int4, nvfp4


@dataclasses.dataclass(frozen=True)
class Format:
  """A stored precision of attention/FFN kernels: one row of `FORMATS`."""
  name: str
  precision: str          # the stack precision (`new_stack_precision`) whose stacks it stores
  compute_dtype: Any      # activations of its stacks
  block: int | str        # values per scale along the contraction axis, or the progressive
                          # config field that sets it
  # Stored leaf (its path under the kernel's layer) -> (dtype, its dims as the kernel's "in" /
  # "out"; None: not split across devices). The dtypes give its bytes (`trees.leaf_bytes`).
  leaves: dict[str, tuple[str, tuple]]
  dequantize: Callable    # ({leaf: array}, dtype) -> kernel [in, out]
  export_as: dict[str, str]   # leaf dtype that safetensors / npz lack -> the dtype written:
                              # integers by value, floats by their bits
  quantize: Callable | None = None        # kernel [in, out] -> {leaf: array}
  fake_quantize: Callable | None = None   # kernel -> dequantize(quantize(kernel)), gradient
                                          # straight through
  qwix_rule: Callable | None = None       # block -> qwix rule fields

  def block_size(self, progressive_config) -> int:
    return self.block if isinstance(self.block, int) else progressive_config[self.block]

  def block_error(self, config, precision: str) -> str | None:
    """Why this format cannot store `config`'s kernels, whose input axes (model.d_model,
    model.d_ff) its blocks must divide; None if it can."""
    m, block = config.model, self.block_size(config.training.progressive)
    if not (m.d_model % block or m.d_ff % block):
      return None
    if isinstance(self.block, str):
      return (f"training.progressive.{self.block}={block}: {self.name} blocks run along the "
              f"kernels' input axis; allowed: a divisor of model.d_model ({m.d_model}) and "
              f"model.d_ff ({m.d_ff})")
    return (f"precision={precision!r} needs model.d_model ({m.d_model}) and model.d_ff "
            f"({m.d_ff}) to be multiples of {block} (the {self.name} block)")


FORMATS = {f.name: f for f in (
    Format(name="int4", precision="qlora", compute_dtype=jnp.bfloat16, block="quant_block_size",
           leaves=int4.LEAVES, dequantize=int4.dequantize_kernel, export_as={"int4": "int8"},
           qwix_rule=int4.qwix_rule),
    Format(name="nvfp4", precision="nvfp4", compute_dtype=jnp.bfloat16, block=nvfp4.BLOCK,
           leaves=nvfp4.LEAVES, dequantize=nvfp4.dequantize_kernel,
           export_as={"float8_e4m3fn": "uint8"}, quantize=nvfp4.quantize_kernel,
           fake_quantize=nvfp4.fake_quantize_kernel),
)}
BY_PRECISION = {f.precision: f for f in FORMATS.values()}
QLORA_TRUNK = FORMATS["int4"]   # design §4: a float trunk under trunk_strategy="qlora" is int4


def stack_format(precision: str, quantized: bool) -> Format | None:
  """The format of a stack's kernels: its precision's, or int4 for a float stack quantized as a
  qlora trunk; None for float kernels."""
  return BY_PRECISION.get(precision) or (QLORA_TRUNK if quantized else None)


def is_stored_leaf(keys) -> bool:
  """Whether a params leaf (its plain keys) is a stored kernel's: never trained, never cast."""
  path = "/".join(map(str, keys))
  return any(path.endswith("/" + leaf) for f in FORMATS.values() for leaf in f.leaves)
